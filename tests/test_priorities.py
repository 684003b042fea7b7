"""Priorities: waiting requests are admitted by rank (priority, lower first, then arrival), a rank
ages so a low priority is delayed and never starved, and a running request of a later rank gives
way to one waiting when the batch has no room (rows or KV bytes), coming back with the same tokens.
What one request brings (its priority, its plugins) can fail only that request."""

from __future__ import annotations

import time

import httpx
import pytest

import nextoken
from helpers import serving
from nextoken import Engine, InvalidRequestError, PluginError, Scheduler
from nextoken.kvcache import row_slack

KW = dict(max_new_tokens=12, ignore_eos=True)


def _drain(scheduler: Scheduler, handles: dict) -> list[str]:
    """Step ``scheduler`` to its end; the names of ``handles`` in the order they finished."""
    order: list[str] = []
    while scheduler.step():
        order += [name for name, h in handles.items() if h.done and name not in order]
    return order + [name for name, h in handles.items() if h.done and name not in order]


def _alone(engine: Engine, prompt: str, **kw) -> list[int]:
    return engine.generate(prompt, **{**KW, **kw}).token_ids


def test_waiting_requests_are_admitted_by_priority_then_arrival(llama_engine):
    scheduler = Scheduler(llama_engine, max_batch=1, priority_aging=None)
    handles = {"first": scheduler.submit("Hello there", priority=-10, **KW)}
    scheduler.step()  # running: it outranks every later one, so nothing preempts it
    for name, priority in (("low", 5), ("high", -5), ("normal", 0), ("low2", 5), ("high2", -5)):
        handles[name] = scheduler.submit("abc", priority=priority, **KW)
    assert _drain(scheduler, handles) == ["first", "high", "high2", "normal", "low", "low2"]
    assert scheduler.preempted == scheduler.preempted_for_priority == 0
    assert handles["low2"].queued_seconds > handles["high"].queued_seconds > 0
    m = scheduler.metrics()
    assert m["requests_by_priority"] == {"high": 3, "normal": 1, "low": 2}
    waited = m["time_to_first_token_by_priority_seconds"]
    assert waited["low"]["count"] == 2 and waited["low"]["sum"] / 2 > waited["high"]["sum"] / 3  # means


def test_a_waiting_rank_ages_so_a_low_priority_is_never_starved(llama_engine):
    """With aging, each 10 ms waited is a level: a priority-3 request that has waited 50 ms goes before a
    priority-0 one arriving then; with strict priorities (no aging) the later one goes first."""
    for aging, expected in ((0.01, ["first", "old low", "new normal"]), (None, ["first", "new normal", "old low"])):
        scheduler = Scheduler(llama_engine, max_batch=1, priority_aging=aging)
        handles = {"first": scheduler.submit("Hello there", priority=-1000, **KW)}
        scheduler.step()
        handles["old low"] = scheduler.submit("abc", priority=3, **KW)
        time.sleep(0.05)
        handles["new normal"] = scheduler.submit("abc", priority=0, **KW)
        assert _drain(scheduler, handles) == expected, aging


@pytest.mark.parametrize(
    "engine_name, backend, kept",
    [
        ("llama_engine", "slots", True),  # its slot's positions copied out, its last token run over them
        ("optimum_engine", "concat", True),  # left-padded rows: its last columns
        ("llama_engine", "concat", False),  # right-padded rows have padding inside: prefilled again
    ],
)
def test_a_running_request_of_a_later_rank_gives_way_and_comes_back_the_same(
    request, monkeypatch, engine_name, backend, kept
):
    """Short of a row (no KV budget), the request that gives way keeps a copy of its cache where its
    backend can copy it out, and comes back over it with nothing run (its last token is its next
    decode step's input, as when it left); either way, the same tokens as alone."""
    engine = request.getfixturevalue(engine_name)
    scheduler = Scheduler(engine, max_batch=1, kv_backend=backend)
    low = scheduler.submit("The cat sat", priority=5, **KW)
    for _ in range(4):
        scheduler.step()
    assert scheduler.running == 1 and len(low.generation.state.generated[0]) > 0
    runs = []
    for method in ("prefill", "prefill_in_place"):  # prompts run from here on (the runner's own calls)
        real = getattr(scheduler.runner, method)
        monkeypatch.setattr(scheduler.runner, method, lambda *a, _real=real, **k: runs.append(1) or _real(*a, **k))
    high = scheduler.submit("Hello there", priority=-1, **KW)
    scheduler.step()  # it gives way
    held = len(low.generation.state.generated[0]) + len(low.generation.state.prompts[0]) - 1
    assert scheduler.preempted_cache_kept == int(kept)
    if kept:  # the copy is counted as held
        assert scheduler.kv_committed_bytes >= held * engine.manifest.kv_bytes_per_token()
    order = _drain(scheduler, {"low": low, "high": high})
    assert order == ["high", "low"] and scheduler.preempted_for_priority == scheduler.preempted == 1
    assert len(runs) == (1 if kept else 2)  # kept: the newcomer's prompt only; it rejoins in a decode step
    monkeypatch.undo()
    assert low.result().token_ids == _alone(engine, "The cat sat")
    assert high.result().token_ids == _alone(engine, "Hello there")
    assert scheduler.metrics()["preempted_for_priority"] == 1
    assert scheduler.metrics()["preempted_cache_kept"] == int(kept)
    assert scheduler.kv_committed_bytes == 0 and not scheduler._parked


def test_several_sequences_give_way_whole(llama_engine):
    """A request of n=2 seeded choices gives way whole and comes back with both choices as alone."""
    kw = dict(KW, n=2, temperature=0.9, seed=7)
    scheduler = Scheduler(llama_engine, max_batch=2)
    low = scheduler.submit("The cat sat", priority=1, **kw)
    for _ in range(3):
        scheduler.step()
    high = scheduler.submit("abc", priority=0, **KW)
    _drain(scheduler, {"low": low, "high": high})
    assert scheduler.preempted_for_priority == 1
    assert [c.token_ids for c in low.results()] == [c.token_ids for c in llama_engine.generate("The cat sat", **kw)]


def test_equal_or_earlier_ranks_are_not_preempted(llama_engine):
    for running, waiting in ((0, 0), (-1, 0), (0, 3)):
        scheduler = Scheduler(llama_engine, max_batch=1)
        first = scheduler.submit("Hello there", priority=running, **KW)
        scheduler.step()
        second = scheduler.submit("abc", priority=waiting, **KW)
        assert _drain(scheduler, {"first": first, "second": second}) == ["first", "second"]
        assert scheduler.preempted == 0


@pytest.mark.parametrize("room, kept", [(1.1, 0), (1.5, 1)])
def test_a_request_gives_way_for_kv_bytes_too(llama_engine, room, kept):
    """Rows to spare but a KV budget one request fills: the later rank gives way for the bytes. A
    copy of its cache (its positions, without a slot's page of slack a head and layer) is kept only
    where it fits beside the newcomer: at 1.5 requests' bytes it does, at 1.1 it does not (recomputed)."""
    manifest = llama_engine.manifest
    positions = 40  # either request's prompt + 12 new tokens fits; both do not
    budget = positions * manifest.kv_bytes_per_token() + row_slack(manifest)
    scheduler = Scheduler(llama_engine, max_batch=4, kv_budget=int(budget * room))
    low = scheduler.submit("A much longer prompt than the first", priority=2, **KW)
    for _ in range(3):
        scheduler.step()
    high = scheduler.submit("Streaming joins late, a prompt", priority=0, **KW)
    assert _drain(scheduler, {"low": low, "high": high}) == ["high", "low"]
    assert scheduler.preempted_for_priority >= 1
    assert scheduler.preempted_cache_kept == kept
    assert low.result().token_ids == _alone(llama_engine, "A much longer prompt than the first")


class Boom:
    """A logits processor that raises from the step its request's options name."""

    @nextoken.hookimpl
    def register_logits_processors(self, register):
        def factory(params, options):
            def processor(logits, state):
                if state.step >= state.params.options.get("boom", {}).get("at", 10**9):
                    raise RuntimeError("boom")
                return logits

            return processor

        register("boom", factory)


@pytest.fixture(scope="module")
def boom_engine(tiny_llama):
    with Engine(tiny_llama[1], device="cpu", plugins=False, extra_plugins=[Boom()]) as engine:
        yield engine


@pytest.mark.parametrize("faulty", ["preempted", "preemptor"])
def test_a_fault_after_giving_way_fails_only_its_request(boom_engine, faulty):
    """The request that gave way fails at its first step back (or the one it gave way to fails at
    once): that request alone ends with the plugin's error; the other gets its tokens alone; the
    scheduler serves the next request."""
    scheduler = Scheduler(boom_engine, max_batch=1)
    boom = dict(processors=["boom"], options={"boom": {"at": 5 if faulty == "preempted" else 0}})
    low = scheduler.submit("The cat sat", priority=1, **KW, **(boom if faulty == "preempted" else {}))
    for _ in range(3):
        scheduler.step()
    high = scheduler.submit("Hello there", priority=0, **KW, **(boom if faulty == "preemptor" else {}))
    _drain(scheduler, {"low": low, "high": high})
    bad, good, prompt = (low, high, "Hello there") if faulty == "preempted" else (high, low, "The cat sat")
    assert scheduler.preempted_for_priority == 1
    assert isinstance(bad.error, PluginError) and "boom" in str(bad.error)
    assert good.error is None and good.result().token_ids == _alone(boom_engine, prompt)
    after = scheduler.submit("abc", priority=-3, **KW)
    while scheduler.step():
        pass
    assert after.result().token_ids == _alone(boom_engine, "abc")


def test_a_bad_priority_is_refused_by_name(llama_engine):
    scheduler = Scheduler(llama_engine, max_batch=2)
    for bad in ("high", 1.5, 2**31, None):
        with pytest.raises(InvalidRequestError, match="priority must be an integer"):
            scheduler.submit("abc", priority=bad, **KW)
    with pytest.raises(InvalidRequestError, match="priority_aging must be > 0"):
        Scheduler(llama_engine, priority_aging=0)
    ok = scheduler.submit("abc", priority=-(2**31), **KW)  # the range's ends are fine, and the queue works
    while scheduler.step():
        pass
    assert ok.result().token_ids == _alone(llama_engine, "abc")


def test_the_server_takes_priority_at_top_level_and_in_the_nextoken_object(tiny_llama):
    with serving(tiny_llama[1], "tiny") as (client, _engine, _scheduler, base):
        url = f"{base}/v1/completions"
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 3}
        for extra in ({"priority": -2}, {"nextoken": {"priority": 4}}, {"priority": 1, "nextoken": {"priority": 1}}):
            answer = httpx.post(url, json={**body, **extra})
            assert answer.status_code == 200, answer.text
        for extra, why in (
            ({"priority": "high"}, "priority"),
            ({"priority": 1, "nextoken": {"priority": 2}}, "priority is given twice"),
            ({"priority": 2**40}, "priority must be an integer"),
        ):
            answer = httpx.post(url, json={**body, **extra})
            assert answer.status_code == 400 and why in answer.text, answer.text
        done = client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"priority": 3})
        assert done.choices[0].finish_reason in ("length", "stop")
