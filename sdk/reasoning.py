"""Reasoning models' thinking, apart from their answer.

A reasoning model (Qwen3, SmolLM3, DeepSeek-R1 distills) writes its thinking between tags before
the answer: ``<think>...</think>answer``; a template may open the tag itself in the prompt (the
answer then starts inside it). gpt-oss writes channels instead (:class:`Harmony`). A reasoning parser splits a chat answer's text into ``reasoning``
and ``content``, whole or as it streams, and counts the tokens the thinking took. Parsers are
plugins (``register_reasoning_parsers``); the built-in ``think`` handles the tags above and
``harmony`` gpt-oss's channels; ``auto`` picks ``harmony`` for a template that writes
``<|channel|>``, ``think`` for one that closes a think tag.

Tool calls and the answer's text are read from the content, after the thinking.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Protocol

from .errors import InvalidRequestError
from .types import Completion

__all__ = [
    "Harmony",
    "ReasoningParser",
    "Splitter",
    "ThinkTags",
    "count_reasoning_tokens",
    "pick_parser",
    "split",
    "split_answer",
    "thinking_tags",
]


class Splitter(Protocol):
    """One answer's text as it streams: each piece fed gives the (reasoning, content) it settles;
    :meth:`flush` gives what is held back at the end (a tag's beginning that never finished)."""

    @property
    def inside(self) -> bool:
        """Whether the text so far ends inside the thinking."""

    def feed(self, text: str) -> tuple[str, str]: ...
    def flush(self) -> tuple[str, str]: ...


class ReasoningParser(Protocol):
    """What a reasoning parser plugin makes: a :class:`Splitter` for an answer whose prompt ends
    with ``prompt_tail`` (a template that opens the thinking itself leaves its tag there)."""

    def splitter(self, prompt_tail: str) -> Splitter: ...


class ThinkTags:
    """``<think>reasoning</think>content`` (tags configurable). An answer that opens no tag is
    content, unless its prompt ended inside an open one (then it is reasoning up to the closing
    tag); an answer that ends inside the thinking is all reasoning."""

    def __init__(self, start: str = "<think>", end: str = "</think>") -> None:
        """
        Args:
            start: the tag that opens the thinking.
            end: the tag that closes it.
        """
        if not start or not end:
            raise InvalidRequestError("a think-tag parser needs a start and an end tag")
        self.start, self.end = start, end

    def splitter(self, prompt_tail: str = "") -> "_ThinkSplitter":
        inside = prompt_tail.rstrip().endswith(self.start)
        return _ThinkSplitter(self.start, self.end, inside)


class _ThinkSplitter:
    """The state machine of :class:`ThinkTags`: before any thinking, inside it, just closed (the
    newlines after the tag are dropped), after it."""

    def __init__(self, start: str, end: str, inside: bool) -> None:
        self.start, self.end = start, end
        self.state = "inside" if inside else "before"
        self.held = ""

    @property
    def inside(self) -> bool:
        return self.state == "inside"

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = [], []
        text = self.held + text
        self.held = ""
        while text:
            if self.state == "closed":  # the newlines after the closing tag belong to neither
                text = text.lstrip("\n")
                if text:
                    self.state = "after"
                continue
            if self.state == "after":
                content.append(text)
                break
            if self.state == "before":
                stripped = text.lstrip()
                if not stripped:
                    self.held = text  # whitespace before a tag may still belong to nothing
                    break
                if stripped.startswith(self.start):
                    self.state, text = "inside", stripped[len(self.start) :]
                    continue
                if self.start.startswith(stripped):
                    self.held = text  # the start tag's beginning: wait for the rest
                    break
                self.state = "after"  # an answer without thinking
                continue
            at = text.find(self.end)
            if at >= 0:
                reasoning.append(text[:at])
                self.state, text = "closed", text[at + len(self.end) :]
                continue
            keep = _partial_suffix(text, self.end)
            reasoning.append(text[: len(text) - keep])
            self.held = text[len(text) - keep :]
            break
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.state == "inside" else ("", held)


#: gpt-oss's harmony markup (special tokens, kept in the text for :class:`Harmony`)
_MARKERS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>", "<|constrain|>")
_RECIPIENT = re.compile(r"to=([^\s<]+)")


class Harmony:
    """gpt-oss's channels (the harmony format): ``<|channel|>analysis<|message|>...<|end|>`` is
    reasoning, ``<|start|>assistant<|channel|>final<|message|>...`` the answer, and a message to
    a function (``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>``)
    a tool call, given to the content as a ``<tool_call>`` block so that the tool-call parsing
    reads it as any other. The markup is special tokens: requests it splits keep them in their
    text (:attr:`needs_special_tokens`; ``SamplingParams.skip_special_tokens`` off)."""

    #: the answer's text must keep its special tokens for this parser to see the channels
    needs_special_tokens = True

    def splitter(self, prompt_tail: str = "") -> "_HarmonySplitter":
        return _HarmonySplitter()


class _HarmonySplitter:
    """The state machine of :class:`Harmony`: ``start`` (nothing yet), ``header`` (between a
    message's start and its ``<|message|>``), ``body`` (a message's text, to its channel's side),
    ``between`` (after a message's end)."""

    def __init__(self) -> None:
        self.state, self.header, self.held = "start", "", ""
        self.channel = "final"
        self.call_open = False

    @property
    def inside(self) -> bool:
        return self.state == "body" and self.channel == "analysis"

    def feed(self, text: str) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        buf, self.held = self.held + text, ""
        while buf:
            at = buf.find("<|")
            if at < 0:
                keep = 1 if buf.endswith("<") else 0
                self._text(buf[: len(buf) - keep], reasoning, content)
                self.held = buf[len(buf) - keep :]
                break
            if at:
                self._text(buf[:at], reasoning, content)
                buf = buf[at:]
            end = buf.find("|>")
            if end < 0:
                self.held = buf  # a marker's beginning: wait for the rest
                break
            marker, buf = buf[: end + 2], buf[end + 2 :]
            self._marker(marker, reasoning, content)
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        held, self.held = self.held, ""
        self._text(held, reasoning, content)
        self._close(content)
        return "".join(reasoning), "".join(content)

    def _text(self, text: str, reasoning: list[str], content: list[str]) -> None:
        if not text:
            return
        if self.state == "start":
            if not text.strip():
                return
            self.state, self.channel = "body", "final"  # no markup: all of it is the answer
        if self.state == "header":
            self.header += text
        elif self.state == "body":
            (reasoning if self.channel == "analysis" else content).append(text)

    def _marker(self, marker: str, reasoning: list[str], content: list[str]) -> None:
        if marker not in _MARKERS:  # another special token: text where text goes
            self._text(marker, reasoning, content)
            return
        if marker in ("<|start|>", "<|channel|>"):
            if self.state != "header":
                self._close(content)
                self.state, self.header = "header", ""
            self.header += " "
        elif marker == "<|constrain|>" and self.state == "header":
            self.header += " constrain="
        elif marker == "<|message|>" and self.state in ("header", "start"):
            self._open(content)
        elif marker in ("<|end|>", "<|call|>", "<|return|>"):
            self._close(content)
            self.state = "between"
        else:
            self._text(marker, reasoning, content)

    def _open(self, content: list[str]) -> None:
        words = self.header.split()
        channels = [w for w in words if w in ("analysis", "commentary", "final")]
        self.channel = channels[-1] if channels else "final"
        recipient = _RECIPIENT.search(self.header)
        self.state = "body"
        if recipient and recipient.group(1).startswith("functions."):
            name = recipient.group(1)[len("functions.") :]
            content.append(f'<tool_call>{{"name": {json.dumps(name)}, "arguments": ')
            self.call_open, self.channel = True, "commentary"

    def _close(self, content: list[str]) -> None:
        if self.call_open:
            content.append("}</tool_call>")
            self.call_open = False


def _partial_suffix(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` are the beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split(parser: ReasoningParser, text: str, prompt_tail: str = "") -> tuple[str | None, str]:
    """(the reasoning, None when there was none; the content) of a whole answer."""
    splitter = parser.splitter(prompt_tail)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    return (r1 + r2).strip() or None, c1 + c2


def count_reasoning_tokens(pieces: Sequence[str], parser: ReasoningParser, prompt_tail: str = "") -> int:
    """How many of an answer's tokens (their text ``pieces``, in order) went to its thinking: every
    one before the first that gives content (that one too when it also closes the thinking); 0 for
    an answer without thinking."""
    splitter = parser.splitter(prompt_tail)
    count, thought = 0, False
    for piece in pieces:
        was_inside = splitter.inside
        reasoning, content = splitter.feed(piece)
        thought = thought or was_inside or bool(reasoning)
        if content:
            return count + (was_inside or bool(reasoning)) if thought else 0
        count += 1
    return count if thought else 0


def pick_parser(name: str | None, template: str | None) -> str | None:
    """The reasoning parser a conversation uses: ``name`` as given, ``None``/``"none"`` for none, or
    ``"auto"``: ``think`` when the chat template closes a think tag, else none."""
    if name in (None, "none"):
        return None
    if name == "auto":
        if template and "<|channel|>" in template:
            return "harmony"
        return "think" if template and "</think>" in template else None
    return name


def thinking_tags(parser: ReasoningParser, prompt_tail: str = "") -> tuple[str, str] | None:
    """The tags a constraint is held after (:attr:`SamplingParams.thinking
    <nextoken.SamplingParams.thinking>`) for an answer ``parser`` splits: its ``start`` and ``end``
    (the start empty when the prompt ends inside an open tag); None for a parser without tags."""
    start, end = getattr(parser, "start", None), getattr(parser, "end", None)
    if not isinstance(start, str) or not isinstance(end, str) or not start or not end:
        return None
    return ("" if prompt_tail.rstrip().endswith(start) else start), end


def split_answer(completion: Completion, parser: ReasoningParser, prompt_tail: str, pieces: Sequence[str]) -> None:
    """Split a finished chat answer in place: its thinking to ``completion.reasoning``, the rest
    stays its text; ``usage.reasoning_tokens`` counts the tokens the thinking took (``pieces``: each
    generated token's text, in order)."""
    completion.reasoning, completion.text = split(parser, completion.text, prompt_tail)
    completion.usage.reasoning_tokens = count_reasoning_tokens(pieces, parser, prompt_tail)
