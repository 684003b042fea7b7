"""The KV cache as ONNX Runtime values, and one forward step bound with IOBinding.

Shapes: prefill feeds ``input_ids [B, S]`` with an empty cache ``[B, kv_heads, 0, head_dim]``;
a decode step feeds ``input_ids [B, 1]`` with the cache of ``[B, kv_heads, T, head_dim]``.
Each step's ``present.*`` outputs are ONNX Runtime values that become the next step's
``past_key_values.*`` inputs as they are: the cache never passes through numpy, and on a GPU it
stays on the device. Only the last position's logits come back to the host.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .errors import NextokenError
from .manifest import Manifest

__all__ = ["KVCache", "StepRunner", "pad_batch", "grow_mask"]

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


def pad_batch(prompts: Sequence[list[int]], pad_id: int, side: str = "left") -> tuple[np.ndarray, np.ndarray]:
    """``[B, S]`` input ids and attention mask of prompts of different lengths.

    ``left`` (graphs that take position_ids: every row's last token in the last column) or
    ``right`` (graphs with GroupQueryAttention, which place keys and read positions by each row's
    length: every row's tokens from the first column).
    """
    batch, width = len(prompts), max(len(p) for p in prompts)
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)
    mask = np.zeros((batch, width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        cols = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        input_ids[row, cols] = prompt
        mask[row, cols] = 1
    return input_ids, mask


def grow_mask(mask: np.ndarray, side: str = "left") -> np.ndarray:
    """The attention mask one decode step later: every row one position longer."""
    batch, width = mask.shape
    if side == "left":
        return np.concatenate([mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
    valid = mask.sum(axis=1, keepdims=True)
    return (np.arange(width + 1)[None, :] <= valid).astype(mask.dtype)


class KVCache:
    """The past keys and values of one batch, layer by layer, as ``ort.OrtValue`` s."""

    def __init__(self, manifest: Manifest, batch_size: int, device: str = "cpu", device_id: int = 0) -> None:
        dtype = _NUMPY_DTYPES.get(manifest.kv_dtype)
        if dtype is None:
            raise NextokenError(f"KV dtype {manifest.kv_dtype} is not supported yet")
        self.dtype = dtype
        self.run_seconds = 0.0  # time spent inside ONNX Runtime for this cache's request
        shape = [batch_size, manifest.num_kv_heads, 0, manifest.head_dim]
        self.values: list[ort.OrtValue] = [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, device_id)
            for _ in manifest.past_names()
        ]

    @property
    def length(self) -> int:
        """Positions held (past sequence length)."""
        return int(self.values[0].shape()[2]) if self.values else 0

    def nbytes(self) -> int:
        """Bytes the cache holds now."""
        itemsize = np.dtype(self.dtype).itemsize
        return sum(int(np.prod(v.shape())) * itemsize for v in self.values)


class StepRunner:
    """Runs the graph one step at a time with IOBinding, carrying a :class:`KVCache` forward."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, device: str = "cpu", device_id: int = 0):
        self.session = session
        self.manifest = manifest
        self.device = device
        self.device_id = device_id
        self._past = manifest.past_names()
        self._present = manifest.present_names()
        self._int_dtypes = {a.name: (np.int32 if a.type == "tensor(int32)" else np.int64) for a in session.get_inputs()}

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.manifest, batch_size, self.device, self.device_id)

    def step(self, cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray | None, all_logits: bool = False) -> np.ndarray:
        """One forward pass. Returns the logits of the last position ``[B, V]`` (or all ``[B, S, V]``).

        ``input_ids``/``position_ids`` are ``[B, S]``; ``attention_mask`` is ``[B, cache.length + S]``.
        The cache is advanced in place to hold the S new positions.
        """
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=self._int_dtypes["input_ids"]))
        binding.bind_cpu_input(
            "attention_mask", np.ascontiguousarray(attention_mask, dtype=self._int_dtypes["attention_mask"])
        )
        if "logits_to_keep" in self._int_dtypes:
            keep = np.array([input_ids.shape[1] if all_logits else 1], dtype=np.int64)
            binding.bind_cpu_input("logits_to_keep", keep)
        if position_ids is not None and "position_ids" in self._int_dtypes:
            binding.bind_cpu_input(
                "position_ids", np.ascontiguousarray(position_ids, dtype=self._int_dtypes["position_ids"])
            )
        for name, value in zip(self._past, cache.values):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present:
            binding.bind_output(name, self.device, self.device_id)
        start = time.perf_counter()
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise NextokenError(f"the model failed to run a step: {str(exc).splitlines()[0][:300]}") from None
        cache.run_seconds += time.perf_counter() - start
        outputs = binding.get_outputs()
        cache.values = list(outputs[1:])
        logits = outputs[0].numpy()                     # [B, S, V], or [B, 1, V] with logits_to_keep
        return logits if all_logits else logits[:, -1, :]
