"""CUDA: device memory through the driver (NVML), and the engine on a GPU.

The NVML tests run everywhere, on a stand-in for the driver's library. The tests marked ``cuda``
run only where ONNX Runtime's CUDA provider really works (a GPU host with onnxruntime-gpu and the
CUDA libraries); elsewhere they skip with the reason the probe gave.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nextoken import Engine, probes
from nextoken.device import cuda_status
from nextoken.tools import memory

CUDA_OK, CUDA_WHY = cuda_status(0)
needs_cuda = pytest.mark.skipif(not CUDA_OK, reason=f"no usable CUDA here: {CUDA_WHY}")

GiB = 1 << 30
REPO = Path(__file__).resolve().parent.parent


class FakeNVML:
    """Answers like libnvidia-ml for one 80 GiB GPU on which this process holds 3 GiB."""

    def __init__(self, processes=True):
        self.processes = processes

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle_ref):
        return 0 if index.value == 0 else 2  # NVML_ERROR_INVALID_ARGUMENT

    def nvmlDeviceGetMemoryInfo(self, handle, mem_ref):
        mem = mem_ref._obj
        mem.total, mem.free, mem.used = 80 * GiB, 60 * GiB, 20 * GiB
        return 0

    def nvmlDeviceGetName(self, handle, buf, size):
        buf.value = b"NVIDIA Test GPU"
        return 0

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle, count_ref, infos):
        if not self.processes:
            return 3  # NVML_ERROR_NOT_SUPPORTED
        infos[0].pid, infos[0].usedGpuMemory = os.getpid() + 1, 17 * GiB
        infos[1].pid, infos[1].usedGpuMemory = os.getpid(), 3 * GiB
        count_ref._obj.value = 2
        return 0


@pytest.fixture()
def fake_gpu(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setattr(probes, "_nvml", lambda: fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_gpu_memory_reads_free_total_and_this_process(fake_gpu):
    gpu = memory.gpu_memory(0)
    assert (gpu.name, gpu.total, gpu.free, gpu.used, gpu.process) == (
        "NVIDIA Test GPU",
        80 * GiB,
        60 * GiB,
        20 * GiB,
        3 * GiB,
    )
    assert memory.gpu_memory(1) is None  # no such device
    fake_gpu.processes = False
    assert memory.gpu_memory(0).process is None


def test_cuda_visible_devices_renumbers(fake_gpu, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,0")
    assert memory.gpu_memory(0) is None  # CUDA's 0 is the driver's 3
    assert memory.gpu_memory(1).free == 60 * GiB


def test_planner_takes_the_free_gpu_memory_as_capacity(fake_gpu, stories_package):
    plan = memory.plan_memory(stories_package, batch=8, context=256, device="cuda")
    assert plan.capacity_bytes == 60 * GiB and plan.fits
    assert plan.capacity_source == "free on cuda:0 (NVIDIA Test GPU)"
    assert "free on cuda:0" in plan.table()
    given = memory.plan_memory(stories_package, batch=8, context=256, device="cuda:0", capacity=GiB)
    assert given.capacity_source == "given" and given.capacity_bytes == GiB


def test_planner_without_a_driver_says_so(monkeypatch, stories_package):
    monkeypatch.setattr(probes, "_nvml", lambda: None)
    plan = memory.plan_memory(stories_package, batch=1, context=64, device="cuda")
    assert plan.capacity_bytes is None and plan.fits is None
    assert plan.capacity_source == "unknown: no NVIDIA driver answers for cuda:0"


# -- on a GPU ----------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_greedy_equals_cpu_on_stories260k(stories_package, stories_engine):
    with Engine(stories_package, device="cuda") as gpu:
        assert gpu.device.device == "cuda" and gpu.device.provider == "CUDAExecutionProvider"
        got = gpu.generate("Once upon a time", max_new_tokens=128)
        assert got.token_ids == stories_engine.generate("Once upon a time", max_new_tokens=128).token_ids
        assert got.usage.device == "cuda" and got.usage.device_memory_bytes
        batch = gpu.generate(["Once upon a time", "The dog"], max_new_tokens=32)
        assert batch[0].token_ids == got.token_ids[:32]


@needs_cuda
def test_cuda_cache_stays_on_the_device(stories_package):
    with Engine(stories_package, device="cuda") as gpu:
        runner = gpu.runner
        cache = runner.new_cache(1)
        ids = np.asarray([gpu.encode("Once upon a time")])
        logits = runner.prefill(cache, ids, np.ones_like(ids), np.arange(ids.shape[1])[None, :])
        assert logits.shape == (1, gpu.manifest.vocab_size)
        assert all(v.device_name().lower() == "cuda" for v in cache.values)


# -- the GPU check script ------------------------------------------------------------------------------


def _gpu_check(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


def test_gpu_check_script_runs_its_whole_path_on_the_cpu(stories_dir, tmp_path):
    """The script a lent GPU machine runs: the same path on the CPU, so it cannot rot between GPU runs."""
    out = tmp_path / "check.json"
    done = _gpu_check(
        "--device",
        "cpu",
        "--quick",
        "--stories",
        str(stories_dir),
        "--work",
        str(tmp_path / "w"),
        "--json",
        str(out),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert [r["package"] for r in report["parity"]] == ["stories260k-fp32", "stories260k-fp16"]
    assert all(r["batch_row_equals_alone"] for r in report["parity"])
    assert report["parity"][0]["identical_to_cpu_fp32"] and report["parity"][0]["max_abs_logit_diff_vs_cpu_fp32"] == 0
    assert [r["batch"] for r in report["bench"]] == [1, 2] and all(r["decode_tok_s"] > 0 for r in report["bench"])
    assert report["scheduler"] == [
        {"package": "stories260k-fp32", "device": "cpu", "kv_backend": "slots", "identical": 4, "requests": 4}
    ]
    assert report["finished"] is True
    assert "| nextoken | stories260k-fp32 | 1 |" in done.stdout


@pytest.mark.skipif(CUDA_OK, reason="this host has CUDA")
def test_gpu_check_script_says_when_cuda_is_not_usable(tmp_path):
    done = _gpu_check("--quick", tmp_path=tmp_path)
    assert done.returncode == 2 and "CUDA: " in done.stdout and "Traceback" not in done.stderr


def test_an_fp32_fused_package_on_cuda_is_told_to_export_fp16(tiny_llama, optimum_llama):
    """onnxruntime's CUDA GroupQueryAttention is fp16/bf16 only: an fp32 fused package would run its
    attention on the CPU; the engine says so when it starts on CUDA (and says nothing elsewhere)."""
    from nextoken.device import device_notes
    from nextoken.manifest import Manifest

    fused = Manifest.load(tiny_llama[1])
    (note,) = device_notes("cuda", fused)
    assert "fp16/bf16 only" in note and "--dtype fp16" in note
    assert device_notes("cpu", fused) == []
    assert device_notes("cuda", Manifest.load(optimum_llama[1])) == []
    assert device_notes("cuda", dataclasses.replace(fused, kv_dtype="float16")) == []
