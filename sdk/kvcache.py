"""The KV cache as ONNX Runtime values (the step that runs over it: :mod:`nextoken.runner`).

Shapes: prefill feeds ``input_ids [B, S]`` with an empty cache ``[B, kv_heads, 0, head_dim]``;
a decode step feeds ``input_ids [B, 1]`` with the cache of ``[B, kv_heads, T, head_dim]``.
Each step's ``present.*`` outputs are ONNX Runtime values that become the next step's
``past_key_values.*`` inputs as they are: the cache never passes through numpy, and on a GPU it
stays on the device. Only the last position's logits come back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .dtypes import kv_dtype
from .manifest import Manifest


class CacheHome(Protocol):
    """Where a cache lives: the package's manifest and the device (a StepRunner is one)."""

    manifest: Manifest
    device: str
    device_id: int


__all__ = ["CacheHome", "KVCache", "SlotCache", "grow_mask", "pad_batch"]


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

    def __init__(
        self, manifest: Manifest, batch_size: int, device: str = "cpu", device_id: int = 0, length: int = 0
    ) -> None:
        self.dtype = kv_dtype(manifest.kv_dtype).numpy
        self.run_seconds = 0.0  # time spent inside ONNX Runtime for this cache's request
        #: a one-token in-place step's binding, kept while its rows stay the same (StepRunner's)
        self.decode_binding: tuple | None = None
        shape = [batch_size, manifest.num_kv_heads, length, manifest.head_dim]  # uninitialised past 0
        self.values: list[ort.OrtValue] = [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, device_id)
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


class SlotCache(KVCache):
    """A fixed-size KV buffer ``[slots, kv_heads, length, head_dim]`` per layer, for graphs with
    GroupQueryAttention: every decode step writes each row's new keys and values in place at that
    row's own length (the graph reads it from the attention mask), so nothing is concatenated,
    padded or trimmed as requests come and go; a slot is reused by the next request."""

    def __init__(self, runner: CacheHome, slots: int, length: int) -> None:
        # Left uninitialised: a slot is written whole (zero-padded) when a request takes it, and
        # attention reads a row only up to its length (a free slot decodes at position 0 only).
        super().__init__(runner.manifest, slots, runner.device, runner.device_id, length)
        self.lengths = np.zeros(slots, dtype=np.int64)  # positions each slot holds
        self._positions = np.arange(length)[None, :]
        #: speculative steps' bindings, by row: [binding, logits buffer, positions bound] (StepRunner._in_place's)
        self.extend_bindings: dict[int, list] = {}

    def mask(self, lengths: np.ndarray) -> np.ndarray:
        """The attention mask of rows holding ``lengths`` positions: ``[len(lengths), buffer length]``,
        1 where a row has a position (the graph reads each row's length from it)."""
        return (self._positions < np.asarray(lengths)[:, None]).astype(np.int64)
