"""Execution provider choice: CUDA only when it really works; one clean line; no ONNX Runtime spam."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nextoken import DeviceError, resolve_device
from nextoken.device import cuda_status, session_options


def test_cpu_is_always_there():
    choice = resolve_device("cpu")
    assert choice.device == "cpu" and choice.provider == "CPUExecutionProvider"
    assert choice.describe() == "device cpu (CPUExecutionProvider): requested"


def test_auto_picks_cuda_only_when_usable():
    usable, why = cuda_status()
    choice = resolve_device("auto")
    assert choice.device == ("cuda" if usable else "cpu")
    assert why in choice.describe()


def test_explicit_cuda_on_a_host_without_it_is_a_clear_error():
    if cuda_status()[0]:
        pytest.skip("CUDA is usable on this host")
    with pytest.raises(DeviceError, match="use device='cpu' or 'auto'"):
        resolve_device("cuda")


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", ""])
def test_invalid_device_names(bad):
    if bad == "":
        assert resolve_device(bad).device in ("cpu", "cuda")   # empty means auto
        return
    with pytest.raises(DeviceError, match="not valid"):
        resolve_device(bad)


def test_probe_is_silent(tiny_llama):
    """Loading with device auto prints nothing: no ONNX Runtime error about missing CUDA libraries."""
    code = f"import nextoken; e = nextoken.Engine({str(tiny_llama[1])!r}); print(e.device.device)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() in ("cpu", "cuda")


def test_spinning_and_threads_are_set():
    off = session_options(threads=2, spin=False)
    on = session_options(spin=True)
    assert off.intra_op_num_threads == 2
    assert off.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert on.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with pytest.raises(ValueError):
        session_options(threads=-1)


def test_engine_spin_default_comes_from_the_environment(tiny_llama, monkeypatch):
    from nextoken import Engine

    monkeypatch.setenv("NEXTOKEN_SPIN", "1")
    with Engine(tiny_llama[1], device="cpu", threads=1) as engine:
        assert engine.spin is True
    monkeypatch.delenv("NEXTOKEN_SPIN")
    with Engine(tiny_llama[1], device="cpu") as engine:
        assert engine.spin is False


def test_small_models_default_to_one_thread(tiny_llama):
    from nextoken import Engine

    with Engine(tiny_llama[1], device="cpu") as engine:
        assert engine.threads == 1
        assert engine.session.get_session_options().intra_op_num_threads == 1
    with Engine(tiny_llama[1], device="cpu", threads=2) as engine:
        assert engine.threads == 2
