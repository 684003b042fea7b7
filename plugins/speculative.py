"""Speculative decoding's built-in proposer: prompt lookup (no second model).

    engine.generate(prompt, speculative={"method": "prompt_lookup", "k": 4})

It looks for the last few tokens of the sequence earlier in the prompt and the text so far, and
guesses that what followed them then follows them again: the next ``k`` tokens. The model checks
the guesses in one step and keeps the ones it would have chosen itself, so the text is the same as
without speculation; text that repeats its prompt (quoting, editing, summarising) takes fewer steps.
"""

from __future__ import annotations

import nextoken

#: the n-gram lengths tried, longest first (a single token's last occurrence guesses too often wrong)
NGRAMS = (3, 2)


class PromptLookup:
    """Per sequence: its tokens so far, and where each n-gram last ended (the token after it is
    the guess), kept up to date a token at a time (a guess costs a few dictionary lookups)."""

    def __init__(self, ngrams: tuple[int, ...] = NGRAMS) -> None:
        self.ngrams = ngrams
        self.rows: dict[int, tuple[list[int], dict[tuple[int, ...], int]]] = {}

    def __call__(self, state, row: int, k: int) -> list[int]:
        kept = self.rows.get(row)
        if kept is None:
            kept = self.rows[row] = ([], {})
        seq, index = kept
        fresh = state.prompts[row] + state.generated[row] if not seq else state.generated[row][
            len(seq) - len(state.prompts[row]):]
        for token in fresh:
            end = len(seq)               # an n-gram that ends here is followed by this token
            for n in self.ngrams:
                if end >= n:
                    index[tuple(seq[end - n:end])] = end
            seq.append(token)
        for n in self.ngrams:
            if len(seq) > n:
                start = index.get(tuple(seq[-n:]))
                if start is not None:
                    return seq[start:start + k]
        return []


def make_prompt_lookup(params, options):
    """Guess that text seen earlier (in the prompt or the answer) continues as it did then."""
    return PromptLookup(tuple(options.get("ngrams", NGRAMS)))


@nextoken.hookimpl
def register_proposers(register):
    register("prompt_lookup", make_prompt_lookup)
