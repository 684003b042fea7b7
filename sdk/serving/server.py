"""The HTTP server: the app's wiring and its transport (extra ``serve``: FastAPI + uvicorn).

    nextoken serve PACKAGE [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY]

Endpoints: ``GET /v1/models[/{id}]``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
model's chat template), with ``stream: true`` as server-sent events ending in ``data: [DONE]`` and
``stream_options.include_usage``; ``POST /v1/responses`` and ``GET`` / ``DELETE
/v1/responses/{id}`` (:mod:`~nextoken.serving.responses_api`); ``POST /v1/messages`` and
``/v1/messages/count_tokens`` (:mod:`~nextoken.serving.anthropic_api`); ``POST /v1/embeddings``
for a package exported with ``--task embed`` (:mod:`~nextoken.serving.embeddings_api`).
nextoken's own parameters go in a ``nextoken`` object in the request (the SamplingParams fields
marked for it: :data:`~nextoken.serving.api_schema.NEXTOKEN_FIELDS`), and each response carries a ``nextoken`` object (its full usage, cost, and the exact stop detail).
Bodies are validated against typed schemas (:mod:`nextoken.serving.api_schema`); client mistakes
are OpenAI-shaped errors with 4xx codes (:func:`~nextoken.serving.protocol.api_error`, the one
map), OpenAI parameters nextoken does not implement are refused by name, and the body limit holds
while a chunked upload is read. A client that disconnects cancels its request (one log line, no
traceback).

The server is split by job: the protocol (schemas in :mod:`~nextoken.serving.api_schema`, body to
parameters and response shapes in :mod:`~nextoken.serving.protocol`), the core every API shares
(:mod:`~nextoken.serving.core`: admission, submission, events on the event loop), one module an
API (:mod:`~nextoken.serving.openai_api`), and this one: routes and transport.

Requests are not trusted: the event loop only moves bytes (a body is parsed, rendered, tokenised,
checked and submitted on the preparation workers of the core), every constraint is compiled first
in a checker process (:mod:`nextoken.serving.constraints`), and what a request can name (draft
models) is the operator's, by name (:class:`~nextoken.serving.core.ServeOptions`).

Sampling defaults: OpenAI's (temperature 1, top_p 1), except where the package's
generation_config.json sets temperature, top_p, top_k, min_p or repetition_penalty: a request that
leaves one out gets the model's value, as vLLM does.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..engine import Engine
from ..errors import InvalidRequestError, NextokenError
from ..scheduler import Scheduler
from .anthropic_api import MessagesService
from .core import ClientGone, ServeOptions, Service, load_drafts, sampling_defaults
from .embeddings_api import EmbeddingsService
from .openai_api import OpenAIService
from .protocol import APIError, api_error, error_response
from .responses_api import ResponsesService

__all__ = [
    "APIError",
    "ServeOptions",
    "Service",
    "api_error",
    "create_app",
    "error_handlers",
    "load_drafts",
    "run_app",
    "sampling_defaults",
    "serve",
]

log = logging.getLogger("nextoken.serving")


def error_handlers(app: Any) -> None:
    """Answer ``app``'s errors in OpenAI's shape: ours (an APIError as it says, an
    InvalidRequestError as :func:`api_error` maps it), FastAPI's (a 404, a 405, a body that fails
    its schema: a 400) and a client gone before its body arrived (499, one log line)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_request, exc: InvalidRequestError):
        failure = api_error(exc)
        return error_response(failure.status, failure.message, failure.kind, failure.param, failure.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), kind, code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc):
        return error_response(400, f"invalid request: {exc.errors()[:1]}")

    @app.exception_handler(ClientGone)
    async def _gone(request, _exc):
        log.info(
            "client %s disconnected before its request body arrived (%s)",
            request.client.host if request.client else "?",
            request.url.path,
        )
        return error_response(499, "client closed the request", code="client_closed")


def create_app(scheduler: Scheduler[Engine], model_name: str, options: ServeOptions | None = None, **settings: Any):
    """The FastAPI application serving ``scheduler``'s engine as ``model_name``: the routes, each
    calling its API's service over the shared core (:class:`Service`), and the errors in OpenAI's shape. ``options`` (or its
    fields as keywords: ``api_key=``, ``max_body_bytes=`` ...): :class:`ServeOptions`. The app's
    ``state.service`` is closed when the app shuts down."""
    try:
        from fastapi import FastAPI, Request
    except ImportError:
        raise NextokenError("serving needs FastAPI and uvicorn: pip install 'nextoken[serve]'") from None

    try:
        options = dataclasses.replace(options or ServeOptions(), **settings)
    except TypeError as exc:
        raise InvalidRequestError(f"create_app: {exc}") from None
    service = Service(scheduler, model_name, options)
    openai_api = OpenAIService(service)
    responses = ResponsesService(service)
    messages = MessagesService(service)
    embeddings = EmbeddingsService(service)
    app = FastAPI(
        title="nextoken",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        on_shutdown=[service.close, embeddings.close],
    )
    app.state.service = service
    app.state.responses = responses  # what a router over several models asks for a stored response
    # The endpoints reach the services through `live` only: FastAPI keeps every endpoint function
    # in a module-level cache, so what their closures hold would outlive the app (an engine a
    # router unloads, whole). Closing empties it.
    live = SimpleNamespace(
        service=service, openai=openai_api, responses=responses, messages=messages, embeddings=embeddings
    )

    def close() -> None:
        service.close()
        embeddings.close()
        vars(live).clear()

    app.state.close = close

    error_handlers(app)

    app.add_middleware(_Guard, service=service)

    @app.get("/health")
    async def health():
        return live.service.health()

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        return request.app.openapi()

    @app.get("/docs", include_in_schema=False)
    async def docs():
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title="nextoken")

    @app.get("/v1/models")
    async def models():
        return live.service.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return live.service.model(model_id)

    @app.get("/metrics")
    async def metrics():
        from fastapi.responses import Response

        body, content_type = live.service.metrics_text()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await live.openai.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await live.openai.chat_completions(request)

    @app.post("/v1/messages")
    async def create_message(request: Request):
        return await live.messages.create(request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        return await live.messages.count_tokens(request)

    @app.post("/v1/embeddings")
    async def create_embeddings(request: Request):
        return await live.embeddings.create(request)

    @app.post("/v1/responses")
    async def create_response(request: Request):
        return await live.responses.create(request)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await live.service.adapter_call("load", request)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await live.service.adapter_call("unload", request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return live.responses.retrieve(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return live.responses.delete(response_id)

    return app


class _Guard:
    """The key and the declared body size, checked before a request reaches its route
    (:meth:`Service.refuse`). A plain ASGI middleware: starlette's ``BaseHTTPMiddleware`` would pass
    every streamed chunk through a memory stream of its own (measured: a third of what streaming
    cost the server a token at batch 8)."""

    def __init__(self, app: Any, service: Service) -> None:
        """
        Args:
            app: the application it guards.
            service: the server's core, whose ``refuse`` decides.
        """
        self.app, self.service = app, service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            from starlette.requests import Request

            refused = self.service.refuse(Request(scope))
            if refused is not None:
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    ``slot_length``, ``paged_slots``, ``kv_budget``); ``options``: :class:`ServeOptions`, checked before the server listens.
    Connections: idle ones close after 5 s between requests, and one that has not sent a whole
    request head within ``header_timeout_s`` (half-open, or a client that stalls in its headers) is
    closed."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise NextokenError("serving needs FastAPI and uvicorn: pip install 'nextoken[serve]'") from None

    options = options or ServeOptions()
    engine_options = dict(engine_options or {})
    scheduler_options = dict(scheduler_options or {})
    cache_note = ""
    from ..manifest import Manifest

    if Manifest.load(package).embeds:  # an embedding package keeps no KV cache to reuse
        engine_options.setdefault("prefix_cache_bytes", 0)
    if "prefix_cache_bytes" not in engine_options:  # on by default, sized from the memory free now
        from ..device import resolve_device
        from ..tools.memory import prefix_cache_budget

        window = Manifest.load(package).context_length
        context = scheduler_options.get("slot_length") or min(window, 2048)
        device = resolve_device(str(engine_options.get("device", "auto")), engine_options.get("tf32")).device
        budget, why = prefix_cache_budget(package, max_batch, context, device)
        engine_options["prefix_cache_bytes"] = budget
        cache_note = f"; prefix cache {budget / 2**20:.0f} MiB ({why}; --prefix-cache-mb sets it, 0: off)"
    elif engine_options["prefix_cache_bytes"]:
        cache_note = f"; prefix cache {engine_options['prefix_cache_bytes'] / 2**20:.0f} MiB"
    if not engine_options.get("prefix_cache_bytes"):
        engine_options.pop("prefix_cache_dir", None)
        engine_options.pop("prefix_cache_disk_bytes", None)
    engine = Engine(package, **engine_options)
    name = model_name or Path(package).resolve().name
    with engine, Scheduler(engine, max_batch=max_batch, **scheduler_options) as scheduler:
        app = create_app(scheduler, name, options)
        if app.state.service.checker is not None:
            app.state.service.checker.start()  # the first constrained request does not wait for it
        slots = (
            f"{scheduler.max_batch} slots of {scheduler.slot_length} positions"
            if scheduler.kv.slot_count
            else f"batches of up to {scheduler.max_batch}"
        )
        if scheduler.kv.slot_count and scheduler.paged_slots:
            slots += ", paged (memory as written)"
        if scheduler.kv_budget is not None:
            slots += f", KV budget {scheduler.kv_budget / 2**20:.0f} MiB"
        print(
            f"nextoken: serving {name} ({engine.path}) at http://{host}:{port}/v1 on {engine.device.provider}; "
            f"KV backend {scheduler.kv_backend}, {slots}; spin {'on' if engine.spin else 'off'} ({engine.spin_reason})"
            + cache_note
            + ("; API key required" if options.api_key else "")
            + (f"; drafts {', '.join(options.drafts)}" if options.drafts else "")
            + (f"; adapters {', '.join(engine.adapters)}" if engine.adapters else ""),
            flush=True,
        )
        run_app(app, host, port, header_timeout_s)


def run_app(app: Any, host: str, port: int, header_timeout_s: float = 10.0) -> None:
    """Serve ``app`` with uvicorn until interrupted: idle connections close after 5 s, and one that
    has not sent a whole request head within ``header_timeout_s`` is closed; one access line a request."""
    import uvicorn

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
