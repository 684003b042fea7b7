"""fp16 packages (the CUDA precision): exported, checked against PyTorch in fp32, and run.

ONNX Runtime's CPU provider runs fp16 graphs through inserted casts, so everything here but the
speed is checked without a GPU; the GPU check script (scripts/gpu_check.py) runs the same on CUDA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import run_cli
from nextoken import Engine, ExportError
from nextoken.exporters import FP16_RTOL, export
from nextoken.tools.memory import plan_memory


@pytest.fixture(scope="module")
def stories_fp16(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "pkg"
    result = run_cli("export", str(stories_dir), "-o", str(out), "--dtype", "fp16")
    assert result.returncode == 0, result.stderr
    return out, result.stderr


def test_fp16_package_records_its_precision(stories_fp16):
    out, log = stories_fp16
    manifest = json.loads((out / "nextoken.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["kv_dtype"] == "float16"
    assert "parity over" in log and "(on cpu)" in log
    diff = float(log.split("max |Δ logits| = ")[1].split()[0])
    assert 0 < diff < FP16_RTOL * 20  # stories260k's logits reach ~20
    assert run_cli("info", str(out), "--verify").returncode == 0


def test_fp16_greedy_equals_fp32_on_stories260k(stories_fp16, stories_engine):
    """Real weights have decisive logits: fp16 rounding does not flip a greedy choice in 200 tokens."""
    with Engine(stories_fp16[0], device="cpu") as half:
        got = half.generate("Once upon a time", max_new_tokens=200)
        want = stories_engine.generate("Once upon a time", max_new_tokens=200)
        assert got.token_ids == want.token_ids
        assert got.usage.kv_cache_bytes * 2 == want.usage.kv_cache_bytes  # the cache is half the size
        logits = half.forward(half.encode("Once upon a time"))
        assert logits.dtype == np.float32  # sampling always sees fp32
        batch = half.generate(["Once upon a time", "The cat"], max_new_tokens=16)
        assert batch[0].token_ids == got.token_ids[:16]


def test_memory_plan_of_an_fp16_package(stories_fp16, stories_package):
    half = plan_memory(stories_fp16[0], batch=8, context=512)
    full = plan_memory(stories_package, batch=8, context=512)
    assert half.dtype == "fp16" and half.kv_cache_bytes * 2 == full.kv_cache_bytes


def test_export_options_that_cannot_work_are_refused(tiny_llama, tmp_path):
    with pytest.raises(ExportError, match="export dtype 'bf16' is not supported; use fp32 or fp16"):
        export(tiny_llama[0], tmp_path / "a", dtype="bf16", progress=None)
    with pytest.raises(ExportError, match="starts from fp32 weights; drop --dtype fp16"):
        export(tiny_llama[0], tmp_path / "b", dtype="fp16", quantize="int8", progress=None)
    with pytest.raises(ExportError, match="export device 'tpu' is not known"):
        export(tiny_llama[0], tmp_path / "c", device="tpu", progress=None)
    import torch

    if not torch.cuda.is_available():
        result = run_cli("export", str(tiny_llama[0]), "-o", str(tmp_path / "d"), "--device", "cuda")
        assert result.returncode == 1
        assert "export on cuda needs a CUDA build of PyTorch and a GPU" in result.stderr
        assert "Traceback" not in result.stderr


def test_continuous_batching_over_an_fp16_cache(stories_fp16):
    """Joins and leaves pad and cut the fp16 cache on its device; each request gets its tokens alone."""
    from nextoken import Scheduler

    prompts = ["Once upon a time", "The little dog", "Lily and Ben went to the park to play"]
    with Engine(stories_fp16[0], device="cpu", plugins=False) as engine:
        alone = [engine.generate(p, max_new_tokens=24 + 8 * i).token_ids for i, p in enumerate(prompts)]
        scheduler = Scheduler(engine, max_batch=4)
        handles = [scheduler.submit(prompts[0], max_new_tokens=24)]
        for _ in range(3):
            scheduler.step()
        handles += [scheduler.submit(p, max_new_tokens=24 + 8 * i) for i, p in enumerate(prompts) if i]
        while scheduler.step():
            pass
        assert [h.result().token_ids for h in handles] == alone
