"""What nextoken asks of a tokenizer, and incremental detokenisation for streaming.

Tokenizers are plugins (hook ``register_tokenizers``); the built-in one wraps Hugging Face
``tokenizers`` (``nextoken.plugins.hf_tokenizer``).
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

__all__ = ["Tokenizer", "IncrementalDecoder"]

# How many tokens before the new ones are decoded with them, so that a token whose text depends on
# its left neighbour (a leading space, the second half of a UTF-8 character) comes out right.
_CONTEXT_TOKENS = 4


@runtime_checkable
class Tokenizer(Protocol):
    """A tokenizer as nextoken uses it."""

    adds_bos: bool
    chat_template: str | None
    special_tokens: Mapping[str, str]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the special tokens, e.g. BOS, the tokenizer adds, unless told not to)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id``."""

    def decoder(self, context: Sequence[int] = ()) -> "IncrementalDecoder":
        """An :class:`IncrementalDecoder` for text that continues ``context`` (usually the prompt)."""


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, for any tokenizer with ``decode``.

    A delta is released only when it is final: text that ends in an incomplete UTF-8 character
    (U+FFFD from a partial byte sequence) is held back until the next token completes it. The
    concatenated deltas equal ``decode(context + ids)[len(decode(context)):]``, so a continuation
    keeps the leading space its first token carries.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(context[-_CONTEXT_TOKENS:])
        self._prefix = 0               # window start: decoded with the new tokens for context
        self._read = len(self._ids)    # tokens before this have been released as text

    def add(self, token_id: int) -> str:
        """Feed one token; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(int(token_id))
        return self._release(final=False)

    def flush(self) -> str:
        """Whatever is held back at the end of the stream (an unfinished character as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        delta = text[len(before):]
        # The tokens just released become the next window's context; older ones are not decoded again.
        self._prefix, self._read = self._read, len(self._ids)
        return delta
