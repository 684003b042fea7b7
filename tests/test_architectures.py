"""Every supported architecture against transformers on the same random weights, through both
export routes: nextoken's builder (the default) and optimum's graph (``--backend optimum``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import ARCHITECTURES

PROMPTS = ["Hi", "The quick brown fox jumps", "A longer prompt than the others, by far."]


def _hf(ckpt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    return model.eval()


@pytest.fixture(
    scope="module",
    params=[(a, b) for b in ("nextoken", "optimum") for a in ARCHITECTURES],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def arch_setup(request, tiny_model):
    from nextoken import Engine

    arch, backend = request.param
    ckpt, pkg = tiny_model(arch, backend)
    with Engine(pkg, device="cpu") as engine:
        assert (engine.manifest.exported_by.get("builder") == "nextoken") == (backend == "nextoken")
        yield arch, engine, _hf(ckpt)


def test_logits_match_transformers(arch_setup):
    _, engine, model = arch_setup
    ids = engine.encode(PROMPTS[2])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = engine.forward(ids)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4


def test_cached_decode_step_matches_transformers(arch_setup):
    """The same logits through the KV cache: prefill all but the last token, then one decode step."""
    _, engine, model = arch_setup
    ids = engine.encode(PROMPTS[1])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    runner = engine.runner
    cache = runner.new_cache(1)
    head = np.asarray([ids[:-1]])
    runner.prefill(cache, head, np.ones_like(head), np.arange(len(ids) - 1)[None, :])
    assert cache.length == len(ids) - 1
    last = runner.decode(cache, np.asarray([[ids[-1]]]), np.ones((1, len(ids)), np.int64), np.asarray([[len(ids) - 1]]))
    assert cache.length == len(ids)
    assert np.abs(last[0] - expected).max() <= 1e-4
    # and as generation runs it, whatever its KV backend (in place in a slot for the fused graph)
    assert np.abs(engine.forward(ids, cached=True)[0] - expected).max() <= 1e-4


def test_greedy_32_tokens_match_transformers_generate(arch_setup):
    _, engine, model = arch_setup
    ids = engine.encode(PROMPTS[1])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            eos_token_id=None,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    expected = out.sequences[0, len(ids) :].tolist()
    # The weights are wide enough that no greedy choice is a near-tie: the top-2 gap dwarfs the
    # ONNX-vs-PyTorch error, so a mismatch would be a real bug and not rounding.
    gaps = [float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in out.scores]
    assert min(gaps) > 1e-3
    got = engine.generate(ids, max_new_tokens=32, ignore_eos=True)
    assert got.token_ids == expected
    assert got.finish_reason == "length"


def test_batch_of_three_equals_each_alone(arch_setup):
    _, engine, _ = arch_setup
    batch = engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert len(batch) == 3
    assert len({len(engine.encode(p)) for p in PROMPTS}) == 3
    for prompt, got in zip(PROMPTS, batch):
        alone = engine.generate(prompt, max_new_tokens=16, ignore_eos=True)
        assert got.token_ids == alone.token_ids
        assert got.text == alone.text
        assert got.usage.batch_size == 3
