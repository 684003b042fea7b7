"""Fault injection: whatever one request brings can end only that request.

A plugin that raises, returns garbage or returns the wrong shape is injected at every hook point
(tokenizer, logits processor, strategy, stop condition, cost meter, the three observers) into
one of eight concurrent requests, under both KV backends. The faulty request ends with an error
naming the plugin; the other seven get exactly the tokens they get alone; the scheduler goes on
serving. A model step that fails for everyone fails the requests in it, and the scheduler still
serves the next one; a loop that dies says so and refuses new requests.
"""

from __future__ import annotations

import numpy as np
import pytest

import nextoken
from helpers import wrap_steps
from nextoken import Charge, Engine, NextokenError, PluginError, Scheduler, SchedulerStoppedError, Stop

PROMPTS = [
    "Hello there",
    "A much longer prompt than the first",
    "abc",
    "Streaming joins late",
    "one two three",
    "The cat sat",
    "zz",
    "Last of eight prompts here",
]
FAULTY = 3  # the index of the request that brings the fault
KW = dict(max_new_tokens=8, ignore_eos=True)
MARK = "BOOM"  # text that the faulty tokenizer chokes on


class Faulty:
    """One plugin with a faulty piece of every kind. A request turns a fault on with
    ``options={"faulty": {"hook": ..., "mode": ..., "at": step}}``; every other request passes
    through it untouched (the observers and the tokenizer see every request)."""

    def __init__(self, inner_tokenizer=None) -> None:
        self.inner = inner_tokenizer

    @staticmethod
    def _fault(state, hook: str) -> str | None:
        opts = state.params.options.get("faulty", {})
        if opts.get("hook") == hook and state.step >= opts.get("at", 0):
            return opts["mode"]
        return None

    @nextoken.hookimpl
    def register_logits_processors(self, register):
        def factory(params, options):
            def processor(logits, state):
                mode = self._fault(state, "processor")
                if mode == "raise":
                    raise RuntimeError("processor exploded")
                if mode == "garbage":
                    return None
                if mode == "shape":
                    return np.zeros((logits.shape[0], logits.shape[0] + 1), dtype=np.float32)
                if mode == "nan":
                    logits[:] = np.nan
                return logits

            return processor

        register("faulty", factory)

    @nextoken.hookimpl
    def register_strategies(self, register):
        def factory(params, options):
            def strategy(logits, state):
                mode = self._fault(state, "strategy")
                if mode == "raise":
                    raise RuntimeError("strategy exploded")
                if mode == "garbage":
                    return np.full(logits.shape[0], logits.shape[1] + 7)  # out of the vocabulary
                if mode == "shape":
                    return np.zeros((logits.shape[0] + 2,), dtype=np.int64)
                if mode == "float":
                    return np.zeros(logits.shape[0], dtype=np.float32)
                return np.argmax(logits, axis=-1)

            return strategy

        register("faulty", factory)

    @nextoken.hookimpl
    def register_stop_conditions(self, register):
        def factory(params, options):
            def condition(tokens, state):
                mode = self._fault(state, "stop")
                if mode == "raise":
                    raise RuntimeError("stop condition exploded")
                if mode == "garbage":
                    return "yes"
                if mode == "shape":
                    return {len(tokens) + 4: Stop("stop")}
                return None

            return condition

        register("faulty", factory)

    @nextoken.hookimpl
    def register_cost_meters(self, register):
        def factory(options):
            mode = options.get("mode")

            def meter(usage):
                if mode == "raise":
                    raise RuntimeError("meter exploded")
                if mode == "garbage":
                    return "three dollars"
                if mode == "shape":
                    return Charge(float("nan"))
                return Charge(0.0)

            return meter

        register("faulty", factory)

    @nextoken.hookimpl
    def on_request_start(self, state):
        return self._observe(state, "on_request_start")

    @nextoken.hookimpl
    def on_step(self, state, tokens):
        return self._observe(state, "on_step")

    @nextoken.hookimpl
    def on_request_end(self, state, completions):
        return self._observe(state, "on_request_end")

    def _observe(self, state, hook):
        mode = self._fault(state, hook)
        if mode == "raise":
            raise RuntimeError(f"{hook} exploded")
        if mode in ("garbage", "shape"):
            return [object()]  # an observer's return value means nothing: it is ignored
        return None


class FaultyTokenizer:
    """Wraps the package's tokenizer: encode chokes on MARK; decode chokes on FAULT_ID."""

    def __init__(self, inner, mode: str, fault_id: int) -> None:
        self.inner, self.mode, self.fault_id = inner, mode, fault_id
        self.adds_bos, self.chat_template, self.special_tokens = (
            inner.adds_bos,
            inner.chat_template,
            inner.special_tokens,
        )

    def encode(self, text, add_special_tokens=True):
        ids = self.inner.encode(text, add_special_tokens=add_special_tokens)
        if MARK in text and self.mode.startswith("encode"):
            kind = self.mode.split("-")[1]
            if kind == "raise":
                raise RuntimeError("encode exploded")
            if kind == "garbage":
                return [10**9] + ids
            return [ids]  # the wrong shape: a nested list
        return ids

    def decode(self, ids):
        if self.fault_id in list(ids) and self.mode.startswith("decode"):
            if self.mode == "decode-raise":
                raise RuntimeError("decode exploded")
            return None if self.mode == "decode-garbage" else [ids]
        return self.inner.decode(ids)

    def id_to_token(self, token_id):
        return self.inner.id_to_token(token_id)


def tokenizer_plugin(mode: str, fault_id: int):
    class TokenizerPlugin:
        @nextoken.hookimpl
        def register_tokenizers(self, register):
            from nextoken.plugins.hf_tokenizer import load

            register("faulty-tok", lambda package, manifest: FaultyTokenizer(load(package, manifest), mode, fault_id))

    return TokenizerPlugin()


STEP_FAULTS = [
    (hook, mode)
    for hook in ("processor", "strategy", "stop", "on_request_start", "on_step", "on_request_end")
    for mode in ("raise", "garbage", "shape")
]
STEP_FAULTS += [("processor", "nan"), ("strategy", "float")]
METER_FAULTS = [("meter", mode) for mode in ("raise", "garbage", "shape")]


def _request(hook: str, mode: str) -> dict:
    """The keyword arguments that make a request bring the fault ``hook``/``mode``."""
    if hook == "meter":
        return dict(cost_meters={"faulty": {"mode": mode}})
    opts = dict(options={"faulty": {"hook": hook, "mode": mode, "at": 0 if hook == "on_request_start" else 2}})
    if hook == "processor":
        opts["processors"] = ("faulty",)
    elif hook == "strategy":
        opts["strategy"] = "faulty"
    elif hook == "stop":
        opts["stop_conditions"] = ("faulty",)
    return opts


@pytest.fixture(scope="module", params=["concat", "slots"])
def backend(request, tiny_llama, gqa_package):
    """(engine with the Faulty plugin, KV backend name, each prompt's tokens alone)."""
    package = tiny_llama[1] if request.param == "concat" else gqa_package
    with Engine(package, device="cpu", plugins=False, extra_plugins=[Faulty()]) as engine:
        alone = [engine.generate(p, **KW).token_ids for p in PROMPTS]
        yield engine, request.param, alone


def _run_eight(engine, kv_backend, faulty_kw, expect_submit_error=None):
    """Submit eight requests at once (the FAULTY one with ``faulty_kw``) to a running scheduler;
    returns (scheduler, handles, the faulty one's error)."""
    scheduler = Scheduler(engine, max_batch=8, kv_backend=kv_backend, slot_length=64 if kv_backend == "slots" else None)
    handles, error = [], None
    with scheduler:
        for i, prompt in enumerate(PROMPTS):
            if i == FAULTY:
                try:
                    handles.append(scheduler.submit(prompt, **KW, **faulty_kw))
                except NextokenError as exc:
                    handles.append(None)
                    error = exc
            else:
                handles.append(scheduler.submit(prompt, **KW))
        if handles[FAULTY] is not None:
            try:
                handles[FAULTY].result(timeout=60)
            except NextokenError as exc:
                error = exc
        others = [h.result(timeout=60).token_ids for i, h in enumerate(handles) if i != FAULTY]
        after = scheduler.submit(PROMPTS[0], **KW).result(timeout=60).token_ids
        assert scheduler.alive
    return others, after, error, scheduler


@pytest.mark.parametrize("hook, mode", STEP_FAULTS + METER_FAULTS)
def test_a_faulty_plugin_ends_only_its_request(backend, hook, mode):
    engine, kv_backend, alone = backend
    others, after, error, scheduler = _run_eight(engine, kv_backend, _request(hook, mode))
    assert others == [t for i, t in enumerate(alone) if i != FAULTY]
    assert after == alone[0]
    if hook.startswith("on_") and mode != "raise":
        assert error is None  # observers' return values are ignored
        assert scheduler.ended == {"finished": 9, "cancelled": 0, "failed": 0}
        return
    assert isinstance(error, PluginError), error
    message = str(error)
    assert "test_faults.Faulty" in message, message  # named by its class, never by an id number
    assert scheduler.ended == {"finished": 8, "cancelled": 0, "failed": 1}


def test_plugin_errors_say_what_was_wrong(backend):
    engine, _, _ = backend
    expected = {
        ("processor", "garbage"): "returned NoneType None, not a float numpy array [batch=1, vocab=",
        ("processor", "shape"): "returned an array of shape [1, 2], not [batch=1, vocab=",
        ("processor", "nan"): "returned NaN in row 0",
        ("strategy", "garbage"): "returned token ids outside the vocabulary",
        ("strategy", "shape"): "returned 3 token ids (shape [3]), not one per row [batch=1]",
        ("strategy", "float"): "not integer token ids",
        ("stop", "garbage"): "returned str 'yes', not None or a dict of row -> Stop",
        ("stop", "shape"): "returned a stop for row 5, not a row of the batch [0, 1)",
        ("meter", "garbage"): "returned str 'three dollars', not a Charge with a finite amount",
        ("meter", "shape"): "not a Charge with a finite amount",
    }
    for (hook, mode), text in expected.items():
        kind = {"processor": "logits_processor", "stop": "stop_condition", "meter": "cost_meter"}.get(hook, hook)
        with pytest.raises(PluginError) as info:
            engine.generate(PROMPTS[0], **KW, **_request(hook, mode))
        assert text in str(info.value) and f"{kind} 'faulty'" in str(info.value), (hook, mode, str(info.value))
    # and the engine is as it was
    assert engine.generate(PROMPTS[0], **KW).token_ids == engine.generate(PROMPTS[0], **KW).token_ids


@pytest.mark.parametrize(
    "mode", ["encode-raise", "encode-garbage", "encode-shape", "decode-raise", "decode-garbage", "decode-shape"]
)
@pytest.mark.parametrize("kv_backend", ["concat", "slots"])
def test_a_faulty_tokenizer_ends_only_the_request_it_fails(tiny_llama, gqa_package, tmp_path, mode, kv_backend):
    import json
    import shutil

    source = tiny_llama[1] if kv_backend == "concat" else gqa_package
    package = tmp_path / "pkg"
    shutil.copytree(source, package)
    manifest = json.loads((package / "nextoken.json").read_text())
    manifest["tokenizer"] = "faulty-tok"
    (package / "nextoken.json").write_text(json.dumps(manifest))
    prompts = list(PROMPTS)
    prompts[FAULTY] = f"{MARK} {PROMPTS[FAULTY]}"
    with Engine(source, device="cpu", plugins=False) as plain:
        alone = [plain.generate(p, **KW).token_ids for p in prompts]
        seen = {t for i, p in enumerate(prompts) if i != FAULTY for t in plain.encode(p) + alone[i]}
        # decode faults fire on a token that only the faulty request's prompt holds
        ids = [plain.encode(p) for p in prompts]
        fault_id = next(t for t in ids[FAULTY][-4:] + alone[FAULTY] if t not in seen)
    with Engine(package, device="cpu", plugins=False, extra_plugins=[tokenizer_plugin(mode, fault_id)]) as engine:
        scheduler = Scheduler(
            engine, max_batch=8, kv_backend=kv_backend, slot_length=64 if kv_backend == "slots" else None
        )
        with scheduler:
            handles, error = [], None
            for i, p in enumerate(prompts):
                try:
                    handles.append(scheduler.submit(p, **KW))
                except PluginError as exc:
                    assert i == FAULTY and mode.startswith("encode")
                    handles.append(None)
                    error = exc
            if mode.startswith("decode"):
                with pytest.raises(PluginError) as info:
                    handles[FAULTY].result(timeout=60)
                error = info.value
            got = [h.result(timeout=60).token_ids for i, h in enumerate(handles) if i != FAULTY]
            assert scheduler.alive
        assert got == [t for i, t in enumerate(alone) if i != FAULTY]
        assert "TokenizerPlugin' (tokenizer 'faulty-tok') failed in" in str(error), str(error)


def test_a_failing_model_step_fails_that_step_and_the_scheduler_serves_on(backend, monkeypatch):
    engine, kv_backend, alone = backend
    calls = {"n": 0}

    def flaky(kind, real, *args):
        if kind.startswith("decode"):  # decode steps only: a failed prefill is retried alone
            calls["n"] += 1
            if calls["n"] == 3:
                raise NextokenError("the model failed to run a step: injected")
        return real(*args)

    wrap_steps(monkeypatch, engine.runner, flaky)
    scheduler = Scheduler(engine, max_batch=8, kv_backend=kv_backend, slot_length=64 if kv_backend == "slots" else None)
    with scheduler:
        handles = [scheduler.submit(p, **KW) for p in PROMPTS[:4]]
        outcomes = []
        for h in handles:
            try:
                outcomes.append(h.result(timeout=60).token_ids)
            except NextokenError as exc:
                outcomes.append(str(exc))
        assert any("injected" in str(o) for o in outcomes)
        assert all(o == alone[i] for i, o in enumerate(outcomes) if not isinstance(o, str))
        assert scheduler.submit(PROMPTS[5], **KW).result(timeout=60).token_ids == alone[5]
        assert scheduler.alive


def test_a_dead_loop_fails_every_request_and_refuses_new_ones(backend, monkeypatch):
    engine, kv_backend, _ = backend
    scheduler = Scheduler(engine, max_batch=8, kv_backend=kv_backend, slot_length=64 if kv_backend == "slots" else None)

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(scheduler, "_compact", broken)
    handles = [scheduler.submit(p, **KW) for p in PROMPTS]  # all in hand before the loop starts
    scheduler.start()
    for h in handles:
        with pytest.raises(NextokenError, match="the scheduler stopped: RuntimeError: an internal bug"):
            h.result(timeout=60)
    assert not scheduler.alive and scheduler.error is not None
    with pytest.raises(SchedulerStoppedError, match="stopped after a failure"):
        scheduler.submit(PROMPTS[0], **KW)
    scheduler.close()


def test_the_server_keeps_serving_around_a_faulty_request(tiny_llama):
    """Through HTTP: the request whose cost meter raises gets a 500 naming the plugin; seven
    concurrent ones get their tokens; a dead loop turns /health and new requests into 503s."""
    import concurrent.futures

    from fastapi.testclient import TestClient

    from nextoken.serving.server import create_app

    with Engine(tiny_llama[1], device="cpu", plugins=False, extra_plugins=[Faulty()]) as engine:
        alone = [engine.generate(p, **KW).token_ids for p in PROMPTS]
        with Scheduler(engine, max_batch=8) as scheduler, TestClient(create_app(scheduler, "tiny")) as client:

            def post(i):
                body = {
                    "prompt": PROMPTS[i],
                    "max_tokens": KW["max_new_tokens"],
                    "temperature": 0,
                    "nextoken": {"ignore_eos": True},
                }
                if i == FAULTY:
                    body["nextoken"]["cost_meters"] = {"faulty": {"mode": "raise"}}
                return client.post("/v1/completions", json=body)

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(post, range(8)))
            bad = answers[FAULTY]
            assert bad.status_code == 500 and bad.json()["error"]["code"] == "plugin_error"
            assert "test_faults.Faulty" in bad.json()["error"]["message"]
            for i, r in enumerate(answers):
                if i != FAULTY:
                    assert r.status_code == 200 and r.json()["nextoken"]["token_ids"] == alone[i]
            assert client.get("/health").status_code == 200

            def broken(*args, **kwargs):
                raise RuntimeError("an internal bug")

            scheduler._compact = broken
            assert post(0).status_code == 503
            health = client.get("/health")
            assert health.status_code == 503 and "an internal bug" in health.json()["error"]
            assert post(1).status_code == 503


def test_a_temperature_that_underflows_is_greedy(llama_engine):
    greedy = llama_engine.generate(PROMPTS[0], **KW).token_ids
    for temperature in (1e-30, 1e-38, 1e-45, 1e-300):  # 1/T overflows float32 from 1e-39 on
        got = llama_engine.generate(PROMPTS[0], temperature=temperature, seed=3, **KW)
        assert got.token_ids == greedy, temperature


def test_non_finite_model_logits_are_an_error_naming_the_step(llama_engine, monkeypatch):
    calls = []

    def nan_at_third(kind, real, *args):  # the prefill, decode step 1, then step 2
        logits = real(*args)
        calls.append(kind)
        if len(calls) >= 3:
            logits[...] = np.nan
        return logits

    wrap_steps(monkeypatch, llama_engine.runner, nan_at_third)
    with pytest.raises(NextokenError, match=r"the model's logits at step 2 of request req-\d+ are NaN in row 0"):
        llama_engine.generate(PROMPTS[0], **KW)
    monkeypatch.undo()
    assert len(llama_engine.generate(PROMPTS[0], **KW).token_ids) == KW["max_new_tokens"]


class Watcher:
    @nextoken.hookimpl
    def on_step(self, state, tokens):
        raise RuntimeError("watcher broke")


def test_plugins_registered_at_run_time_are_named_by_what_they_are(tiny_llama):
    with Engine(tiny_llama[1], device="cpu", plugins=False) as engine:
        first, second = engine.register(Watcher()), engine.register(Watcher())
        assert first.endswith("test_faults.Watcher") and second == first + "#2"
        names = [row["plugin"] for row in engine.plugins.listing()]
        assert first in names and not any(name.isdigit() for name in names), names
        with pytest.raises(PluginError, match=r"plugin '\S*test_faults.Watcher(#2)?' failed in on_step"):
            engine.generate(PROMPTS[0], **KW)


class CutBack:
    """A stop condition with no holdback that, at step 4, cuts the text back to its start."""

    @nextoken.hookimpl
    def register_stop_conditions(self, register):
        def factory(params, options):
            return lambda tokens, state: {0: Stop("stop", "cut", text_end=0)} if state.step == 4 else None

        register("cut-back", factory)


def test_a_cut_never_takes_back_streamed_text(tiny_llama):
    with Engine(tiny_llama[1], device="cpu", plugins=False, extra_plugins=[CutBack()]) as engine:
        generation = engine.start(PROMPTS[0], stop_conditions=("cut-back",), **KW)
        streamed = "".join(event.text for event in engine.run(generation))
        final = generation.completions()[0]
        assert final.finish_reason == "stop" and final.text == streamed and len(final.token_ids) == 4


def test_a_failed_batched_prefill_is_retried_request_by_request(backend, monkeypatch):
    """A prefill of several newcomers that fails is no one request's fault until one fails alone:
    each is prefilled by itself, and those that succeed join with the tokens they get alone."""
    engine, kv_backend, alone = backend
    failed = {"n": 0}

    def no_batched_prefill(kind, real, *args):
        if kind == "prefill" and args[1].shape[0] > 1 and args[1].shape[1] > 1:
            failed["n"] += 1
            raise NextokenError("the model failed to run a step: injected into a batched prefill")
        return real(*args)

    wrap_steps(monkeypatch, engine.runner, no_batched_prefill)
    scheduler = Scheduler(engine, max_batch=8, kv_backend=kv_backend, slot_length=64 if kv_backend == "slots" else None)
    handles = [scheduler.submit(p, **KW) for p in PROMPTS]
    while scheduler.step():
        pass
    assert failed["n"] >= 1
    assert [h.result().token_ids for h in handles] == alone


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1e-45),
        dict(temperature=1e30, seed=1),
        dict(temperature=1.0, top_p=1e-30, seed=1),
        dict(temperature=1.0, min_p=0.999999, seed=1),
        dict(temperature=1.0, top_k=10**9, seed=1),
        dict(repetition_penalty=1e-38),
        dict(repetition_penalty=1e38),
        dict(presence_penalty=-2, frequency_penalty=-2),
        dict(logit_bias={5: 100, 6: -100}),
        dict(temperature=0.7, seed=2**80),
    ],
)
def test_extreme_but_valid_parameters_behave_as_their_limit(llama_engine, kw):
    got = llama_engine.generate(PROMPTS[1], max_new_tokens=6, ignore_eos=True, **kw)
    assert len(got.token_ids) == 6 and all(0 <= t < llama_engine.manifest.vocab_size for t in got.token_ids)
