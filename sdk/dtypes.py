"""One table of the element types nextoken meets: the manifest's name, ONNX Runtime's type string,
the ONNX enum, bytes per element, numpy's type, and whether the runtime can hold a KV cache in it.

Every module that maps between these names reads this table (the manifest, the KV cache, the cache
surgery graphs, the memory planner), so a type is supported everywhere or refused everywhere, with
one message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelPackageError

__all__ = ["DTYPES", "QUANTISED_KV", "DType", "by_ort_type", "kv_dtype"]


@dataclass(frozen=True)
class DType:
    """One element type: ``name`` as the manifest writes it, ``short`` as the CLI says it,
    ``ort`` (ONNX Runtime's type string), ``onnx`` (TensorProto's enum), ``itemsize`` in bytes,
    ``numpy`` (None where numpy has none) and ``kv`` (a KV cache may be held in it)."""

    name: str
    short: str
    ort: str
    onnx: int
    itemsize: int
    numpy: type | None
    kv: bool


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", "fp32", "tensor(float)", 1, 4, np.float32, True),
        DType("float16", "fp16", "tensor(float16)", 10, 2, np.float16, True),
        # numpy has no bfloat16, so the cache cannot be made or copied through it yet
        DType("bfloat16", "bf16", "tensor(bfloat16)", 16, 2, None, False),
        DType("float64", "fp64", "tensor(double)", 11, 8, np.float64, True),
        # an int8 KV cache: GroupQueryAttention's own quantised cache (scales in the graph)
        DType("int8", "int8", "tensor(int8)", 3, 1, np.int8, True),
        # an int4 KV cache: two 4-bit values a byte, so a head of D channels is D / 2 bytes
        DType("int4", "int4", "tensor(uint8)", 2, 1, np.uint8, True),
        DType("int64", "int64", "tensor(int64)", 7, 8, np.int64, False),
        DType("int32", "int32", "tensor(int32)", 6, 4, np.int32, False),
    )
}

_BY_ORT = {d.ort: d for d in DTYPES.values()}

#: KV dtypes GroupQueryAttention quantises, with the bytes one cached value takes (int4: two a byte)
QUANTISED_KV = {"int8": 1.0, "int4": 0.5}


def by_ort_type(ort_type: str) -> DType | None:
    """The entry of ONNX Runtime's type string (``tensor(float16)``), or None."""
    return _BY_ORT.get(ort_type)


def kv_dtype(name: str) -> DType:
    """The entry of a KV cache's dtype name; one the runtime cannot hold a cache in is a
    :class:`ModelPackageError` naming the ones it can."""
    entry = DTYPES.get(name)
    if entry is None or not entry.kv:
        ok = ", ".join(d.name for d in DTYPES.values() if d.kv)
        raise ModelPackageError(
            f"this package keeps its KV cache in {name}, which nextoken cannot hold yet ({ok}); "
            "export it with --dtype fp16 or fp32"
        )
    return entry
