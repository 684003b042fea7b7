"""What nextoken asks of a tokenizer, and incremental detokenisation for streaming.

Tokenizers are plugins (hook ``register_tokenizers``); the built-in one wraps Hugging Face
``tokenizers`` (``nextoken.plugins.hf_tokenizer``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .errors import InvalidRequestError, PluginError, describe

__all__ = ["GuardedTokenizer", "IncrementalDecoder", "Tokenizer", "decoder_for"]

# How many tokens before the new ones are decoded with them, so that a token whose text depends on
# its left neighbour (a leading space, the second half of a UTF-8 character) comes out right.
_CONTEXT_TOKENS = 4


class Decoder(Protocol):
    """Text deltas from a stream of token ids (:class:`IncrementalDecoder` is the stock one)."""

    def add(self, token_id: int) -> str:
        """The text token ``token_id`` completes (may be empty while a character is incomplete)."""

    def flush(self) -> str:
        """Whatever text is held back, at the end."""


@runtime_checkable
class Tokenizer(Protocol):
    """A tokenizer as nextoken uses it."""

    @property
    def adds_bos(self) -> bool:
        """Whether ``encode`` puts a BOS token first."""

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (Jinja), if it has one."""

    @property
    def special_tokens(self) -> Mapping[str, Any]:
        """Its special tokens by role (``bos_token``, ``eos_token`` ...)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the special tokens, e.g. BOS, the tokenizer adds, unless told not to)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out. A tokenizer that can also keep them takes
        ``skip_special_tokens=False`` (a request's ``skip_special_tokens``; gpt-oss's channels)."""

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of ``token_id``."""

    def decoder(self, context: Sequence[int] = ()) -> Decoder:
        """A :class:`Decoder` for text that continues ``context`` (usually the prompt)."""


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, for any tokenizer with ``decode``.

    A delta is released only when it is final: text that ends in an incomplete UTF-8 character
    (U+FFFD from a partial byte sequence) is held back until the next token completes it. The
    concatenated deltas equal ``decode(context + ids)[len(decode(context)):]``, so a continuation
    keeps the leading space its first token carries.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        """
        Args:
            tokenizer: any tokenizer with ``decode``.
            context: ids before the first one added (a continuation keeps its first token's space).
        """
        self._tok = tokenizer
        self._ids: list[int] = list(context[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start: decoded with the new tokens for context
        self._read = len(self._ids)  # tokens before this have been released as text

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
        before = self._tok.decode(self._ids[self._prefix : self._read])
        text = self._tok.decode(self._ids[self._prefix :])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        delta = text[len(before) :]
        # The tokens just released become the next window's context; older ones are not decoded again.
        self._prefix, self._read = self._read, len(self._ids)
        return delta


class GuardedTokenizer:
    """A tokenizer plugin's tokenizer with its answers checked where they enter the engine.

    ``encode`` must give integer ids inside the vocabulary, ``decode`` a string; anything else,
    or an exception, is a :class:`~nextoken.PluginError` naming the plugin (``source``), so a
    faulty tokenizer fails the request that used it instead of reaching ONNX Runtime. Every other
    attribute is the wrapped tokenizer's.
    """

    def __init__(self, inner: Tokenizer, source: str, vocab_size: int) -> None:
        self.inner = inner
        self.source = source
        self.vocab_size = vocab_size

    @property
    def adds_bos(self) -> bool:
        return self.inner.adds_bos

    @property
    def chat_template(self) -> str | None:
        return self.inner.chat_template

    @property
    def special_tokens(self) -> Mapping[str, Any]:
        return self.inner.special_tokens

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            ids = self.inner.encode(text, add_special_tokens=add_special_tokens)
        except Exception as exc:
            raise _plugin_failure(self.source, "encode", "", exc) from exc
        try:
            out = [int(t) for t in ids]
            if any(isinstance(t, (bool, float)) for t in ids):
                raise TypeError
        except (TypeError, ValueError):
            raise _plugin_failure(
                self.source, "encode", f"returned {describe(ids)}, not a list of integer token ids"
            ) from None
        bad = [t for t in out if not 0 <= t < self.vocab_size]
        if bad:
            raise _plugin_failure(
                self.source, "encode", f"returned token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
            )
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        try:
            text = self.inner.decode(ids) if skip_special_tokens else self.inner.decode(ids, skip_special_tokens=False)  # type: ignore[call-arg]
        except TypeError as exc:
            if skip_special_tokens:
                raise _plugin_failure(self.source, "decode", "", exc) from exc
            raise InvalidRequestError(
                f"the tokenizer of plugin {self.source} cannot keep special tokens in its text "
                "(decode takes no skip_special_tokens); leave skip_special_tokens on"
            ) from None
        except Exception as exc:
            raise _plugin_failure(self.source, "decode", "", exc) from exc
        if not isinstance(text, str):
            raise _plugin_failure(self.source, "decode", f"returned {describe(text)}, not a string")
        return text

    def decoder(self, context: Sequence[int] = (), skip_special_tokens: bool = True) -> Decoder:
        """A checked incremental decoder; ``skip_special_tokens=False``: one whose text keeps the
        special tokens (the stock decoder over ``decode(ids, skip_special_tokens=False)``)."""
        if not skip_special_tokens:
            return IncrementalDecoder(_KeepSpecials(self), context)  # type: ignore[arg-type]
        make = getattr(self.inner, "decoder", None)
        if make is None or isinstance(self.inner, GuardedTokenizer):
            return IncrementalDecoder(self, context)
        try:
            inner = make(context)
        except Exception as exc:
            raise _plugin_failure(self.source, "decoder", "", exc) from exc
        if type(inner) is IncrementalDecoder:  # the stock decoder: run it over the checked decode
            return IncrementalDecoder(self, context)
        return _GuardedDecoder(inner, self)


def decoder_for(tokenizer: Tokenizer, context: Sequence[int] = (), skip_special_tokens: bool = True) -> Decoder:
    """``tokenizer``'s incremental decoder for text after ``context``, keeping the special tokens
    when ``skip_special_tokens`` is off (through ``decode(ids, skip_special_tokens=False)``)."""
    if skip_special_tokens:
        return tokenizer.decoder(context)
    if isinstance(tokenizer, GuardedTokenizer):
        return tokenizer.decoder(context, skip_special_tokens=False)
    return IncrementalDecoder(_KeepSpecials(tokenizer), context)  # type: ignore[arg-type]


class _KeepSpecials:
    """A checked tokenizer seen through a decode that keeps the special tokens."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def decode(self, ids: Sequence[int]) -> str:
        return self.owner.decode(ids, skip_special_tokens=False)


class _GuardedDecoder:
    """A plugin's own incremental decoder, with its deltas checked to be strings."""

    def __init__(self, inner, owner: GuardedTokenizer) -> None:
        self.inner, self.owner = inner, owner

    def _checked(self, what: str, call) -> str:
        try:
            text = call()
        except Exception as exc:
            raise _plugin_failure(self.owner.source, what, "", exc) from exc
        if not isinstance(text, str):
            raise _plugin_failure(self.owner.source, what, f"returned {describe(text)}, not a string")
        return text

    def add(self, token_id: int) -> str:
        return self._checked("decoder.add", lambda: self.inner.add(token_id))

    def flush(self) -> str:
        return self._checked("decoder.flush", self.inner.flush)


def _plugin_failure(source: str, what: str, problem: str, exc: BaseException | None = None) -> PluginError:
    """The error for a tokenizer plugin that raised (``exc``) or answered wrongly (``problem``)."""
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else problem
    return PluginError(f"{source} failed in {what}: {detail}")
