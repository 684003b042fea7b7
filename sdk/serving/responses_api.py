"""OpenAI's Responses API (``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``) over
the server's core: input items (messages, ``function_call``, ``function_call_output``) and
``instructions`` rendered through the chat template, function tools, ``text.format``, a reasoning
item for a thinking model, and the Responses event sequence when streamed. Responses are kept
(``store``, the default) in a bounded store, so ``previous_response_id`` continues a conversation."""
# No `from __future__ import annotations` here: FastAPI reads annotations at run time.

import collections
import dataclasses
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..errors import NextokenError
from ..reasoning import ReasoningParser
from ..scheduler import RequestHandle
from ..toolcalls import ToolRequest
from ..types import Completion
from .core import AnswerStream, Service
from .protocol import APIError, api_error

__all__ = ["ResponsesService"]


#: Responses kept for previous_response_id and GET, the oldest first out.
STORE_CAPACITY = 1024


@dataclasses.dataclass
class PreparedResponse:
    """A submitted response and what its answer needs: the request's echoed fields, the
    conversation so far (for the store), its tools and reasoning parser."""

    rid: str
    handle: RequestHandle
    request: dict[str, Any]
    conversation: list[dict[str, Any]]
    prompt: list[int]
    tools: ToolRequest | None
    parser: ReasoningParser | None
    tail: str
    stream: bool
    store: bool
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


class ResponsesService:
    """``/v1/responses`` over one :class:`~nextoken.serving.core.Service`."""

    def __init__(self, core: Service, capacity: int = STORE_CAPACITY) -> None:
        """
        Args:
            core: the server's shared core.
            capacity: responses kept for ``previous_response_id`` and ``GET`` at most.
        """
        self.core, self.capacity = core, capacity
        self._store: collections.OrderedDict[str, tuple[dict, list[dict]]] = collections.OrderedDict()
        self._lock = threading.Lock()

    # -- the store -----------------------------------------------------------------------------------
    def retrieve(self, response_id: str) -> dict:
        """``GET /v1/responses/{id}``: a stored response, or a 404."""
        with self._lock:
            found = self._store.get(response_id)
        if found is None:
            raise APIError(404, f"no stored response {response_id!r}", code="not_found", param="response_id")
        return found[0]

    def delete(self, response_id: str) -> dict:
        """``DELETE /v1/responses/{id}``."""
        with self._lock:
            found = self._store.pop(response_id, None)
        if found is None:
            raise APIError(404, f"no stored response {response_id!r}", code="not_found", param="response_id")
        return {"id": response_id, "object": "response", "deleted": True}

    def _keep(self, response: dict, conversation: list[dict]) -> None:
        with self._lock:
            self._store[response["id"]] = (response, conversation)
            while len(self._store) > self.capacity:
                self._store.popitem(last=False)

    # -- a request -----------------------------------------------------------------------------------
    async def create(self, request: Any) -> Any:
        """``POST /v1/responses``."""
        return await self.core.answer(request, self.prepare, self.stream, self.finish)

    def prepare(self, raw: bytes) -> PreparedResponse:
        """A Responses body, parsed, rendered, checked and submitted."""
        from .api_schema import ResponsesRequest

        core = self.core
        req = core.parse(raw, ResponsesRequest)
        if req.background:
            raise APIError(400, "background responses are not supported by this server", param="background")
        conversation: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            with self._lock:
                found = self._store.get(req.previous_response_id)
            if found is None:
                raise APIError(
                    404,
                    f"previous_response_id {req.previous_response_id!r} is not stored here (store: true keeps "
                    f"the last {self.capacity} responses)",
                    code="not_found",
                    param="previous_response_id",
                )
            conversation = list(found[1])
        conversation += _messages(req.input)
        messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
        tools = _chat_tools(req.tools)
        choice = _chat_tool_choice(req.tool_choice)
        params = core.api_params(
            max_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stream=req.stream,
            nextoken=req.nextoken,
            response_format=_response_format(req.text),
            top_logprobs=req.top_logprobs,
            model=req.model,
        )
        engine = core.engine
        fallback = bool(req.nextoken and req.nextoken.tool_fallback)
        ids, params, request_tools, parser = core.render(
            messages,
            params,
            (tools, choice, req.parallel_tool_calls is not False, fallback),
            req.chat_template_kwargs,
            req.nextoken,
            req.max_output_tokens is not None,
            param="input",
        )
        echoed = {
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "tools": req.tools or [],
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "store": req.store,
            "text": req.text or {"format": {"type": "text"}},
            "metadata": req.metadata or {},
            "reasoning": req.reasoning or {"effort": None, "summary": None},
            "truncation": req.truncation or "disabled",
            "user": req.user,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "top_logprobs": req.top_logprobs or 0,
            "max_tool_calls": None,
            "background": False,
            "service_tier": "default",
            "safety_identifier": req.safety_identifier,
            "prompt_cache_key": req.prompt_cache_key,
        }
        handle = core.submit(ids, params)
        tail = engine.prompt_tail(ids) if parser is not None else ""
        rid = f"resp_{uuid.uuid4().hex}"
        return PreparedResponse(
            rid, handle, echoed, conversation, ids, request_tools, parser, tail, req.stream, req.store
        )

    # -- the answer ----------------------------------------------------------------------------------
    def finish(self, prepared: PreparedResponse, completion: Completion, streamed: AnswerStream | None = None) -> dict:
        """The finished response object (stored when asked), its output items from ``completion``
        (its calls as ``streamed`` found them, when it streamed)."""
        if prepared.parser is not None:
            self.core.engine.split_reasoning([completion], prepared.parser, prepared.prompt)
        if streamed is not None:
            streamed.settle(completion)
        elif prepared.tools is not None:
            prepared.tools.finish([completion])
        output = []
        if completion.reasoning:
            output.append(_reasoning_item(f"rs_{uuid.uuid4().hex}", completion.reasoning))
        if completion.tool_calls:
            output += [_call_item(f"fc_{uuid.uuid4().hex}", c.id, c.name, c.arguments) for c in completion.tool_calls]
        if completion.text or not completion.tool_calls:
            output.append(_message_item(f"msg_{uuid.uuid4().hex}", completion.text, "completed"))
        response = self._response(prepared, "completed", output, completion)
        if completion.finish_reason in ("length", "context", "deadline"):
            response["status"] = "incomplete"
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        if prepared.store:
            said: list[dict[str, Any]] = []
            if completion.tool_calls:
                said.append(
                    {
                        "role": "assistant",
                        "content": completion.text,
                        "tool_calls": [c.to_dict() for c in completion.tool_calls],
                    }
                )
            else:
                said.append({"role": "assistant", "content": completion.text})
            self._keep(response, prepared.conversation + said)
        return response

    def _response(self, prepared: PreparedResponse, status: str, output: list, completion: Completion | None) -> dict:
        usage = None
        if completion is not None:
            u = completion.usage
            usage = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": u.cache_write_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
                "total_tokens": u.total_tokens,
            }
        now = int(time.time())
        return {
            "id": prepared.rid,
            "object": "response",
            "created_at": prepared.created,
            "completed_at": now if status in ("completed", "incomplete") else None,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "model": self.core.name_of(prepared.handle),
            "output": output,
            "usage": usage,
            **prepared.request,
        }

    async def stream(self, prepared: PreparedResponse) -> AsyncIterator[str]:
        """The Responses event sequence: created, in progress, each output item added, its text,
        reasoning or call arguments as deltas, done, and completed with the whole response. A call
        streams as it forms (:class:`~nextoken.toolcalls.CallStream`): its item (id, name) first,
        then its arguments a fragment at a time."""
        core, handle = self.core, prepared.handle
        events = _Events()
        yield events("response.created", response=self._response(prepared, "in_progress", [], None))
        yield events("response.in_progress", response=self._response(prepared, "in_progress", [], None))
        answer = AnswerStream(prepared.parser, prepared.tail, prepared.tools)
        open_items: list[_OpenItem] = []
        try:
            async for deltas in core.events([handle]):
                for delta in deltas:
                    for piece in answer.feed(delta.text, delta.finish_reason is not None):
                        for line in _piece_events(events, open_items, piece):
                            yield line
            completion = handle.results()[0]
        except NextokenError as exc:
            failure = api_error(exc, running=True)
            failed = self._response(prepared, "failed", [], None)
            failed["error"] = {"code": failure.code or "server_error", "message": failure.message}
            yield events("response.failed", response=failed)
            return
        finally:
            core.let_go([handle], prepared.rid)
        core.keep_record(handle, prepared.rid)
        response = self.finish(prepared, completion, answer)
        for line in _close(events, open_items, response["output"]):
            yield line
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield events(kind, response=response)


class _Events:
    """Server-sent events of the Responses API, numbered in order."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclasses.dataclass
class _OpenItem:
    """An output item being streamed: its kind (reasoning or message), id, index and text so far."""

    kind: str
    id: str
    index: int
    text: str = ""
    call_id: str = ""
    name: str = ""


def _text_events(events: _Events, open_items: list[_OpenItem], kind: str, text: str) -> Iterator[str]:
    """Deltas of ``text`` to the open item of ``kind``; opening it (and closing the one before) first."""
    item = open_items[-1] if open_items and open_items[-1].kind == kind else None
    if item is None:
        if open_items:
            yield from _finish_item(events, open_items[-1])
        prefix = "rs" if kind == "reasoning" else "msg"
        item = _OpenItem(kind, f"{prefix}_{uuid.uuid4().hex}", len(open_items))
        open_items.append(item)
        empty = _reasoning_item(item.id, "") if kind == "reasoning" else _message_item(item.id, "", "in_progress")
        empty["content"] = []
        yield events("response.output_item.added", output_index=item.index, item=empty)
        part = {"type": "reasoning_text", "text": ""} if kind == "reasoning" else _text_part("")
        yield events(
            "response.content_part.added", item_id=item.id, output_index=item.index, content_index=0, part=part
        )
    item.text += text
    where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
    if kind == "reasoning":
        yield events("response.reasoning_text.delta", delta=text, **where)
    else:
        yield events("response.output_text.delta", delta=text, logprobs=[], **where)


def _piece_events(events: _Events, open_items: list[_OpenItem], piece: tuple) -> Iterator[str]:
    """A :class:`~nextoken.toolcalls.CallStream` piece as events: text to the message item, a new
    call as a function_call item, arguments as its deltas."""
    if piece[0] == "thinking":
        yield from _text_events(events, open_items, "reasoning", piece[1])
        return
    if piece[0] == "text":
        open_kind = open_items[-1].kind if open_items else None
        if piece[1].strip() or open_kind == "message":
            yield from _text_events(events, open_items, "message", piece[1])
        return
    if piece[0] == "call":
        if open_items:
            yield from _finish_item(events, open_items[-1])
        call = piece[2]
        item = _OpenItem("function_call", f"fc_{uuid.uuid4().hex}", len(open_items), call_id=call.id, name=call.name)
        open_items.append(item)
        added = {**_call_item(item.id, call.id, call.name, ""), "status": "in_progress"}
        yield events("response.output_item.added", output_index=item.index, item=added)
        return
    item = open_items[-1]
    item.text += piece[2]
    yield events("response.function_call_arguments.delta", item_id=item.id, output_index=item.index, delta=piece[2])


def _finish_item(events: _Events, item: _OpenItem) -> Iterator[str]:
    if item.kind == "function_call":
        done = _call_item(item.id, item.call_id, item.name, item.text)
        yield events(
            "response.function_call_arguments.done", item_id=item.id, output_index=item.index, arguments=item.text
        )
        yield events("response.output_item.done", output_index=item.index, item=done)
        return
    where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
    if item.kind == "reasoning":
        done = _reasoning_item(item.id, item.text)
        yield events("response.reasoning_text.done", text=item.text, **where)
        yield events("response.content_part.done", part=done["content"][0], **where)
    else:
        done = _message_item(item.id, item.text, "completed")
        yield events("response.output_text.done", text=item.text, logprobs=[], **where)
        yield events("response.content_part.done", part=done["content"][0], **where)
    yield events("response.output_item.done", output_index=item.index, item=done)


def _close(events: _Events, open_items: list[_OpenItem], output: list[dict]) -> Iterator[str]:
    """Close the last open item, and make the final output the streamed items (same ids, texts)."""
    if open_items:
        yield from _finish_item(events, open_items[-1])
    else:  # nothing was said: one empty message, as the response has
        item = _OpenItem("message", output[-1]["id"] if output else f"msg_{uuid.uuid4().hex}", 0)
        yield events(
            "response.output_item.added",
            output_index=0,
            item={**_message_item(item.id, "", "in_progress"), "content": []},
        )
        yield events(
            "response.content_part.added", item_id=item.id, output_index=0, content_index=0, part=_text_part("")
        )
        yield from _finish_item(events, item)
        open_items.append(item)
    output[:] = [_done_item(i) for i in open_items]


def _done_item(item: _OpenItem) -> dict:
    """A streamed item as the final response has it."""
    if item.kind == "function_call":
        return _call_item(item.id, item.call_id, item.name, item.text)
    if item.kind == "reasoning":
        return _reasoning_item(item.id, item.text)
    return _message_item(item.id, item.text, "completed")


# -- the shapes ----------------------------------------------------------------------------------------
def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [_text_part(text)]}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str) -> dict:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": "completed",
    }


# -- a request's input as chat messages ---------------------------------------------------------------
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input items as chat messages: messages (text parts joined by a newline), a model's
    function calls as an assistant message's tool calls, their outputs as tool messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise APIError(400, f"{where}.role must be user, assistant, system or developer", param="input")
            out.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output, where)
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": text})
        elif kind == "reasoning":
            continue  # the model's earlier thinking: templates leave it out of the next turn
        else:
            raise APIError(
                400, f"{where}: input items of type {kind!r} are not supported by this server", param="input"
            )
    return out


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be text or a list of content parts", param="input")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise APIError(
                400, f"{where}: {kind} is not supported by this server (text models only); send text", param="input"
            )
        else:
            raise APIError(400, f"{where}: a content part of type {kind!r} is not supported", param="input")
    return "\n".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{key} must be a string", param="input")
    return value


def _chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' function tools (flat) in the chat shape (nested under ``function``)."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise APIError(
                400,
                f"tools[{i}]: tools of type {tool.get('type')!r} are not supported (function tools are)",
                param="tools",
            )
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format``."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise APIError(
        400, f"text.format.type must be text, json_object or json_schema, not {fmt.get('type')!r}", param="text"
    )
