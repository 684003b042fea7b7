"""Built-in decoding: the greedy and seeded-sampling strategies, and the logits processors
repetition_penalty (order 10), temperature (20), top_k (30), top_p (40) and min_p (50).

Each processor works on the whole batch's logits ``[B, V]`` at once, in place where it can.
"""

from __future__ import annotations

import numpy as np

import nextoken

NEG_INF = np.float32(-np.inf)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


# -- strategies -------------------------------------------------------------------------------------

def greedy(logits: np.ndarray, state=None) -> np.ndarray:
    """``[B, V]`` -> ``[B]``: each row's largest logit (the first on a tie). Temperature 0."""
    return np.argmax(logits, axis=-1)


class Sampler:
    """Draws each row's token from softmax(logits) with the row's own random generator.

    With a seed, every sequence gets ``numpy.random.default_rng(seed)``: the same seed, prompt and
    parameters give the same tokens whatever batch the sequence runs in. One uniform draw per row
    per step, inverted through the row's cumulative distribution.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.rngs: list[np.random.Generator] | None = None

    def __call__(self, logits: np.ndarray, state) -> np.ndarray:
        batch, vocab = logits.shape
        if self.rngs is None:
            self.rngs = [np.random.default_rng(self.seed) for _ in range(batch)]
        u = np.fromiter((1.0 - rng.random() for rng in self.rngs), dtype=np.float64, count=batch)  # (0, 1]
        cdf = np.cumsum(_softmax(logits), axis=1, dtype=np.float64)
        picks = (cdf < u[:, None] * cdf[:, -1:]).sum(axis=1)
        return np.minimum(picks, vocab - 1)


def make_greedy(params, options):
    """The most likely token every time (temperature 0)."""
    return greedy


def make_sampler(params, options):
    """Sample from the processed distribution; seeded per sequence with SamplingParams.seed."""
    return Sampler(params.seed)


# -- processors --------------------------------------------------------------------------------------

def make_repetition_penalty(params, options):
    """Penalise tokens already in the prompt or the output (transformers' rule: positive logits / p, negative * p)."""
    penalty = float(params.repetition_penalty)
    if penalty == 1.0:
        return None

    def repetition_penalty(logits: np.ndarray, state) -> np.ndarray:
        seen = state.presence()
        picked = logits[seen]
        logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
        return logits

    return repetition_penalty


def make_temperature(params, options):
    """Divide logits by the temperature (inactive at 0, which is greedy, and at 1)."""
    temperature = float(params.temperature)
    if temperature in (0.0, 1.0):
        return None
    scale = np.float32(1.0 / temperature)

    def temperature_(logits: np.ndarray, state) -> np.ndarray:
        logits *= scale
        return logits

    return temperature_


def make_top_k(params, options):
    """Keep each row's k largest logits."""
    k = int(params.top_k)
    if k <= 0:
        return None

    def top_k(logits: np.ndarray, state) -> np.ndarray:
        vocab = logits.shape[1]
        if k >= vocab:
            return logits
        kth = np.partition(logits, vocab - k, axis=1)[:, vocab - k: vocab - k + 1]
        logits[logits < kth] = NEG_INF
        return logits

    return top_k


def nucleus_mask(logits: np.ndarray, p: float, first: int = 256) -> np.ndarray:
    """``[B, V]`` bool: each row's smallest set of likeliest tokens whose probability reaches ``p``.

    Sorting the whole vocabulary every step is the slow part of top-p. The set is found among the
    ``first`` likeliest tokens (one O(V) partition and a small sort); only a row whose ``first``
    tokens hold less than ``p`` of the mass is sorted in full. Exact either way.
    """
    batch, vocab = logits.shape
    probs = _softmax(logits)
    m = min(first, vocab)
    keep = np.zeros((batch, vocab), dtype=bool)
    cand = np.argpartition(-probs, m - 1, axis=1)[:, :m] if m < vocab else np.tile(np.arange(vocab), (batch, 1))
    for row in range(batch):
        idx = cand[row]
        vals = probs[row, idx]
        order = np.argsort(-vals, kind="stable")
        cum = np.cumsum(vals[order], dtype=np.float64)
        if cum[-1] < p and m < vocab:            # the mass is spread wide: sort the whole row
            order = np.argsort(-probs[row], kind="stable")
            idx = np.arange(vocab)
            cum = np.cumsum(probs[row, order], dtype=np.float64)
        count = min(int(np.searchsorted(cum, p - 1e-7)) + 1, len(order))
        keep[row, idx[order[:count]]] = True
    return keep


def make_top_p(params, options):
    """Keep each row's smallest set of likeliest tokens with probability mass >= top_p."""
    p = float(params.top_p)
    if p >= 1.0:
        return None

    def top_p(logits: np.ndarray, state) -> np.ndarray:
        logits[~nucleus_mask(logits, p)] = NEG_INF
        return logits

    return top_p


def make_min_p(params, options):
    """Drop tokens less likely than min_p times the likeliest token's probability."""
    min_p = float(params.min_p)
    if min_p <= 0.0:
        return None
    log_ratio = np.float32(np.log(min_p))

    def min_p_(logits: np.ndarray, state) -> np.ndarray:
        # p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p)
        logits[logits - logits.max(axis=1, keepdims=True) < log_ratio] = NEG_INF
        return logits

    return min_p_


@nextoken.hookimpl
def register_strategies(register):
    register("greedy", make_greedy)
    register("sample", make_sampler)


@nextoken.hookimpl
def register_logits_processors(register):
    register("repetition_penalty", make_repetition_penalty, order=10, auto=True)
    register("temperature", make_temperature, order=20, auto=True)
    register("top_k", make_top_k, order=30, auto=True)
    register("top_p", make_top_p, order=40, auto=True)
    register("min_p", make_min_p, order=50, auto=True)
