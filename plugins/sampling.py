"""Built-in decoding: the greedy and seeded-sampling strategies, and the logits processors
logit_bias (order 5), repetition_penalty (10), presence/frequency penalties (15), temperature (20),
top_k (30), top_p (40) and min_p (50).

Each processor works on the whole batch's logits ``[B, V]`` at once, in place where it can.
"""

from __future__ import annotations

import numpy as np

import nextoken

NEG_INF = np.float32(-np.inf)
FLOAT_MAX = np.finfo(np.float32).max
#: Up to this many tokens, whole-row numpy operations over the batch beat per-row candidate tricks.
SMALL_VOCAB = 4096


# -- strategies -------------------------------------------------------------------------------------


def greedy(logits: np.ndarray, state=None) -> np.ndarray:
    """``[B, V]`` -> ``[B]``: each row's largest logit (the first on a tie). Temperature 0."""
    return np.argmax(logits, axis=-1)


class Sampler:
    """Draws each row's token from softmax(logits) with the row's own random generator.

    With a seed, every sequence gets ``numpy.random.default_rng(seed + its choice index)`` (the
    choice index is 0 unless the request asks for ``n`` > 1 choices): the same seed, prompt and
    parameters give the same tokens whatever batch the sequence runs in, and choice ``i`` of a
    request is the same request alone with ``seed + i``. One uniform draw per row per step,
    inverted through the row's cumulative distribution.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.rngs: list[np.random.Generator] | None = None

    def __call__(self, logits: np.ndarray, state) -> np.ndarray:
        batch, vocab = logits.shape
        if self.rngs is None:
            choices = getattr(state, "choices", None) or [0] * batch
            self.rngs = [
                np.random.default_rng(None if self.seed is None else self.seed + choices[row]) for row in range(batch)
            ]
        u = np.fromiter((1.0 - rng.random() for rng in self.rngs), dtype=np.float64, count=batch)  # (0, 1]
        if vocab <= SMALL_VOCAB:
            cdf = np.cumsum(np.exp(logits - logits.max(axis=1, keepdims=True)), axis=1, dtype=np.float64)
            return np.minimum((cdf < u[:, None] * cdf[:, -1:]).sum(axis=1), vocab - 1)
        finite = np.isfinite(logits)
        counts = finite.sum(axis=1)
        out = np.empty(batch, dtype=np.int64)
        for row in range(batch):
            if counts[row] < vocab // 4:  # after top-k/top-p: only the candidates
                idx = np.flatnonzero(finite[row])
                vals = logits[row, idx]
            else:
                idx, vals = None, logits[row]
            cdf = np.cumsum(np.exp(vals - vals.max()), dtype=np.float64)
            k = min(int(np.searchsorted(cdf, u[row] * cdf[-1], side="left")), len(cdf) - 1)
            out[row] = idx[k] if idx is not None else k
        return out


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
        with np.errstate(over="ignore"):
            scaled = np.where(picked > 0, picked / penalty, picked * penalty)
        # an extreme penalty is its limit: the largest float, not +inf (which would be no score at all)
        logits[seen] = np.clip(scaled, -FLOAT_MAX, FLOAT_MAX)
        return logits

    return repetition_penalty


def make_logit_bias(params, options):
    """Add each token's bias from SamplingParams.logit_bias to its logit (-100 bans it; OpenAI's rule)."""
    if not params.logit_bias:
        return None
    ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64)
    bias = np.fromiter(params.logit_bias.values(), dtype=np.float32)

    def logit_bias(logits: np.ndarray, state) -> np.ndarray:
        logits[:, ids] += bias  # the ids were checked against the vocabulary when the request started
        return logits

    return logit_bias


def make_penalties(params, options):
    """OpenAI's presence and frequency penalties: subtract presence_penalty from the logit of every
    token generated so far, and frequency_penalty times the number of times it was generated."""
    presence, frequency = float(params.presence_penalty), float(params.frequency_penalty)
    if presence == 0.0 and frequency == 0.0:
        return None

    def penalties(logits: np.ndarray, state) -> np.ndarray:
        counts = state.counts()
        logits -= (counts > 0) * np.float32(presence) + counts * np.float32(frequency)
        return logits

    return penalties


def make_temperature(params, options):
    """Divide logits by the temperature (inactive at 0, which is greedy, and at 1).

    Each row is first shifted so that its largest logit is 0 (softmax does not change), so a tiny
    temperature sends the others towards -inf instead of overflowing: one so small that 1/T is not
    a float32 is its limit, greedy (only each row's largest logits stay, ties kept).
    """
    temperature = float(params.temperature)
    if temperature in (0.0, 1.0):
        return None
    with np.errstate(over="ignore"):
        scale = np.float32(1.0 / temperature)

    def temperature_(logits: np.ndarray, state) -> np.ndarray:
        top = logits.max(axis=1, keepdims=True)
        logits -= top
        if np.isinf(scale):
            logits[logits < 0] = NEG_INF
            return logits
        with np.errstate(over="ignore"):
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
        logits[logits < kth_largest(logits, k)[:, None]] = NEG_INF
        return logits

    return top_k


def kth_largest(logits: np.ndarray, k: int) -> np.ndarray:
    """``[B]``: each row's k-th largest logit.

    Partitioning a whole 50k-token row is slow. A strided sample of about 1,000 logits gives a
    threshold that a few hundred logits of the row clear; only those are partitioned (the whole row
    only if fewer than k clear it). Exact either way.
    """
    batch, vocab = logits.shape
    if vocab <= SMALL_VOCAB:
        return np.partition(logits, vocab - k, axis=1)[:, vocab - k]
    stride = vocab // 1024
    out = np.empty(batch, dtype=logits.dtype)
    sample = logits[:, ::stride]
    j = min(sample.shape[1], 2 * -(-k // stride) + 8)  # a sample rank safely below k's
    bars = np.partition(sample, sample.shape[1] - j, axis=1)[:, sample.shape[1] - j]
    for row in range(batch):
        values = logits[row]
        cand = values[values >= bars[row]]
        if len(cand) < k:
            cand = values
        out[row] = np.partition(cand, len(cand) - k)[len(cand) - k]
    return out


def nucleus(logits: np.ndarray, p: float) -> list[np.ndarray]:
    """Per row, the ids of the smallest set of likeliest tokens whose probability reaches ``p``.

    Sorting the whole vocabulary every step is the slow part of top-p. The set is looked for among
    the tokens at least ``1e-4`` as likely as the likeliest (one O(V) pass and a small sort); only
    when those hold less than ``p`` of the mass is the bar lowered. Exact either way.
    """
    out = []
    for row in logits:
        weights = np.exp(row - row.max())  # relative to the likeliest; -inf -> 0
        total = weights.sum(dtype=np.float64)
        bar = 1e-4
        while True:
            cand = np.flatnonzero(weights >= bar) if bar > 0 else np.flatnonzero(weights > 0)
            mass = weights[cand].sum(dtype=np.float64) / total
            if mass >= p or bar == 0:
                break
            bar = bar * 1e-4 if bar > 1e-36 else 0.0
        order = np.argsort(-weights[cand], kind="stable")
        cum = np.cumsum(weights[cand][order], dtype=np.float64) / total
        count = min(int(np.searchsorted(cum, p - 1e-7)) + 1, len(order))
        out.append(cand[order[:count]])
    return out


def nucleus_mask(logits: np.ndarray, p: float) -> np.ndarray:
    """``[B, V]`` bool of :func:`nucleus`; for a small vocabulary, one sort of the whole batch."""
    if logits.shape[1] <= SMALL_VOCAB:
        weights = np.exp(logits - logits.max(axis=1, keepdims=True)).astype(np.float64)
        order = np.argsort(-weights, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(weights, order, axis=1), axis=1)
        count = (cum < (p - 1e-7) * cum[:, -1:]).sum(axis=1) + 1
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(logits.shape[1])[None, :].repeat(len(logits), 0), axis=1)
        return ranks < count[:, None]
    keep = np.zeros(logits.shape, dtype=bool)
    for row, ids in enumerate(nucleus(logits, p)):
        keep[row, ids] = True
    return keep


def make_top_p(params, options):
    """Keep each row's smallest set of likeliest tokens with probability mass >= top_p."""
    p = float(params.top_p)
    if p >= 1.0:
        return None

    def top_p(logits: np.ndarray, state) -> np.ndarray:
        if logits.shape[1] <= SMALL_VOCAB:
            logits[~nucleus_mask(logits, p)] = NEG_INF
            return logits
        for row, ids in enumerate(nucleus(logits, p)):
            kept = logits[row, ids]
            logits[row] = NEG_INF
            logits[row, ids] = kept
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
    register("logit_bias", make_logit_bias, order=5, auto=True)
    register("repetition_penalty", make_repetition_penalty, order=10, auto=True)
    register("penalties", make_penalties, order=15, auto=True)
    register("temperature", make_temperature, order=20, auto=True)
    register("top_k", make_top_k, order=30, auto=True)
    register("top_p", make_top_p, order=40, auto=True)
    register("min_p", make_min_p, order=50, auto=True)
