"""The KV cache as ONNX Runtime values (the step that runs over it: :mod:`nextoken.runner`).

Shapes: prefill feeds ``input_ids [B, S]`` with an empty cache ``[B, kv_heads, 0, head_dim]``;
a decode step feeds ``input_ids [B, 1]`` with the cache of ``[B, kv_heads, T, head_dim]``.
Each step's ``present.*`` outputs are ONNX Runtime values that become the next step's
``past_key_values.*`` inputs as they are: the cache never passes through numpy, and on a GPU it
stays on the device. Only the last position's logits come back to the host.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .dtypes import kv_dtype
from .errors import NextokenError
from .manifest import Manifest


class CacheHome(Protocol):
    """Where a cache lives: the package's manifest and the device (a StepRunner is one)."""

    manifest: Manifest
    device: str
    device_id: int


__all__ = ["PAGED_HOST", "CacheHome", "KVCache", "SlotCache", "grow_mask", "pad_batch", "resident_bytes", "row_slack"]

_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)  # address space, not swap: pages come when written
_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", None)


def _strict_overcommit() -> bool:
    """Linux with ``vm.overcommit_memory`` 2: every mapping is charged whole, reserved or not."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() == "2"
    except OSError:
        return False


#: whether host buffers can be reserved address space with pages given back (paged slots): not
#: where the kernel charges a reservation as if it were written (strict overcommit)
PAGED_HOST = hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MADV_DONTNEED") and not _strict_overcommit()


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
        shape = [batch_size, manifest.num_kv_heads, length, manifest.cache_head_dim]  # uninitialised past 0
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
    padded or trimmed as requests come and go; a slot is reused by the next request.

    ``paged`` (the default on the CPU): the buffers are reserved address space, not memory. Each
    is an anonymous mapping the kernel backs with a page the first time a position in it is
    written, so the cache holds what its rows have written (a row's positions for each head are
    contiguous: a 4 KiB page holds 16 positions of a 64-wide fp32 head), whatever ``slots x
    length`` is. A slot that frees gives its pages back (:meth:`release`), and a row cut short
    gives back the pages past its end (:meth:`trim`). The memory management unit is the page table:
    attention reads each row as one contiguous run, as with fixed slots, at the same speed.
    :meth:`nbytes` is then the bytes held (pages touched); :meth:`reserved_bytes` the address
    space. Transparent huge pages are turned off for the mappings (a 2 MiB page would back a
    slot's whole head at its first token)."""

    def __init__(self, runner: CacheHome, slots: int, length: int, paged: bool | None = None) -> None:
        """
        Args:
            runner: where the cache lives (the package's manifest and the device).
            slots: rows of the buffer.
            length: positions a slot.
            paged: reserve address space and hold only the pages written (None: on the CPU).
        """
        # Left uninitialised: a slot is written from position 0 when a request takes it, and
        # attention reads a row only up to its length (a free slot decodes at position 0 only).
        self.paged = runner.device == "cpu" and PAGED_HOST if paged is None else paged
        if self.paged and (runner.device != "cpu" or not PAGED_HOST):
            raise NextokenError(
                "paged slots live in host memory on Linux or macOS; on a GPU (or elsewhere) the slot "
                "buffer is allocated whole (paged=False)"
            )
        super().__init__(runner.manifest, slots, runner.device, runner.device_id, 0 if self.paged else length)
        self._maps: list[mmap.mmap] = []
        shape = [slots, runner.manifest.num_kv_heads, length, runner.manifest.cache_head_dim]
        if self.paged:
            self.values = [self._mapped(shape) for _ in self.values]
        self.on_host = runner.device == "cpu"
        self.lengths = np.zeros(slots, dtype=np.int64)  # positions each slot holds
        #: positions each slot has written since its pages were last given back (what backs it)
        self.high = np.zeros(slots, dtype=np.int64)
        self._positions = np.arange(length)[None, :]
        self._shape = shape
        #: speculative steps' bindings, by row: [binding, logits buffer, positions bound] (StepRunner._in_place's)
        self.extend_bindings: dict[int, list] = {}

    def _mapped(self, shape: list[int]) -> ort.OrtValue:
        """One layer's buffer as an anonymous mapping (no memory until written), wrapped without a copy."""
        count = int(np.prod(shape))
        size = max(count * np.dtype(self.dtype).itemsize, 1)
        try:
            mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
        except OSError as exc:
            raise NextokenError(
                f"could not reserve {size / 2**30:.1f} GiB of address space for a slot buffer ({exc}); "
                "ask for fewer or shorter slots (max_batch, slot_length), or fixed slots (paged=False)"
            ) from None
        if _NOHUGEPAGE is not None:
            mapping.madvise(_NOHUGEPAGE)
        self._maps.append(mapping)
        array = np.frombuffer(mapping, dtype=self.dtype, count=count).reshape(shape)
        return ort.OrtValue.ortvalue_from_numpy(array)  # on the CPU: the mapping's memory itself

    @property
    def length(self) -> int:
        """Positions a slot holds at most."""
        return self._shape[2]

    def set_lengths(self, rows: np.ndarray | slice | int, lengths: np.ndarray | int) -> None:
        """Rows ``rows`` hold ``lengths`` positions now, written (what backs them grows with it)."""
        self.lengths[rows] = lengths
        self.high[rows] = np.maximum(self.high[rows], self.lengths[rows])

    def _head_bytes(self) -> int:
        return self._shape[3] * np.dtype(self.dtype).itemsize

    def touch(self, slot: int, positions: int) -> None:
        """Write zeros over slot ``slot``'s first ``positions`` positions, layer by layer and head
        by head in address order (CPU), before a prompt is prefilled into it in chunks: the pages
        backing each head's run are then taken one after another, as a whole prompt's one write
        takes them. Chunks alone take every head's pages a chunk at a time, interleaved with all the
        others', and decode reads the cache slower for it (the 135M config at 8k: 13.1-13.9 tok/s
        against 15.0 after a whole prompt; touched first, 15.3-15.5)."""
        if not self.on_host:
            return
        positions = min(positions, self._shape[2])
        self.high[slot] = max(int(self.high[slot]), positions)  # held now: given back as written ones are
        itemsize = np.dtype(self.dtype).itemsize
        count = int(np.prod(self._shape))
        for value in self.values:
            raw = (ctypes.c_char * (count * itemsize)).from_address(value.data_ptr())
            np.frombuffer(memoryview(raw), dtype=self.dtype).reshape(self._shape)[slot, :, :positions] = 0

    def release(self, slot: int) -> None:
        """Slot ``slot`` holds nothing now: its pages go back to the system (paged), or it is just free."""
        self.lengths[slot] = 0
        self.trim(slot, 0)

    def trim(self, slot: int, length: int) -> None:
        """Give back the pages of slot ``slot`` past its first ``length`` positions (paged; the
        pages a kept position shares are kept)."""
        if self.high[slot] <= length:
            return
        self.high[slot] = length
        if not self.paged:
            return
        heads, block = self._shape[1], self._shape[2] * self._head_bytes()
        page, first = mmap.PAGESIZE, slot * heads * block
        spans = (
            [(first, first + heads * block)]
            if length == 0
            else [(first + h * block + length * self._head_bytes(), first + (h + 1) * block) for h in range(heads)]
        )
        for start, end in spans:
            start = -(-start // page) * page  # whole pages only: a page a kept position is on stays
            if end - start >= page:
                for mapping in self._maps:
                    mapping.madvise(mmap.MADV_DONTNEED, start, (end - start) // page * page)

    def nbytes(self) -> int:
        """Bytes the cache holds: the pages its slots have written (paged), else the whole buffer."""
        if not self.paged:
            return super().nbytes()
        heads, row = self._shape[1], self._head_bytes()
        block, page = self._shape[2] * row, mmap.PAGESIZE
        written = np.repeat(self.high, heads)  # each (slot, head) run, in address order
        starts = np.arange(len(written), dtype=np.int64)[written > 0] * block
        if not len(starts):
            return 0
        first, last = starts // page, (starts + written[written > 0] * row - 1) // page
        # a page two neighbouring runs are on counts once (heads shorter than a page share them)
        pages = int((last - first + 1).sum()) - int((first[1:] == last[:-1]).sum())
        return pages * page * len(self.values)

    def reserved_bytes(self) -> int:
        """Bytes of the whole buffer (paged: address space reserved; else allocated)."""
        return int(np.prod(self._shape)) * np.dtype(self.dtype).itemsize * len(self.values)

    def mask(self, lengths: np.ndarray) -> np.ndarray:
        """The attention mask of rows holding ``lengths`` positions: ``[len(lengths), longest]``, 1
        where a row has a position (the graph reads each row's length from it, and
        GroupQueryAttention the total from its width, which may be under the buffer's: a slot of a
        32k window does not cost a 32k-wide mask a step)."""
        lengths = np.asarray(lengths)
        width = max(int(lengths.max(initial=1)), 1)
        return (self._positions[:, :width] < lengths[:, None]).astype(np.int64)


def row_slack(manifest: Manifest) -> int:
    """Bytes a row of a paged :class:`SlotCache` may hold past its positions: the rest of the last
    page of each head's run, for every layer's keys and values."""
    return mmap.PAGESIZE * manifest.num_kv_heads * len(manifest.past_names())


def resident_bytes(cache: KVCache) -> int:
    """Bytes of ``cache``'s host buffers backed by memory now, as the kernel counts them
    (``mincore``; Linux and macOS): what a paged :class:`SlotCache` really holds."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page, total = mmap.PAGESIZE, 0
    itemsize = np.dtype(cache.dtype).itemsize
    for value in cache.values:
        address = value.data_ptr()
        start = address // page * page
        size = int(np.prod(value.shape())) * itemsize + (address - start)
        pages = -(-size // page)
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        total += int((np.frombuffer(vector, dtype=np.uint8) & 1).sum()) * page
    return total
