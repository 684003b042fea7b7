"""The built-in samplers on fixed logits with fixed seeds, and the sampling parameters' validation."""

from __future__ import annotations

import numpy as np
import pytest

import nextoken
from nextoken import InvalidRequestError, SamplingParams
from nextoken.plugins.sampling import (
    Sampler,
    make_min_p,
    make_repetition_penalty,
    make_temperature,
    make_top_k,
    make_top_p,
    nucleus_mask,
)

LOGITS = np.array([[2.0, 1.5, 1.2, 0.9, 0.4, 0.1, -0.3, -0.8, -1.5, -2.5]], dtype=np.float32)
DRAWS = 20000
# Chi-square critical value for 9 degrees of freedom at significance 0.001.
CHI2_9DOF_0_001 = 27.877


def _draw(params: SamplingParams, logits: np.ndarray = LOGITS, n: int = DRAWS) -> np.ndarray:
    """n draws of one sequence's next token through the processors the params turn on, then the sampler."""
    procs = [
        f
        for f in (
            make_repetition_penalty(params, {}),
            make_temperature(params, {}),
            make_top_k(params, {}),
            make_top_p(params, {}),
            make_min_p(params, {}),
        )
        if f
    ]
    sampler = Sampler(params.seed)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        x = logits.copy()
        for proc in procs:
            x = proc(x, None)
        out[i] = sampler(x, None)[0]
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_matches_softmax_of_logits_over_t(temperature):
    draws = _draw(SamplingParams(temperature=temperature, seed=1234))
    observed = np.bincount(draws, minlength=LOGITS.shape[1])
    expected = _softmax(LOGITS[0] / temperature) * DRAWS
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_9DOF_0_001, (chi2, observed, expected.round())


def test_top_k_never_leaves_the_k_best():
    draws = _draw(SamplingParams(temperature=1.5, top_k=3, seed=7), n=5000)
    assert set(np.unique(draws)) <= {0, 1, 2}
    assert len(np.unique(draws)) == 3
    # and within them, the renormalised softmax
    observed = np.bincount(draws, minlength=3)[:3]
    expected = _softmax(LOGITS[0, :3] / 1.5) * 5000
    assert float(((observed - expected) ** 2 / expected).sum()) < 13.816  # 2 dof, 0.001


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9, 0.99])
def test_top_p_never_leaves_the_smallest_set_with_mass_p(p):
    probs = _softmax(LOGITS[0])
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), p)) + 1].tolist())
    draws = _draw(SamplingParams(temperature=1.0, top_p=p, seed=11), n=4000)
    assert set(np.unique(draws).tolist()) <= nucleus
    assert len(set(np.unique(draws).tolist())) == len(nucleus)


def test_nucleus_mask_is_exact_when_the_mass_is_spread_wide():
    rng = np.random.default_rng(0)
    flat = rng.normal(0, 0.01, size=(3, 5000)).astype(np.float32)  # nearly uniform: 256 tokens hold ~5%
    for p in (0.5, 0.95):
        mask = nucleus_mask(flat.copy(), p)
        for row in range(3):
            probs = _softmax(flat[row].astype(np.float64))
            order = np.argsort(-probs, kind="stable")
            need = int(np.searchsorted(np.cumsum(probs[order]), p - 1e-7)) + 1
            assert mask[row].sum() == need
            assert probs[mask[row]].sum() >= p - 1e-5


def test_min_p_drops_the_unlikely():
    probs = _softmax(LOGITS[0])
    allowed = set(np.flatnonzero(probs >= 0.2 * probs.max()).tolist())
    draws = _draw(SamplingParams(temperature=1.0, min_p=0.2, seed=3), n=3000)
    assert set(np.unique(draws).tolist()) == allowed


def test_repetition_penalty_follows_transformers_rule():
    class State:
        def presence(self):
            m = np.zeros((1, 10), dtype=bool)
            m[0, [0, 8]] = True
            return m

    out = make_repetition_penalty(SamplingParams(repetition_penalty=2.0), {})(LOGITS.copy(), State())
    assert out[0, 0] == pytest.approx(1.0) and out[0, 8] == pytest.approx(-3.0)
    assert np.array_equal(np.delete(out[0], [0, 8]), np.delete(LOGITS[0], [0, 8]))


def test_same_seed_same_draws_and_other_seed_other_draws():
    a = _draw(SamplingParams(temperature=1.0, seed=5), n=200)
    b = _draw(SamplingParams(temperature=1.0, seed=5), n=200)
    c = _draw(SamplingParams(temperature=1.0, seed=6), n=200)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(temperature=-0.1), r"temperature must be >= 0 \(0 means greedy\)"),
        (dict(temperature=float("nan")), "temperature must be a number"),
        (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(temperature=1.0, top_k=-1), "top_k must be >= 0"),
        (dict(temperature=1.0, min_p=1.0), r"min_p must be in \[0, 1\)"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(top_logprobs=21), r"top_logprobs must be in \[0, 20\]"),
        (dict(deadline_s=0), "deadline_s must be > 0"),
        (dict(top_k=5), "top_k only matters when sampling: temperature is 0 \\(greedy\\)"),
        (dict(top_p=0.9), "top_p only matters when sampling"),
        (dict(stop=("",)), "stop strings must be non-empty"),
        (dict(options={"x": 1}), "options must map plugin names to option dicts"),
    ],
)
def test_nonsense_is_rejected_before_any_work(kwargs, words):
    with pytest.raises(InvalidRequestError, match=words):
        SamplingParams(**kwargs)


def test_temperature_zero_means_greedy():
    assert SamplingParams().strategy_name == "greedy"
    assert SamplingParams(temperature=0.7).strategy_name == "sample"
    assert SamplingParams(temperature=0.7, strategy="greedy").strategy_name == "greedy"
    assert make_temperature(SamplingParams(), {}) is None


def test_unknown_names_list_what_is_registered(llama_engine):
    with pytest.raises(InvalidRequestError, match="unknown strategy 'beam'; registered: greedy, sample"):
        llama_engine.generate("x", strategy="beam")
    with pytest.raises(InvalidRequestError, match="unknown logits processor 'nope'; registered: .*top_k"):
        llama_engine.generate("x", processors=("nope",))
    with pytest.raises(InvalidRequestError, match="unknown stop condition 'nope'; registered: .*stop_strings"):
        llama_engine.generate("x", stop_conditions=("nope",))
    with pytest.raises(InvalidRequestError, match="unknown cost meter 'nope'; registered: device_hour, per_token"):
        llama_engine.generate("x", cost_meters={"nope": {}})
    with pytest.raises(InvalidRequestError, match="per_token has no option.*input_price"):
        llama_engine.generate("x", cost_meters={"per_token": {"input_price": 1}})
    assert len(llama_engine.generate("x", max_new_tokens=2).token_ids) >= 1


def test_public_protocol_types():
    assert isinstance(nextoken.Stop("stop", "x", 3).text_end, int)
    assert nextoken.Charge(1.5).currency == "USD"


@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0])
@pytest.mark.parametrize("k", [1, 5, 50, 3000])
def test_kth_largest_is_exact_for_narrow_and_wide_logits(scale, k):
    from nextoken.plugins.sampling import kth_largest

    logits = (np.random.default_rng(k).normal(0, scale, size=(4, 49152))).astype(np.float32)
    logits[1, :100] = 50.0  # many ties at the top
    expected = -np.sort(-logits, axis=1)[:, k - 1]
    assert np.array_equal(kth_largest(logits, k), expected)


@pytest.mark.parametrize("vocab", [10, 5000])
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_both_nucleus_paths_agree_with_a_full_sort(vocab, p):
    logits = np.random.default_rng(vocab).normal(0, 2, size=(3, vocab)).astype(np.float32)
    mask = nucleus_mask(logits, p)
    for row in range(3):
        w = np.exp(logits[row].astype(np.float64) - logits[row].max())
        order = np.argsort(-w, kind="stable")
        need = int(np.searchsorted(np.cumsum(w[order]) / w.sum(), p - 1e-7)) + 1
        assert set(np.flatnonzero(mask[row])) == set(order[:need].tolist())
