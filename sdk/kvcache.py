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

__all__ = ["KVCache", "SlotCache", "StepRunner", "CacheOps", "pad_batch", "grow_mask"]

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

    def __init__(self, manifest: Manifest, batch_size: int, device: str = "cpu", device_id: int = 0,
                 length: int = 0) -> None:
        dtype = _NUMPY_DTYPES.get(manifest.kv_dtype)
        if dtype is None:
            raise NextokenError(f"KV dtype {manifest.kv_dtype} is not supported yet")
        self.dtype = dtype
        self.run_seconds = 0.0  # time spent inside ONNX Runtime for this cache's request
        #: a one-token in-place step's binding, kept while its rows stay the same (StepRunner's)
        self.decode_binding: tuple | None = None
        shape = [batch_size, manifest.num_kv_heads, length, manifest.head_dim]   # uninitialised past 0
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
        # The device handles of ONNX Runtime's binding, made once: its Python wrappers make them
        # again for every output of every step, which is a tenth of a tiny model's step.
        # (None where this onnxruntime lays its wrappers out differently: the public calls are used.)
        try:
            self._c_devices = (ort.OrtDevice.make("cpu", 0)._get_c_device(),
                               ort.OrtDevice.make(device, device_id)._get_c_device())
        except Exception:
            self._c_devices = None
        logits_type = next((o.type for o in session.get_outputs() if o.name == "logits"), "tensor(float)")
        self._logits_dtype = np.float16 if logits_type == "tensor(float16)" else np.float32

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.manifest, batch_size, self.device, self.device_id)

    def step(self, cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray,
             position_ids: np.ndarray | None, all_logits: bool = False, in_place: bool = False,
             rows: int | None = None, first_row: int = 0) -> np.ndarray:
        """One forward pass. Returns the logits of the last position ``[B, V]`` (or all ``[B, S, V]``).

        ``input_ids``/``position_ids`` are ``[B, S]``; ``attention_mask`` is ``[B, cache.length + S]``.
        The cache is advanced to hold the S new positions: as new values, or (``in_place``, for
        GroupQueryAttention graphs over a fixed-size buffer, ``attention_mask`` as wide as the
        buffer) written into the same buffers, each row at its own length; ``rows`` then runs only
        ``rows`` of the buffers' rows from ``first_row`` on (a contiguous part of their memory, bound
        by address).
        """
        if in_place and not all_logits and input_ids.shape[1] == 1 and self.device == "cpu":
            return self._decode_in_place(cache, input_ids, attention_mask, position_ids, rows, first_row)
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
        if self._c_devices is not None:
            binding._iobinding.bind_output("logits", self._c_devices[0])
        else:
            binding.bind_output("logits", "cpu")
        for past, present, value in zip(self._past, self._present, cache.values):
            if in_place:
                shape = value.shape()
                address = value.data_ptr() + first_row * int(np.prod(shape[1:])) * np.dtype(cache.dtype).itemsize
                shape = [rows if rows is not None else shape[0]] + list(shape[1:])
                binding.bind_input(past, self.device, self.device_id, cache.dtype, shape, address)
                binding.bind_output(present, self.device, self.device_id, cache.dtype, shape, address)
            elif self._c_devices is not None:
                raw = binding._iobinding
                raw.bind_ortvalue_input(past, value._ortvalue)
                raw.bind_output(present, self._c_devices[1])
            else:
                binding.bind_ortvalue_input(past, value)
                binding.bind_output(present, self.device, self.device_id)
        self._run(binding, cache)
        if self._c_devices is not None and not in_place:
            raw_outputs = binding._iobinding.get_outputs()
            cache.values = [ort.OrtValue(raw_outputs[i]) for i in range(1, len(raw_outputs))]
            logits = raw_outputs[0].numpy()
        else:
            outputs = binding.get_outputs()
            if not in_place:
                cache.values = list(outputs[1:])
            logits = outputs[0].numpy()                 # [B, S, V], or [B, 1, V] with logits_to_keep
        if logits.dtype != np.float32:                  # fp16 graphs: sampling works in fp32
            logits = logits.astype(np.float32)
        return logits if all_logits else logits[:, -1, :]

    def _run(self, binding, cache: KVCache) -> None:
        """Run the bound step, its time counted to ``cache``; ONNX Runtime's failure as nextoken's."""
        start = time.perf_counter()
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise NextokenError(f"the model failed to run a step: {str(exc).splitlines()[0][:300]}") from None
        cache.run_seconds += time.perf_counter() - start

    def _decode_in_place(self, cache: KVCache, input_ids: np.ndarray, attention_mask: np.ndarray,
                         position_ids: np.ndarray | None, rows: int | None, first_row: int) -> np.ndarray:
        """A one-token step over a fixed buffer, on the CPU, through a binding kept on the cache:
        the keys and values stay bound by address and the logits land in a buffer of the binding's
        own, so a step binds only its ids and mask (binding 2 x layers tensors a step cost 0.6 ms,
        a tenth of a 135M int4 step)."""
        n = rows if rows is not None else int(cache.values[0].shape()[0])
        kept = cache.decode_binding
        if kept is None or kept[0] != (n, first_row):
            binding = self.session.io_binding()
            shape = list(cache.values[0].shape())
            stride = int(np.prod(shape[1:])) * np.dtype(cache.dtype).itemsize
            for past, present, value in zip(self._past, self._present, cache.values):
                address = value.data_ptr() + first_row * stride
                binding.bind_input(past, self.device, self.device_id, cache.dtype, [n] + shape[1:], address)
                binding.bind_output(present, self.device, self.device_id, cache.dtype, [n] + shape[1:], address)
            if "logits_to_keep" in self._int_dtypes:
                binding.bind_cpu_input("logits_to_keep", np.array([1], dtype=np.int64))
            logits = np.empty((n, 1, self.manifest.vocab_size), dtype=self._logits_dtype)
            binding.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            kept = cache.decode_binding = ((n, first_row), binding, logits)
        _, binding, logits = kept
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=self._int_dtypes["input_ids"]))
        binding.bind_cpu_input("attention_mask",
                               np.ascontiguousarray(attention_mask, dtype=self._int_dtypes["attention_mask"]))
        if position_ids is not None and "position_ids" in self._int_dtypes:
            binding.bind_cpu_input("position_ids",
                                   np.ascontiguousarray(position_ids, dtype=self._int_dtypes["position_ids"]))
        self._run(binding, cache)
        return logits[:, -1, :].astype(np.float32)      # a copy: the buffer is the next step's


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
        elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
                "bfloat16": TensorProto.BFLOAT16}[runner.manifest.kv_dtype]
        # Each group of tensors gets its own symbolic batch and length: inputs and outputs differ.
        kv = lambda name: helper.make_tensor_value_info(name, elem, [f"{name[0]}_rows", "heads", f"{name[0]}_len", "dim"])  # noqa: E731
        idx = lambda name: helper.make_tensor_value_info(name, TensorProto.INT64, ["n"])   # noqa: E731
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
            merge_nodes += [helper.make_node("Pad", [f"a{i}", "pads_a"], [f"pa{i}"]),
                            helper.make_node("Pad", [f"b{i}", "pads_b"], [f"pb{i}"]),
                            helper.make_node("Concat", [f"pa{i}", f"pb{i}"], [f"y{i}"], axis=0)]
        self._merge = build(merge_nodes, [kv(f"a{i}") for i in range(n)] + [kv(f"b{i}") for i in range(n)]
                            + [idx("pads_a"), idx("pads_b")], [kv(f"y{i}") for i in range(n)])
        select_nodes = []
        for i in range(n):
            select_nodes += [helper.make_node("Gather", [f"x{i}", "rows"], [f"g{i}"], axis=0),
                             helper.make_node("Slice", [f"g{i}", "starts", "ends", "axes"], [f"y{i}"])]
        axes = onnx.numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
        self._select = build(select_nodes, [kv(f"x{i}") for i in range(n)] + [idx("rows"), idx("starts"), idx("ends")],
                             [kv(f"y{i}") for i in range(n)], [axes])
        # (slot, head, position) for every written position: only the prefilled positions move
        write_nodes = [helper.make_node("ScatterND", [f"s{i}", "index", f"r{i}"], [f"y{i}"]) for i in range(n)]
        index = helper.make_tensor_value_info("index", TensorProto.INT64, ["n", "heads", "r_len", 3])
        self._write = build(write_nodes, [kv(f"s{i}") for i in range(n)] + [kv(f"r{i}") for i in range(n)]
                            + [index], [kv(f"y{i}") for i in range(n)])
        self._n = n

    def _run(self, session: ort.InferenceSession, values: dict[str, ort.OrtValue], arrays: dict[str, np.ndarray],
             batch_size: int, into: KVCache | None = None) -> KVCache:
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
        out = self._run(self._select, values, {"rows": np.asarray(rows), "starts": np.array([start]),
                                               "ends": np.array([stop])}, len(rows))
        out.run_seconds = cache.run_seconds
        return out

    def write(self, buffers: KVCache, rows: KVCache, slots: Sequence[int]) -> None:
        """Copy each row of ``rows`` into positions 0.. of slot ``slots[i]`` of the fixed-size
        ``buffers``, in place (ScatterND's output is bound to its input). Only the row's own
        positions move; the rest of the slot is left as it is (attention reads a slot only up to its
        length). Padding each row to the slot's length first cost a whole slot's copy per newcomer:
        94 MB for the 135M model's 2,048-position slots."""
        values = {**{f"s{i}": v for i, v in enumerate(buffers.values)}, **{f"r{i}": v for i, v in enumerate(rows.values)}}
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
        self.lengths = np.zeros(slots, dtype=np.int64)     # positions each slot holds

    def mask(self, lengths: np.ndarray) -> np.ndarray:
        """The attention mask of rows holding ``lengths`` positions: ``[len(lengths), buffer length]``,
        1 where a row has a position (the graph reads each row's length from it)."""
        return (np.arange(self.length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
