"""Speculative decoding with prompt lookup: a proposer plugin guesses, the model checks the guesses
in one step; the tokens are exactly plain decoding's (greedy and seeded), on both KV backends, with
stop strings, logprobs and constraints, alone and under the scheduler; the cache is cut back past
rejected guesses; a proposer that misbehaves fails its request by name."""

from __future__ import annotations

import pytest

import nextoken
from helpers import run_cli
from nextoken import Engine, InvalidRequestError, PluginError, Scheduler
from nextoken.speculation import Speculation, StepCost

SPEC = {"method": "prompt_lookup", "k": 4}


@pytest.fixture(scope="module")
def copy_prompt(stories_engine):
    """A story, then its first words again: the model continues much as it went on the first time."""
    base = stories_engine.encode("Once upon a time")
    story = stories_engine.generate(base, max_new_tokens=200).token_ids
    return base + story[:150] + base + story[:24]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(temperature=0.8, seed=5),
        dict(temperature=1.0, top_k=20, seed=9),
        dict(stop=["park"]),
        dict(top_logprobs=2),
    ],
)
def test_the_same_tokens_as_plain_decoding(stories_engine, copy_prompt, kw):
    plain = stories_engine.generate(copy_prompt, max_new_tokens=80, **kw)
    spec = stories_engine.generate(copy_prompt, max_new_tokens=80, speculative=SPEC, **kw)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text and spec.finish_reason == plain.finish_reason
    if "top_logprobs" in kw:
        assert [lp.logprob for lp in spec.logprobs] == pytest.approx([lp.logprob for lp in plain.logprobs], abs=1e-4)
    assert spec.usage.accepted_tokens > 0 and spec.usage.proposed_tokens >= spec.usage.accepted_tokens


def test_with_a_constraint_and_on_both_backends(tiny_model, stories_engine, copy_prompt):
    schema = {
        "type": "json_schema",
        "json_schema": {
            "name": "s",
            "schema": {
                "type": "object",
                "properties": {"story": {"type": "string", "maxLength": 60}},
                "required": ["story"],
            },
        },
    }
    a = stories_engine.generate(copy_prompt, max_new_tokens=60, response_format=schema)
    b = stories_engine.generate(copy_prompt, max_new_tokens=60, response_format=schema, speculative=SPEC)
    assert a.token_ids == b.token_ids
    for backend in ("nextoken", "optimum"):  # slots (a length cut) and concatenation (a slice)
        with Engine(tiny_model("llama", backend)[1], plugins=False) as engine:
            prompt = list(range(5, 25)) * 3
            for kw in (dict(), dict(temperature=0.9, seed=2)):
                plain = engine.generate(prompt, max_new_tokens=30, ignore_eos=True, **kw)
                spec = engine.generate(prompt, max_new_tokens=30, ignore_eos=True, speculative=SPEC, **kw)
                assert spec.token_ids == plain.token_ids, (backend, kw)


def test_under_the_scheduler_speculation_runs_while_a_request_decodes_alone(stories_engine, copy_prompt):
    alone = stories_engine.generate(copy_prompt, max_new_tokens=60)
    other = stories_engine.generate("The dog", max_new_tokens=10)
    scheduler = Scheduler(stories_engine, max_batch=4)
    first = scheduler.submit(copy_prompt, max_new_tokens=60, speculative=SPEC)
    second = scheduler.submit("The dog", max_new_tokens=10, speculative=SPEC)
    while scheduler.step():
        pass
    assert first.result().token_ids == alone.token_ids and second.result().token_ids == other.token_ids
    assert first.result().usage.accepted_tokens > 0  # it went on alone once the other ended


def test_adaptive_k_follows_acceptance_and_step_cost_and_falls_back():
    """k is the guess that makes the most tokens per second: with nothing known of the cost every
    guess is free (k_max); once plain steps and checks of several sizes were timed, a + b * n and
    how often a guessed position was kept pick it; when no guess beats a plain step, speculation
    stops; the line is left in the engine's StepCost for the next request."""

    shared = StepCost()
    spec = Speculation(proposer=None, k=8, step_cost=shared)
    a, b = 75e-6, 25e-6  # a position costs a quarter of a plain step
    spec.stepped(1, 1.0)  # a request's first plain step and first
    spec.record(8, 8, 1.0)  # check make their bindings: not counted
    assert spec.k == 8 and spec.cost() == (1.0, 0.0)  # nothing known: every guess free, k_max
    for _ in range(8):
        spec.stepped(1, a + b)
    for n in (2, 5, 9):
        spec.record(n - 1, n - 1, a + b * n)
    assert spec.k == 8 and shared.line is None  # 3 checks timed: not yet a line
    spec.record(8, 3, a + b * 9)
    assert spec.cost() == pytest.approx((a, b))
    assert 1 <= spec.k < 8 and not spec.off  # alpha 25/27: a guess of 7 pays more than 8
    for _ in range(8):
        spec.record(max(spec.k, 1), 0, a + b * (max(spec.k, 1) + 1))
    assert spec.off and spec.propose(None, 10) == []  # alpha 0.1 < b / (a + b): plain decoding
    assert shared.line == pytest.approx((a, b))  # 8 of each timed: the engine's line
    assert Speculation(proposer=None, k=8, step_cost=shared).k == 1  # the next request starts from it


def test_bad_speculation_requests(stories_engine):
    with pytest.raises(InvalidRequestError, match="unknown proposer 'medusa'; registered: draft, prompt_lookup"):
        stories_engine.generate("Hi", speculative={"method": "medusa"})
    with pytest.raises(InvalidRequestError, match="'draft' needs 'model'"):
        stories_engine.generate("Hi", speculative={"method": "draft"})
    with pytest.raises(InvalidRequestError, match="the draft model /nowhere: model package /nowhere does not exist"):
        stories_engine.generate("Hi", speculative={"method": "draft", "model": "/nowhere"})
    with pytest.raises(InvalidRequestError, match=r"speculative k must be an integer in \[1, 16\]"):
        stories_engine.generate("Hi", speculative={"method": "prompt_lookup", "k": 0})

    class Liar:
        @nextoken.hookimpl
        def register_proposers(self, register):
            register("liar", lambda params, options: lambda state, row, k: ["x"])

    with Engine(stories_engine.path, plugins=False, extra_plugins=[Liar()]) as engine:
        with pytest.raises(PluginError, match="proposer 'liar'.*not a list of token ids"):
            engine.generate("Once upon a time", max_new_tokens=5, speculative={"method": "liar"})
        assert engine.generate("Once upon a time", max_new_tokens=5).token_ids  # the engine goes on


def test_cli_speculative(stories_package):
    got = run_cli(
        "generate",
        str(stories_package),
        "Once upon a time",
        "--max-new-tokens",
        "20",
        "--speculative",
        "prompt_lookup:3",
        "--json",
    )
    assert got.returncode == 0, got.stderr
    bad = run_cli("generate", str(stories_package), "Hi", "--speculative", "prompt_lookup:x")
    assert bad.returncode == 2 and "METHOD[:K[:MODEL]]" in bad.stderr


def test_through_the_server(stories_package, stories_engine, copy_prompt):
    from helpers import serving

    with serving(stories_package, "stories") as (client, *_):
        got = client.completions.create(
            model="stories",
            prompt=copy_prompt,
            max_tokens=40,
            temperature=0,
            extra_body={"nextoken": {"speculative": SPEC}},
        )
        assert got.choices[0].text == stories_engine.generate(copy_prompt, max_new_tokens=40).text
        assert got.model_extra["nextoken"]["usage"]["accepted_tokens"] > 0


def test_a_draft_model_proposes_and_the_tokens_stay_the_model_s(tiny_model):
    """A draft that is the model itself keeps nearly every guess; another tiny model (same byte
    vocabulary) keeps fewer; both give exactly plain decoding's tokens."""
    target = tiny_model("llama")[1]
    prompt = list(range(5, 25))
    with Engine(target, plugins=False) as engine:
        for draft in (target, tiny_model("qwen2")[1]):
            for kw in (dict(), dict(temperature=0.9, seed=3)):
                plain = engine.generate(prompt, max_new_tokens=24, ignore_eos=True, **kw)
                spec = engine.generate(
                    prompt,
                    max_new_tokens=24,
                    ignore_eos=True,
                    speculative={"method": "draft", "model": str(draft), "k": 4},
                    **kw,
                )
                assert spec.token_ids == plain.token_ids, (draft, kw)
            if draft == target:
                greedy = engine.generate(
                    prompt,
                    max_new_tokens=24,
                    ignore_eos=True,
                    speculative={"method": "draft", "model": str(draft), "k": 4},
                )
                assert greedy.usage.accepted_tokens >= 0.8 * greedy.usage.proposed_tokens > 0


def test_cached_forward_runs_a_sequence_piece_by_piece(tiny_model):
    """What the draft proposer keeps per sequence: fed in pieces, with a cut back and a different
    continuation, the logits are a one-pass forward's (both KV backends)."""
    import numpy as np

    for backend in ("nextoken", "optimum"):
        with Engine(tiny_model("llama", backend)[1], plugins=False) as engine:
            ids = list(range(5, 30))
            whole = engine.forward(ids)
            forward = engine.cached_forward(64)
            first = forward.feed(ids[:10])  # a prefill: the last position's logits
            rest = forward.feed(ids[10:20])  # an extension: each position's
            np.testing.assert_allclose(first[-1], whole[9], atol=1e-4)
            np.testing.assert_allclose(rest, whole[10:20], atol=1e-4)
            forward.truncate(15)
            other = [7, 8, 9]
            np.testing.assert_allclose(forward.feed(other), engine.forward(ids[:15] + other)[15:], atol=1e-4)
            assert forward.tokens == ids[:15] + other
            with pytest.raises(nextoken.ContextWindowError, match="exceed this cache's 64 positions"):
                forward.feed(list(range(50)))


def test_a_server_wide_default(stories_package, stories_engine, copy_prompt):
    from helpers import serving

    with serving(stories_package, "stories", speculative=SPEC) as (client, *_):
        got = client.completions.create(model="stories", prompt=copy_prompt, max_tokens=40, temperature=0)
        assert got.choices[0].text == stories_engine.generate(copy_prompt, max_new_tokens=40).text
        assert got.model_extra["nextoken"]["usage"]["accepted_tokens"] > 0
        off = client.completions.create(
            model="stories",
            prompt=copy_prompt,
            max_tokens=10,
            temperature=0,
            extra_body={"nextoken": {"speculative": {"method": "prompt_lookup", "k": 1}}},
        )
        assert off.model_extra["nextoken"]["usage"]["proposed_tokens"] <= 9  # the request's own setting


def test_bench_speculative(stories_package):
    """``nextoken bench --speculative``: both tasks, plain and speculative side by side, the settings printed."""
    import json

    got = run_cli(
        "bench",
        str(stories_package),
        "--speculative",
        "prompt_lookup:4",
        "--new",
        "30",
        "--repeat",
        "1",
        "--threads",
        "1",
        "--no-spin",
        "--json",
        "/dev/stdout",
    )
    assert got.returncode == 0, got.stderr
    report = json.loads(got.stdout[got.stdout.index("{") :])
    assert report["threads"] == 1 and report["spin"] is False
    rows = {r["task"]: r for r in report["rows"]}
    assert set(rows) == {"copies its prompt", "nothing to copy"}
    assert all(
        r["identical"] and r["k"] == 4 and r["plain_tok_s"] > 0 and r["speculative_tok_s"] > 0 for r in rows.values()
    )
    assert rows["copies its prompt"]["kept"] > 0
