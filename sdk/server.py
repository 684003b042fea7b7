"""An OpenAI-compatible HTTP server over a :class:`~nextoken.Scheduler` (extra ``serve``: FastAPI + uvicorn).

    nextoken serve PACKAGE [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY]

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's
chat template), with ``stream: true`` as server-sent events ending in ``data: [DONE]`` and
``stream_options.include_usage``. nextoken's own parameters go in a ``nextoken`` object in the
request (``top_k``, ``min_p``, ``repetition_penalty``, ``strategy``, ``processors``,
``stop_conditions``, ``options``, ``cost_meters``, ``context_policy``, ``protected_prefix``,
``ignore_eos``), and each response carries a ``nextoken`` object (its full usage, cost, and the
exact stop detail). Client mistakes are OpenAI-shaped errors with 4xx codes. A client that
disconnects cancels its request.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.


import asyncio
import json
import time
import uuid
from typing import Any

from .errors import InvalidRequestError, ModelPackageError, NextokenError, PluginError, SchedulerStoppedError
from .generation import Completion, SamplingParams
from .scheduler import RequestHandle, Scheduler

__all__ = ["create_app", "serve"]

#: OpenAI's finish reasons for nextoken's.
FINISH = {"stop": "stop", "length": "length", "context": "length", "deadline": "length", "cancelled": "stop"}
NEXTOKEN_FIELDS = ("top_k", "min_p", "repetition_penalty", "strategy", "processors", "stop_conditions", "options",
                   "cost_meters", "context_policy", "protected_prefix", "ignore_eos", "deadline_s")


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def _params(body: dict[str, Any], chat: bool) -> tuple[SamplingParams, bool]:
    """SamplingParams from an OpenAI request body (and its ``nextoken`` extras); (params, include_usage)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", None if chat else 16))
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    extras = body.get("nextoken") or {}
    if not isinstance(extras, dict):
        raise APIError(400, "nextoken must be an object of nextoken's parameters", param="nextoken")
    unknown = sorted(set(extras) - set(NEXTOKEN_FIELDS))
    if unknown:
        raise APIError(400, f"unknown nextoken parameter(s) {', '.join(unknown)}; known: {', '.join(NEXTOKEN_FIELDS)}",
                       param="nextoken")
    logprobs = body.get("top_logprobs") if chat else body.get("logprobs")
    if chat and body.get("logprobs") and logprobs is None:
        logprobs = 0
    kwargs: dict[str, Any] = dict(
        temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0), stop=tuple(stop),
        seed=body.get("seed"), top_logprobs=logprobs, **extras,
    )
    if max_tokens is not None:
        kwargs["max_new_tokens"] = max_tokens
    if kwargs["temperature"] == 0:
        kwargs["top_p"] = 1.0     # OpenAI lets top_p ride along with temperature 0 (greedy); it means nothing there
    try:
        params = SamplingParams(**kwargs)
    except (TypeError, InvalidRequestError) as exc:
        raise APIError(400, str(exc)) from None
    options = body.get("stream_options") or {}
    return params, bool(options.get("include_usage"))


def _failure(exc: NextokenError) -> APIError:
    """How a request that failed while it ran is answered: the client's mistake is a 400; a plugin
    or the model failing is a 500 naming the cause; a scheduler that stopped is a 503."""
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc))
    if isinstance(exc, SchedulerStoppedError):
        return APIError(503, str(exc), "server_error", code="scheduler_stopped")
    code = "plugin_error" if isinstance(exc, PluginError) else "generation_failed"
    return APIError(500, str(exc), "server_error", code=code)


def create_app(scheduler: Scheduler, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               max_pending: int = 256):
    """The FastAPI application serving ``scheduler``'s engine as ``model_name``."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError:
        raise NextokenError("serving needs FastAPI and uvicorn: pip install 'nextoken[serve]'") from None

    from concurrent.futures import ThreadPoolExecutor

    engine = scheduler.engine
    app = FastAPI(title="nextoken", version="1")
    # Waiting on a request's events blocks a thread; give every request in hand one (the default
    # executor has only cpu_count + 4, which would couple unrelated streams).
    waiters = ThreadPoolExecutor(max_workers=max_pending + 4, thread_name_prefix="nextoken-wait")
    created = int(time.time())

    def error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return error(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_request, exc: InvalidRequestError):
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc):
        return error(400, f"invalid request: {exc.errors()[:1]}")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                             code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return error(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
        return await call_next(request)

    @app.get("/health")
    async def health():
        """Liveness and load, for balancers and operators (no API key needed): 200 while the
        scheduler serves, 503 with the reason once its loop has stopped."""
        body = {"status": "ok", "model": model_name, "running": scheduler.running, "waiting": scheduler.waiting,
                "ended": dict(scheduler.ended), "max_sequence_length": scheduler.max_sequence_length}
        if not scheduler.alive:
            body["status"] = "failed"
            body["error"] = str(scheduler.error or "the scheduler is closed")
            return JSONResponse(body, status_code=503)
        return body

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nextoken"}]}

    async def _body(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, model_name):
            raise APIError(404, f"model {model!r} is not served here; GET /v1/models lists {model_name!r}",
                           code="model_not_found", param="model")
        return body

    def _submit(prompt: Any, params: SamplingParams) -> RequestHandle:
        window = scheduler.max_sequence_length
        if params.max_new_tokens > window:
            raise APIError(400, f"max_tokens {params.max_new_tokens} is more than a whole sequence may hold here "
                                f"({window} tokens); ask for at most {window}", param="max_tokens")
        if not scheduler.alive:
            raise APIError(503, f"the server cannot take requests: {scheduler.error or 'its scheduler is closed'}",
                           "server_error", code="scheduler_stopped")
        if scheduler.running + scheduler.waiting >= max_pending:
            raise APIError(503, f"the server has {max_pending} requests in hand; retry later", "server_busy")
        try:
            return scheduler.submit(prompt, params)
        except SchedulerStoppedError as exc:
            raise APIError(503, str(exc), "server_error", code="scheduler_stopped") from None
        except (InvalidRequestError, ModelPackageError, PluginError) as exc:
            raise APIError(400, str(exc)) from None

    def _usage(c: Completion) -> dict:
        return {"prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens,
                "total_tokens": c.usage.total_tokens}

    def _extras(c: Completion) -> dict:
        return {"finish_reason": c.finish_reason, "stop_detail": c.stop_detail, "token_ids": list(c.token_ids),
                "usage": c.usage.to_dict(),
                "cost": {k: v.to_dict() for k, v in c.cost.items()}}

    async def _wait_or_cancel(request: Request, handle: RequestHandle) -> Completion:
        """The completion, unless the client goes away first (then the request is cancelled)."""
        loop = asyncio.get_running_loop()
        result = loop.run_in_executor(waiters, handle.result)

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        gone = asyncio.ensure_future(disconnected())
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result not in done:
            handle.cancel()
            raise asyncio.CancelledError
        gone.cancel()
        try:
            return result.result()
        except NextokenError as exc:
            raise _failure(exc) from None

    def _stream(handle: RequestHandle, chat: bool, rid: str, include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage: dict | None = None, extra: dict | None = None) -> str:
            data = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            if extra is not None:
                data["nextoken"] = extra
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events():
            loop = asyncio.get_running_loop()
            iterator = iter(handle)
            try:
                if chat:
                    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                first = True           # the first token is always sent, even while its text is held back
                while True:
                    event = await loop.run_in_executor(waiters, next, iterator, None)
                    if event is None:
                        break
                    finish = FINISH.get(event.finish_reason, event.finish_reason) if event.finish_reason else None
                    if event.text or finish or first:
                        first = False
                        body = {"index": 0, "finish_reason": finish}
                        if chat:
                            body["delta"] = {"content": event.text} if event.text else {}
                        else:
                            body["text"] = event.text
                            body["logprobs"] = None
                        yield chunk([body])
                completion = handle.result()
                if include_usage:
                    yield chunk([], _usage(completion), _extras(completion))
                yield "data: [DONE]\n\n"
            except NextokenError as exc:
                failure = _failure(exc)
                err = {"error": {"message": failure.message, "type": failure.kind, "param": None, "code": failure.code}}
                yield f"data: {json.dumps(err)}\n\n"
            finally:
                if not handle.done:
                    handle.cancel()          # the client went away mid-stream

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _respond(request: Request, body: dict, handle: RequestHandle, chat: bool, include_usage: bool):
        """The stream, or the whole answer, of one submitted request, in the OpenAI shape."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return _stream(handle, chat, rid, include_usage)
        c = await _wait_or_cancel(request, handle)
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH.get(c.finish_reason, c.finish_reason),
                                  "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [choice], "usage": _usage(c), "nextoken": _extras(c)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) and not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt")
        params, include_usage = _params(body, chat=False)
        return await _respond(request, body, _submit(prompt, params), False, include_usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        messages = body.get("messages")
        params, include_usage = _params(body, chat=True)
        try:
            ids = engine.apply_chat_template(messages)
        except (InvalidRequestError, ModelPackageError) as exc:
            raise APIError(400, str(exc), param="messages") from None
        if body.get("max_completion_tokens", body.get("max_tokens")) is None:
            room = scheduler.max_sequence_length - len(ids)
            params = params.replace(max_new_tokens=max(1, min(params.max_new_tokens, room)))
        return await _respond(request, body, _submit(ids, params), True, include_usage)

    return app


def serve(package: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, api_key: str | None = None,
          model_name: str | None = None, device: str = "auto", threads: int | None = None,
          scheduler_options: dict[str, Any] | None = None, spin: bool | None = None,
          tf32: bool | None = None) -> None:
    """Load ``package`` and serve it until interrupted (``scheduler_options``: more
    :class:`~nextoken.Scheduler` arguments: ``max_prefill_tokens``, ``kv_backend``, ``slot_length``;
    ``spin``, ``tf32``: as :class:`~nextoken.Engine` takes them)."""
    try:
        import uvicorn
    except ImportError:
        raise NextokenError("serving needs FastAPI and uvicorn: pip install 'nextoken[serve]'") from None
    from pathlib import Path

    from .engine import Engine

    engine = Engine(package, device=device, threads=threads, spin=spin, tf32=tf32)
    with Scheduler(engine, max_batch=max_batch, **(scheduler_options or {})) as scheduler:
        app = create_app(scheduler, model_name or Path(package).resolve().name, api_key=api_key)
        uvicorn.run(app, host=host, port=port, log_level="warning")
