"""The KV-cache claim, tested: the cache stays in ONNX Runtime values from step to step, and
generating with it gives what recomputing the whole sequence every step gives."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from helpers import wrap_steps
from nextoken.kvcache import KVCache
from nextoken.ortbind import Binder


def test_tokens_equal_a_naive_recompute_loop(llama_engine):
    prompt = llama_engine.encode("Recompute me")
    cached = llama_engine.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
    ids = list(prompt)
    for _ in range(24):  # no cache: the whole sequence, every step
        ids.append(int(np.argmax(llama_engine.forward(ids)[-1])))
    assert ids[len(prompt) :] == cached


def test_present_values_are_bound_back_as_past_without_numpy(optimum_engine, monkeypatch):
    """Every decode step binds, as each past_key_values.* input, the very OrtValue the previous
    step returned as present.*; the only tensors turned into numpy are the logits, and only the
    last position's (the exported graph slices before the LM head). Watched through onnxruntime's
    public binding calls (the step's fallback path; the fast path is checked equal below)."""
    monkeypatch.setattr(optimum_engine.runner, "binder", Binder("cpu", 0, fast=False))
    bound: list[dict[str, int]] = []
    to_numpy: list[tuple[int, ...]] = []
    real_bind = ort.IOBinding.bind_ortvalue_input
    real_numpy = ort.OrtValue.numpy

    def bind(self, name, value):
        if name.startswith("past_key_values."):
            if not bound or name in bound[-1]:
                bound.append({})
            bound[-1][name] = value.data_ptr()
        return real_bind(self, name, value)

    def numpy(self):
        to_numpy.append(tuple(self.shape()))
        return real_numpy(self)

    monkeypatch.setattr(ort.IOBinding, "bind_ortvalue_input", bind)
    monkeypatch.setattr(ort.OrtValue, "numpy", numpy)

    runner = optimum_engine.runner
    presents: list[dict[str, int]] = []

    def watch(kind, real, cache: KVCache, *args):
        out = real(cache, *args)
        assert kind in ("prefill", "decode") and all(isinstance(v, ort.OrtValue) for v in cache.values)
        presents.append(dict(zip(runner.manifest.past_names(), (v.data_ptr() for v in cache.values))))
        return out

    wrap_steps(monkeypatch, runner, watch)
    steps = 12
    got = optimum_engine.generate(["Cache check", "and a second, longer row"], max_new_tokens=steps, ignore_eos=True)
    assert all(len(c.token_ids) == steps for c in got)
    assert len(bound) == len(presents) == steps  # a prefill and steps-1 decode steps
    for before, now in zip(presents, bound[1:]):
        assert now == before  # the same memory, not a copy
    vocab = optimum_engine.manifest.vocab_size
    assert len(to_numpy) == steps
    assert all(len(shape) == 3 and shape[-1] == vocab for shape in to_numpy)
    assert all(shape[1] == 1 for shape in to_numpy)  # prefill too: only the last position's logits


def test_cache_grows_one_position_a_step(llama_engine):
    runner = llama_engine.runner
    cache = runner.new_cache(2)
    assert cache.length == 0 and cache.nbytes() == 0
    ids = np.array([[5, 6, 7], [8, 9, 10]])
    runner.prefill(cache, ids, np.ones_like(ids), np.tile(np.arange(3), (2, 1)))
    m = llama_engine.manifest
    assert cache.length == 3
    assert cache.nbytes() == 2 * 3 * m.kv_bytes_per_token()
    runner.decode(cache, np.array([[1], [2]]), np.ones((2, 4), np.int64), np.array([[3], [3]]))
    assert cache.length == 4


def test_cache_ops_join_and_drop_rows_like_numpy(llama_engine):
    """The scheduler's cache surgery runs in ONNX Runtime on the cache's own device; checked
    against the same padding, concatenation, row selection and column slicing in numpy."""
    from nextoken.runner import CacheOps

    runner = llama_engine.runner
    ops = CacheOps(runner, llama_engine.device.providers)
    rng = np.random.default_rng(0)
    shape_a, shape_b = (
        (2, llama_engine.manifest.num_kv_heads, 5, llama_engine.manifest.head_dim),
        (1, llama_engine.manifest.num_kv_heads, 3, llama_engine.manifest.head_dim),
    )

    def cache(shape):
        c = runner.new_cache(shape[0])
        c.values = [ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in c.values]
        return c

    a, b = cache(shape_a), cache(shape_b)
    a.run_seconds = 1.5
    for left in (True, False):
        merged = ops.merge(a, b, 7, left)
        assert merged.run_seconds == 1.5 and merged.length == 7
        for va, vb, vm in zip(a.values, b.values, merged.values):
            pad = lambda x, n, left=left: np.pad(x.numpy(), [(0, 0), (0, 0), (n, 0) if left else (0, n), (0, 0)])  # noqa: E731
            np.testing.assert_array_equal(vm.numpy(), np.concatenate([pad(va, 2), pad(vb, 4)]))
        kept = ops.select(merged, [2, 0], 1, 6)
        assert kept.length == 5
        for vm, vk in zip(merged.values, kept.values):
            np.testing.assert_array_equal(vk.numpy(), vm.numpy()[[2, 0]][:, :, 1:6])


def test_the_fast_binding_path_equals_the_public_one(llama_engine, monkeypatch):
    """The step binds through ONNX Runtime's raw binding object with device handles made once;
    onnxruntime's public wrappers (the fallback) give the same tokens and cache."""
    fast = llama_engine.generate("Hello there", max_new_tokens=16, ignore_eos=True)
    assert llama_engine.runner.binder.fast
    monkeypatch.setattr(llama_engine.runner, "binder", Binder("cpu", 0, fast=False))
    public = llama_engine.generate("Hello there", max_new_tokens=16, ignore_eos=True)
    assert fast.token_ids == public.token_ids and fast.usage.kv_cache_bytes == public.usage.kv_cache_bytes
