"""OpenAI conformance: what other servers' test suites check of /v1/completions and
/v1/chat/completions, driven with the official openai client (and raw HTTP where the client hides
the shape): lists of prompts with n, echo and logprobs, /v1/models/{id}, OpenAI-shaped errors for
every status, the seed range, logprobs 0, no hidden cap on a chat's length, content parts, and the
newer OpenAI fields accepted."""

from __future__ import annotations

import math

import httpx
import numpy as np
import openai
import pytest

from helpers import TEMPLATE, serving, with_chat_template

GREEDY = dict(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    pkg = with_chat_template(tiny_llama[1], tmp_path_factory.mktemp("conf") / "tiny", TEMPLATE)
    with serving(pkg, "tiny", max_batch=4) as (client, engine, scheduler, base):
        yield client, engine, scheduler, base


def test_a_list_of_prompts_with_n_gives_each_prompts_choices_in_a_row(served):
    client, engine, *_ = served
    prompts = ["Once upon a time", "The cat sat"]
    got = client.completions.create(model="tiny", prompt=prompts, n=2, seed=3, temperature=0.9, max_tokens=5)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        alone = engine.generate(prompt, n=2, seed=3, temperature=0.9, max_new_tokens=5)
        assert [c.text for c in got.choices[2 * i : 2 * i + 2]] == [c.text for c in alone]
    assert got.usage.prompt_tokens == sum(len(engine.encode(p)) for p in prompts)
    ids = [engine.encode(p) for p in prompts]
    by_ids = client.completions.create(model="tiny", prompt=ids, **GREEDY)
    by_text = client.completions.create(model="tiny", prompt=prompts, **GREEDY)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    streamed = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt=prompts, stream=True, **GREEDY):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in by_text.choices]


def test_echo_with_logprobs_scores_the_prompt_too(served):
    client, engine, *_ = served
    prompt = "Once upon a time"
    ids = engine.encode(prompt)
    got = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, **GREEDY)
    choice = got.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 6 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    logits = engine.forward(ids)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert math.isclose(lp.token_logprobs[1], float(logp[0, ids[1]]), abs_tol=1e-4)
    assert all(len(top) <= 3 for top in lp.top_logprobs[1:])  # the 2 likeliest, and the token itself
    streamed = list(
        client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, stream=True, **GREEDY)
    )
    assert streamed[0].choices[0].text == prompt and streamed[0].choices[0].logprobs.token_logprobs[0] is None


def test_logprobs_zero_still_reports_the_sampled_token(served):
    client, *_ = served
    got = client.completions.create(model="tiny", prompt="Hi", logprobs=0, **GREEDY)
    lp = got.choices[0].logprobs
    assert [list(top) for top in lp.top_logprobs] == [[token] for token in lp.tokens]
    assert all(top[t] == v for top, t, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))


def test_models_by_id_and_every_error_in_openais_shape(served):
    client, _, _, base = served
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("other")
    assert caught.value.body["code"] == "model_not_found"
    for path in ("/v1/nothing", "/v2/models"):
        r = httpx.get(base + path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    r = httpx.get(base + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_stream_options_need_stream(served):
    client, *_ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="Hi", stream_options={"include_usage": True}, **GREEDY)
    assert caught.value.body["param"] == "stream_options"


def test_the_seed_range_of_openais_clients(served):
    client, engine, *_ = served
    kw = dict(model="tiny", prompt="Hi", temperature=1.0, max_tokens=5)
    negative = client.completions.create(seed=-5, **kw).choices[0].text
    assert negative == engine.generate("Hi", seed=2**64 - 5, temperature=1.0, max_new_tokens=5).text
    assert client.completions.create(seed=2**64 - 1, **kw).choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(seed=2**64, **kw)


def test_a_chat_without_max_tokens_runs_to_the_window(stories_package, tmp_path):
    """No hidden default cap (it was 128): the window decides, unless the operator sets one."""
    pkg = with_chat_template(stories_package, tmp_path / "stories", TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}]
    body = dict(model="stories", messages=messages, extra_body={"nextoken": {"ignore_eos": True}})
    with serving(pkg, "stories") as (client, engine, scheduler, _):
        got = client.chat.completions.create(**body)
        prompt = len(engine.apply_chat_template(messages))
        assert got.usage.completion_tokens == scheduler.max_sequence_length - prompt > 128
        assert got.choices[0].finish_reason == "length"
    with serving(pkg, "stories", max_tokens_default=40) as (client, *_):
        assert client.chat.completions.create(**body).usage.completion_tokens == 40


def test_text_parts_are_joined_by_a_newline(served):
    client, engine, *_ = served
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}], **GREEDY)
    assert got.usage.prompt_tokens == len(engine.apply_chat_template([{"role": "user", "content": "first\nsecond"}]))


NEWER = dict(
    user="u-1",
    metadata={"team": "a"},
    store=False,
    service_tier="auto",
    reasoning_effort="low",
    prompt_cache_key="k",
    safety_identifier="s",
    verbosity="low",
)


def test_newer_openai_fields_are_accepted_and_unknown_ones_still_refused(served):
    client, *_ = served
    messages = [{"role": "user", "content": "Hi"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    tagged = client.chat.completions.create(model="tiny", messages=messages, extra_body=NEWER, **GREEDY)
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, extra_body={"frobnicate": 1}, **GREEDY)
    assert caught.value.body["param"] == "frobnicate"


def test_the_servers_default_prefix_cache_is_a_share_of_the_memory_left(tiny_llama, monkeypatch):
    from nextoken.tools import memory

    budget, why = memory.prefix_cache_budget(tiny_llama[1], 8, 128)
    free = memory.meminfo_bytes("MemAvailable")
    assert 0 < budget <= min(free // 4, memory.PREFIX_CACHE_CAP) and "a quarter" in why
    monkeypatch.setattr(memory, "meminfo_bytes", lambda field: 1 << 20)  # 1 MiB free: less than the weights
    budget, why = memory.prefix_cache_budget(tiny_llama[1], 8, 128)
    assert budget == 0 and "leaves nothing" in why
