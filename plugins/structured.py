"""Constrained decoding, a built-in plugin on llguidance: the text follows a JSON schema, is a JSON
object, matches a regular expression, is one of a list of strings, or follows a Lark grammar.

    engine.generate(prompt, response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    engine.generate(prompt, regex=r"[0-9]{3}-[0-9]{4}")
    engine.generate(prompt, choice=["yes", "no"])
    engine.generate(prompt, grammar=LARK_TEXT)

Two pieces, registered like anyone's: a logits processor (``structured``, order 0: it masks first,
so temperature, top-k and top-p choose among the tokens the grammar allows) and a stop condition
(``structured``, order 5: it feeds each sequence's token to its matcher and ends the sequence with
finish reason ``stop`` once the grammar is complete). Each sequence has its own matcher; the
request's are kept while the request runs. A grammar llguidance rejects is an
:class:`~nextoken.InvalidRequestError` with its message, before any work. Requests without a
constraint make neither piece active and pay nothing.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np

import nextoken
from nextoken import InvalidRequestError, Stop

#: How constrained JSON is written: one space after separators, no other whitespace.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: The vocabulary llguidance works on, made once per tokenizer (~1 s for a large one).
_VOCABULARIES: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
#: Each running constrained request's matchers, by its state (gone with the request).
_RUNS: "weakref.WeakKeyDictionary[Any, _Run]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of nextoken
        raise InvalidRequestError("constrained decoding needs llguidance: pip install llguidance") from None
    return llguidance


def _lark_string(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def grammar_of(params) -> tuple[str, str] | None:
    """(what the request constrains the text to, llguidance's grammar for it), or None."""
    matcher = _llguidance().LLMatcher
    fmt = params.response_format
    if fmt is not None:
        schema = fmt["json_schema"]["schema"] if fmt["type"] == "json_schema" else {"type": "object"}
        try:
            # compact JSON (", " and ": " between items): flexible whitespace lets a model wander in
            # newlines until max_new_tokens; schema "x-guidance" options still apply
            return "JSON schema", matcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"the JSON schema is not valid: {exc}") from None
    if params.regex is not None:
        return "regular expression", matcher.grammar_from_regex(params.regex)
    if params.choice:
        return "choice", matcher.grammar_from_lark("start: " + " | ".join(_lark_string(c) for c in params.choice))
    if params.grammar is not None:
        return "grammar", matcher.grammar_from_lark(params.grammar)
    return None


def _vocabulary(state):
    """llguidance's tokenizer for the request's tokenizer and the model's vocabulary."""
    tokenizer = state.tokenizer
    to_json = getattr(tokenizer, "to_json", None)
    if to_json is None:
        raise InvalidRequestError("constrained decoding needs the package's tokenizer.json (a Hugging Face "
                                  "tokenizer); this package's tokenizer cannot give it")
    key = getattr(tokenizer, "inner", tokenizer)
    with _LOCK:
        vocabulary = _VOCABULARIES.get(key)
        if vocabulary is None or vocabulary.vocab_size != state.vocab_size:
            eos = list(state.eos_token_ids) or None
            vocabulary = _llguidance().LLTokenizer(to_json(), n_vocab=state.vocab_size, eos_token=eos)
            _VOCABULARIES[key] = vocabulary
    return vocabulary


class _Run:
    """One request's matchers, a sequence each, and the bitmask they fill."""

    def __init__(self, grammar: str, state) -> None:
        llg = _llguidance()
        vocabulary = _vocabulary(state)
        self.matchers = [llg.LLMatcher(vocabulary, grammar, log_level=0) for _ in range(state.batch_size)]
        bad = next((m.get_error() for m in self.matchers if m.is_error()), None)
        if bad:
            raise InvalidRequestError(f"the grammar cannot be used: {bad}")
        self.bitmask = np.full((state.batch_size, (state.vocab_size + 31) // 32), -1, dtype=np.int32)

    def apply(self, logits: np.ndarray, alive: np.ndarray) -> None:
        """Set to -inf, in place, every token a live row's grammar does not allow next (a finished
        row is left as it is). The mask of a row is llguidance's bitmask, unpacked once for the
        batch; ``putmask`` then writes [B, V] in one pass (a boolean index took 8x as long)."""
        bitmask = self.bitmask
        for row, live in enumerate(alive.tolist()):
            bits = bitmask[row]
            if live:
                self.matchers[row].unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            else:
                bits[:] = -1
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :logits.shape[1]]
        np.putmask(logits, allowed == 0, -np.inf)


def _run(state, grammar: str) -> _Run:
    with _LOCK:
        run = _RUNS.get(state)
    if run is None:
        run = _Run(grammar, state)
        with _LOCK:
            _RUNS[state] = run
    return run


def make_constraint(params, options):
    """Mask every token the request's grammar does not allow (response_format, regex, choice, grammar)."""
    found = grammar_of(params)
    if found is None:
        return None
    what, grammar = found
    problem = _llguidance().LLMatcher.validate_grammar(grammar)
    if problem:
        raise InvalidRequestError(f"the {what} cannot be used: {problem.strip()}"[:1000])

    def structured(logits: np.ndarray, state) -> np.ndarray:
        _run(state, grammar).apply(logits, state.alive)
        return logits

    return structured


def make_complete(params, options):
    """End a constrained sequence (finish reason "stop") once its grammar is complete."""
    found = grammar_of(params)
    if found is None:
        return None
    grammar = found[1]

    def complete(tokens: np.ndarray, state):
        run = _run(state, grammar)
        stops = {}
        for row in np.flatnonzero(state.alive).tolist():
            matcher = run.matchers[row]
            matcher.consume_token(int(tokens[row]))
            if matcher.is_error():
                raise ValueError(f"token {int(tokens[row])} of row {row} is not allowed by the grammar "
                                 f"({matcher.get_error()}); a processor or strategy overrode the mask")
            if matcher.is_stopped():
                stops[row] = Stop("stop", "the grammar is complete")
        return stops or None

    return complete


@nextoken.hookimpl
def register_logits_processors(register):
    register("structured", make_constraint, order=0, auto=True)


@nextoken.hookimpl
def register_stop_conditions(register):
    register("structured", make_complete, order=5, auto=True)
