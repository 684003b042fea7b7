"""An OpenAI-compatible HTTP server over a :class:`~nextoken.Scheduler` (extra ``serve``: FastAPI + uvicorn).

    nextoken serve PACKAGE [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY]

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the model's
chat template), with ``stream: true`` as server-sent events ending in ``data: [DONE]`` and
``stream_options.include_usage``. nextoken's own parameters go in a ``nextoken`` object in the
request (the SamplingParams fields marked for it: :data:`~nextoken.serving.api_schema.NEXTOKEN_FIELDS`),
and each response carries a ``nextoken`` object (its full usage, cost, and the exact stop detail). Bodies are validated against typed schemas (:mod:`nextoken.serving.api_schema`);
client mistakes are OpenAI-shaped errors with 4xx codes, OpenAI parameters nextoken does not
implement are refused by name, and the body limit holds while a chunked upload is read. A client
that disconnects cancels its request (one log line, no traceback).

Requests are not trusted: the event loop only moves bytes (a body is parsed, rendered, tokenised,
checked and submitted on the preparation workers of :class:`Service`), every constraint is
compiled first in a checker process (:mod:`nextoken.serving.constraints`), and what a request can
name (draft models) is the operator's, by name (:class:`ServeOptions`).

Sampling defaults: OpenAI's (temperature 1, top_p 1), except where the package's
generation_config.json sets temperature, top_p, top_k, min_p or repetition_penalty: a request that
leaves one out gets the model's value, as vLLM does.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.

import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..engine import Engine
from ..errors import (
    InvalidRequestError,
    NextokenError,
    PluginError,
    SchedulerStoppedError,
    is_number,
)
from ..scheduler import RequestHandle, Scheduler
from ..toolcalls import ToolRequest
from ..types import Completion, SamplingParams
from .constraints import BUDGET_S

__all__ = ["ServeOptions", "Service", "create_app", "load_drafts", "sampling_defaults", "serve"]

log = logging.getLogger("nextoken.serving.server")

#: OpenAI's finish reasons for nextoken's.
FINISH = {
    "stop": "stop",
    "length": "length",
    "context": "length",
    "deadline": "length",
    "cancelled": "stop",
    "tool_calls": "tool_calls",
}
#: generation_config.json keys the server takes as sampling defaults, and their SamplingParams names
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class APIError(Exception):
    """An HTTP error answer in OpenAI's shape: ``status``, ``message``, ``kind`` (OpenAI's error
    ``type``), the request field at fault (``param``) and a ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def sampling_defaults(package: Path) -> dict[str, Any]:
    """The sampling defaults a package's generation_config.json sets (the server's defaults for it)."""
    path = Path(package) / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in GENERATION_DEFAULTS if is_number(config.get(k))}


def _parse(raw: bytes, schema):
    """The body as ``schema``, or a 400 naming the first field that is wrong and why."""
    from pydantic import ValidationError

    try:
        return schema.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {err.get('msg', '')}") from None
        if err.get("type") == "model_type" and not loc:
            raise APIError(400, "the request body must be a JSON object") from None
        message = "unknown parameter" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid")
        if loc.startswith("nextoken.") and err.get("type") == "extra_forbidden":
            from .api_schema import NEXTOKEN_FIELDS

            message = f"unknown nextoken parameter; known: {', '.join(NEXTOKEN_FIELDS)}"
        raise APIError(400, f"{loc or 'body'}: {message}", param=loc or None) from None


def _params(req, chat: bool, defaults: dict[str, float]) -> SamplingParams:
    """SamplingParams from a validated request (and its ``nextoken`` extras)."""
    from .api_schema import REFUSED

    for name, unused in REFUSED.items():
        value = getattr(req, name, None)
        if value is not None and value != unused:
            raise APIError(400, f"{name} is not supported by this server yet; leave it out", param=name)
    from .api_schema import SERVER_FIELDS

    extras = (
        {
            k: getattr(req.nextoken, k)
            for k in req.nextoken.model_fields_set
            if getattr(req.nextoken, k) is not None and k not in SERVER_FIELDS
        }
        if req.nextoken
        else {}
    )
    max_tokens = (req.max_completion_tokens or req.max_tokens) if chat else (req.max_tokens or 16)
    if chat:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        logprobs = req.logprobs
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    kwargs: dict[str, Any] = {
        **{
            k: v
            for k, v in defaults.items()
            if k in ("top_k", "min_p", "repetition_penalty", "speculative") and k not in extras
        },
        **extras,
    }
    temperature = req.temperature if req.temperature is not None else defaults.get("temperature", 1.0)
    top_p = req.top_p if req.top_p is not None else defaults.get("top_p", 1.0)
    kwargs.update(
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        seed=req.seed,
        top_logprobs=logprobs,
        n=req.n,
        response_format=req.response_format,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=req.logit_bias or {},
    )
    if max_tokens is not None:
        kwargs["max_new_tokens"] = max_tokens
    if kwargs["temperature"] == 0:
        # OpenAI lets top_p ride along with temperature 0 (greedy), where it means nothing; so do
        # the model's own sampling defaults
        kwargs["top_p"] = 1.0
        for name in ("top_k", "min_p"):
            if name not in extras:
                kwargs.pop(name, None)
    try:
        return SamplingParams(**kwargs)
    except (TypeError, InvalidRequestError) as exc:
        raise api_error(exc) from None


def _completion_logprobs(items: list, offset: int) -> dict:
    """OpenAI's legacy completions ``logprobs`` object for ``items`` (TokenLogprob), text from ``offset``."""
    offsets, at = [], offset
    for lp in items:
        offsets.append(at)
        at += len(lp.token)
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [lp.logprob for lp in items],
        "top_logprobs": [{t: v for _, t, v in lp.top} for lp in items],
        "text_offset": offsets,
    }


def _chat_logprobs(items: list) -> dict:
    """OpenAI's chat ``logprobs`` object (``content``: one entry per token, with its alternatives)."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]} for lp in items
        ],
        "refusal": None,
    }


def api_error(exc: Exception, running: bool = False, param: str | None = None) -> APIError:
    """The one map from an error to its HTTP answer. Before a request runs, what it asks for is at
    fault: a 400 (naming the field the error names, else ``param``). While it runs (``running``),
    the client's mistake is still a 400; a plugin or the model failing is a 500 naming the cause.
    A scheduler that stopped is a 503 either way."""
    if isinstance(exc, SchedulerStoppedError):
        return APIError(503, str(exc), "server_error", code="scheduler_stopped")
    if isinstance(exc, (InvalidRequestError, TypeError)) or not running:
        return APIError(400, str(exc), param=getattr(exc, "param", None) or param)
    code = "plugin_error" if isinstance(exc, PluginError) else "generation_failed"
    return APIError(500, str(exc), "server_error", code=code)


class _ClientGone(Exception):
    """The client went away while its body was read."""


def _error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
    """An OpenAI-shaped error response."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What the operator sets for a server (the same for ``nextoken serve`` and every Ray replica).

    ``api_key``: required as ``Authorization: Bearer KEY`` (every path but ``/health``);
    ``max_body_bytes``: the largest request body (413 beyond, checked while it is read);
    ``max_pending``: requests in hand before new ones get a 503; ``body_timeout_s``: how long a
    body may stall between two chunks (408); ``speculative``: speculative decoding for requests
    that set none (its ``model`` a name of ``drafts``); ``drafts``: the draft packages requests may
    name (name -> path, loaded at start; a request never names a path); ``record_dir``: where each
    request's record goes; ``constraint_budget_s``: the longest a request's constraint may take
    to compile (:mod:`nextoken.serving.constraints`); ``prep_workers``: threads that parse,
    render, tokenise and check requests, off the event loop."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_pending: int = 256
    body_timeout_s: float = 30.0
    speculative: Mapping[str, Any] | None = None
    drafts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    record_dir: str | None = None
    constraint_budget_s: float = BUDGET_S
    prep_workers: int = 2


def load_drafts(engine: Any, drafts: Mapping[str, str]) -> dict[str, str]:
    """The draft packages a server offers (name -> path), each loaded now and checked to share the
    served model's vocabulary; an error naming the option otherwise."""
    from ..plugins.speculative import draft_engine

    out = {}
    for name, path in dict(drafts).items():
        try:
            draft = draft_engine(path, engine.threads)
        except InvalidRequestError as exc:
            raise NextokenError(f"--draft {name}={path}: {exc}") from None
        if draft.manifest.vocab_size != engine.manifest.vocab_size:
            raise NextokenError(
                f"--draft {name}={path}: its vocabulary ({draft.manifest.vocab_size} tokens) is not the "
                f"served model's ({engine.manifest.vocab_size}); a draft must share the tokenizer"
            )
        out[name] = path
    return out


class Service:
    """What the server does for each endpoint, over one :class:`~nextoken.Scheduler` (the FastAPI
    routes of :func:`create_app` call these), as :class:`ServeOptions` says. The event loop only
    moves bytes: a request's body is parsed, its prompt rendered and tokenised, its constraint
    checked and the request submitted on the preparation workers."""

    def __init__(self, scheduler: Scheduler[Engine], model_name: str, options: ServeOptions | None = None) -> None:
        """Args:
        scheduler: the running scheduler over the served engine.
        model_name: the name clients ask for.
        options: the server's settings (default: :class:`ServeOptions`' defaults).
        """
        from concurrent.futures import ThreadPoolExecutor

        from .constraints import ConstraintChecker, StackPool

        options = options or ServeOptions()
        self.options = options
        self.scheduler, self.engine, self.model_name = scheduler, scheduler.engine, model_name
        self.api_key, self.max_body_bytes, self.max_pending, self.body_timeout_s = (
            options.api_key,
            options.max_body_bytes,
            options.max_pending,
            options.body_timeout_s,
        )
        self.defaults: dict[str, Any] = sampling_defaults(self.engine.path)
        self.drafts = load_drafts(self.engine, options.drafts)
        if options.speculative:  # the server's default; a request's own nextoken.speculative wins
            self.defaults["speculative"] = self.check_speculative(options.speculative)
        # Waiting on a request's events blocks a thread; give every request in hand one (the default
        # executor has only cpu_count + 4, which would couple unrelated streams).
        self.waiters = ThreadPoolExecutor(max_workers=options.max_pending + 4, thread_name_prefix="nextoken-wait")
        self.prep = StackPool(max(1, options.prep_workers))
        self.checker = ConstraintChecker.for_engine(self.engine, options.constraint_budget_s)
        self.created = int(time.time())
        #: where each request's record goes (None: nowhere); the records hold prompts: the operator's to protect
        self.record_dir = Path(options.record_dir) if options.record_dir else None
        if self.record_dir is not None:
            try:
                self.record_dir.mkdir(parents=True, exist_ok=True)
                if not os.access(self.record_dir, os.W_OK | os.X_OK):
                    raise PermissionError(13, "not writable by this user")
            except OSError as exc:
                raise NextokenError(f"--record-dir {self.record_dir}: {exc.strerror or exc}") from None

    def check_speculative(self, spec: Mapping[str, Any]) -> dict:
        """The server's default ``speculative``, checked now (method, k, draft name) as a request's
        would be; an error naming --speculative otherwise."""
        spec = dict(spec)
        try:
            self.engine.start(
                [self.engine.pad_token_id], SamplingParams(max_new_tokens=1, speculative=self.with_draft_path(spec))
            )
        except NextokenError as exc:
            raise NextokenError(f"--speculative {spec}: {exc}") from None
        return spec

    def with_draft_path(self, spec: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """``spec`` with the draft it names (by one of the server's names) as that draft's path; an
        InvalidRequestError when it names another."""
        if spec is None or "model" not in spec:
            return spec
        name = spec["model"]
        if not isinstance(name, str) or name not in self.drafts:
            offered = ", ".join(sorted(self.drafts)) or "none (nextoken serve --draft NAME=PATH offers one)"
            raise InvalidRequestError(f"nextoken.speculative.model names a draft model this server offers: {offered}")
        return {**spec, "model": self.drafts[name]}

    def close(self) -> None:
        """Stop the constraint checker and the workers."""
        if self.checker is not None:
            self.checker.close()
        self.prep.shutdown()
        self.waiters.shutdown(wait=False)

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on a preparation worker, awaited."""
        return await asyncio.wrap_future(self.prep.submit(fn, *args))

    # -- around every request --------------------------------------------------------------------------
    def refuse(self, request) -> Any:
        """The error response for a request without the API key or with a declared body over the
        limit, else None."""
        if self.api_key is not None and request.url.path != "/health" and not self.authorized(request):
            return _error(
                401,
                "missing or wrong API key (Authorization: Bearer ...)",
                "authentication_error",
                code="invalid_api_key",
            )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return _error(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
        return None

    def authorized(self, request) -> bool:
        """Whether the request carries the API key (the scheme in any case; compared in constant time)."""
        import hmac

        scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), (self.api_key or "").encode())

    async def read(self, request) -> bytes:
        """The body, read a chunk at a time (the size limit holds for chunked uploads too, and a
        body that stalls is a 408)."""
        from starlette.requests import ClientDisconnect

        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=self.body_timeout_s)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(
                    408, f"the request body stalled for {self.body_timeout_s:g} s", code="request_timeout"
                ) from None
            except ClientDisconnect:
                raise _ClientGone() from None
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"request body over {self.max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, raw: bytes, schema):
        """The body validated against ``schema``, for this server's model."""
        body = _parse(raw, schema)
        if body.model not in (None, self.model_name):
            raise APIError(
                404,
                f"model {body.model!r} is not served here; GET /v1/models lists {self.model_name!r}",
                code="model_not_found",
                param="model",
            )
        return body

    def submit(self, prompt: Any, params: SamplingParams) -> RequestHandle:
        """Hand a request to the scheduler, or the 400/503 that says why not."""
        scheduler, window = self.scheduler, self.scheduler.max_sequence_length
        if params.max_new_tokens > window:
            raise APIError(
                400,
                f"max_tokens {params.max_new_tokens} is more than a whole sequence may hold here "
                f"({window} tokens); ask for at most {window}",
                param="max_tokens",
            )
        if not scheduler.alive:
            raise APIError(
                503,
                f"the server cannot take requests: {scheduler.error or 'its scheduler is closed'}",
                "server_error",
                code="scheduler_stopped",
            )
        if scheduler.running + scheduler.waiting >= self.max_pending:
            raise APIError(503, f"the server has {self.max_pending} requests in hand; retry later", "server_busy")
        try:
            return scheduler.submit(prompt, params)
        except NextokenError as exc:
            raise api_error(exc) from None

    # -- the endpoints ---------------------------------------------------------------------------------
    def health(self):
        """Liveness and load, for balancers and operators (no API key needed): 200 while the
        scheduler serves, 503 with the reason once its loop has stopped."""
        from fastapi.responses import JSONResponse

        scheduler = self.scheduler
        body = {
            "status": "ok",
            "model": self.model_name,
            "running": scheduler.running,
            "waiting": scheduler.waiting,
            "ended": dict(scheduler.ended),
            "max_sequence_length": scheduler.max_sequence_length,
        }
        if not scheduler.alive:
            body["status"] = "failed"
            body["error"] = str(scheduler.error or "the scheduler is closed")
            return JSONResponse(body, status_code=503)
        return body

    def keep_record(self, handle: RequestHandle, rid: str) -> None:
        """Write the request's record to ``record_dir/<id>.json`` (when the server keeps records)."""
        if self.record_dir is None:
            return
        from ..records import records_of

        records = records_of(self.engine, handle.generation)
        (self.record_dir / f"{rid}.json").write_text(json.dumps(records[0] if len(records) == 1 else records) + "\n")

    def metrics_text(self) -> tuple[bytes, str]:
        """``scheduler.metrics()`` in Prometheus' text format, and its content type."""
        from ..metrics import prometheus_text

        try:
            return prometheus_text(self.scheduler.metrics())
        except ImportError:
            raise APIError(
                501, "metrics need prometheus_client: pip install 'nextoken[serve]'", "server_error"
            ) from None

    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "nextoken"}],
        }

    async def completions(self, request):
        raw = await self.read(request)
        handle, stream, include_usage, echo = await self.off_loop(self.prepare_completion, raw)
        return await self.respond(request, handle, False, stream, include_usage, echo)

    def prepare_completion(self, raw: bytes) -> tuple[RequestHandle, bool, bool, str]:
        """A completions body, parsed, checked and submitted: (its handle, stream, include_usage, echo)."""
        from .api_schema import CompletionRequest

        req = self.parse(raw, CompletionRequest)
        if req.tools is not None or req.tool_choice is not None:
            raise APIError(400, "tools take a conversation: use /v1/chat/completions", param="tools")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(
                    400, "prompt: one prompt per request (a list of one string, or of token ids)", param="prompt"
                )
            prompt = prompt[0]
        params = self.params(req, False)
        if req.echo and params.top_logprobs is not None:
            raise APIError(
                400, "echo with logprobs is not supported (it needs the prompt's log-probabilities)", param="echo"
            )
        handle = self.submit(prompt, params)
        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else self.engine.decode(prompt)
        return handle, req.stream, bool(req.stream_options and req.stream_options.include_usage), echo

    async def chat_completions(self, request):
        raw = await self.read(request)
        handle, stream, include_usage, tools = await self.off_loop(self.prepare_chat, raw)
        return await self.respond(request, handle, True, stream, include_usage, tools=tools)

    def prepare_chat(self, raw: bytes) -> tuple[RequestHandle, bool, bool, ToolRequest | None]:
        """A chat body, parsed, rendered, checked and submitted: (its handle, stream, include_usage, tools)."""
        from .api_schema import ChatRequest

        req = self.parse(raw, ChatRequest)
        params = self.params(req, True)
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
            ids, params = self.engine.chat_prompt(messages, params, tools)
        except NextokenError as exc:
            raise api_error(exc, param="messages") from None
        if tools is not None:
            self.check_constraint(params, "tool_choice")
        if req.max_completion_tokens is None and req.max_tokens is None:
            room = self.scheduler.max_sequence_length - len(ids)
            params = params.replace(max_new_tokens=max(1, min(params.max_new_tokens, room)))
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self.submit(ids, params), req.stream, include_usage, tools

    def params(self, req, chat: bool) -> SamplingParams:
        """The request's SamplingParams, its draft model resolved from the server's names and its
        constraint checked (:meth:`check_constraint`)."""
        options = req.nextoken.options if req.nextoken is not None and req.nextoken.options else {}
        if "draft" in options:
            raise APIError(
                400,
                "nextoken.options.draft: the draft model's settings are the server's "
                "(nextoken serve --draft NAME=PATH)",
                param="nextoken.options",
            )
        params = _params(req, chat, self.defaults)
        try:
            params = params.replace(speculative=self.with_draft_path(params.speculative))
        except InvalidRequestError as exc:
            raise api_error(exc, param="nextoken.speculative.model") from None
        self.check_constraint(params)
        return params

    def check_constraint(self, params: SamplingParams, param: str | None = None) -> None:
        """The request's constraint compiled in the checker process, or the 400 naming its field."""
        found = self.checker.problem(params) if self.checker is not None else None
        if found is not None:
            field, problem = found
            name = param or (field if field == "response_format" else f"nextoken.{field}")
            raise APIError(400, f"{name}: {problem}", param=name)

    # -- answers ---------------------------------------------------------------------------------------
    async def respond(
        self,
        request,
        handle: RequestHandle,
        chat: bool,
        stream: bool,
        include_usage: bool,
        echo: str = "",
        tools: ToolRequest | None = None,
    ):
        """The stream, or the whole answer, of one submitted request, in the OpenAI shape (with
        ``tools``: its calls parsed out of its text)."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if stream:
            return self.stream(handle, chat, rid, include_usage, echo, tools)
        completions = await self.wait_or_cancel(request, handle, rid)
        self.keep_record(handle, rid)
        if tools is not None:
            tools.finish(completions)
        choices = []
        for index, c in enumerate(completions):
            choice: dict[str, Any] = {
                "index": index,
                "finish_reason": FINISH.get(c.finish_reason, c.finish_reason),
                "logprobs": _logprobs(c.logprobs, chat, len(echo)),
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
            "model": self.model_name,
            "choices": choices,
            "usage": _usage(completions),
            "nextoken": _extras(completions),
        }

    async def wait_or_cancel(self, request, handle: RequestHandle, rid: str) -> list[Completion]:
        """Every choice's completion, unless the client goes away first (then the request is cancelled)."""
        loop = asyncio.get_running_loop()
        result = loop.run_in_executor(self.waiters, handle.results)

        async def disconnected():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        gone = asyncio.ensure_future(disconnected())
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        if result not in done:
            log.info("client of %s went away; its request is cancelled", rid)
            handle.cancel()
            raise asyncio.CancelledError
        gone.cancel()
        try:
            return result.result()
        except NextokenError as exc:
            raise api_error(exc, running=True) from None

    def stream(
        self,
        handle: RequestHandle,
        chat: bool,
        rid: str,
        include_usage: bool,
        echo: str = "",
        tools: ToolRequest | None = None,
    ):
        """Server-sent events of one request: a chunk per text delta, usage at the end when asked.
        With ``tools`` the text is held until the answer ends, then sent as content or as tool-call
        deltas (a call whole in one delta: id, name and arguments)."""
        from fastapi.responses import StreamingResponse

        obj = "chat.completion.chunk" if chat else "text_completion"
        service = self
        wants_logprobs = handle.generation.params.top_logprobs is not None
        n = handle.generation.params.n
        model_name, waiters = self.model_name, self.waiters

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
                while tools is None:
                    event = await loop.run_in_executor(waiters, next, iterator, None)
                    if event is None:
                        break
                    index = event.index
                    finish = FINISH.get(event.finish_reason, event.finish_reason) if event.finish_reason else None
                    lps = [event.logprob] if (wants_logprobs and event.logprob is not None) else None
                    if event.text or finish or first[index] or lps:
                        first[index] = False
                        body = {"index": index, "finish_reason": finish}
                        if chat:
                            body["delta"] = {"content": event.text} if event.text else {}
                            if lps:
                                body["logprobs"] = _chat_logprobs(lps)
                        else:
                            body["text"] = event.text
                            body["logprobs"] = _completion_logprobs(lps, offsets[index]) if lps else None
                        offsets[index] += len(event.text)
                        yield chunk([body])
                if tools is not None:
                    while await loop.run_in_executor(waiters, next, iterator, None) is not None:
                        pass
                    for body in _tool_chunks(tools.finish(handle.results())):
                        yield chunk([body])
                completions = handle.results()
                service.keep_record(handle, rid)
                if include_usage:
                    yield chunk([], _usage(completions), _extras(completions))
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


def _tool_chunks(completions: list[Completion]):
    """The streamed answer of a tools request, each choice's at once: its content, its calls as
    tool-call deltas, its finish reason."""
    for index, c in enumerate(completions):
        if c.text:
            yield {"index": index, "delta": {"content": c.text}, "finish_reason": None}
        if c.tool_calls:
            yield {
                "index": index,
                "finish_reason": None,
                "delta": {"tool_calls": [{"index": k, **call.to_dict()} for k, call in enumerate(c.tool_calls)]},
            }
        yield {"index": index, "delta": {}, "finish_reason": FINISH.get(c.finish_reason, c.finish_reason)}


def _usage(completions: list[Completion]) -> dict:
    """OpenAI's usage of a request: its prompt counted once, every choice's tokens."""
    prompt = completions[0].usage.prompt_tokens
    generated = sum(c.usage.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": completions[0].usage.cached_tokens},
    }


def _extras(completions: list[Completion]) -> dict:
    """nextoken's own: the first choice's stop detail, ids, full usage and cost, and with ``n`` > 1
    the same for every choice (``choices``)."""

    def one(c: Completion) -> dict:
        return {
            "finish_reason": c.finish_reason,
            "stop_detail": c.stop_detail,
            "token_ids": list(c.token_ids),
            "usage": c.usage.to_dict(),
            "cost": {k: v.to_dict() for k, v in c.cost.items()},
        }

    out = one(completions[0])
    if len(completions) > 1:
        out["choices"] = [one(c) for c in completions]
    return out


def _logprobs(items: list | None, chat: bool, offset: int) -> dict | None:
    if items is None:
        return None
    return _chat_logprobs(items) if chat else _completion_logprobs(items, offset)


def create_app(scheduler: Scheduler[Engine], model_name: str, options: ServeOptions | None = None, **settings: Any):
    """The FastAPI application serving ``scheduler``'s engine as ``model_name``: the routes, each
    calling its :class:`Service` method, and the errors in OpenAI's shape. ``options`` (or its
    fields as keywords: ``api_key=``, ``max_body_bytes=`` ...): :class:`ServeOptions`. The app's
    ``state.service`` is closed when the app shuts down."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
    except ImportError:
        raise NextokenError("serving needs FastAPI and uvicorn: pip install 'nextoken[serve]'") from None

    try:
        options = dataclasses.replace(options or ServeOptions(), **settings)
    except TypeError as exc:
        raise InvalidRequestError(f"create_app: {exc}") from None
    service = Service(scheduler, model_name, options)
    app = FastAPI(
        title="nextoken", version="1", docs_url=None, redoc_url=None, openapi_url=None, on_shutdown=[service.close]
    )
    app.state.service = service

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_request, exc: InvalidRequestError):
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc):
        return _error(400, f"invalid request: {exc.errors()[:1]}")

    @app.exception_handler(_ClientGone)
    async def _gone(request, _exc):
        log.info(
            "client %s disconnected before its request body arrived (%s)",
            request.client.host if request.client else "?",
            request.url.path,
        )
        return _error(499, "client closed the request", code="client_closed")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        refused = service.refuse(request)
        return refused if refused is not None else await call_next(request)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    async def docs():
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="nextoken")

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/metrics")
    async def metrics():
        from fastapi.responses import Response

        body, content_type = service.metrics_text()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.chat_completions(request)

    return app


def serve(
    package: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    model_name: str | None = None,
    engine_options: dict[str, Any] | None = None,
    scheduler_options: dict[str, Any] | None = None,
    options: ServeOptions | None = None,
    header_timeout_s: float = 10.0,
) -> None:
    """Load ``package`` and serve it until interrupted. ``engine_options``: :class:`~nextoken.Engine`
    arguments (``device``, ``threads``, ``spin``, ``tf32``, the prefix cache's); ``scheduler_options``:
    more :class:`~nextoken.Scheduler` arguments (``max_prefill_tokens``, ``kv_backend``,
    ``slot_length``); ``options``: :class:`ServeOptions`, checked before the server listens.
    Connections: idle ones close after 5 s between requests, and one that has not sent a whole
    request head within ``header_timeout_s`` (half-open, or a client that stalls in its headers) is
    closed."""
    try:
        import uvicorn
    except ImportError:
        raise NextokenError("serving needs FastAPI and uvicorn: pip install 'nextoken[serve]'") from None

    options = options or ServeOptions()
    engine = Engine(package, **(engine_options or {}))
    name = model_name or Path(package).resolve().name
    with engine, Scheduler(engine, max_batch=max_batch, **(scheduler_options or {})) as scheduler:
        app = create_app(scheduler, name, options)
        if app.state.service.checker is not None:
            app.state.service.checker.start()  # the first constrained request does not wait for it
        slots = (
            f"{scheduler.max_batch} slots of {scheduler.slot_length} positions"
            if scheduler.kv.slot_count
            else f"batches of up to {scheduler.max_batch}"
        )
        print(
            f"nextoken: serving {name} ({engine.path}) at http://{host}:{port}/v1 on {engine.device.provider}; "
            f"KV backend {scheduler.kv_backend}, {slots}; spin {'on' if engine.spin else 'off'} ({engine.spin_reason})"
            + ("; API key required" if options.api_key else "")
            + (f"; drafts {', '.join(options.drafts)}" if options.drafts else ""),
            flush=True,
        )
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level=None,
            access_log=True,
            timeout_keep_alive=5,
            log_config=_LOG_CONFIG,
            http=_head_timeout_protocol(header_timeout_s),
        )


def _head_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    ``seconds`` of connecting or of its last response (uvicorn times out only idle keep-alive)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeout(H11Protocol):
        _head_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expired(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                log.info(
                    "closed a connection from %s that sent no whole request in %g s",
                    self.client[0] if self.client else "?",
                    seconds,
                )
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is in hand: its body has its own timeout

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadTimeout


#: uvicorn's loggers: its own at warning, the access log (one line a request) at info.
_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "access": {
            "()": "uvicorn.logging.AccessFormatter",
            "fmt": '%(client_addr)s - "%(request_line)s" %(status_code)s',
        }
    },
    "handlers": {"access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"level": "WARNING"},
    },
}
