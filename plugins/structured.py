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


#: The request fields that constrain the text, and what each is called in messages.
FIELDS = {"response_format": "JSON schema", "regex": "regular expression", "choice": "choice", "grammar": "grammar"}


def constrained_field(params) -> str | None:
    """The field that constrains ``params``' text (one of :data:`FIELDS`), or None."""
    return next((name for name in FIELDS if getattr(params, name)), None)


def grammar_of(params) -> tuple[str, str] | None:
    """(the field that constrains the text, llguidance's grammar for it), or None; an
    :class:`~nextoken.InvalidRequestError` naming the field when llguidance cannot read it."""
    field = constrained_field(params)
    if field is None:
        return None
    matcher = _llguidance().LLMatcher
    try:
        if field == "response_format":
            fmt = params.response_format
            schema = fmt["json_schema"]["schema"] if fmt["type"] == "json_schema" else {"type": "object"}
            # compact JSON (", " and ": " between items): flexible whitespace lets a model wander in
            # newlines until max_new_tokens; schema "x-guidance" options still apply
            grammar = matcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
        elif field == "regex":
            grammar = matcher.grammar_from_regex(params.regex)
        elif field == "choice":
            grammar = matcher.grammar_from_lark("start: " + " | ".join(_lark_string(c) for c in params.choice))
        else:
            grammar = matcher.grammar_from_lark(params.grammar)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"{field}: the {FIELDS[field]} is not valid: {clean(str(exc))}") from None
    if params.thinking is not None:
        grammar = after_thinking(grammar, *params.thinking)
    return field, grammar


def after_thinking(grammar: str, start: str, end: str) -> str:
    """``grammar`` (llguidance's: Lark text or its JSON) held after a reasoning model's thinking:
    an optional block from ``start`` to the first ``end``, free text, then whitespace, then the
    answer the grammar describes; with ``start`` empty the answer begins inside the thinking (the
    prompt opened it), so the block runs to ``end`` first."""
    top = json.loads(grammar) if grammar.lstrip().startswith("{") else {"grammars": [{"lark_grammar": grammar}]}
    inner = list(top["grammars"])
    inner[0] = {**inner[0], "name": "nextoken_answer"}
    tags = f"{_lark_string(start)} " if start else ""
    block = f"think[lazy]: {tags}/(.|\\n)*/ {_lark_string(end)}"
    head = "think /[ \\t\\n]*/" if not start else "/[ \\t\\n]*/ (think /[ \\t\\n]*/)?"
    outer = f"start: {head} @nextoken_answer\n{block}"
    return json.dumps({**top, "grammars": [{"lark_grammar": outer}, *inner]})


def vocabulary(tokenizer_json: str, vocab_size: int, eos_token_ids: list[int] | None = None):
    """llguidance's tokenizer for a Hugging Face ``tokenizer.json`` and the model's vocabulary size."""
    return _llguidance().LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids or []) or None)


def _vocabulary(state):
    """llguidance's tokenizer for the request's tokenizer and the model's vocabulary (made once per tokenizer)."""
    tokenizer = state.tokenizer
    to_json = getattr(tokenizer, "to_json", None)
    if to_json is None:
        raise InvalidRequestError(
            "constrained decoding needs the package's tokenizer.json (a Hugging Face "
            "tokenizer); this package's tokenizer cannot give it"
        )
    key = getattr(tokenizer, "inner", tokenizer)
    with _LOCK:
        found = _VOCABULARIES.get(key)
        if found is None or found.vocab_size != state.vocab_size:
            found = _VOCABULARIES[key] = vocabulary(to_json(), state.vocab_size, list(state.eos_token_ids))
    return found


def clean(message: str) -> str:
    """llguidance's message for a client: its first lines, without the parser state it appends."""
    return message.split("<state>")[0].strip().replace("\n", " ")[:500]


def check(grammar: str, vocab, steps: int = 8) -> str | None:
    """What is wrong with ``grammar`` over ``vocab`` (an :func:`vocabulary`), or None: llguidance's
    validation, then a matcher's masks along ``steps`` tokens it allows (the lowest id each step),
    where the limits of its parser and lexer show (too many alternatives in a row, too many lexer
    states, too many items for a token)."""
    llg = _llguidance()
    problem = llg.LLMatcher.validate_grammar(grammar, vocab)
    if problem:
        return clean(problem)
    matcher = llg.LLMatcher(vocab, grammar, log_level=0)
    bits = np.empty((vocab.vocab_size + 31) // 32, dtype=np.int32)
    for _ in range(steps):
        if matcher.is_error() or matcher.is_stopped():
            break
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        allowed = np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[: vocab.vocab_size])
        if matcher.is_error() or not allowed.size:
            break
        matcher.consume_token(int(allowed[0]))
    return clean(matcher.get_error()) if matcher.is_error() else None


class _Run:
    """One request's matchers, a sequence each, and the bitmask they fill."""

    def __init__(self, grammar: str, state, field: str) -> None:
        llg = _llguidance()
        self.field = field
        vocabulary = _vocabulary(state)
        self.matchers = [llg.LLMatcher(vocabulary, grammar, log_level=0) for _ in range(state.batch_size)]
        bad = next((m.get_error() for m in self.matchers if m.is_error()), None)
        if bad:
            raise InvalidRequestError(f"{field}: the {FIELDS[field]} cannot be used: {clean(bad)}")
        self.bitmask = np.full((state.batch_size, (state.vocab_size + 31) // 32), -1, dtype=np.int32)

    def apply(self, logits: np.ndarray, alive: np.ndarray) -> None:
        """Set to -inf, in place, every token a live row's grammar does not allow next (a finished
        row is left as it is). The mask of a row is llguidance's bitmask, unpacked once for the
        batch; ``putmask`` then writes [B, V] in one pass (a boolean index took 8x as long)."""
        bitmask = self.bitmask
        for row, live in enumerate(alive.tolist()):
            bits = bitmask[row]
            if live:
                matcher = self.matchers[row]
                matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
                if matcher.is_error():
                    raise InvalidRequestError(
                        f"{self.field}: the {FIELDS[self.field]} cannot be followed here: {clean(matcher.get_error())}"
                    )
            else:
                bits[:] = -1
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
        np.putmask(logits, allowed == 0, -np.inf)


def _run(state, grammar: str, field: str) -> _Run:
    with _LOCK:
        run = _RUNS.get(state)
    if run is None:
        run = _Run(grammar, state, field)
        with _LOCK:
            _RUNS[state] = run
    return run


def make_constraint(params, options):
    """Mask every token the request's grammar does not allow (response_format, regex, choice, grammar)."""
    found = grammar_of(params)
    if found is None:
        return None
    field, grammar = found
    problem = _llguidance().LLMatcher.validate_grammar(grammar)
    if problem:
        raise InvalidRequestError(f"{field}: the {FIELDS[field]} cannot be used: {clean(problem)}")

    def structured(logits: np.ndarray, state) -> np.ndarray:
        _run(state, grammar, field).apply(logits, state.alive)
        return logits

    return structured


def make_complete(params, options):
    """End a constrained sequence (finish reason "stop") once its grammar is complete."""
    found = grammar_of(params)
    if found is None:
        return None
    field, grammar = found

    def complete(tokens: np.ndarray, state):
        run = _run(state, grammar, field)
        stops = {}
        for row in np.flatnonzero(state.alive).tolist():
            matcher, token = run.matchers[row], int(tokens[row])
            matcher.consume_token(token)
            if matcher.is_error():
                if (int(run.bitmask[row, token >> 5]) >> (token & 31)) & 1:  # the mask allowed it: a limit
                    raise InvalidRequestError(
                        f"{field}: the {FIELDS[field]} cannot be followed here: {clean(matcher.get_error())}"
                    )
                raise ValueError(
                    f"token {token} of row {row} is not allowed by the grammar "
                    f"({clean(matcher.get_error())}); a processor or strategy overrode the mask"
                )
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
