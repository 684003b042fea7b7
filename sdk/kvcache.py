"""The KV cache as ONNX Runtime values (the step that runs over it: :mod:`nextoken.runner`).

Shapes: prefill feeds ``input_ids [B, S]`` with an empty cache ``[B, kv_heads, 0, head_dim]``;
a decode step feeds ``input_ids [B, 1]`` with the cache of ``[B, kv_heads, T, head_dim]``.
Each step's ``present.*`` outputs are ONNX Runtime values that become the next step's
``past_key_values.*`` inputs as they are: the cache never passes through numpy, and on a GPU it
stays on the device. Only the last position's logits come back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from .dtypes import DTYPES, kv_dtype
from .manifest import Manifest

if TYPE_CHECKING:
    from .runner import StepRunner

__all__ = ["CacheOps", "KVCache", "SlotCache", "grow_mask", "pad_batch"]


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


class CacheOps:
    """Row and column surgery on :class:`KVCache` s where they live (the GPU on CUDA).

    Continuous batching joins caches (a newcomer's rows padded to the batch's length) and drops
    rows (finished requests) and the padding every remaining row shares. Doing that through numpy
    would copy the whole cache to the host and back at every join and leave; instead two small
    ONNX graphs (Pad + Concat, Gather + Slice over every layer's keys and values at once) run in
    a session on the engine's own execution provider.
    """

    def __init__(self, runner: StepRunner, providers: Sequence) -> None:
        import onnx
        from onnx import TensorProto, helper

        self.runner = runner
        names = runner.manifest.past_names()
        elem = DTYPES[runner.manifest.kv_dtype].onnx
        # Each group of tensors gets its own symbolic batch and length: inputs and outputs differ.
        kv = lambda name: helper.make_tensor_value_info(
            name, elem, [f"{name[0]}_rows", "heads", f"{name[0]}_len", "dim"]
        )  # noqa: E731
        idx = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["n"])  # noqa: E731
        n = len(names)

        def build(nodes, inputs, outputs, inits=()):
            graph = helper.make_graph(nodes, "nextoken_cache_ops", inputs, outputs, list(inits))
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            model.ir_version = 8
            onnx.checker.check_model(model)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.log_severity_level = 3
            return ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))

        merge_nodes = []
        for i in range(n):
            merge_nodes += [
                helper.make_node("Pad", [f"a{i}", "pads_a"], [f"pa{i}"]),
                helper.make_node("Pad", [f"b{i}", "pads_b"], [f"pb{i}"]),
                helper.make_node("Concat", [f"pa{i}", f"pb{i}"], [f"y{i}"], axis=0),
            ]
        self._merge = build(
            merge_nodes,
            [kv(f"a{i}") for i in range(n)] + [kv(f"b{i}") for i in range(n)] + [idx("pads_a"), idx("pads_b")],
            [kv(f"y{i}") for i in range(n)],
        )
        select_nodes = []
        for i in range(n):
            select_nodes += [
                helper.make_node("Gather", [f"x{i}", "rows"], [f"g{i}"], axis=0),
                helper.make_node("Slice", [f"g{i}", "starts", "ends", "axes"], [f"y{i}"]),
            ]
        axes = onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
        self._select = build(
            select_nodes,
            [kv(f"x{i}") for i in range(n)] + [idx("rows"), idx("starts"), idx("ends")],
            [kv(f"y{i}") for i in range(n)],
            [axes],
        )
        # (slot, head, position) for every written position: only the prefilled positions move
        write_nodes = [helper.make_node("ScatterND", [f"s{i}", "index", f"r{i}"], [f"y{i}"]) for i in range(n)]
        index = helper.make_tensor_value_info("index", TensorProto.INT64, ["n", "heads", "r_len", 3])
        self._write = build(
            write_nodes,
            [kv(f"s{i}") for i in range(n)] + [kv(f"r{i}") for i in range(n)] + [index],
            [kv(f"y{i}") for i in range(n)],
        )
        self._n = n

    def _run(
        self,
        session: ort.InferenceSession,
        values: dict[str, ort.OrtValue],
        arrays: dict[str, np.ndarray],
        batch_size: int,
        into: KVCache | None = None,
    ) -> KVCache:
        """Run one of the graphs; its outputs become a new cache of ``batch_size`` rows, or are
        written over ``into`` 's buffers (in place)."""
        binding = session.io_binding()
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for name, array in arrays.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype=np.int64))
        runner = self.runner
        for i in range(self._n):
            if into is not None:
                binding.bind_ortvalue_output(f"y{i}", into.values[i])
            else:
                binding.bind_output(f"y{i}", runner.device, runner.device_id)
        session.run_with_iobinding(binding)
        if into is not None:
            return into
        cache = runner.new_cache(batch_size)
        cache.values = list(binding.get_outputs())
        return cache

    def merge(self, a: KVCache, b: KVCache, width: int, left: bool) -> KVCache:
        """``a``'s rows then ``b``'s, each padded with zeros to ``width`` positions (on the left or right)."""

        def pads(cache: KVCache) -> np.ndarray:
            missing = width - cache.length
            return np.array([0, 0, missing if left else 0, 0, 0, 0, 0 if left else missing, 0])

        rows = int(a.values[0].shape()[0]) + int(b.values[0].shape()[0])
        values = {**{f"a{i}": v for i, v in enumerate(a.values)}, **{f"b{i}": v for i, v in enumerate(b.values)}}
        out = self._run(self._merge, values, {"pads_a": pads(a), "pads_b": pads(b)}, rows)
        out.run_seconds = a.run_seconds
        return out

    def select(self, cache: KVCache, rows: Sequence[int], start: int, stop: int) -> KVCache:
        """The cache of ``rows`` only, positions ``start`` to ``stop``."""
        values = {f"x{i}": v for i, v in enumerate(cache.values)}
        out = self._run(
            self._select,
            values,
            {"rows": np.asarray(rows), "starts": np.array([start]), "ends": np.array([stop])},
            len(rows),
        )
        out.run_seconds = cache.run_seconds
        return out

    def write(self, buffers: SlotCache, rows: KVCache, slots: Sequence[int]) -> None:
        """Copy each row of ``rows`` into positions 0.. of slot ``slots[i]`` of the fixed-size
        ``buffers``, in place (ScatterND's output is bound to its input). Only the row's own
        positions move; the rest of the slot is left as it is (attention reads a slot only up to its
        length). Padding each row to the slot's length first cost a whole slot's copy per newcomer:
        94 MB for the 135M model's 2,048-position slots."""
        values = {
            **{f"s{i}": v for i, v in enumerate(buffers.values)},
            **{f"r{i}": v for i, v in enumerate(rows.values)},
        }
        n, heads, length = len(slots), int(rows.values[0].shape()[1]), rows.length
        index = np.empty((n, heads, length, 3), dtype=np.int64)
        index[..., 0] = np.asarray(slots, dtype=np.int64)[:, None, None]
        index[..., 1] = np.arange(heads)[None, :, None]
        index[..., 2] = np.arange(length)[None, None, :]
        self._run(self._write, values, {"index": index}, len(buffers.lengths), into=buffers)


class SlotCache(KVCache):
    """A fixed-size KV buffer ``[slots, kv_heads, length, head_dim]`` per layer, for graphs with
    GroupQueryAttention: every decode step writes each row's new keys and values in place at that
    row's own length (the graph reads it from the attention mask), so nothing is concatenated,
    padded or trimmed as requests come and go; a slot is reused by the next request."""

    def __init__(self, runner: StepRunner, slots: int, length: int) -> None:
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
