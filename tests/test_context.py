"""Context-window policies, on a tiny Llama whose window is 64 positions."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import run_cli
from nextoken import ContextWindowError, Engine, InvalidRequestError, SamplingParams

WINDOW = 64


@pytest.fixture(scope="module")
def small_window(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from nextoken.exporters import export, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("window")
    ckpt = make_tiny_checkpoint(root / "ckpt", "llama", max_position_embeddings=WINDOW, seed=3)
    export(ckpt, root / "pkg", progress=None)
    with Engine(root / "pkg", device="cpu") as engine:
        yield engine, AutoModelForCausalLM.from_pretrained(ckpt).eval(), root / "pkg"


def _greedy(model, ids, n):
    """transformers' model, greedy, n tokens, EOS not special (as nextoken's ignore_eos)."""
    out, past, step_ids = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            result = model(step_ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            out.append(int(result.logits[0, -1].argmax()))
            step_ids = torch.tensor([[out[-1]]])
    return out


def test_error_is_the_default_and_names_both_lengths(small_window):
    engine, _, _ = small_window
    assert SamplingParams().context_policy == "error"
    with pytest.raises(ContextWindowError, match="has 81 tokens but the model's context window is 64"):
        engine.generate("x" * 80, max_new_tokens=4)
    got = engine.generate("y" * 40, max_new_tokens=100, ignore_eos=True)  # fits; generation fills the window
    assert got.finish_reason == "context" and 41 + len(got.token_ids) == WINDOW


def test_truncate_equals_transformers_on_the_truncated_prompt(small_window):
    engine, model, _ = small_window
    prompt = engine.encode("System: be kind. " + "a long story that goes on and on " * 4)
    assert len(prompt) > WINDOW
    got = engine.generate(prompt, max_new_tokens=16, ignore_eos=True, context_policy="truncate", protected_prefix=5)
    kept = got.prompt_token_ids
    assert len(kept) + 16 == WINDOW
    assert kept[:5] == prompt[:5] and kept[5:] == prompt[-(WINDOW - 16 - 5) :]
    assert got.token_ids == _greedy(model, kept, 16)
    with pytest.raises(ContextWindowError, match="leaves 4 of the 64-token context window .* protected prefix of 5"):
        engine.generate(prompt, max_new_tokens=60, context_policy="truncate", protected_prefix=5)


def test_slide_generates_200_tokens_matching_transformers_after_each_slide(small_window):
    engine, model, _ = small_window
    prompt = engine.encode("Sys: " + "slide along the window ")[:30]
    gen = engine.start(prompt, max_new_tokens=200, ignore_eos=True, context_policy="slide", protected_prefix=4)
    completion = engine.complete(gen)[0]
    assert len(completion.token_ids) == 200 and completion.finish_reason == "length"
    assert len(gen.slides) >= 5
    # Before the first slide: transformers on the prompt.
    first_step = gen.slides[0][0]
    assert completion.token_ids[:first_step] == _greedy(model, prompt, first_step)
    bounds = [s[0] for s in gen.slides] + [200]
    for (step, row, kept), end in zip(gen.slides, bounds[1:]):
        assert row == 0 and len(kept) == WINDOW // 2
        assert kept[:4] == prompt[:4]  # the protected prefix stays
        assert kept[4:] == (prompt + completion.token_ids)[step + len(prompt) - (len(kept) - 4) : step + len(prompt)]
        assert completion.token_ids[step:end] == _greedy(model, kept, end - step)


def test_slide_in_a_batch(small_window):
    engine, _, _ = small_window
    prompts = [engine.encode("short"), engine.encode("a somewhat longer prompt")]
    got = engine.generate(prompts, max_new_tokens=120, ignore_eos=True, context_policy="slide")
    assert [len(c.token_ids) for c in got] == [120, 120]
    # Each row slides at its own times (the other row is prefilled again as it stands), and gets
    # what it gets alone: a row that did not fill keeps its window, not its whole history.
    alone = [engine.generate(p, max_new_tokens=120, ignore_eos=True, context_policy="slide").token_ids for p in prompts]
    assert [c.token_ids for c in got] == alone


def test_policy_validation(small_window):
    engine, _, _ = small_window
    with pytest.raises(InvalidRequestError, match="context_policy must be one of error, truncate, slide"):
        SamplingParams(context_policy="drop")
    with pytest.raises(InvalidRequestError, match="protected_prefix must be >= 0"):
        SamplingParams(protected_prefix=-1)
    with pytest.raises(ContextWindowError, match="under half the 64-token window"):
        engine.generate("abc", context_policy="slide", protected_prefix=40)
    assert engine.generate("abc", max_new_tokens=2).token_ids


def test_cli_context_policy(small_window):
    _, _, pkg = small_window
    long = "word " * 30
    err = run_cli("generate", str(pkg), long, "--max-new-tokens", "8")
    assert err.returncode == 1 and "context window is 64" in err.stderr
    ok = run_cli("generate", str(pkg), long, "--max-new-tokens", "8", "--context-policy", "truncate", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["usage"]["prompt_tokens"] == WINDOW - 8
    slide = run_cli(
        "generate",
        str(pkg),
        "hello",
        "--max-new-tokens",
        "150",
        "--ignore-eos",
        "--context-policy",
        "slide",
        "--protected-prefix",
        "1",
        "--json",
    )
    assert slide.returncode == 0 and len(json.loads(slide.stdout)["token_ids"]) == 150
