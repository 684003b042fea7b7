"""Speculative decoding's built-in proposers: prompt lookup (no second model) and a draft model.

    engine.generate(prompt, speculative={"method": "prompt_lookup", "k": 4})
    engine.generate(prompt, speculative={"method": "draft", "model": "path/to/small-package", "k": 4})

Prompt lookup looks for the last few tokens of the sequence earlier in the prompt and the text so
far, and guesses that what followed them then follows them again: the next ``k`` tokens. A draft
model (a smaller package with the same vocabulary) guesses its own greedy continuation. The model
checks the guesses in one step and keeps the ones it would have chosen itself, so the text is the
same as without speculation; only the number of steps changes.
"""

from __future__ import annotations

import os
import threading

import nextoken
from nextoken import InvalidRequestError, NextokenError

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
        fresh = (
            state.prompts[row] + state.generated[row]
            if not seq
            else state.generated[row][len(seq) - len(state.prompts[row]) :]
        )
        for token in fresh:
            end = len(seq)  # an n-gram that ends here is followed by this token
            for n in self.ngrams:
                if end >= n:
                    index[tuple(seq[end - n : end])] = end
            seq.append(token)
        for n in self.ngrams:
            if len(seq) > n:
                start = index.get(tuple(seq[-n:]))
                if start is not None:
                    return seq[start : start + k]
        return []


def make_prompt_lookup(params, options):
    """Guess that text seen earlier (in the prompt or the answer) continues as it did then."""
    return PromptLookup(tuple(options.get("ngrams", NGRAMS)))


#: draft packages loaded, by real path: one engine each for the process (a request only reads it)
_DRAFTS: dict[str, nextoken.Engine] = {}
_DRAFTS_LOCK = threading.Lock()


def draft_engine(path: str, threads: int | None = None) -> nextoken.Engine:
    """The process's engine for the draft package at ``path`` (loaded once per real path, however
    it is spelt; ``threads`` count only for the load that makes it)."""
    if not isinstance(path, str) or not path:
        raise InvalidRequestError(
            "speculative method 'draft' needs 'model': the path of a smaller package with the same tokenizer"
        )
    key = os.path.realpath(path)
    with _DRAFTS_LOCK:
        engine = _DRAFTS.get(key)
        if engine is None:
            try:
                engine = _DRAFTS[key] = nextoken.Engine(key, plugins=False, threads=threads)
            except NextokenError as exc:
                raise InvalidRequestError(f"the draft model {path}: {exc}") from None
    return engine


class DraftModel:
    """Guesses with a smaller package's greedy continuation. Per sequence the draft keeps its own
    KV cache (:meth:`nextoken.Engine.cached_forward`): a guess runs only the tokens the model kept
    since the last one, then one draft step a guessed token; the draft's guesses the model did not
    keep are cut away. A sequence longer than the draft's window is guessed from its newest
    tokens, prefilled each time."""

    def __init__(self, engine: nextoken.Engine) -> None:
        self.engine = engine
        self.rows: dict[int, tuple] = {}  # row -> (its cached forward, tokens certainly common)

    def __call__(self, state, row: int, k: int) -> list[int]:
        manifest = self.engine.manifest
        if manifest.vocab_size != state.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({manifest.vocab_size} tokens) is not the model's "
                f"({state.vocab_size}); a draft must share the tokenizer"
            )
        ids = state.prompts[row] + state.generated[row]
        window = max(1, manifest.context_length - k)
        if len(ids) > window:  # positions move with the window: no cache to keep
            self.rows.pop(row, None)
            return self.engine.generate(ids[-window:], max_new_tokens=k, ignore_eos=True).token_ids
        forward, common = self.rows.get(row) or (self.engine.cached_forward(), 0)
        held = forward.tokens  # the sequence only grows: what it held then is common
        while common < len(held) and common < len(ids) and held[common] == ids[common]:
            common += 1
        forward.truncate(min(common, len(ids) - 1))  # the last token runs again: its logits are the guess's
        logits = forward.feed(ids[len(forward.tokens) :])[-1]
        guess = [int(logits.argmax())]
        while len(guess) < k:
            guess.append(int(forward.feed(guess[-1:])[-1].argmax()))
        self.rows[row] = (forward, len(ids))
        return guess


def make_draft(params, options):
    """Guess with a smaller package of the same vocabulary (speculative={"method": "draft", "model": PKG})."""
    return DraftModel(draft_engine(params.speculative.get("model"), options.get("threads")))


@nextoken.hookimpl
def register_proposers(register):
    register("prompt_lookup", make_prompt_lookup)
    register("draft", make_draft)
