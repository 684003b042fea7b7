"""An example nextoken plugin: one logits processor, one stop condition, one cost meter."""

from __future__ import annotations

import re

import numpy as np

import nextoken

# -- a logits processor: no_repeat_ngram ---------------------------------------------------------------


def make_no_repeat_ngram(params, options):
    """Ban any token that would repeat an n-gram already in the sequence."""
    n = int(options.get("n", 3))
    if n < 1:
        raise nextoken.InvalidRequestError(f"no_repeat_ngram: n must be >= 1, not {n}")

    def no_repeat_ngram(logits, state):
        for row in np.flatnonzero(state.alive):
            seq = state.prompts[row] + state.generated[row]
            if len(seq) < n:
                continue
            prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
            banned = [seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix]
            logits[row, banned] = -np.inf
        return logits

    return no_repeat_ngram


# -- a stop condition: regex -----------------------------------------------------------------------------


def make_regex(params, options):
    """Stop when the text matches a regular expression; cut the match and what follows.

    A match may begin in text that a stream would already show (``red b`` before ``blue`` is
    complete), so the condition declares ``holdback``: the last ``holdback`` characters (option,
    default 32: longer than the matches it is meant for) are kept from a stream until they cannot
    be cut any more. A match longer than that may start in text already streamed; the loop then
    cuts at the end of what was streamed, so the final text and the stream always agree.
    """
    pattern = options.get("pattern")
    if not pattern:
        raise nextoken.InvalidRequestError("regex: give the pattern, e.g. --option 'regex.pattern=\\bdog\\b'")
    compiled = re.compile(pattern)
    keep = int(options.get("holdback", 32))

    def regex(tokens, state):
        found = {}
        for row in np.flatnonzero(state.alive):
            match = compiled.search(state.texts[row])
            if match:
                found[int(row)] = nextoken.Stop("stop", f"regex {pattern!r}", text_end=match.start())
        return found or None

    regex.holdback = lambda text: min(len(text), keep)
    return regex


# -- a cost meter: energy --------------------------------------------------------------------------------


def make_energy(options):
    """Energy: watts x seconds x price per kWh."""
    watts = float(options.get("watts", 300.0))
    price = float(options.get("price_per_kwh", 0.30))

    def energy(usage):
        kwh = watts * usage.wall_ms / 1e3 / 3.6e6
        return nextoken.Charge(kwh * price, "USD", f"{kwh * 1e3:.6f} Wh at {price:g}/kWh")

    return energy


@nextoken.hookimpl
def register_logits_processors(register):
    register("no_repeat_ngram", make_no_repeat_ngram, order=5)


@nextoken.hookimpl
def register_stop_conditions(register):
    register("regex", make_regex, order=35)


@nextoken.hookimpl
def register_cost_meters(register):
    register("energy", make_energy)
