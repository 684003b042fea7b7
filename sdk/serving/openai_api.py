"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` over the server's core
(:class:`~nextoken.serving.core.Service`): a body parsed and submitted on a preparation worker,
then the whole answer, or server-sent events ending in ``data: [DONE]``."""
# No `from __future__ import annotations` here: FastAPI reads annotations at run time.

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..errors import NextokenError
from ..scheduler import RequestHandle
from ..toolcalls import ToolRequest
from .core import Service
from .protocol import (
    FINISH,
    APIError,
    api_error,
    chat_logprobs,
    completion_logprobs,
    error_response,
    extras_of,
    logprobs_of,
    tool_chunks,
    usage_of,
)

__all__ = ["OpenAIService"]

log = logging.getLogger("nextoken.serving")


class OpenAIService:
    """The OpenAI endpoints over one :class:`~nextoken.serving.core.Service`."""

    def __init__(self, core: Service) -> None:
        """
        Args:
            core: the server's shared core.
        """
        self.core = core

    # -- /v1/completions -----------------------------------------------------------------------------
    async def completions(self, request: Any) -> Any:
        core = self.core
        raw = await core.read(request)
        handle, stream, include_usage, echo = await core.off_loop(self.prepare_completion, raw)
        return await self.respond(request, handle, False, stream, include_usage, echo)

    def prepare_completion(self, raw: bytes) -> tuple[RequestHandle, bool, bool, str]:
        """A completions body, parsed, checked and submitted: (its handle, stream, include_usage, echo)."""
        from .api_schema import CompletionRequest

        core = self.core
        req = core.parse(raw, CompletionRequest)
        if req.tools is not None or req.tool_choice is not None:
            raise APIError(400, "tools take a conversation: use /v1/chat/completions", param="tools")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(
                    400, "prompt: one prompt per request (a list of one string, or of token ids)", param="prompt"
                )
            prompt = prompt[0]
        params = core.params(req, False)
        if req.echo and params.top_logprobs is not None:
            raise APIError(
                400, "echo with logprobs is not supported (it needs the prompt's log-probabilities)", param="echo"
            )
        handle = core.submit(prompt, params)
        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else core.engine.decode(prompt)
        return handle, req.stream, bool(req.stream_options and req.stream_options.include_usage), echo

    # -- /v1/chat/completions ------------------------------------------------------------------------
    async def chat_completions(self, request: Any) -> Any:
        core = self.core
        raw = await core.read(request)
        handle, stream, include_usage, tools = await core.off_loop(self.prepare_chat, raw)
        return await self.respond(request, handle, True, stream, include_usage, tools=tools)

    def prepare_chat(self, raw: bytes) -> tuple[RequestHandle, bool, bool, ToolRequest | None]:
        """A chat body, parsed, rendered, checked and submitted: (its handle, stream, include_usage, tools)."""
        from .api_schema import ChatRequest

        core = self.core
        req = core.parse(raw, ChatRequest)
        params = core.params(req, True)
        fallback = bool(req.nextoken and req.nextoken.tool_fallback)
        messages = [
            {
                "role": m.role,
                "content": m.text(),
                **{k: v for k, v in (m.model_extra or {}).items() if k in ("tool_calls", "tool_call_id", "name")},
            }
            for m in req.messages
        ]
        try:
            tools = ToolRequest.of(req.tools, req.tool_choice, req.parallel_tool_calls is not False, fallback)
            ids, params = core.engine.chat_prompt(messages, params, tools)
        except NextokenError as exc:
            raise api_error(exc, param="messages") from None
        if tools is not None:
            core.check_constraint(params, "tool_choice")
        if req.max_completion_tokens is None and req.max_tokens is None:
            room = core.scheduler.max_sequence_length - len(ids)
            params = params.replace(max_new_tokens=max(1, min(params.max_new_tokens, room)))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return core.submit(ids, params), req.stream, include_usage, tools

    # -- answers ---------------------------------------------------------------------------------------
    async def respond(
        self,
        request: Any,
        handle: RequestHandle,
        chat: bool,
        stream: bool,
        include_usage: bool,
        echo: str = "",
        tools: ToolRequest | None = None,
    ) -> Any:
        """The stream, or the whole answer, of one submitted request, in the OpenAI shape (with
        ``tools``: its calls parsed out of its text)."""
        core = self.core
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if stream:
            return self.stream(handle, chat, rid, include_usage, echo, tools)
        completions = await core.finished(request, handle, rid)
        if completions is None:  # the client went away: nobody reads this
            return error_response(499, "client closed the request", code="client_closed")
        core.keep_record(handle, rid)
        if tools is not None:
            tools.finish(completions)
        choices = []
        for index, c in enumerate(completions):
            choice: dict[str, Any] = {
                "index": index,
                "finish_reason": FINISH.get(c.finish_reason, c.finish_reason),
                "logprobs": logprobs_of(c.logprobs, chat, len(echo)),
            }
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None}
                if c.tool_calls:
                    choice["message"]["tool_calls"] = [call.to_dict() for call in c.tool_calls]
            else:
                choice["text"] = echo + c.text
            choices.append(choice)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": core.model_name,
            "choices": choices,
            "usage": usage_of(completions),
            "nextoken": extras_of(completions),
        }

    def stream(
        self,
        handle: RequestHandle,
        chat: bool,
        rid: str,
        include_usage: bool,
        echo: str = "",
        tools: ToolRequest | None = None,
    ) -> Any:
        """Server-sent events of one request: a chunk per choice for what it made since the last
        one, usage at the end when asked. With ``tools`` the text is held until the answer ends,
        then sent as content or as tool-call deltas (a call whole in one delta: id, name and
        arguments)."""
        from fastapi.responses import StreamingResponse

        core = self.core
        obj = "chat.completion.chunk" if chat else "text_completion"
        wants_logprobs = handle.generation.params.top_logprobs is not None
        n = handle.generation.params.n
        model_name = core.model_name

        def chunk(choices: list, usage: dict | None = None, extra: dict | None = None) -> str:
            data = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            if extra is not None:
                data["nextoken"] = extra
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            offsets = [len(echo)] * n  # each choice's text so far
            first = [True] * n  # a choice's first token is always sent, even while its text is held back
            try:
                for index in range(n):
                    if chat:
                        yield chunk(
                            [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                        )
                    elif echo:
                        yield chunk([{"index": index, "text": echo, "logprobs": None, "finish_reason": None}])
                async for deltas in core.events(handle):
                    if tools is not None:
                        continue  # held until the answer ends
                    for delta in deltas:
                        index = delta.index
                        finish = FINISH.get(delta.finish_reason, delta.finish_reason) if delta.finish_reason else None
                        lps = delta.logprobs if wants_logprobs and delta.logprobs else None
                        if not (delta.text or finish or first[index] or lps):
                            continue
                        first[index] = False
                        body: dict[str, Any] = {"index": index, "finish_reason": finish}
                        if chat:
                            body["delta"] = {"content": delta.text} if delta.text else {}
                            if lps:
                                body["logprobs"] = chat_logprobs(lps)
                        else:
                            body["text"] = delta.text
                            body["logprobs"] = completion_logprobs(lps, offsets[index]) if lps else None
                        offsets[index] += len(delta.text)
                        yield chunk([body])
                if tools is not None:
                    for body in tool_chunks(tools.finish(handle.results())):
                        yield chunk([body])
                completions = handle.results()
                core.keep_record(handle, rid)
                if include_usage:
                    yield chunk([], usage_of(completions), extras_of(completions))
                yield "data: [DONE]\n\n"
            except NextokenError as exc:
                failure = api_error(exc, running=True)
                err = {"error": {"message": failure.message, "type": failure.kind, "param": None, "code": failure.code}}
                yield f"data: {json.dumps(err)}\n\n"
            finally:
                if not handle.done:
                    log.info("client of %s went away mid-stream; its request is cancelled", rid)
                    handle.cancel()  # the client went away mid-stream

        return StreamingResponse(events(), media_type="text/event-stream")
