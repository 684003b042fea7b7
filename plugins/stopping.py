"""Built-in stop conditions: eos (order 10), stop_token_ids (20), stop_strings (30),
max_new_tokens (40) and deadline (50). The first that stops a sequence names its finish reason."""

from __future__ import annotations

import time

import numpy as np

import nextoken
from nextoken import Stop


def make_eos(params, options):
    """Stop at any of the model's EOS ids (all of them: generation_config may list several)."""
    if params.ignore_eos:
        return None

    def eos(tokens: np.ndarray, state):
        return _hits(tokens, state, frozenset(state.eos_token_ids), "eos token")

    return eos


def _hits(tokens: np.ndarray, state, ids: frozenset, what: str):
    """``{row: Stop}`` for the live rows whose token is one of ``ids`` (a set lookup a row: numpy's
    ``isin`` cost 20 us a step for a handful of ids)."""
    if not ids:
        return None
    alive = state.alive
    hit = {
        row: Stop("stop", f"{what} {token}") for row, token in enumerate(tokens.tolist()) if token in ids and alive[row]
    }
    return hit or None


def make_stop_token_ids(params, options):
    """Stop at any of SamplingParams.stop_token_ids."""
    ids = frozenset(int(t) for t in params.stop_token_ids)
    if not ids:
        return None

    def stop_token_ids(tokens: np.ndarray, state):
        return _hits(tokens, state, ids, "stop token")

    return stop_token_ids


class StopStrings:
    """Stop when a sequence's text contains a stop string, matched across token boundaries.

    The stop string and everything after it are cut from the text, and ``holdback`` keeps from a
    streaming client any tail of the text that could still grow into a stop string.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.longest = max(len(s) for s in stops)
        self.first_chars = {s[0] for s in stops}
        self.checked: dict[int, int] = {}

    def __call__(self, tokens: np.ndarray, state):
        found = {}
        for row in map(int, np.flatnonzero(state.alive)):
            text = state.texts[row]
            start = max(0, self.checked.get(row, 0) - self.longest + 1)
            self.checked[row] = len(text)
            hits = [(i, s) for s in self.stops if (i := text.find(s, start)) >= 0]
            if hits:
                at, stop = min(hits)
                found[int(row)] = Stop("stop", f"stop string {stop!r}", text_end=at)
        return found or None

    def holdback(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is the start of some stop string."""
        tail = text[len(text) - min(self.longest - 1, len(text)) :]
        for i, char in enumerate(tail):
            if char in self.first_chars and any(s.startswith(tail[i:]) for s in self.stops):
                return len(tail) - i
        return 0


def make_stop_strings(params, options):
    """Stop at any of SamplingParams.stop, cut it from the text, never stream part of one."""
    return StopStrings(params.stop) if params.stop else None


def make_max_new_tokens(params, options):
    """Stop after SamplingParams.max_new_tokens tokens (finish reason "length")."""
    limit = params.max_new_tokens

    def max_new_tokens(tokens: np.ndarray, state):
        if state.step < limit:
            return None
        return {int(r): Stop("length", f"max_new_tokens={limit}") for r in np.flatnonzero(state.alive)}

    return max_new_tokens


def make_deadline(params, options):
    """Stop every sequence once the request has run SamplingParams.deadline_s seconds (finish reason "deadline")."""
    if params.deadline_s is None:
        return None
    seconds = float(params.deadline_s)

    def deadline(tokens: np.ndarray, state):
        if time.perf_counter() - state.start_time < seconds:
            return None
        return {int(r): Stop("deadline", f"deadline of {seconds:g} s") for r in np.flatnonzero(state.alive)}

    return deadline


@nextoken.hookimpl
def register_stop_conditions(register):
    register("eos", make_eos, order=10, auto=True)
    register("stop_token_ids", make_stop_token_ids, order=20, auto=True)
    register("stop_strings", make_stop_strings, order=30, auto=True)
    register("max_new_tokens", make_max_new_tokens, order=40, auto=True)
    register("deadline", make_deadline, order=50, auto=True)
