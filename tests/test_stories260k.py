"""The real trained model: real text, real tokenizer, two EOS ids."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def reference(stories_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval()
    return tok, model


def test_greedy_64_tokens_equal_transformers_text(stories_engine, reference):
    tok, model = reference
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert stories_engine.encode(PROMPT) == ids[0].tolist()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=64, do_sample=False)
    expected_ids = out[0, ids.shape[1] :].tolist()
    got = stories_engine.generate(PROMPT, max_new_tokens=64)
    assert got.token_ids == expected_ids
    assert PROMPT + got.text == tok.decode(out[0], skip_special_tokens=True)
    # A children's story: ordinary English words, not noise.
    words = got.text.split()
    assert len(words) > 30
    assert (
        sum(w.strip(".,!\"'").lower() in {"the", "a", "she", "he", "was", "to", "and", "her", "play"} for w in words)
        > 8
    )


def test_stops_at_the_second_eos_id_and_ignore_eos_runs_past_it(stories_engine, reference):
    assert stories_engine.eos_token_ids == (2, 1)
    done = stories_engine.generate(PROMPT, max_new_tokens=420)
    assert done.finish_reason == "stop"
    assert done.token_ids[-1] == 1  # the model ends a story with BOS (id 1)
    assert 1 not in done.token_ids[:-1] and 2 not in done.token_ids
    assert "<s>" not in done.text and "</s>" not in done.text
    n = len(done.token_ids)
    assert n < 420
    # transformers agrees on where the story ends.
    tok, model = reference
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=420, do_sample=False)
    assert out[0, ids.shape[1] :].tolist() == done.token_ids

    past = stories_engine.generate(PROMPT, max_new_tokens=n + 20, ignore_eos=True)
    assert past.finish_reason == "length"
    assert len(past.token_ids) == n + 20
    assert past.token_ids[:n] == done.token_ids


def test_cli_generate_streams_only_the_continuation(stories_package, stories_engine):
    result = run_cli("generate", str(stories_package), PROMPT, "--max-new-tokens", "32")
    assert result.returncode == 0, result.stderr
    expected = stories_engine.generate(PROMPT, max_new_tokens=32).text
    assert result.stdout == expected + "\n"
    assert not result.stdout.startswith(PROMPT)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tok/s" in lines[0] and "prompt 5 tok, completion 32 tok" in lines[0]


def test_cli_generate_json_and_ignore_eos(stories_package):
    result = run_cli("generate", str(stories_package), PROMPT, "--max-new-tokens", "400", "--ignore-eos", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"text", "token_ids", "finish_reason", "usage"} <= set(data)
    assert len(data["token_ids"]) == 400 and data["finish_reason"] == "length"
    assert 1 in data["token_ids"]  # it ran past the end of the story
    usage = data["usage"]
    assert usage["prompt_tokens"] == 5 and usage["completion_tokens"] == 400
    for key in ("time_to_first_token_ms", "decode_tokens_per_s", "wall_ms", "kv_cache_bytes"):
        assert usage[key] > 0
    assert usage["provider"] == "CPUExecutionProvider" or usage["device"] == "cuda"
