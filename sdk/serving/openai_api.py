"""OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` over the server's core
(:class:`~nextoken.serving.core.Service`): a body parsed and submitted on a preparation worker,
then the whole answer, or server-sent events ending in ``data: [DONE]``."""
# No `from __future__ import annotations` here: FastAPI reads annotations at run time.

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..errors import NextokenError
from ..reasoning import ReasoningParser
from ..scheduler import RequestHandle
from ..toolcalls import ToolRequest
from ..types import TokenLogprob
from .core import AnswerStream, Service
from .protocol import (
    FINISH,
    APIError,
    api_error,
    chat_logprobs,
    completion_logprobs,
    error_response,
    extras_of,
    logprobs_of,
    prompt_logprobs,
    usage_of,
)

__all__ = ["OpenAIService"]


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
        prepared = await core.off_loop(self.prepare_completion, raw)
        return await self.respond(request, prepared, chat=False)

    def prepare_completion(self, raw: bytes) -> "Prepared":
        """A completions body, parsed, checked and submitted: a request a prompt (text or ids; a
        list of prompts is several), each with its ``n`` choices."""
        from .api_schema import CompletionRequest

        core = self.core
        req = core.parse(raw, CompletionRequest)
        if req.tools is not None or req.tool_choice is not None:
            raise APIError(400, "tools take a conversation: use /v1/chat/completions", param="tools")
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt: give a prompt (text, token ids, or a list of them)", param="prompt")
        params = core.params(req, False)
        echoes: list[str] = [""] * len(prompts)
        echo_logprobs: list[tuple[str, list[TokenLogprob]] | None] = [None] * len(prompts)
        engine = core.engine
        if req.echo:
            for i, p in enumerate(prompts):
                try:
                    ids = engine.encode(p) if isinstance(p, str) else [int(t) for t in p]
                    echoes[i] = p if isinstance(p, str) else engine.decode(ids)
                    if params.top_logprobs is not None:  # the prompt's own log-probabilities, one pass
                        text = self._token_text
                        scored = prompt_logprobs(engine.forward(ids), ids, params.top_logprobs, text)
                        echo_logprobs[i] = (text(ids[0]), scored)
                except NextokenError as exc:
                    raise api_error(exc, param="prompt") from None
        handles = [core.submit(p, params) for p in prompts]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(handles, req.stream, include_usage, echoes, echo_logprobs)

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.core.engine.intake.tokenizer
        if tokenizer is None:
            return ""
        return tokenizer.decode([token_id]) or (tokenizer.id_to_token(token_id) or "")

    # -- /v1/chat/completions ------------------------------------------------------------------------
    async def chat_completions(self, request: Any) -> Any:
        core = self.core
        raw = await core.read(request)
        prepared = await core.off_loop(self.prepare_chat, raw)
        return await self.respond(request, prepared, chat=True)

    def prepare_chat(self, raw: bytes) -> "Prepared":
        """A chat body, parsed, rendered, checked and submitted."""
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
        ids, params, tools, parser = core.render(
            messages,
            params,
            (req.tools, req.tool_choice, req.parallel_tool_calls is not False, fallback),
            req.chat_template_kwargs,
            req.nextoken,
            req.max_completion_tokens is not None or req.max_tokens is not None,
        )
        engine = core.engine
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        reasoning = None if parser is None else Reasoning(parser, ids, engine.prompt_tail(ids))
        return Prepared([core.submit(ids, params)], req.stream, include_usage, tools=tools, reasoning=reasoning)

    # -- answers ---------------------------------------------------------------------------------------
    async def respond(self, request: Any, prepared: "Prepared", chat: bool) -> Any:
        """The stream, or the whole answer, of submitted requests, in the OpenAI shape (with
        tools: their calls parsed out of the text)."""
        core = self.core
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if prepared.stream:
            return self.stream(prepared, chat, rid)
        handles, tools = prepared.handles, prepared.tools
        completions = await core.finished(request, handles, rid)
        if completions is None:  # the client went away: nobody reads this
            return error_response(499, "client closed the request", code="client_closed")
        for handle in handles:
            core.keep_record(handle, rid)
        reasoning = prepared.reasoning
        if reasoning is not None:
            core.engine.split_reasoning(completions, reasoning.parser, reasoning.prompt)
        if tools is not None:
            tools.finish(completions)
        n = handles[0].rows
        choices = []
        for index, c in enumerate(completions):
            choice: dict[str, Any] = {"index": index, "finish_reason": FINISH.get(c.finish_reason, c.finish_reason)}
            if chat:
                choice["logprobs"] = logprobs_of(c.logprobs, True, 0)
                choice["message"] = {"role": "assistant", "content": c.text if c.text or not c.tool_calls else None}
                if reasoning is not None:
                    choice["message"]["reasoning_content"] = c.reasoning
                if c.tool_calls:
                    choice["message"]["tool_calls"] = [call.to_dict() for call in c.tool_calls]
            else:
                echo, scored = prepared.echoes[index // n], prepared.echo_logprobs[index // n]
                choice["text"] = echo + c.text
                if scored is not None:  # the prompt's tokens, then the answer's
                    choice["logprobs"] = completion_logprobs(scored[1] + (c.logprobs or []), 0, first=scored[0])
                else:
                    choice["logprobs"] = logprobs_of(c.logprobs, False, len(echo))
            choices.append(choice)
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": core.name_of(handles[0]),
            "choices": choices,
            "usage": usage_of(completions, n),
            "nextoken": extras_of(completions),
        }

    def stream(self, prepared: "Prepared", chat: bool, rid: str) -> Any:
        """Server-sent events of submitted requests: a chunk per choice for what it made since the
        last one, usage at the end when asked. A thinking model's thinking streams as
        ``reasoning_content``; with tools, each call streams as it forms (its index, id and name
        first, then its arguments a fragment at a time: :class:`~nextoken.toolcalls.CallStream`)."""
        from fastapi.responses import StreamingResponse

        core = self.core
        handles, tools = prepared.handles, prepared.tools
        obj = "chat.completion.chunk" if chat else "text_completion"
        wants_logprobs = handles[0].generation.params.top_logprobs is not None
        n = handles[0].rows
        total = n * len(handles)
        model_name = core.name_of(handles[0])

        def chunk(choices: list, usage: dict | None = None, extra: dict | None = None) -> str:
            data = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            if extra is not None:
                data["nextoken"] = extra
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        reasoning = prepared.reasoning
        parser, tail = (reasoning.parser, reasoning.tail) if reasoning is not None else (None, "")
        answers = [AnswerStream(parser, tail, tools) for _ in range(total)]

        def chat_deltas(index: int, text: str, ending: bool) -> list[dict[str, Any]]:
            """A choice's new text as chat deltas: reasoning, content, tool calls as they form."""
            return [_chat_delta(piece) for piece in answers[index].feed(text, ending)]

        async def events() -> AsyncIterator[str]:
            offsets = [len(prepared.echoes[i // n]) for i in range(total)]  # each choice's text so far
            first = [True] * total  # a choice's first token is always sent, even while its text is held back
            try:
                for index in range(total):
                    if chat:
                        yield chunk(
                            [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
                        )
                    elif prepared.echoes[index // n]:
                        scored = prepared.echo_logprobs[index // n]
                        lp = None if scored is None else completion_logprobs(scored[1], 0, first=scored[0])
                        body = {"index": index, "text": prepared.echoes[index // n], "logprobs": lp}
                        yield chunk([{**body, "finish_reason": None}])
                async for deltas in core.events(handles):
                    for delta in deltas:
                        index = delta.index
                        finish = FINISH.get(delta.finish_reason, delta.finish_reason) if delta.finish_reason else None
                        lps = delta.logprobs if wants_logprobs and delta.logprobs else None
                        if not (delta.text or finish or first[index] or lps):
                            continue
                        first[index] = False
                        body = {"index": index, "finish_reason": finish}
                        if chat:
                            parts = chat_deltas(index, delta.text, finish is not None) or [{}]
                            found = answers[index].calls
                            if finish and found is not None and found.calls:
                                body["finish_reason"] = "tool_calls"
                            for part in parts[:-1]:
                                yield chunk([{"index": index, "delta": part, "finish_reason": None}])
                            body["delta"] = parts[-1]
                            if lps:
                                body["logprobs"] = chat_logprobs(lps)
                        else:
                            body["text"] = delta.text
                            body["logprobs"] = completion_logprobs(lps, offsets[index]) if lps else None
                        offsets[index] += len(delta.text)
                        yield chunk([body])
                completions = [c for handle in handles for c in handle.results()]
                if reasoning is not None:
                    core.engine.split_reasoning(completions, reasoning.parser, reasoning.prompt)
                for completion, answer in zip(completions, answers):  # the calls as streamed
                    answer.settle(completion)
                for handle in handles:
                    core.keep_record(handle, rid)
                if prepared.include_usage:
                    yield chunk([], usage_of(completions, n), extras_of(completions))
                yield "data: [DONE]\n\n"
            except NextokenError as exc:
                failure = api_error(exc, running=True)
                err = {"error": {"message": failure.message, "type": failure.kind, "param": None, "code": failure.code}}
                yield f"data: {json.dumps(err)}\n\n"
            finally:
                core.let_go(handles, rid)

        return StreamingResponse(events(), media_type="text/event-stream")


@dataclasses.dataclass
class Prepared:
    """Submitted requests and how to answer them: ``stream``, ``include_usage``, each prompt's
    echoed text (and its tokens' log-probabilities: the first token's text and the rest scored),
    and the tools whose calls the answer's text holds."""

    handles: list[RequestHandle]
    stream: bool
    include_usage: bool
    echoes: list[str] = dataclasses.field(default_factory=lambda: [""])
    echo_logprobs: list[tuple[str, list[TokenLogprob]] | None] = dataclasses.field(default_factory=lambda: [None])
    tools: ToolRequest | None = None
    reasoning: "Reasoning | None" = None


@dataclasses.dataclass
class Reasoning:
    """How a chat's answers lose their thinking: the parser, the prompt's ids, and the text it ends with."""

    parser: ReasoningParser
    prompt: list[int]
    tail: str


def _chat_delta(piece: tuple) -> dict[str, Any]:
    """An answer's piece (:class:`~nextoken.serving.core.AnswerStream`) as a chat delta."""
    if piece[0] == "thinking":
        return {"reasoning_content": piece[1]}
    if piece[0] == "text":
        return {"content": piece[1]}
    if piece[0] == "call":
        call = piece[2]
        return {
            "tool_calls": [
                {"index": piece[1], "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
            ]
        }
    return {"tool_calls": [{"index": piece[1], "function": {"arguments": piece[2]}}]}
