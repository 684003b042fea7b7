"""Tool calls, OpenAI-shaped: the tools go to the model through its chat template (which receives
``tools`` as transformers' ``apply_chat_template`` passes them), and its answer is parsed into calls.

What the model writes, and what ``tool_choice`` ``required`` or a named function enforces with a
grammar (the ``structured`` plugin), is the format most open tool-calling templates teach::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

one block per call (several with ``parallel_tool_calls``). ``auto`` lets the model choose: its
answer is parsed for such blocks (or an answer that is one bare ``{"name": ..., "arguments": ...}``
object), and any text outside them is the message's content. A model whose chat template does not
take ``tools`` is an error, unless the request asks for the fallback (``tool_fallback``): a system
message of nextoken's own that lists the tools as JSON and teaches the format above.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidRequestError
from .types import Completion, SamplingParams, ToolCall

__all__ = ["FALLBACK_PROMPT", "ToolRequest"]

#: The fallback's system message (``{tools}``: the tools as JSON, one a line).
FALLBACK_PROMPT = (
    "You can call these tools:\n{tools}\n"
    'To call one, answer with <tool_call>{{"name": <the tool\'s name>, "arguments": <its arguments as a JSON '
    "object>}}</tool_call> and nothing else; one block per call."
)
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
#: compact JSON inside a call, as the structured plugin writes constrained JSON
_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


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


class ToolRequest:
    """The tools of one chat request and what to do with them: render them, constrain the answer
    (``required`` or a named function), and parse the answer into :class:`ToolCall` s."""

    def __init__(
        self, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool = True, fallback: bool = False
    ) -> None:
        """
        Args:
            tools: OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters"}}]``.
            tool_choice: ``auto`` (None), ``none``, ``required`` or ``{"type": "function", "function": {"name": ...}}``.
            parallel_tool_calls: whether an answer may hold several calls.
            fallback: describe the tools in a system message of nextoken's own for a template without them.
        """
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
        cls, tools: Any, tool_choice: Any = None, parallel_tool_calls: bool = True, fallback: bool = False
    ) -> "ToolRequest | None":
        """A request's tools as the model should see them: None without tools (``tool_choice`` must
        then be absent or ``none``) or with ``tool_choice`` ``none``; the one entry for the library
        and the server."""
        if tools is None:
            if tool_choice not in (None, "none"):
                raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
            return None
        request = cls(tools, tool_choice, parallel_tool_calls, fallback)
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
        schema = {
            "x-guidance": _STYLE,
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for t in allowed
            ],
        }
        calls = "call+" if self.parallel and self.choice == "required" else "call"
        return (
            f'start: {calls}\ncall: "<tool_call>" obj "</tool_call>"\n'
            f"obj: %json {json.dumps(schema, ensure_ascii=False)}"
        )

    def constrain(self, params: SamplingParams) -> SamplingParams:
        """``params`` held to the calls ``required`` or a named function asks for (as they are for
        ``auto`` and ``none``); another constraint beside them is an error."""
        grammar = self.grammar()
        if grammar is None:
            return params
        if any(getattr(params, k) for k in ("response_format", "regex", "choice", "grammar")):
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
        for block in _BLOCK.finditer(text):
            call = self._call(block.group(1))
            if call is not None:
                kept.append(text[end : block.start()])
                end = block.end()
                calls.append(call)
        if not calls:
            call = self._call(text.strip())
            return ("", [call]) if call is not None else (text, [])
        if not self.parallel:
            calls = calls[:1]
        kept.append(text[end:])
        return "".join(kept).strip(), calls

    def _call(self, body: str) -> ToolCall | None:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if (
            not isinstance(value, dict)
            or value.get("name") not in self.names
            or not isinstance(value.get("arguments", {}), dict)
        ):
            return None
        arguments = json.dumps(value.get("arguments", {}), ensure_ascii=False)
        return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], arguments)

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
