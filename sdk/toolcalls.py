"""Tool calls, OpenAI-shaped: the tools go to the model through its chat template (which receives
``tools`` as transformers' ``apply_chat_template`` passes them), and its answer is parsed into calls.

What the model writes, and what ``tool_choice`` ``required`` or a named function enforces with a
grammar (the ``structured`` plugin), is the format most open tool-calling templates teach::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

one block per call (several with ``parallel_tool_calls``). ``auto`` lets the model choose: its
answer is parsed for such blocks, and any text outside them is the message's content. An answer
with no block is read as the other formats popular templates teach: one bare ``{"name": ...,
"arguments": ...}`` object (Llama 3.x writes ``"parameters"`` for ``"arguments"``, after an optional
``<|python_tag|>``), or a JSON list of them (Mistral's, after its ``[TOOL_CALLS]`` marker). A model whose chat template does not
take ``tools`` is an error, unless the request asks for the fallback (``tool_fallback``): a system
message of nextoken's own that lists the tools as JSON and teaches the format above.

Which format ``required`` and a named function hold the answer to, and how a streamed answer's
calls are found, is a :class:`ToolFormat`, a plugin kind (``register_tool_parsers``): the
built-ins are ``hermes`` (the blocks above: Qwen, Hermes, SmolLM3), ``llama3_json`` (one bare
object with ``"parameters"``) and ``mistral`` (a JSON list of calls), and ``auto`` picks one from
the chat template (:func:`pick_tool_parser`).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidRequestError
from .types import Completion, SamplingParams, ToolCall

__all__ = ["FALLBACK_PROMPT", "HERMES", "CallStream", "ToolFormat", "ToolRequest", "pick_tool_parser"]

#: The fallback's system message (``{tools}``: the tools as JSON, one a line).
FALLBACK_PROMPT = (
    "You can call these tools:\n{tools}\n"
    'To call one, answer with <tool_call>{{"name": <the tool\'s name>, "arguments": <its arguments as a JSON '
    "object>}}</tool_call> and nothing else; one block per call."
)
#: compact JSON inside a call, as the structured plugin writes constrained JSON
_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ToolFormat:
    """How a chat template teaches a model to write tool calls: in tagged blocks (``open`` and
    ``close`` around each call object), or bare (one call object, or a JSON list of them when
    ``as_list``); the call object's arguments under ``arguments_key``. It writes the grammar that
    ``tool_choice`` ``required`` or a named function holds an answer to (:meth:`grammar`); answers
    are read leniently in every format (:meth:`ToolRequest.parse`)."""

    def __init__(
        self,
        name: str,
        open: str | None = None,
        close: str | None = None,
        arguments_key: str = "arguments",
        as_list: bool = False,
    ) -> None:
        """
        Args:
            name: the format's name (as a request names it).
            open: the tag before each call (None: calls are bare JSON).
            close: the tag after each call.
            arguments_key: the call object's key for its arguments (``arguments``, ``parameters``).
            as_list: bare calls come as one JSON list (Mistral's), not one object.
        """
        if (open is None) != (close is None) or (open is not None and as_list):
            raise InvalidRequestError(f"tool format {name!r}: give both tags, or neither (bare calls, maybe a list)")
        self.name, self.open, self.close = name, open, close
        self.arguments_key, self.as_list = arguments_key, as_list

    @property
    def tagged(self) -> bool:
        """Whether calls are written in tagged blocks."""
        return self.open is not None

    def grammar(self, calls: Sequence[tuple[str, Any]], definitions: dict[str, Any], many: bool) -> str:
        """The Lark grammar of an answer that is calls only: ``calls`` each allowed tool's name and
        arguments schema (its ``$defs`` already in ``definitions``), ``many``: more than one call
        may be made."""
        objects = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, self.arguments_key: arguments},
                "required": ["name", self.arguments_key],
                "additionalProperties": False,
            }
            for name, arguments in calls
        ]
        one: dict[str, Any] = {"x-guidance": _STYLE, "anyOf": objects}
        if self.as_list:
            one = {"x-guidance": _STYLE, "type": "array", "items": {"anyOf": objects}, "minItems": 1}
            if not many:
                one["maxItems"] = 1
        if definitions:
            one["$defs"] = definitions
        body = f"obj: %json {json.dumps(one, ensure_ascii=False)}"
        if not self.tagged:
            return f"start: obj\n{body}"
        calls_rule = "call+" if many else "call"
        return f"start: {calls_rule}\ncall: {json.dumps(self.open)} obj {json.dumps(self.close)}\n{body}"


#: The format most open tool-calling templates teach: ``<tool_call>{json}</tool_call>`` blocks.
HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>")


def pick_tool_parser(name: str | None, template: str | None) -> str:
    """The tool format a request's ``name`` means: ``auto`` (or None) picks from the chat template
    (``mistral`` for one that writes ``[TOOL_CALLS]``; ``llama3_json`` for one that teaches bare calls
    with ``"parameters"`` or ``<|python_tag|>`` and no ``<tool_call>`` block; else ``hermes``)."""
    if name is not None and name != "auto":
        return name
    text = template or ""
    if "<tool_call>" in text or "<|channel|>" in text:  # gpt-oss: its calls reach the content as blocks
        return "hermes"
    if "[TOOL_CALLS]" in text:
        return "mistral"
    if "<|python_tag|>" in text or '"parameters"' in text:
        return "llama3_json"
    return "hermes"


def _check_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise InvalidRequestError(
            "tools must be a non-empty list of {'type': 'function', 'function': {...}}", param="tools"
        )
    out, names = [], set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise InvalidRequestError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                f"'parameters': {{...}}}}}} with a name of letters, digits, _ . - (at most 64)",
                param="tools",
            )
        if name in names:
            raise InvalidRequestError(f"tools[{i}]: the function name {name!r} is given twice", param="tools")
        assert isinstance(function, Mapping)  # a name was found in it
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidRequestError(f"tools[{i}] ({name}): parameters must be a JSON schema object", param="tools")
        names.add(name)
        out.append({"type": "function", "function": {**function, "parameters": dict(parameters)}})
    return out


def _hoisted(parameters: Mapping[str, Any], tool: str, definitions: dict[str, Any]) -> Any:
    """A tool's parameters schema placed inside the calls' schema: its own ``$defs`` / ``definitions``
    (what pydantic writes) moved to the root under names of the tool's, and its ``$ref`` s pointed
    there, so references resolve from the root as JSON Schema resolves them."""
    own = {**parameters.get("definitions", {}), **parameters.get("$defs", {})}
    renamed = {name: f"{tool}__{name}" for name in own}

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            out = {}
            for key, value in node.items():
                if key in ("$defs", "definitions") and node is parameters:
                    continue
                if key == "$ref" and isinstance(value, str):
                    for prefix in ("#/$defs/", "#/definitions/"):
                        if value.startswith(prefix) and value[len(prefix) :] in renamed:
                            value = "#/$defs/" + renamed[value[len(prefix) :]]
                out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    for name, body in own.items():
        definitions[renamed[name]] = walk(body)
    return walk(parameters)


class ToolRequest:
    """The tools of one chat request and what to do with them: render them, constrain the answer
    (``required`` or a named function), and parse the answer into :class:`ToolCall` s."""

    def __init__(
        self,
        tools: Any,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        fallback: bool = False,
        format: ToolFormat | None = None,
    ) -> None:
        """
        Args:
            tools: OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters"}}]``.
            tool_choice: ``auto`` (None), ``none``, ``required`` or ``{"type": "function", "function": {"name": ...}}``.
            parallel_tool_calls: whether an answer may hold several calls.
            fallback: describe the tools in a system message of nextoken's own for a template without them.
            format: how the template writes calls (None: :data:`HERMES`); the fallback teaches HERMES.
        """
        self.format = HERMES if format is None or fallback else format
        #: the tags calls are looked for in: the format's, or (a bare format) HERMES' too
        self.tags = _Tags(self.format if self.format.tagged else HERMES)
        self.tools = _check_tools(tools)
        self.names = [t["function"]["name"] for t in self.tools]
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, Mapping):
            function = choice.get("function") if choice.get("type") == "function" else None
            name = function.get("name") if isinstance(function, Mapping) else None
            if not isinstance(name, str):
                raise InvalidRequestError(
                    "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                    param="tool_choice",
                )
            if name not in self.names:
                raise InvalidRequestError(
                    f"tool_choice names function {name!r}, which is not among the tools ({', '.join(self.names)})",
                    param="tool_choice",
                )
            choice = name
        elif choice not in ("none", "auto", "required"):
            raise InvalidRequestError(
                "tool_choice must be 'none', 'auto', 'required' or "
                f"{{'type': 'function', 'function': {{'name': ...}}}}, not {tool_choice!r}",
                param="tool_choice",
            )
        self.choice = choice
        self.parallel = bool(parallel_tool_calls)
        self.fallback = bool(fallback)

    @classmethod
    def of(
        cls,
        tools: Any,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        fallback: bool = False,
        format: ToolFormat | None = None,
    ) -> "ToolRequest | None":
        """A request's tools as the model should see them: None without tools (``tool_choice`` must
        then be absent or ``none``) or with ``tool_choice`` ``none``; the one entry for the library
        and the server."""
        if tools is None:
            if tool_choice not in (None, "none"):
                raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
            return None
        request = cls(tools, tool_choice, parallel_tool_calls, fallback, format)
        return request if request.active else None

    @property
    def active(self) -> bool:
        """Whether the model sees the tools (``tool_choice`` is not ``none``)."""
        return self.choice != "none"

    def messages(self, messages: Sequence[Mapping[str, Any]], template: str | None) -> list:
        """The messages to render: as they are for a template that takes ``tools``; with the fallback's
        system message in front for one that does not (or an error, without the fallback)."""
        if template and "tools" in template:
            return list(messages)
        if not self.fallback:
            raise InvalidRequestError(
                "this model's chat template does not take tools; ask for nextoken's fallback "
                '(tool_fallback=True; the server: "nextoken": {"tool_fallback": true}), which '
                "describes them in a system message",
                param="tools",
            )
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":")) for t in self.tools)
        return [{"role": "system", "content": FALLBACK_PROMPT.format(tools=listing)}, *messages]

    def template_tools(self, template: str | None) -> list | None:
        """What the template receives as ``tools`` (None when it does not take them)."""
        return self.tools if template and "tools" in template else None

    def grammar(self) -> str | None:
        """The Lark grammar that ``required`` or a named function holds the answer to (None: free)."""
        if self.choice in ("none", "auto"):
            return None
        allowed = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.choice]
        definitions: dict[str, Any] = {}
        calls = [
            (t["function"]["name"], _hoisted(t["function"]["parameters"], t["function"]["name"], definitions))
            for t in allowed
        ]
        return self.format.grammar(calls, definitions, self.parallel and self.choice == "required")

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """``params`` held to the calls ``required`` or a named function asks for (as they are for
        ``auto`` and ``none``); another constraint beside them is an error."""
        grammar = self.grammar()
        if grammar is None:
            return params
        if params.constrained:
            raise InvalidRequestError(
                f"tool_choice {self.choice!r} constrains the answer to tool calls; "
                "leave out response_format, regex, choice and grammar",
                param="tool_choice",
            )
        return params.replace(grammar=grammar)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the text outside the calls, the calls) of an answer; a block that is not a call of one of
        the tools stays text."""
        calls, kept, end = [], [], 0
        for block in self.tags.blocks.finditer(text):
            call = self.call_in(block.group(1))
            if call is not None:
                kept.append(text[end : block.start()])
                end = block.end()
                calls.append(call)
        if not calls:  # a bare call, or a list of them
            bare = self._bare(text)
            return ("", bare) if bare else (text, [])
        if not self.parallel:
            calls = calls[:1]
        kept.append(text[end:])
        return "".join(kept).strip(), calls

    def _bare(self, text: str) -> list[ToolCall]:
        """The calls of an answer that is nothing but one call object, or a list of them (all
        calls of the tools, else none)."""
        body = text.strip()
        for marker in ("<|python_tag|>", "[TOOL_CALLS]"):
            body = body.removeprefix(marker).strip()
        try:
            value = json.loads(body)
        except ValueError:
            return []
        values = value if isinstance(value, list) and value else [value]
        calls = [self._call_of(v) for v in values]
        if not all(calls):
            return []
        found = [c for c in calls if c is not None]
        return found if self.parallel else found[:1]

    def call_in(self, body: str) -> ToolCall | None:
        """The call a block's text holds (a call object of one of the tools, as JSON), or None."""
        try:
            value = json.loads(body)
        except ValueError:
            return None
        return self._call_of(value)

    def _call_of(self, value: Any) -> ToolCall | None:
        """A call object (``name`` of a tool, ``arguments`` or Llama's ``parameters`` an object) as a
        ToolCall, or None."""
        if not isinstance(value, dict) or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(arguments, ensure_ascii=False))

    def finish(self, completions: list[Completion]) -> list[Completion]:
        """Each completion with its calls parsed out of its text (finish reason ``tool_calls`` when
        it made any); the same list."""
        if not self.active:
            return completions
        for completion in completions:
            text, calls = self.parse(completion.text)
            if calls:
                completion.text, completion.tool_calls, completion.finish_reason = text, calls, "tool_calls"
        return completions


class _Tags:
    """A tagged format's tags, and the patterns of its blocks and of a call's head in one."""

    def __init__(self, fmt: ToolFormat) -> None:
        assert fmt.open is not None and fmt.close is not None
        self.open, self.close = fmt.open, fmt.close
        self.blocks = re.compile(rf"{re.escape(fmt.open)}\s*(.*?)\s*{re.escape(fmt.close)}", re.S)
        key = re.escape(json.dumps(fmt.arguments_key))
        self.head = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*' + key + r"\s*:\s*")


#: characters a block may take to show its head before it is held and judged whole
_HEAD_MAX = 256


class CallStream:
    """A tools answer as it streams: its text, and each call as soon as its name is known, then its
    arguments' JSON a fragment at a time as the model writes it (what clients show as a call
    forms). :meth:`feed` and :meth:`flush` return pieces: ``("text", str)``, ``("call", index,
    ToolCall)`` (its id and name; ``arguments`` empty yet), ``("arguments", index, fragment)``.
    :attr:`calls` and :attr:`text` are the answer's, as :meth:`ToolRequest.parse` would give them,
    except that a streamed call keeps the arguments as written. A block whose head is not
    ``{"name": <a tool's>, "arguments": ...`` is held until it ends and judged whole, as is an
    answer that starts with ``{`` or ``[`` or a format's marker (it may be bare calls)."""

    def __init__(self, request: ToolRequest) -> None:
        """
        Args:
            request: the tools the answer may call.
        """
        self.request = request
        self._tags = request.tags
        self.calls: list[ToolCall] = []
        self.text = ""
        self._buffer = ""
        self._state = "start"  # start, text, head, arguments, tail, held, bare
        self._depth = 0
        self._in_string = self._escaped = False
        self._args = ""

    def feed(self, text: str) -> list[tuple]:
        out: list[tuple] = []
        self._buffer += text
        while self._step(out):
            pass
        return out

    def flush(self) -> list[tuple]:
        """What is held at the end: an unfinished block or a bare answer, judged whole."""
        out: list[tuple] = []
        rest, self._buffer = self._buffer, ""
        if self._state == "bare":
            text, calls = self.request.parse(rest)
            for call in calls:
                self._open(out, call.name, call.id)
                self._fragment(out, call.arguments)
            if text:
                self._say(out, text)
        elif self._state in ("head", "held"):
            self._say(out, self._tags.open + rest)
        elif rest:
            self._say(out, rest)
        self._state = "text"
        return out

    # -- the state machine ---------------------------------------------------------------------------
    def _step(self, out: list[tuple]) -> bool:
        buf = self._buffer
        if self._state == "start":
            stripped = buf.lstrip()
            if not stripped:
                return False
            if any(m.startswith(stripped[: len(m)]) for m in ("<|python_tag|>", "[TOOL_CALLS]")) and len(stripped) < 14:
                return False  # a format's marker may be coming
            bare = stripped.startswith(("{", "[", "<|python_tag|>", "[TOOL_CALLS]"))
            self._state = "bare" if bare else "text"
            return True
        if self._state == "bare":
            return False  # judged whole at the end
        if self._state == "text":
            at = buf.find(self._tags.open)
            if at < 0:
                keep = _partial(buf, self._tags.open)
                if len(buf) > keep:
                    self._say(out, buf[: len(buf) - keep])
                    self._buffer = buf[len(buf) - keep :]
                return False
            if at:
                self._say(out, buf[:at])
            self._buffer, self._state = buf[at + len(self._tags.open) :], "head"
            return True
        if self._state == "head":
            head = self._tags.head.match(buf)
            if head is not None and head.group(1) in self.request.names and self._room():
                self._open(out, head.group(1))
                self._buffer, self._state, self._depth, self._args = buf[head.end() :], "arguments", 0, ""
                return True
            if head is not None or self._tags.close in buf or len(buf) > _HEAD_MAX:
                self._state = "held"  # not a head streamed as it comes: judged whole when it ends
                return True
            return False
        if self._state == "arguments":
            if self._depth == 0 and not self.calls[-1].arguments:  # the space before the value is not its
                buf = self._buffer = buf.lstrip()
            for i, ch in enumerate(buf):
                if self._in_string:
                    self._escaped = not self._escaped and ch == "\\"
                    if ch == '"' and not self._escaped:
                        self._in_string = False
                elif ch == '"':
                    self._in_string = True
                elif ch in "{[":
                    self._depth += 1
                elif ch in "}]":
                    self._depth -= 1
                    if self._depth == 0:
                        self._fragment(out, buf[: i + 1])
                        self._buffer, self._state = buf[i + 1 :], "tail"
                        return True
            if buf:
                self._fragment(out, buf)
            self._buffer = ""
            return False
        if self._state == "tail":  # the object's closing brace, then the end tag
            at = buf.find(self._tags.close)
            if at < 0:
                return False
            self._buffer, self._state = buf[at + len(self._tags.close) :], "text"
            return True
        # held: a block judged whole once it ends
        at = buf.find(self._tags.close)
        if at < 0:
            return False
        call = self.request.call_in(buf[:at]) if self._room() else None
        if call is not None:
            self._open(out, call.name, call.id)
            self._fragment(out, call.arguments)
        else:
            self._say(out, self._tags.open + buf[: at + len(self._tags.close)])
        self._buffer, self._state = buf[at + len(self._tags.close) :], "text"
        return True

    def _room(self) -> bool:
        """Whether another call may be made (one at most without parallel calls)."""
        return self.request.parallel or not self.calls

    def _say(self, out: list[tuple], text: str) -> None:
        self.text += text
        out.append(("text", text))

    def _open(self, out: list[tuple], name: str, call_id: str | None = None) -> None:
        call = ToolCall(call_id or f"call_{uuid.uuid4().hex[:24]}", name, "")
        self.calls.append(call)
        out.append(("call", len(self.calls) - 1, call))

    def _fragment(self, out: list[tuple], fragment: str) -> None:
        index = len(self.calls) - 1
        call = self.calls[index]
        self.calls[index] = ToolCall(call.id, call.name, call.arguments + fragment)
        out.append(("arguments", index, fragment))


def _partial(text: str, tag: str) -> int:
    """How many trailing characters of ``text`` are the beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
