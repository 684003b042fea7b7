"""nextoken: portable LLM inference on ONNX Runtime.

    import nextoken
    with nextoken.Engine("path/to/package") as engine:
        print(engine.generate("Once upon a time", max_new_tokens=32).text)
"""

from .device import DeviceChoice, resolve_device
from .engine import CachedForward, Engine, Prompt
from .errors import (
    ContextWindowError,
    DeviceError,
    ExportError,
    InvalidRequestError,
    PluginError,
    SchedulerStoppedError,
    ManifestMismatchError,
    ModelPackageError,
    NextokenError,
)
from .generation import Generation, Timings
from .types import (
    BatchState,
    Charge,
    Completion,
    SamplingParams,
    Stop,
    StreamEvent,
    TokenLogprob,
    ToolCall,
    Usage,
)
from .hookspecs import hookimpl, hookspec
from .manifest import FORMAT_VERSION, Manifest
from .registry import Registry
from .scheduler import RequestHandle, Scheduler
from .tokenizer import IncrementalDecoder, Tokenizer

__version__ = "0.1.0"

__all__ = [
    "Engine", "CachedForward", "Prompt", "SamplingParams", "Completion", "StreamEvent", "Usage", "Generation", "Timings",
    "BatchState", "Stop", "Charge", "TokenLogprob", "ToolCall", "Registry", "hookimpl", "hookspec", "Scheduler", "RequestHandle",
    "Manifest", "FORMAT_VERSION", "Tokenizer", "IncrementalDecoder", "DeviceChoice", "resolve_device",
    "NextokenError", "ModelPackageError", "ManifestMismatchError", "InvalidRequestError",
    "ContextWindowError", "ExportError", "DeviceError", "PluginError", "SchedulerStoppedError", "__version__",
]

for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and isinstance(_obj, type):
        _obj.__module__ = "nextoken"
del _name, _obj
