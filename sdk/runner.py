"""One forward step of the model, bound with IOBinding over the KV cache (:mod:`nextoken.kvcache`).

Shapes: prefill feeds ``input_ids [B, S]`` with an empty cache ``[B, kv_heads, 0, head_dim]``;
a decode step feeds ``input_ids [B, 1]`` with the cache of ``[B, kv_heads, T, head_dim]``.
Each step's ``present.*`` outputs are ONNX Runtime values that become the next step's
``past_key_values.*`` inputs as they are: the cache never passes through numpy, and on a GPU it
stays on the device. Only the last position's logits come back to the host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from .adapters import AdapterTable
from .dtypes import DTYPES
from .errors import NextokenError
from .kvcache import KVCache, SlotCache
from .manifest import Manifest
from .ortbind import Binder

__all__ = ["CacheOps", "StepRunner"]


class StepRunner:
    """Runs the graph one step at a time with IOBinding, carrying a :class:`KVCache` forward.

    Two ways to carry the cache: as new values each step (:meth:`prefill`, :meth:`decode`: present
    = concat(past, new), any graph), or in place in a fixed-size :class:`SlotCache`
    (:meth:`prefill_in_place`, :meth:`decode_in_place`: GroupQueryAttention graphs, which write
    each row's new keys and values at the row's own length, read from the attention mask).
    Every call returns float32 logits of the last position ``[B, V]`` (all positions with
    ``all_logits``), and adds its time inside ONNX Runtime to the cache's ``run_seconds``.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        manifest: Manifest,
        device: str = "cpu",
        device_id: int = 0,
        providers: Sequence = ("CPUExecutionProvider",),
    ) -> None:
        """
        Args:
            session: the package's ONNX Runtime session.
            manifest: the package's manifest (names and shapes of the cache).
            device: where caches live, ``"cpu"`` or ``"cuda"``.
            device_id: the CUDA device's index.
            providers: the session's execution providers, for :meth:`cache_ops`.
        """
        self.session: ort.InferenceSession | None = session
        self.providers = providers
        self._cache_ops: CacheOps | None = None
        self._cache_ops_lock = threading.Lock()
        self.manifest = manifest
        self.device = device
        self.device_id = device_id
        self._past = manifest.past_names()
        self._present = manifest.present_names()
        self._int_dtypes = {a.name: (np.int32 if a.type == "tensor(int32)" else np.int64) for a in session.get_inputs()}
        self.binder = Binder(device, device_id)
        #: the LoRA adapters' slots, where the graph takes adapters (:mod:`nextoken.adapters`)
        self.adapters = (
            AdapterTable(session.get_inputs(), manifest, device, device_id) if "lora_ids" in self._int_dtypes else None
        )
        logits_type = next((o.type for o in session.get_outputs() if o.name == "logits"), "tensor(float)")
        self._logits_dtype = np.float16 if logits_type == "tensor(float16)" else np.float32

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the session is gone: nothing can run)."""
        return self.session is None

    def close(self) -> None:
        """Drop the session and the cache surgery's (their memory goes when nothing else holds them)."""
        self.session = None
        self._cache_ops = None

    def _live(self) -> ort.InferenceSession:
        if self.session is None:
            raise NextokenError("the engine is closed; load the package again")
        return self.session

    def cache_ops(self) -> "CacheOps":
        """The KV cache surgery graphs (join, drop, copy rows where the cache lives), on this
        runner's execution providers; made at the first use and kept."""
        with self._cache_ops_lock:
            if self._cache_ops is None:
                self._cache_ops = CacheOps(self, self.providers)
            return self._cache_ops

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty cache of ``batch_size`` rows, for :meth:`prefill`."""
        return KVCache(self.manifest, batch_size, self.device, self.device_id)

    def cache_of(self, arrays: Sequence[np.ndarray]) -> KVCache:
        """A cache holding ``arrays`` (host keys and values, in the past-input order) where this
        runner's caches live."""
        cache = self.new_cache(int(arrays[0].shape[0]))
        if len(arrays) != len(cache.values) or any(np.dtype(a.dtype) != np.dtype(cache.dtype) for a in arrays):
            raise NextokenError(
                f"{len(arrays)} arrays of {sorted({str(a.dtype) for a in arrays})} are not this "
                f"package's {len(cache.values)} {np.dtype(cache.dtype)} key and value tensors"
            )
        cache.values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, self.device_id) for a in arrays
        ]
        return cache

    # -- the public steps -----------------------------------------------------------------------------
    def prefill(
        self,
        cache: KVCache,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray | None,
        all_logits: bool = False,
        lora: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run ``input_ids [B, S]`` over ``cache`` (empty, or holding earlier chunks) and replace its
        values by the longer ones. ``attention_mask`` is ``[B, cache.length + S]``; ``lora``: each
        row's adapter slot (None: none)."""
        return self._concat(cache, input_ids, attention_mask, position_ids, all_logits, lora)

    def decode(
        self,
        cache: KVCache,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray | None,
        lora: np.ndarray | None = None,
    ) -> np.ndarray:
        """One token a row (``input_ids [B, 1]``) over ``cache``: a prefill of one position."""
        return self._concat(cache, input_ids, attention_mask, position_ids, False, lora)

    def _concat(
        self,
        cache: KVCache,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray | None,
        all_logits: bool,
        lora: np.ndarray | None = None,
    ) -> np.ndarray:
        binding = self._binding()
        self._bind_ids(binding, input_ids, attention_mask, position_ids, lora)
        if "logits_to_keep" in self._int_dtypes:
            keep = np.array([input_ids.shape[1] if all_logits else 1], dtype=np.int64)
            self.binder.host_input(binding, "logits_to_keep", keep)
        self.binder.logits_to_host(binding, "logits")
        for past, present, value in zip(self._past, self._present, cache.values):
            self.binder.value_in_out(binding, past, present, value)
        self._run(binding, cache)
        logits, cache.values = self.binder.outputs(binding)  # [B, S, V], or [B, 1, V] with logits_to_keep
        return _float32(logits if all_logits else logits[:, -1, :])

    def prefill_in_place(
        self, slots: "SlotCache", prompt: Sequence[int], row: int, lora: int = 0, start: int = 0
    ) -> np.ndarray:
        """Prefill one prompt straight into row ``row`` of ``slots`` from position ``start`` (the
        row holds the prompt's first ``start`` tokens already: an earlier chunk; its length becomes
        ``start + len(prompt)``), with adapter slot ``lora``. Returns its last logits ``[1, V]``."""
        slots.lengths[row] = start
        return self._in_place(slots, row, prompt, keep=1, lora=lora)

    def decode_in_place(
        self, slots: "SlotCache", input_ids: np.ndarray, lengths: np.ndarray, lora: np.ndarray | None = None
    ) -> np.ndarray:
        """One token for each of the first ``len(lengths)`` rows of ``slots``, written in place at
        position ``lengths - 1`` (each row's length after the step; a row whose length does not
        grow rewrites its last position). On the CPU the binding is kept on the cache: the keys and
        values stay bound by address and the logits land in a buffer of the binding's own, so a
        step binds only its ids and mask (binding 2 x layers tensors a step cost 0.6 ms, a tenth of
        a 135M int4 step)."""
        n = len(lengths)
        mask, positions = slots.mask(lengths), (np.asarray(lengths) - 1)[:, None]
        kept = slots.decode_binding if self.device == "cpu" else None
        if kept is None or kept[0] != n:
            binding = self._binding()
            self._bind_rows(binding, slots, n, 0)
            if "logits_to_keep" in self._int_dtypes:
                self.binder.host_input(binding, "logits_to_keep", np.array([1], dtype=np.int64))
            logits = np.empty((n, 1, self.manifest.vocab_size), dtype=self._logits_dtype)
            binding.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            kept = (n, binding, logits)
            if self.device == "cpu":
                slots.decode_binding = kept
        _, binding, logits = kept
        self._bind_ids(binding, input_ids, mask, positions, lora)
        self._run(binding, slots)
        slots.set_lengths(slice(0, n), lengths)
        return logits[:, -1, :].astype(np.float32)  # a copy: the buffer is the next step's

    def extend_in_place(self, slots: "SlotCache", row: int, tokens: Sequence[int], lora: int = 0) -> np.ndarray:
        """Run ``tokens`` after what row ``row`` of ``slots`` holds, in place (its length grows by
        their count), and return the logits after each of them ``[len(tokens), V]`` (speculative
        decoding checks its guesses with them in one step)."""
        return self._in_place(slots, row, tokens, keep=len(tokens), lora=lora)

    def _in_place(self, slots: "SlotCache", row: int, tokens: Sequence[int], keep: int, lora: int = 0) -> np.ndarray:
        """Run ``tokens`` after row ``row``'s positions, in place; the last ``keep`` positions'
        logits ``[keep, V]``. On the CPU a speculative step's binding (all its positions kept) is
        kept per row with a logits buffer, its keys and values bound once (as decode_in_place keeps
        its own): a step binds its ids and mask, and its logits when its count differs from the
        last. A prompt's binding is made each time."""
        n = len(tokens)
        length = int(slots.lengths[row]) + n
        reuse = self.device == "cpu" and keep == n
        kept = slots.extend_bindings.get(row) if reuse else None
        if kept is None or kept[1].shape[1] < n:
            binding = self._binding() if kept is None else kept[0]
            if kept is None:
                self._bind_rows(binding, slots, 1, row)
            buffer = np.empty((1, max(n, 8) if reuse else n, self.manifest.vocab_size), dtype=self._logits_dtype)
            kept = [binding, buffer, 0]
            if reuse:
                slots.extend_bindings[row] = kept
        binding, buffer, bound = kept
        logits = buffer[:, : keep if "logits_to_keep" in self._int_dtypes else n]
        if bound != n:
            if "logits_to_keep" in self._int_dtypes:
                self.binder.host_input(binding, "logits_to_keep", np.array([keep], dtype=np.int64))
            self.binder.host_output(binding, "logits", logits)
            kept[2] = n
        ids = np.asarray([tokens], dtype=np.int64)
        self._bind_ids(binding, ids, slots.mask(np.array([length])), None, np.array([lora], dtype=np.int64))
        self._run(binding, slots)
        slots.set_lengths(row, length)
        return logits[0, -keep:].astype(np.float32)  # a copy: a kept buffer is the next step's

    # -- binding ---------------------------------------------------------------------------------------
    def _binding(self) -> ort.IOBinding:
        """A new binding, the adapters' slots bound where the graph takes them."""
        binding = self._live().io_binding()
        if self.adapters is not None:
            self.adapters.bind(binding)
        return binding

    def _bind_ids(
        self,
        binding: ort.IOBinding,
        input_ids: np.ndarray,
        mask: np.ndarray,
        positions: np.ndarray | None,
        lora: np.ndarray | None = None,
    ) -> None:
        dtypes = self._int_dtypes
        bind = self.binder.host_input
        bind(binding, "input_ids", np.ascontiguousarray(input_ids, dtype=dtypes["input_ids"]))
        bind(binding, "attention_mask", np.ascontiguousarray(mask, dtype=dtypes["attention_mask"]))
        if positions is not None and "position_ids" in dtypes:
            bind(binding, "position_ids", np.ascontiguousarray(positions, dtype=dtypes["position_ids"]))
        if self.adapters is not None:
            rows = len(input_ids)
            ids = np.zeros(rows, dtype=np.int64) if lora is None else np.ascontiguousarray(lora, dtype=np.int64)
            if ids.shape != (rows,):
                raise NextokenError(f"{len(ids)} adapter slots for {rows} rows")
            bind(binding, "lora_ids", ids)

    def _bind_rows(self, binding: ort.IOBinding, slots: "SlotCache", n: int, first_row: int) -> None:
        """Bind ``n`` rows of the slot buffers from ``first_row`` on (a contiguous part of their
        memory, by address) as both past and present: the graph writes in place."""
        shape = list(slots.values[0].shape())
        stride = int(np.prod(shape[1:])) * np.dtype(slots.dtype).itemsize
        for past, present, value in zip(self._past, self._present, slots.values):
            address = value.data_ptr() + first_row * stride
            binding.bind_input(past, self.device, self.device_id, slots.dtype, [n] + shape[1:], address)
            binding.bind_output(present, self.device, self.device_id, slots.dtype, [n] + shape[1:], address)

    def _run(self, binding: ort.IOBinding, cache: KVCache) -> None:
        """Run the bound step, its time counted to ``cache``; ONNX Runtime's failure as nextoken's."""
        start = time.perf_counter()
        try:
            self.binder.run(self._live(), binding)
        except Exception as exc:
            raise NextokenError(f"the model failed to run a step: {str(exc).splitlines()[0][:300]}") from None
        cache.run_seconds += time.perf_counter() - start


def _float32(logits: np.ndarray) -> np.ndarray:
    """fp16 graphs' logits widened: sampling works in fp32."""
    return logits if logits.dtype == np.float32 else logits.astype(np.float32)


class CacheOps:
    """Row and column surgery on :class:`KVCache` s where they live (the GPU on CUDA).

    Continuous batching joins caches (a newcomer's rows padded to the batch's length) and drops
    rows (finished requests) and the padding every remaining row shares. Doing that through numpy
    would copy the whole cache to the host and back at every join and leave; instead two small
    ONNX graphs (Pad + Concat, Gather + Slice over every layer's keys and values at once) run in
    a session on the engine's own execution provider.
    """

    def __init__(self, runner: StepRunner, providers: Sequence) -> None:
        """
        Args:
            runner: the runner whose caches it operates on.
            providers: the execution providers the surgery graphs run on (the session's).
        """
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
        # positions first, then rows: a slot buffer's row is its whole length, and the positions
        # wanted are usually a few of them (a preempted request's cache copied out of its slot)
        select_nodes = []
        for i in range(n):
            select_nodes += [
                helper.make_node("Slice", [f"x{i}", "starts", "ends", "axes"], [f"g{i}"]),
                helper.make_node("Gather", [f"g{i}", "rows"], [f"y{i}"], axis=0),
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
        buffers.set_lengths(np.asarray(slots, dtype=np.int64), length)  # the joiner sets each row's own
