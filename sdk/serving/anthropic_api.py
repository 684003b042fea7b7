"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``) over the
server's core: a system prompt and messages of content blocks (text, ``tool_use``,
``tool_result``) rendered through the chat template, tools and ``tool_choice``, ``stop_sequences``,
thinking blocks for a thinking model, and Anthropic's event sequence when streamed. Errors come
back in Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``)."""
# No `from __future__ import annotations` here: FastAPI reads annotations at run time.

import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

from ..errors import NextokenError
from ..reasoning import ReasoningParser
from ..scheduler import RequestHandle
from ..toolcalls import ToolRequest
from ..types import Completion, SamplingParams
from .core import AnswerStream, Service
from .protocol import APIError, api_error

__all__ = ["MessagesService", "anthropic_error"]


#: Anthropic's error types by status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error(error: APIError) -> Any:
    """An error answer in Anthropic's shape."""
    from fastapi.responses import JSONResponse

    kind = ERROR_TYPES.get(error.status, "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": error.message}}, status_code=error.status)


@dataclasses.dataclass
class PreparedMessage:
    """A submitted Messages request and what its answer needs."""

    rid: str
    handle: RequestHandle
    prompt: list[int]
    stops: list[str]
    tools: ToolRequest | None
    parser: ReasoningParser | None
    tail: str
    stream: bool


class MessagesService:
    """``/v1/messages`` over one :class:`~nextoken.serving.core.Service`."""

    def __init__(self, core: Service) -> None:
        """
        Args:
            core: the server's shared core.
        """
        self.core = core

    async def create(self, request: Any) -> Any:
        """``POST /v1/messages``."""
        try:
            return await self.core.answer(request, self.prepare, self.stream, self.message)
        except APIError as error:
            return anthropic_error(error)

    async def count_tokens(self, request: Any) -> Any:
        """``POST /v1/messages/count_tokens``: the prompt's tokens, as the answer would take them."""
        from .api_schema import CountTokensRequest

        core = self.core
        try:
            raw = await core.read(request)
            req = core.parse(raw, CountTokensRequest)
            ids, *_ = await core.off_loop(self._prompt, req, SamplingParams())
        except APIError as error:
            return anthropic_error(error)
        return {"input_tokens": len(ids)}

    def _prompt(
        self, req: Any, params: SamplingParams, nextoken: Any = None, max_tokens_given: bool = True
    ) -> tuple[list[int], SamplingParams, ToolRequest | None, ReasoningParser | None]:
        """The request's prompt ids and parameters, with its tools and reasoning parser (also for
        count_tokens), rendered as every API renders a conversation (:meth:`Service.render
        <nextoken.serving.core.Service.render>`)."""
        messages = _system(req.system) + _messages(req.messages)
        choice = req.tool_choice or {}
        kind = choice.get("type", "auto")
        named: Any = {"auto": "auto", "any": "required", "none": "none"}.get(kind)
        if named is None and kind == "tool":
            named = {"type": "function", "function": {"name": choice.get("name")}}
        if named is None:
            raise APIError(400, f"tool_choice.type must be auto, any, tool or none, not {kind!r}", param="tool_choice")
        template_kwargs = None
        if req.thinking is not None:
            template_kwargs = {"enable_thinking": req.thinking.get("type") == "enabled"}
        tools = (
            _chat_tools(req.tools),
            named if req.tools else None,
            not choice.get("disable_parallel_tool_use"),
            False,
        )
        return self.core.render(messages, params, tools, template_kwargs, nextoken, max_tokens_given)

    def prepare(self, raw: bytes) -> PreparedMessage:
        """A Messages body, parsed, rendered, checked and submitted."""
        from .api_schema import MessagesRequest, NextokenOptions

        core = self.core
        req = core.parse(raw, MessagesRequest)
        if req.container is not None:
            raise APIError(400, "container (code execution) is not supported by this server", param="container")
        extras = req.nextoken.model_dump(exclude_unset=True) if req.nextoken is not None else {}
        if req.top_k is not None:
            extras["top_k"] = req.top_k
        nextoken = cast(Any, NextokenOptions).model_validate(extras) if extras else None
        params = core.api_params(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stream=req.stream,
            nextoken=nextoken,
            stop=list(req.stop_sequences or []),
            response_format=_response_format(req.output_config),
            model=req.model,
        )
        ids, params, tools, parser = self._prompt(req, params, nextoken)
        handle = core.submit(ids, params)
        tail = core.engine.prompt_tail(ids) if parser is not None else ""
        rid = f"msg_{uuid.uuid4().hex[:24]}"
        return PreparedMessage(rid, handle, ids, list(req.stop_sequences or []), tools, parser, tail, req.stream)

    # -- the answer ----------------------------------------------------------------------------------
    def _settle(
        self, prepared: PreparedMessage, completion: Completion, streamed: bool = False
    ) -> tuple[list[dict], str, str | None]:
        """The answer's content blocks, its stop reason and the stop sequence that ended it
        (``streamed``: its thinking and calls were split off as it streamed)."""
        if prepared.parser is not None and not streamed:
            self.core.engine.split_reasoning([completion], prepared.parser, prepared.prompt)
        if prepared.tools is not None and not streamed:
            prepared.tools.finish([completion])
        blocks: list[dict[str, Any]] = []
        if completion.reasoning:
            blocks.append({"type": "thinking", "thinking": completion.reasoning, "signature": ""})
        if completion.text or not completion.tool_calls:
            blocks.append({"type": "text", "text": completion.text})
        for call in completion.tool_calls or []:
            blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": call.parsed_arguments()})
        sequence = next((s for s in prepared.stops if f"stop string {s!r}" == completion.stop_detail), None)
        if completion.tool_calls:
            reason = "tool_use"
        elif completion.finish_reason in ("length", "context", "deadline"):
            reason = "max_tokens"
        else:
            reason = "stop_sequence" if sequence is not None else "end_turn"
        return blocks, reason, sequence

    def message(self, prepared: PreparedMessage, completion: Completion) -> dict:
        blocks, reason, sequence = self._settle(prepared, completion)
        return {
            "id": prepared.rid,
            "type": "message",
            "role": "assistant",
            "model": self.core.name_of(prepared.handle),
            "content": blocks,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": _usage(completion),
        }

    async def stream(self, prepared: PreparedMessage) -> AsyncIterator[str]:
        """Anthropic's event sequence: message_start, each block's start, deltas and stop,
        message_delta (stop reason, output tokens), message_stop. A tool call streams as it forms
        (:class:`~nextoken.toolcalls.CallStream`): its ``tool_use`` block (id, name) first, then its
        input as ``input_json_delta`` fragments."""
        core, handle = self.core, prepared.handle
        start: dict[str, Any] = {
            "id": prepared.rid,
            "type": "message",
            "role": "assistant",
            "model": core.name_of(handle),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": len(prepared.prompt), "output_tokens": 0},
        }
        yield _event("message_start", message=start)
        answer = AnswerStream(prepared.parser, prepared.tail, prepared.tools)
        block = _Block()
        try:
            async for deltas in core.events([handle]):
                for delta in deltas:
                    for piece in answer.feed(delta.text, delta.finish_reason is not None):
                        for line in block.events(piece):
                            yield line
            completion = handle.results()[0]
        except NextokenError as exc:
            failure = api_error(exc, running=True)
            yield _event(
                "error", error={"type": ERROR_TYPES.get(failure.status, "api_error"), "message": failure.message}
            )
            return
        finally:
            core.let_go([handle], prepared.rid)
        core.keep_record(handle, prepared.rid)
        if prepared.parser is not None:
            core.engine.split_reasoning([completion], prepared.parser, prepared.prompt)
        answer.settle(completion)  # the calls as streamed
        _, reason, sequence = self._settle(prepared, completion, streamed=True)
        if block.kind is None:  # nothing was said: one empty text block
            for line in block.events(("text", "")):
                yield line
        yield block.stop()
        yield _event(
            "message_delta", delta={"stop_reason": reason, "stop_sequence": sequence}, usage=_usage(completion)
        )
        yield _event("message_stop")


class _Block:
    """The content block being streamed, and the events that open, feed and close blocks."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.index = -1

    def events(self, piece: tuple) -> list[str]:
        kind = piece[0]
        out = []
        if kind == "arguments":
            return [
                _event(
                    "content_block_delta",
                    index=self.index,
                    delta={"type": "input_json_delta", "partial_json": piece[2]},
                )
            ]
        if kind == "text" and not piece[1].strip() and self.kind not in ("text", None):
            return []  # the space between calls
        if kind == "call" or kind != self.kind:
            if self.kind is not None:
                out.append(self.stop())
            self.kind, self.index = kind, self.index + 1
            if kind == "call":
                call = piece[2]
                opened: dict[str, Any] = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            elif kind == "thinking":
                opened = {"type": "thinking", "thinking": "", "signature": ""}
            else:
                opened = {"type": "text", "text": ""}
            out.append(_event("content_block_start", index=self.index, content_block=opened))
        if kind == "thinking":
            out.append(
                _event("content_block_delta", index=self.index, delta={"type": "thinking_delta", "thinking": piece[1]})
            )
        elif kind == "text" and piece[1]:
            out.append(_event("content_block_delta", index=self.index, delta={"type": "text_delta", "text": piece[1]}))
        return out

    def stop(self) -> str:
        """The stop of the block being streamed (a thinking block's empty signature first)."""
        signature = _event("content_block_delta", index=self.index, delta={"type": "signature_delta", "signature": ""})
        return (signature if self.kind == "thinking" else "") + _event("content_block_stop", index=self.index)


def _event(kind: str, **fields: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields}, ensure_ascii=False)}\n\n"


def _usage(completion: Completion) -> dict:
    u = completion.usage
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
    }


# -- the request as chat messages ---------------------------------------------------------------------
def _system(system: str | list[dict[str, Any]] | None) -> list[dict[str, str]]:
    if system is None:
        return []
    text = system if isinstance(system, str) else "\n".join(_text_blocks(system, "system"))
    return [{"role": "system", "content": text}]


def _text_blocks(blocks: list[dict[str, Any]], where: str) -> list[str]:
    out = []
    for i, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise APIError(400, f"{where}[{i}] must be a text block", param=where)
        out.append(block["text"])
    return out


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic's messages as chat messages: text blocks joined by a newline, an assistant's
    ``tool_use`` blocks as its tool calls, a user's ``tool_result`` blocks as tool messages."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, content, where = message.get("role"), message.get("content"), f"messages[{i}]"
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role must be user or assistant", param="messages")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be text or a list of content blocks", param="messages")
        texts, calls = [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                arguments = json.dumps(block.get("input", {}), ensure_ascii=False)
                calls.append(
                    {
                        "id": block.get("id"),
                        "type": "function",
                        "function": {"name": block.get("name"), "arguments": arguments},
                    }
                )
            elif kind == "tool_result" and role == "user":
                result = block.get("content", "")
                text = (
                    result
                    if isinstance(result, str)
                    else "\n".join(_text_blocks(result, f"{where}.content[{j}].content"))
                )
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # the model's earlier thinking: templates leave it out of the next turn
            else:
                raise APIError(
                    400,
                    f"{where}.content[{j}]: a {kind!r} block is not supported by this server (text models only)",
                    param="messages",
                )
        if texts or calls:
            entry: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
    return out


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Anthropic's tools (``name``, ``description``, ``input_schema``) in the chat shape."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if "input_schema" not in tool or tool.get("type") not in (None, "custom"):
            raise APIError(400, f"tools[{i}]: only custom tools with an input_schema are supported", param="tools")
        function = {
            "name": tool.get("name"),
            "description": tool.get("description", ""),
            "parameters": tool["input_schema"],
        }
        out.append({"type": "function", "function": function})
    return out


def _response_format(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``output_config.format`` (a JSON schema the answer must meet) as chat's ``response_format``."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise APIError(400, "output_config.format must be {type: json_schema, schema: {...}}", param="output_config")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
