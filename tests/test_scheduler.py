"""Continuous batching: requests join and leave a running batch and get what they get alone."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest

import nextoken
from nextoken import Engine, InvalidRequestError, PluginError, Scheduler

PROMPTS = ["Hello there", "A much longer prompt than the first one", "abc", "Streaming, per sequence, joins late"]


@pytest.fixture()
def engine(tiny_llama):
    with Engine(tiny_llama[1], device="cpu", plugins=False) as e:
        yield e


def _run_until_done(scheduler: Scheduler, limit: int = 1000) -> None:
    for _ in range(limit):
        if not scheduler.step():
            return
    raise AssertionError("the scheduler did not finish")


def test_requests_joining_mid_batch_get_what_they_get_alone(engine):
    kw = dict(max_new_tokens=20, ignore_eos=True)
    alone = [engine.generate(p, **kw).token_ids for p in PROMPTS]
    scheduler = Scheduler(engine, max_batch=8)
    handles = [scheduler.submit(PROMPTS[0], **kw)]
    for _ in range(5):
        scheduler.step()
    handles += [scheduler.submit(p, **kw) for p in PROMPTS[1:3]]
    for _ in range(7):
        scheduler.step()
    handles.append(scheduler.submit(PROMPTS[3], **kw))
    _run_until_done(scheduler)
    assert [h.result().token_ids for h in handles] == alone
    texts = ["".join(e.text for e in h) for h in handles]
    assert texts == [h.result().text for h in handles]
    for h in handles:
        usage = h.result().usage
        assert 0 < usage.time_to_first_token_ms <= usage.wall_ms and usage.completion_tokens == 20
        assert usage.kv_cache_bytes == (usage.prompt_tokens + 19) * engine.manifest.kv_bytes_per_token()
    assert scheduler.running == 0 and scheduler.waiting == 0


def test_each_request_keeps_its_own_sampling_and_seed(engine):
    specs = [
        dict(max_new_tokens=16, temperature=0.9, top_k=20, seed=1),
        dict(max_new_tokens=12, ignore_eos=True),
        dict(max_new_tokens=16, temperature=1.2, top_p=0.8, seed=7, repetition_penalty=1.2),
    ]
    alone = [engine.generate(p, **kw).token_ids for p, kw in zip(PROMPTS, specs)]
    scheduler = Scheduler(engine)
    handles = []
    for p, kw in zip(PROMPTS, specs):
        handles.append(scheduler.submit(p, **kw))
        scheduler.step()
    _run_until_done(scheduler)
    assert [h.result().token_ids for h in handles] == alone


def test_max_batch_and_waiting(engine):
    scheduler = Scheduler(engine, max_batch=2)
    handles = [scheduler.submit(p, max_new_tokens=6, ignore_eos=True) for p in PROMPTS[:3]]
    scheduler.step()
    assert scheduler.running == 2 and scheduler.waiting == 1
    _run_until_done(scheduler)
    assert all(len(h.result().token_ids) == 6 for h in handles)


def test_cancel_frees_the_slot_within_one_step(engine):
    scheduler = Scheduler(engine, max_batch=2)
    a = scheduler.submit(PROMPTS[0], max_new_tokens=50, ignore_eos=True)
    b = scheduler.submit(PROMPTS[1], max_new_tokens=50, ignore_eos=True)
    waiting = scheduler.submit(PROMPTS[2], max_new_tokens=5, ignore_eos=True)
    for _ in range(3):
        scheduler.step()
    a.cancel()
    scheduler.step()
    assert a.done and a.result().finish_reason == "cancelled"
    assert scheduler.running == 2  # the waiting request took the freed slot
    _run_until_done(scheduler)
    assert len(b.result().token_ids) == 50 and len(waiting.result().token_ids) == 5
    assert b.result().token_ids == engine.generate(PROMPTS[1], max_new_tokens=50, ignore_eos=True).token_ids


def test_a_failing_plugin_ends_only_its_request(engine):
    def make_broken(params, options):
        def broken(logits, state):
            if state.step == 2:
                raise RuntimeError("boom")
            return logits

        return broken

    engine.register(
        types.SimpleNamespace(
            register_logits_processors=nextoken.hookimpl(lambda register: register("broken", make_broken))
        ),
        "broken-plugin",
    )
    scheduler = Scheduler(engine)
    bad = scheduler.submit(PROMPTS[0], max_new_tokens=8, processors=("broken",))
    good = scheduler.submit(PROMPTS[1], max_new_tokens=8, ignore_eos=True)
    _run_until_done(scheduler)
    with pytest.raises(PluginError, match="broken-plugin"):
        list(bad)
    assert good.result().token_ids == engine.generate(PROMPTS[1], max_new_tokens=8, ignore_eos=True).token_ids


def test_bad_requests_are_refused_at_submit(engine):
    scheduler = Scheduler(engine)
    with pytest.raises(InvalidRequestError, match="max_new_tokens must be >= 1"):
        scheduler.submit("x", max_new_tokens=0)
    with pytest.raises(InvalidRequestError, match="one prompt per request"):
        scheduler.submit(["a", "b"])
    with pytest.raises(InvalidRequestError, match="max_batch must be >= 1"):
        Scheduler(engine, max_batch=0)


def test_background_thread_with_submitters_on_many_threads(engine):
    kw = dict(max_new_tokens=10, ignore_eos=True)
    alone = {p: engine.generate(p, **kw).token_ids for p in PROMPTS}
    results: dict[str, list[int]] = {}
    with Scheduler(engine, max_batch=3) as scheduler:

        def worker(prompt: str) -> None:
            results[prompt] = [e.token_id for e in scheduler.submit(prompt, **kw)]

        threads = [threading.Thread(target=worker, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert results == alone


def test_asyncio_streams(engine):
    kw = dict(max_new_tokens=8, ignore_eos=True)
    alone = [engine.generate(p, **kw).text for p in PROMPTS[:2]]

    async def main():
        with Scheduler(engine) as scheduler:

            async def one(prompt):
                return "".join([e.text async for e in scheduler.submit(prompt, **kw)])

            return await asyncio.gather(*(one(p) for p in PROMPTS[:2]))

    assert asyncio.run(main()) == alone


def test_closing_fails_what_is_left(engine):
    scheduler = Scheduler(engine)
    handle = scheduler.submit("abc", max_new_tokens=5)
    scheduler.close()
    with pytest.raises(nextoken.NextokenError, match="closed before this request finished"):
        handle.result(timeout=5)
    with pytest.raises(nextoken.NextokenError, match="closed"):
        scheduler.submit("abc")


def test_prefill_budget_spreads_newcomers_over_steps(engine):
    scheduler = Scheduler(engine, max_batch=8, max_prefill_tokens=30)
    handles = [scheduler.submit(p, max_new_tokens=4, ignore_eos=True) for p in PROMPTS]
    sizes = [len(engine.encode(p)) for p in PROMPTS]
    assert sizes[0] + sizes[2] <= 30 < sizes[1] and sizes[3] > 30
    scheduler.step()
    # The first and third fit the budget; the second is long, so it is being prefilled in chunks,
    # and the fourth (long too) waits for it: one chunked prefill at a time.
    assert scheduler.running == 2 and scheduler.waiting == 2
    _run_until_done(scheduler)
    assert all(len(h.result().token_ids) == 4 for h in handles)
    with pytest.raises(InvalidRequestError, match="max_prefill_tokens must be >= 1"):
        Scheduler(engine, max_prefill_tokens=0)


def test_closing_the_engine_under_a_running_scheduler_fails_requests_cleanly(tiny_llama):
    engine = Engine(tiny_llama[1], device="cpu", plugins=False)
    scheduler = Scheduler(engine)
    handle = scheduler.submit("abc", max_new_tokens=100, ignore_eos=True)
    engine.close()
    scheduler.start()
    with pytest.raises(nextoken.NextokenError, match="engine is closed"):
        handle.result(timeout=10)
    scheduler.close()


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(engine):
    """A prompt longer than max_prefill_tokens is prefilled a chunk a step while the batch keeps
    decoding (one token a step); it gets exactly the tokens it gets alone."""
    long_prompt = "A long prompt, " * 6
    kw = dict(max_new_tokens=12, ignore_eos=True)
    alone_long = engine.generate(long_prompt, **kw).token_ids
    alone_short = engine.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True).token_ids
    size = len(engine.encode(long_prompt))
    scheduler = Scheduler(engine, max_batch=4, max_prefill_tokens=16)
    short = scheduler.submit(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
    scheduler.step()
    tokens = [len(short.generation.state.generated[0])]
    long = scheduler.submit(long_prompt, **kw)
    steps_to_join = 0
    while scheduler.running < 2:
        scheduler.step()
        steps_to_join += 1
        tokens.append(len(short.generation.state.generated[0]))
        assert steps_to_join < 20
    assert steps_to_join == -(-size // 16)  # ceil(size / chunk) steps
    assert tokens == list(range(1, len(tokens) + 1))  # the running one never skipped a step
    _run_until_done(scheduler)
    assert long.result().token_ids == alone_long and short.result().token_ids == alone_short
    assert long.result().usage.prompt_tokens == size


def test_a_prompt_prefilled_in_place_in_a_slot_between_running_ones(engine):
    """Slots: a long prompt is prefilled in chunks straight into a free slot (slot 1 here, between
    running rows in slots 0 and 2, which decode every step: the step writes past the half-filled
    slot's positions and gives it back its length); it joins there and gets what it gets alone,
    as do the rows around it. Cancelled half-way, its slot is free for the next request."""
    long_prompt = "A long prompt, " * 6
    kw = dict(max_new_tokens=12, ignore_eos=True)
    alone = {p: engine.generate(p, max_new_tokens=40, ignore_eos=True).token_ids for p in PROMPTS[:3]}
    alone_long = engine.generate(long_prompt, **kw).token_ids
    scheduler = Scheduler(engine, max_batch=3, max_prefill_tokens=8)
    a = scheduler.submit(PROMPTS[0], max_new_tokens=40, ignore_eos=True)
    b = scheduler.submit(PROMPTS[1], max_new_tokens=2, ignore_eos=True)
    c = scheduler.submit(PROMPTS[2], max_new_tokens=40, ignore_eos=True)
    while not b.done:
        scheduler.step()
    scheduler.step()
    assert sorted(scheduler.kv.slot_ids) == [0, 2]
    long = scheduler.submit(long_prompt, **kw)
    scheduler.step()
    assert scheduler.kv.reserved == {1} and scheduler.waiting == 1  # half prefilled, in slot 1
    _run_until_done(scheduler)
    assert long.result().token_ids == alone_long
    assert a.result().token_ids == alone[PROMPTS[0]] and c.result().token_ids == alone[PROMPTS[2]]
    assert not scheduler.kv.reserved
    cancelled = scheduler.submit(long_prompt, **kw)
    scheduler.step()
    assert scheduler.kv.reserved == {0}
    cancelled.cancel()
    _run_until_done(scheduler)
    assert not scheduler.kv.reserved and cancelled.result().finish_reason == "cancelled"
    again = scheduler.submit(long_prompt, **kw)
    _run_until_done(scheduler)
    assert again.result().token_ids == alone_long


def test_cancelling_a_prompt_while_it_is_prefilled_in_chunks(engine):
    scheduler = Scheduler(engine, max_batch=4, max_prefill_tokens=8)
    handle = scheduler.submit("A long prompt, " * 6, max_new_tokens=5)
    scheduler.step()
    assert scheduler.waiting == 1 and scheduler.running == 0
    handle.cancel()
    _run_until_done(scheduler)
    assert handle.result().finish_reason == "cancelled" and scheduler.waiting == 0 and scheduler.ended["cancelled"] == 1


def test_slide_under_continuous_batching_equals_alone(engine):
    """context_policy='slide': when a request's window fills, it leaves the batch, its kept window
    is prefilled again (in chunks, before newcomers), and it rejoins: tokens and slides as alone."""
    kw = dict(max_new_tokens=200, ignore_eos=True, context_policy="slide", protected_prefix=3)
    alone = engine.start("Sliding along", **kw)
    alone_tokens = engine.complete(alone)[0].token_ids
    assert len(alone.slides) >= 2
    other_alone = engine.generate(PROMPTS[1], max_new_tokens=150, ignore_eos=True).token_ids
    scheduler = Scheduler(engine, max_batch=4, max_prefill_tokens=24)
    handle = scheduler.submit("Sliding along", **kw)
    for _ in range(30):
        scheduler.step()
    other = scheduler.submit(PROMPTS[1], max_new_tokens=150, ignore_eos=True)
    _run_until_done(scheduler)
    assert handle.result().token_ids == alone_tokens and other.result().token_ids == other_alone
    assert handle.generation.slides == alone.slides
    assert "".join(e.text for e in handle) == handle.result().text
