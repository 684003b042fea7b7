"""Hugging Face -> nextoken model package export.

The default route is nextoken's own graph builder (:mod:`nextoken.exporters.builder`: numpy and
onnx, fused operators; torch and transformers only for the parity check); optimum's exporter (the
``export`` extra) writes what the builder does not cover.

    from nextoken.exporters import export
    report = export("HuggingFaceTB/SmolLM2-135M", "smollm2")      # or a local checkpoint directory
    print(report.max_abs_diff)

Importing this module is cheap; torch, transformers and optimum load when an export needs them, and
their absence is one clear :class:`~nextoken.ExportError` naming the extra to install.
"""

from .genai import import_genai
from .hf import (
    DEFAULT_ATOL,
    DTYPES,
    FP16_RTOL,
    SUPPORTED_ARCHITECTURES,
    TASK,
    ExportReport,
    export,
)
from .quantize import QUANTIZATIONS, Accuracy
from .tiny import make_byte_tokenizer, make_random_checkpoint, make_tiny_checkpoint

__all__ = [
    "DEFAULT_ATOL",
    "DTYPES",
    "FP16_RTOL",
    "QUANTIZATIONS",
    "SUPPORTED_ARCHITECTURES",
    "TASK",
    "Accuracy",
    "ExportReport",
    "export",
    "import_genai",
    "make_byte_tokenizer",
    "make_random_checkpoint",
    "make_tiny_checkpoint",
]
