"""What the process and its GPU hold now, read from the OS and the driver: resident memory and its
peak (/proc), and a CUDA device's memory (NVML). The runtime samples these around requests; the
planner (:mod:`nextoken.tools.memory`) uses them to check its figures."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import threading
import time
from dataclasses import dataclass

__all__ = [
    "GPUMemory",
    "MemorySampler",
    "gpu_memory",
    "peak_rss_bytes",
    "release_free_heap",
    "reset_peak_rss",
    "rss_bytes",
]


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``).

    Loading a session parses the graph and optimises it; the transient buffers are freed but glibc
    may keep them mapped, so a process's resident memory after loading the same model varied by
    ~190 MB between runs (135M-parameter model). Trimming once after loading makes it repeatable.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``Field:  N kB`` line of a /proc file, in bytes (None where there is no such file or line)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def meminfo_bytes(field: str) -> int | None:
    """A field of /proc/meminfo (``MemTotal``, ``MemAvailable``) in bytes (Linux), else None."""
    return _proc_bytes("/proc/meminfo", field)


def _status(field: str) -> int | None:
    return _proc_bytes("/proc/self/status", field)


def rss_bytes() -> int | None:
    """The process's resident memory now (Linux), else None."""
    return _status("VmRSS")


def reset_peak_rss() -> bool:
    """Start a new peak-resident-memory window (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory since the last :func:`reset_peak_rss` (Linux), else the
    lifetime peak from ``getrusage``, else None."""
    peak = _status("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    except Exception:
        return None


@dataclass(frozen=True)
class GPUMemory:
    """A CUDA device's memory as its driver reports it (NVML), in bytes."""

    name: str
    total: int
    free: int
    used: int
    process: int | None  # what this process holds on it (None where the driver does not say)


class _NVMLMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _NVMLProcess(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


@functools.lru_cache(maxsize=1)
def _nvml():
    """The NVIDIA driver's management library, initialised; None where there is no NVIDIA driver."""
    names = ("nvml.dll",) if sys.platform == "win32" else ("libnvidia-ml.so.1", "libnvidia-ml.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        init = getattr(lib, "nvmlInit_v2", None) or getattr(lib, "nvmlInit", None)
        if init is not None and init() == 0:
            return lib
    return None


def _nvml_index(device_id: int) -> int:
    """The NVML index of CUDA device ``device_id``: CUDA_VISIBLE_DEVICES renumbers what CUDA sees."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if device_id < len(visible) and visible[device_id].isdigit():
        return int(visible[device_id])
    return device_id


def gpu_memory(device_id: int = 0) -> GPUMemory | None:
    """Memory of CUDA device ``device_id`` (free, total, this process's share), read from the driver
    through NVML; None where there is no NVIDIA driver or no such device."""
    lib = _nvml()
    if lib is None:
        return None
    handle = ctypes.c_void_p()
    get = getattr(lib, "nvmlDeviceGetHandleByIndex_v2", None) or lib.nvmlDeviceGetHandleByIndex
    if get(ctypes.c_uint(_nvml_index(device_id)), ctypes.byref(handle)) != 0:
        return None
    mem = _NVMLMemory()
    if lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
        return None
    name = ctypes.create_string_buffer(96)
    label = name.value.decode(errors="replace") if lib.nvmlDeviceGetName(handle, name, ctypes.c_uint(96)) == 0 else ""
    process = None
    running = getattr(lib, "nvmlDeviceGetComputeRunningProcesses_v3", None) or getattr(
        lib, "nvmlDeviceGetComputeRunningProcesses_v2", None
    )
    if running is not None:
        count = ctypes.c_uint(64)
        infos = (_NVMLProcess * 64)()
        if running(handle, ctypes.byref(count), infos) == 0:
            mine = [infos[i].usedGpuMemory for i in range(min(count.value, 64)) if infos[i].pid == os.getpid()]
            process = int(mine[0]) if mine and mine[0] < (1 << 62) else None
    return GPUMemory(label or f"cuda:{device_id}", int(mem.total), int(mem.free), int(mem.used), process)


class MemorySampler:
    """The process's peak resident memory and, on CUDA, its GPU memory, read at most once every
    ``interval`` seconds (the figures a request's usage reports): a scheduler ending many requests a
    second reads /proc and NVML once a second, not once a request."""

    def __init__(self, device: str = "cpu", device_id: int = 0, interval: float = 1.0) -> None:
        self.device, self.device_id, self.interval = device, device_id, interval
        self._at = -float("inf")
        self._value: tuple[int | None, int | None] = (None, None)
        self._lock = threading.Lock()

    def sample(self) -> tuple[int | None, int | None]:
        """(peak resident bytes, GPU bytes of this process or the device; None on the CPU)."""
        now = time.monotonic()
        with self._lock:
            if now - self._at >= self.interval:
                gpu = None
                if self.device == "cuda":
                    mem = gpu_memory(self.device_id)
                    gpu = None if mem is None else (mem.process if mem.process is not None else mem.used)
                self._value, self._at = (peak_rss_bytes(), gpu), now
            return self._value
