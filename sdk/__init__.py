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
    ManifestMismatchError,
    ModelPackageError,
    NextokenError,
    PluginError,
    SchedulerStoppedError,
)
from .generation import Generation, Timings
from .hookspecs import hookimpl, hookspec
from .manifest import FORMAT_VERSION, Manifest
from .pool import ModelPool
from .reasoning import Harmony, ThinkTags
from .registry import Registry
from .scheduler import RequestHandle, Scheduler
from .tokenizer import IncrementalDecoder, Tokenizer
from .toolcalls import ToolFormat
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

#: the one version: pyproject reads it from here
__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "BatchState",
    "CachedForward",
    "Charge",
    "Completion",
    "ContextWindowError",
    "DeviceChoice",
    "DeviceError",
    "Engine",
    "ExportError",
    "Generation",
    "Harmony",
    "IncrementalDecoder",
    "InvalidRequestError",
    "Manifest",
    "ManifestMismatchError",
    "ModelPackageError",
    "ModelPool",
    "NextokenError",
    "PluginError",
    "Prompt",
    "Registry",
    "RequestHandle",
    "SamplingParams",
    "Scheduler",
    "SchedulerStoppedError",
    "Stop",
    "StreamEvent",
    "ThinkTags",
    "Timings",
    "TokenLogprob",
    "Tokenizer",
    "ToolCall",
    "ToolFormat",
    "Usage",
    "__version__",
    "hookimpl",
    "hookspec",
    "resolve_device",
]
