"""Choosing the execution provider: CUDA when it really works on this host, else CPU.

onnxruntime-gpu lists ``CUDAExecutionProvider`` as available even where the CUDA libraries or a
GPU are missing, and then logs a loud error when a session asks for it. So "available" is not
trusted: a one-node session is built with ONNX Runtime's logging silenced, and CUDA counts as
usable only if that session really runs on it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnxruntime as ort

from .errors import DeviceError

if TYPE_CHECKING:
    from .manifest import Manifest

__all__ = [
    "SMALL_MODEL_BYTES",
    "DeviceChoice",
    "cuda_status",
    "default_threads",
    "device_notes",
    "resolve_device",
    "session_options",
]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class DeviceChoice:
    """Where a model runs: ``device`` ("cpu" or "cuda"), the ONNX Runtime providers to ask for, and why."""

    device: str
    providers: tuple
    reason: str

    @property
    def provider(self) -> str:
        first = self.providers[0]
        return first[0] if isinstance(first, tuple) else first

    def describe(self) -> str:
        """One line for people: which device, which provider, why."""
        return f"device {self.device} ({self.provider}): {self.reason}"


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _nvidia_library_dirs() -> list[str]:
    """Library folders of the ``nvidia-*`` wheels (``nvidia/cu13/lib``, ``nvidia/cudnn/lib``, ...)
    wherever they are on ``sys.path``, not only beside onnxruntime (a venv with system site packages,
    a ``--user`` install, an overlay that adds onnxruntime-gpu to an image holding the CUDA wheels)."""
    import sys
    from pathlib import Path

    found: list[str] = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            found += sorted(str(d) for d in root.glob("*/lib") if d.is_dir() and str(d) not in found)
    return found


def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the ``nvidia-*`` wheels (the ``cuda`` extra) so the CUDA
    provider finds them without LD_LIBRARY_PATH; quietly, since the probe reports what is missing.

    ONNX Runtime's own ``preload_dlls`` looks only in the site folder that holds onnxruntime; the
    wheels may sit in another one on ``sys.path``, so each of their library folders is tried too
    (cuBLAS before cuDNN: ONNX Runtime's list loads each library after those it needs)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for directory in (None, *_nvidia_library_dirs()):
            try:
                preload(directory=directory)
            except Exception:  # a missing library shows in the probe below, with its reason
                pass


def _why_cuda_provider_fails() -> str:
    """Why CUDA cannot run, for people: no driver; or the library the CUDA provider cannot load (the
    dynamic loader names it) and how to install it; or, when everything loads, a hint about the GPU."""
    import ctypes
    import sys
    from pathlib import Path

    if not sys.platform.startswith("linux"):  # the names below are Linux's
        return "CUDA libraries or GPU not usable on this host"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA GPU driver on this host (libcuda.so.1 not found)"
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.is_file():
        return "CUDA libraries or GPU not usable on this host"
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        detail = str(exc).replace(f"{library}: ", "")
        try:
            from onnxruntime.capi.build_and_package_info import cuda_version

            cuda = f"CUDA {cuda_version.split('.')[0]}"
        except ImportError:
            cuda = "the CUDA version this onnxruntime-gpu was built for"
        if "undefined symbol" in detail:  # libcuda.so.1 loads but lacks what this CUDA calls
            return f"the NVIDIA driver is older than {cuda} needs ({detail}); update the driver"
        return (
            f"the CUDA provider cannot load its libraries ({detail}); install them with "
            f"pip install 'nextoken[cuda]', or put {cuda} and cuDNN 9 on LD_LIBRARY_PATH"
        )
    return "the CUDA libraries load but no usable GPU answered (check nvidia-smi and CUDA_VISIBLE_DEVICES)"


@functools.lru_cache(maxsize=8)
def cuda_status(device_id: int = 0) -> tuple[bool, str]:
    """(usable, why) for CUDA device ``device_id``; probed once per process, silently."""
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider (install onnxruntime-gpu on a CUDA host)"
    _preload_cuda_libraries()
    options = ort.SessionOptions()
    options.log_severity_level = 4
    previous = 2
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(_probe_model(), options, providers=[(CUDA, {"device_id": str(device_id)}), CPU])
        used = session.get_providers()
    except Exception as exc:  # any failure to build the probe means: not usable
        return False, f"CUDA provider failed to start ({str(exc).splitlines()[0][:160]})"
    finally:
        ort.set_default_logger_severity(previous)
    if CUDA not in used:
        return False, _why_cuda_provider_fails()
    return True, f"CUDA device {device_id} is usable"


def resolve_device(device: str = "auto", tf32: bool | None = None) -> DeviceChoice:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a :class:`DeviceChoice`.

    ``auto`` takes CUDA when it really works and says why not otherwise; an explicit ``cuda``
    that cannot work raises :class:`DeviceError` instead of silently running on the CPU.

    ``tf32``: let CUDA run fp32 matrix products in TensorFloat-32 (10-bit mantissa) on Ampere and
    newer GPUs. ONNX Runtime does by default; nextoken does not (None: the NEXTOKEN_TF32
    environment variable, off when unset), so an fp32 package computes in fp32 on every device and
    its greedy tokens match the CPU's and the PyTorch reference. fp16 packages are unaffected.
    """
    name = (device or "auto").strip().lower()
    if name == "cpu":
        return DeviceChoice("cpu", (CPU,), "requested")
    if name == "auto" or name == "cuda" or name.startswith("cuda:"):
        device_id = 0
        if name.startswith("cuda:"):
            try:
                device_id = int(name.split(":", 1)[1])
            except ValueError:
                raise DeviceError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N") from None
        usable, why = cuda_status(device_id)
        if usable:
            use_tf32 = _env_flag("NEXTOKEN_TF32") if tf32 is None else bool(tf32)
            providers = ((CUDA, {"device_id": str(device_id), "use_tf32": "1" if use_tf32 else "0"}), CPU)
            return DeviceChoice("cuda", providers, "requested" if name != "auto" else why)
        if name == "auto":
            return DeviceChoice("cpu", (CPU,), why)
        raise DeviceError(f"device {device!r} requested but {why}; use device='cpu' or 'auto'")
    raise DeviceError(f"device {device!r} is not valid; use auto, cpu, cuda or cuda:N")


def session_options(threads: int | None = None, spin: bool = False) -> ort.SessionOptions:
    """ONNX Runtime session options for nextoken.

    ``threads``: intra-op threads (None: ONNX Runtime's default, one per physical core).
    ``spin``: let idle worker threads busy-wait between the ops of a step (and stop as soon as the
    step returns, so an idle engine burns nothing). It lowers per-op latency on a quiet host (+26%
    to +45% decode speed at batch 1 on a 2-core machine) and costs up to a third when the cores are
    shared with other work; :func:`spin_policy` chooses it by the host's load unless told.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.inter_op_num_threads = 1  # nodes run one after another (sequential mode): no inter-op pool
    if threads is not None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0 (0: ONNX Runtime's default), not {threads}")
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def spin_policy(threads: int | None = None) -> tuple[bool, str]:
    """(spin, why): NEXTOKEN_SPIN when it is set (1/true/yes or 0/false/no); else on when the
    host's other work leaves the ``threads`` intra-op threads their cores (the 1-minute load
    average, or the tasks runnable right now when more, plus ``threads`` within the usable cores,
    half a core of slack), off when it does not:
    spinning wins on a quiet host and loses on a busy one. Decided once, when an engine starts."""
    raw = os.environ.get("NEXTOKEN_SPIN", "").strip().lower()
    if raw:
        return _env_flag("NEXTOKEN_SPIN"), f"NEXTOKEN_SPIN={raw}"
    cores = _usable_cores()
    want = threads or cores
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return False, "no load average on this host"
    load = max(load, _running_now())
    quiet = load + want <= cores + 0.5
    return quiet, f"load {load:.2f} with {want} threads on {cores} cores: {'quiet' if quiet else 'busy'}"


def _running_now() -> float:
    """Other tasks runnable at this instant (Linux's /proc/loadavg, less this reader): the 1-minute
    average lags a burst of work that began seconds ago. 0 where the host does not say."""
    try:
        with open("/proc/loadavg") as fh:
            return max(0.0, float(fh.read().split()[3].split("/")[0]) - 1)
    except (OSError, ValueError, IndexError):
        return 0.0


#: Op types whose work grows with the model (a CUDA session should not leave them on the CPU).
COMPUTE_OPS = frozenset(
    {
        "MatMul",
        "Gemm",
        "MatMulNBits",
        "MatMulInteger",
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "Conv",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "Softmax",
        "RotaryEmbedding",
        "GatherBlockQuantized",
        "FastGelu",
        "Gelu",
    }
)


def heavy_on_cpu(session: ort.InferenceSession) -> list[tuple[str, str]]:
    """(node, op type) of the compute nodes assigned to the CPU in a session that records its graph
    assignment (``session.record_ep_graph_assignment_info``); [] where it does not."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except Exception:
        return []
    return [
        (n.name, n.op_type)
        for sub in subgraphs
        if sub.ep_name == "CPUExecutionProvider"
        for n in sub.get_nodes()
        if n.op_type in COMPUTE_OPS
    ]


#: Below this many bytes of weights a CPU session runs on one intra-op thread by default: a small
#: model's step is many tiny ops, and waking a thread pool for each costs more than it saves
#: (stories260k, 1.3 MB: 0.38 ms a decode step on 1 thread, 0.57 ms on 2; a 135M-parameter model,
#: 622 MB: 34 ms on 1 thread, 29 ms on 2).
SMALL_MODEL_BYTES = 16 << 20


def default_threads(device: str, weights_bytes: int) -> int | None:
    """Intra-op threads when none are asked for: one for a model under :data:`SMALL_MODEL_BYTES` on the
    CPU, else None (onnxruntime's default, one per physical core)."""
    return 1 if device == "cpu" and weights_bytes < SMALL_MODEL_BYTES else None


def device_notes(device: str, manifest: "Manifest") -> list[str]:
    """What the user should know about running ``manifest`` 's package on ``device`` (logged as
    warnings when an engine starts)."""
    notes = []
    if device == "cuda" and manifest.padding_side == "right" and manifest.kv_dtype == "float32":
        notes.append(
            "onnxruntime runs GroupQueryAttention on CUDA in fp16/bf16 only, so this fp32 package's "
            "attention runs on the CPU, with copies each step; export it with --dtype fp16 for a GPU"
        )
    return notes
