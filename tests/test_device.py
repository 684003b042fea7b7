"""Execution provider choice: CUDA only when it really works; one clean line; no ONNX Runtime spam."""

from __future__ import annotations

import os
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
        assert resolve_device(bad).device in ("cpu", "cuda")  # empty means auto
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
    assert on.get_session_config_entry("session.force_spinning_stop") == "1"  # not between steps
    with pytest.raises(ValueError):
        session_options(threads=-1)


def test_engine_spin_default_comes_from_the_environment_then_the_load(tiny_llama, monkeypatch):
    from nextoken import Engine, device

    monkeypatch.setenv("NEXTOKEN_SPIN", "1")
    with Engine(tiny_llama[1], device="cpu", threads=1) as engine:
        assert engine.spin is True and engine.spin_reason == "NEXTOKEN_SPIN=1"
    monkeypatch.setenv("NEXTOKEN_SPIN", "0")
    with Engine(tiny_llama[1], device="cpu", threads=1) as engine:
        assert engine.spin is False
    monkeypatch.delenv("NEXTOKEN_SPIN")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setattr(device, "_running_now", lambda: 0.0)
    for load, want in ((0.2, True), (1.5, False)):  # 2 threads on 2 cores: quiet, then busy
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        with Engine(tiny_llama[1], device="cpu", threads=2) as engine:
            assert engine.spin is want
            assert engine.spin_reason == f"load {load:.2f} with 2 threads on 2 cores: {'quiet' if want else 'busy'}"
            assert engine.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == (
                "1" if want else "0"
            )
    monkeypatch.setattr(device, "_running_now", lambda: 2.0)  # a burst the 1-minute average has not seen yet
    with Engine(tiny_llama[1], device="cpu", threads=2) as engine:
        assert engine.spin is False and engine.spin_reason == "load 2.00 with 2 threads on 2 cores: busy"
    with Engine(tiny_llama[1], device="cpu", spin=False) as engine:
        assert engine.spin is False and engine.spin_reason == "given"


def test_small_models_default_to_one_thread(tiny_llama):
    from nextoken import Engine

    with Engine(tiny_llama[1], device="cpu") as engine:
        assert engine.threads == 1
        assert engine.session.get_session_options().intra_op_num_threads == 1
    with Engine(tiny_llama[1], device="cpu", threads=2) as engine:
        assert engine.threads == 2


def test_without_cuda_the_reason_names_what_is_missing():
    """The probe's one line says which library (or driver) is missing, not just 'not usable'."""
    usable, why = cuda_status()
    if usable:
        pytest.skip("CUDA is usable on this host")
    if "no CUDA provider" in why:  # an onnxruntime build without CUDA: nothing to load
        return
    assert ".so" in why or "GPU" in why, why
    if "cannot load its libraries" in why:
        assert "nextoken[cuda]" in why and "LD_LIBRARY_PATH" in why


def test_cuda_wheels_are_found_on_any_site_folder(tmp_path, monkeypatch, capsys):
    """The nvidia-* wheels may sit in another site folder than onnxruntime (an overlay, --user, a venv
    with system site packages): each of their library folders is handed to ONNX Runtime's preloader."""
    from nextoken import device

    other_site = tmp_path / "site"
    for sub in ("cu13", "cudnn"):
        (other_site / "nvidia" / sub / "lib").mkdir(parents=True)
    (other_site / "nvidia" / "README").write_text("not a library folder")
    monkeypatch.setattr(sys, "path", [*sys.path, str(other_site)])
    assert device._nvidia_library_dirs()[-2:] == [
        str(other_site / "nvidia" / "cu13" / "lib"),
        str(other_site / "nvidia" / "cudnn" / "lib"),
    ]
    calls = []

    def preload(directory=None):
        calls.append(directory)
        if directory is None:
            raise RuntimeError("the default search failed")  # tolerated: the probe reports it
        print("noise that must not reach the user")

    monkeypatch.setattr(device.ort, "preload_dlls", preload, raising=False)
    device._preload_cuda_libraries()
    assert calls[0] is None and calls[-2:] == [
        str(other_site / "nvidia" / "cu13" / "lib"),
        str(other_site / "nvidia" / "cudnn" / "lib"),
    ]
    assert capsys.readouterr() == ("", "")


def test_cuda_keeps_fp32_in_fp32_unless_tf32_is_asked_for(monkeypatch):
    """ONNX Runtime runs fp32 products in TF32 on Ampere+ by default; nextoken asks for fp32."""
    from nextoken import device

    monkeypatch.setattr(device, "cuda_status", lambda device_id=0: (True, f"CUDA device {device_id} is usable"))
    monkeypatch.delenv("NEXTOKEN_TF32", raising=False)
    options = lambda choice: dict(choice.providers[0][1])  # noqa: E731
    assert options(device.resolve_device("cuda:1")) == {"device_id": "1", "use_tf32": "0"}
    assert options(device.resolve_device("cuda", tf32=True))["use_tf32"] == "1"
    monkeypatch.setenv("NEXTOKEN_TF32", "1")
    assert options(device.resolve_device("auto"))["use_tf32"] == "1"
    assert options(device.resolve_device("auto", tf32=False))["use_tf32"] == "0"
    assert device.resolve_device("cpu", tf32=True).providers == ("CPUExecutionProvider",)


def test_with_a_driver_but_no_cuda_libraries_the_reason_says_what_to_install(tmp_path):
    """A stand-in libcuda.so.1 (a driver without the CUDA wheels): the line names the library the
    CUDA provider could not load and the extra that installs it."""
    import shutil

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or cuda_status()[0]:
        pytest.skip("needs a C compiler to build the stand-in driver, on a host without CUDA")
    source = tmp_path / "driver.c"
    source.write_text("int cuInit(unsigned int flags) { return 100; }\n")
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), str(source)], check=True)
    code = "from nextoken.device import cuda_status; print(cuda_status()[1])"
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    why = done.stdout.strip()
    if "cannot load its libraries" in why:
        assert ".so" in why and "nextoken[cuda]" in why
    else:  # the CUDA wheels are installed here: the stand-in lacks what CUDA calls
        assert "driver is older" in why, why


def test_cli_runtime_options_reach_the_engine_and_the_server(monkeypatch):
    """--spin and --tf32 are runtime options of every command that loads a model, serve included."""
    from nextoken import cli, engine
    from nextoken.cli.common import open_engine
    from nextoken.serving import server

    engines, serves = [], []
    monkeypatch.setattr(engine, "Engine", lambda *a, **k: engines.append(k))
    open_engine(cli._parser().parse_args(["generate", "pkg", "hi", "--tf32", "--spin"]))
    open_engine(cli._parser().parse_args(["generate", "pkg", "hi"]))
    assert [(k["tf32"], k["spin"]) for k in engines] == [(True, True), (None, None)]  # None: the environment's
    monkeypatch.setattr(server, "serve", lambda *a, **k: serves.append(k))
    assert cli.main(["serve", "pkg", "--no-tf32", "--spin"]) == 0
    assert (serves[0]["engine_options"]["tf32"], serves[0]["engine_options"]["spin"]) == (False, True)
