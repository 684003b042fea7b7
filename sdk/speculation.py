"""Speculative decoding's policy: how many tokens a request guesses next, from how many of its
guesses were kept and what a step of n positions costs on this host (:class:`StepCost`, one per
engine, learned by the requests that speculate). The scheduler runs the checking steps; the
proposers are plugins."""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

import numpy as np

from .errors import describe
from .types import BatchState

if TYPE_CHECKING:
    from .registry import Active

__all__ = ["Speculation", "StepCost"]


class StepCost:
    """What a step of ``n`` positions costs this engine's model on this host, as speculative
    decoding measured it: ``line`` = (a, b), about ``a + b * n`` seconds (None until a request timed
    eight plain steps and eight checks). Each request's :class:`Speculation` starts from it and
    leaves its own fit in it."""

    def __init__(self) -> None:
        self.line: tuple[float, float] | None = None


class Speculation:
    """A request's speculative decoding: its proposer (a plugin), what was guessed and kept, and how
    many tokens to guess next (``k``, at most ``k_max``): the count expected to make the most
    tokens per second. A guessed position is kept with probability ``alpha`` once the ones before
    it were (kept / (kept + misses) over the last eight checks, from one of each), so a guess of k
    keeps ``alpha + ... + alpha**k`` on average, and a step of n positions takes ``a + b * n``
    seconds (a line through the request's last 32 steps, plain and checking, guessing and binding
    included: on a CPU a big model's extra positions cost little, a tiny model's a tenth of a step
    each). A request starts from the line the last one left in the engine's :class:`StepCost`: the
    line is the model's and the host's. When no guess beats a plain step (``alpha`` under ``b / (a + b)``)
    it stops (``off``: plain decoding from then on, as prompt lookup on text with nothing to copy
    should).
    """

    def __init__(self, proposer: Active, k: int, step_cost: StepCost | None = None) -> None:
        """
        Args:
            proposer: the proposer plugin's resolved piece.
            k: tokens guessed a step at most.
            step_cost: the engine's learned cost of a step (a request starts from it).
        """
        self.proposer, self.k_max, self.k = proposer, k, k
        self.proposed = self.accepted = 0
        self.off = False
        self._checks: collections.deque[tuple[int, int]] = collections.deque(maxlen=8)
        self._steps: collections.deque[tuple[int, float]] = collections.deque(maxlen=32)
        self._sums = [0.0, 0.0, 0.0, 0.0]  # of n, t, n*n, n*t over _steps
        self._counts = [0, 0]  # plain steps and checks in _steps
        self._seen = [False, False]
        self.shared = step_cost
        if step_cost is not None and step_cost.line is not None:
            self.k = max(1, self._best(0.5, *step_cost.line))  # even odds until it has guessed

    def propose(self, state: BatchState, room: int) -> list[int]:
        """Up to ``min(k, room)`` guesses for sequence 0 (``[]``: decode plainly this step)."""
        if self.off or room < 1:
            return []
        k = min(self.k, room)
        try:
            guess = self.proposer.fn(state, 0, k)
        except Exception as exc:
            raise self.proposer.provided.error(exc) from exc
        if not isinstance(guess, (list, tuple)) or not all(
            isinstance(t, (int, np.integer)) and 0 <= t < state.vocab_size for t in guess
        ):
            raise self.proposer.provided.error(
                ValueError(f"returned {describe(guess)}, not a list of token ids in [0, {state.vocab_size})")
            )
        return [int(t) for t in guess[:k]]

    def stepped(self, positions: int, seconds: float) -> None:
        """A step of ``positions`` positions took ``seconds``: a check (``positions`` > 1) or a
        plain step, whose cost anchors the line. The request's first of each is not counted: it
        makes its binding."""
        kind = positions > 1
        if not self._seen[kind]:
            self._seen[kind] = True
            return
        self._counts[kind] += 1
        if len(self._steps) == self._steps.maxlen:
            n, t = self._steps[0]
            self._counts[n > 1] -= 1
            self._sums = [self._sums[0] - n, self._sums[1] - t, self._sums[2] - n * n, self._sums[3] - n * t]
        self._steps.append((positions, seconds))
        s = self._sums
        self._sums = [s[0] + positions, s[1] + seconds, s[2] + positions * positions, s[3] + positions * seconds]

    def record(self, proposed: int, accepted: int, seconds: float | None = None) -> None:
        """One checking step's outcome: ``accepted`` of ``proposed`` guesses kept (the step took
        ``seconds``); then the next ``k``."""
        self.proposed += proposed
        self.accepted += accepted
        self._checks.append((accepted, int(accepted < proposed)))
        if seconds is not None:
            self.stepped(proposed + 1, seconds)
        fitted = self._fit()
        if fitted is not None and self.shared is not None and min(self._counts) >= 8:
            self.shared.line = fitted
        kept = 1 + sum(a for a, _ in self._checks)
        self.k = self._best(kept / (kept + 1 + sum(m for _, m in self._checks)), *(fitted or self.cost()))
        if self.k == 0:
            self.off = True

    def _best(self, alpha: float, a: float, b: float) -> int:
        """The guess that makes the most tokens per second (0: a plain step)."""
        best, count, gain = 1 / (a + b), 0, 1.0
        for k in range(1, self.k_max + 1):
            gain += alpha**k
            if gain / (a + b * (k + 1)) > best:
                best, count = gain / (a + b * (k + 1)), k
        return count

    def cost(self) -> tuple[float, float]:
        """(a, b): a step of n positions takes about ``a + b * n`` seconds: least squares over the
        request's last 32 steps once 4 plain steps and 4 checks were timed (from 8 each on, it is
        left in the engine's :class:`StepCost` for the next request); before, the last request's line,
        else b = 0."""
        fitted = self._fit()
        if fitted is not None:
            return fitted
        if self.shared is not None and self.shared.line is not None:
            return self.shared.line
        return (self._sums[1] / len(self._steps) if self._steps else 1.0), 0.0

    def _fit(self) -> tuple[float, float] | None:
        """The request's own line, once 4 plain steps and 4 checks were timed."""
        if min(self._counts) < 4:
            return None
        count = len(self._steps)
        n, t, nn, nt = self._sums
        b = max((nt - n * t / count) / max(nn - n * n / count, 1e-9), 0.0)
        return max((t - b * n) / count, 1e-3 * t / count, 1e-12), b
