"""One server, many models: requests routed by their ``model`` to one of a
:class:`~nextoken.ModelPool`'s packages, each served by the single-model application
(:func:`~nextoken.serving.server.create_app`) over its own scheduler.

    nextoken serve PKG_A PKG_B [NAME=PKG_C] [--models-dir DIR] [--memory-budget 6GiB] [--pin NAME]

A request's body is read here (the key, the size limit and the stall timeout hold as for one
model), its ``model`` looked up (an unknown one: a 404 naming the models there are), the model
loaded if need be (the pool unloads idle ones, least recently used first, when the memory plan
says it would not fit; a request waits for that at most ``--load-timeout``, then a 503), and the
body handed on to that model's application, which answers it exactly as a single-model server
would. The model is held for the request until its answer has gone (streamed ones too), so a
model is never unloaded under a request.

Endpoints beyond the single-model server's: ``GET /v1/models`` lists every model with its
``state`` (unloaded, loading, loaded, unloading), ``planned_bytes``, ``pinned`` and ``in_use``;
``POST /models/load`` and ``POST /models/unload`` with ``{"model": NAME}`` (behind the API key,
the paths llama.cpp's router uses); ``/metrics`` carries a ``model`` label; ``/health`` shows
every model. LoRA adapters (``--lora-modules NAME=PATH``) go with the model whose package they were
made for: ``/v1/models`` lists each with its ``parent``, and a request naming one holds (and
loads) that model, whose application runs it with the adapter, as a single-model server does.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time.

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError, NextokenError
from ..manifest import MANIFEST_NAME
from ..pool import LoadedModel, ModelInUseError, ModelPool, PoolBusyError, UnknownModelError
from .core import ServeOptions, read_body, refusal
from .protocol import APIError, json_object

__all__ = ["attach_app", "close_app", "create_router", "models_in", "serve_models"]

log = logging.getLogger("nextoken.serving")


def models_in(packages: list[str], models_dir: str | None = None) -> dict[str, str]:
    """Model names and paths from ``packages`` (each ``PATH`` or ``NAME=PATH``; a path's folder
    name is its name) and every package folder in ``models_dir``; an InvalidRequestError when a
    name comes twice or a path is no package."""
    found: list[tuple[str, str]] = []
    for item in packages:
        name, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            name, path = Path(item).resolve().name, item
        found.append((name, path))
    if models_dir is not None:
        root = Path(models_dir)
        if not root.is_dir():
            raise InvalidRequestError(f"--models-dir {models_dir}: no such folder")
        inside = sorted(p for p in root.iterdir() if (p / MANIFEST_NAME).is_file())
        if not inside:
            raise InvalidRequestError(f"--models-dir {models_dir}: no package folders (with {MANIFEST_NAME}) in it")
        found += [(p.name, str(p)) for p in inside]
    out: dict[str, str] = {}
    for name, path in found:
        if not (Path(path) / MANIFEST_NAME).is_file():
            raise InvalidRequestError(f"{path}: not a nextoken package (no {MANIFEST_NAME}); export one first")
        if name in out:
            raise InvalidRequestError(f"two models are named {name!r} ({out[name]} and {path}); name one NAME=PATH")
        out[name] = path
    return out


def create_router(pool: ModelPool, options: ServeOptions | None = None):
    """The FastAPI application routing each request to ``pool``'s model it names (see the module's
    doc). The pool's ``on_load`` must attach each model's application
    (:func:`attach_app`); the router closes the pool when it shuts down."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response

    from .server import error_handlers

    options = options or ServeOptions()
    created = int(time.time())
    app = FastAPI(
        title="nextoken", version="1", docs_url=None, redoc_url=None, openapi_url=None, on_shutdown=[pool.close]
    )
    app.state.pool = pool

    error_handlers(app)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        refused = refusal(request, options.api_key, options.max_body_bytes)
        return refused if refused is not None else await call_next(request)

    def entry(described: dict[str, Any]) -> dict[str, Any]:
        model = pool.loaded(described["id"])
        out = {"id": described["id"], "object": "model", "created": created, "owned_by": "nextoken"}
        out.update({k: described[k] for k in ("state", "planned_bytes", "pinned", "in_use", "loads")})
        if "error" in described:
            out["error"] = described["error"]
        if model is not None:
            out["max_model_len"] = model.scheduler.max_sequence_length
        return out

    def adapter_entry(name: str) -> dict[str, Any]:
        parent = pool.adapters[name]
        out = {"id": name, "object": "model", "created": created, "owned_by": "nextoken", "parent": parent}
        out["state"] = pool.describe(parent)[0]["state"]
        return out

    def named(model_id: str) -> dict[str, Any]:
        if model_id in pool.adapters:
            return adapter_entry(model_id)
        try:
            return entry(pool.describe(model_id)[0])
        except UnknownModelError as exc:
            raise APIError(404, str(exc), code="model_not_found", param="model") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "budget_bytes": pool.budget, "held_bytes": pool.held_bytes, "models": pool.describe()}

    @app.get("/v1/models")
    async def models():
        listed = [entry(d) for d in pool.describe()] + [adapter_entry(name) for name in pool.adapters]
        return {"object": "list", "data": listed}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return named(model_id)

    async def model_of(request: Request) -> str:
        raw = await read_body(request, options.max_body_bytes, options.body_timeout_s)
        return pool.model_of(_model_named(raw, pool))

    @app.post("/models/load")
    async def load(request: Request):
        return await _in_pool(pool.load, await model_of(request))

    @app.post("/models/unload")
    async def unload(request: Request):
        return await _in_pool(pool.unload, await model_of(request))

    @app.get("/metrics")
    async def metrics():
        from ..metrics import prometheus_text

        loaded = {name: m for name in pool.names if (m := pool.loaded(name)) is not None}
        try:
            body, content_type = prometheus_text({}, {n: m.scheduler.metrics() for n, m in loaded.items()})
        except ImportError:
            raise APIError(
                501, "metrics need prometheus_client: pip install 'nextoken[serve]'", "server_error"
            ) from None
        return Response(body, media_type=content_type)

    def stored(response_id: str, method: str) -> Any:
        for name in pool.names:
            model = pool.loaded(name)
            if model is None:
                continue
            store = model.attached.state.responses
            try:
                return store.retrieve(response_id) if method == "get" else store.delete(response_id)
            except APIError as exc:
                if exc.status != 404:
                    raise
        raise APIError(404, f"no stored response {response_id!r}", code="not_found")

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str):
        return stored(response_id, "get")

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        return stored(response_id, "delete")

    @app.post("/v1/{path:path}")
    async def forward(request: Request, path: str):
        anthropic = path.startswith("messages")
        try:
            raw = await read_body(request, options.max_body_bytes, options.body_timeout_s)
            name = pool.model_of(_model_named(raw, pool))  # an adapter's: its model's
            model = pool.try_acquire(name) or await _in_pool(pool.acquire, name)
        except APIError as error:
            if anthropic:
                from .anthropic_api import anthropic_error

                return anthropic_error(error)
            raise
        return _forward(pool, model, raw)

    return app


def attach_app(options: ServeOptions) -> Any:
    """The pool's ``on_load`` for a router: each model's single-model application, its constraint
    checker started (the first constrained request does not wait for it)."""
    from .server import create_app

    def on_load(model: LoadedModel) -> Any:
        app = create_app(model.scheduler, model.name, options)
        if app.state.service.checker is not None:
            app.state.service.checker.start()
        log.info("loaded model %s (%s)", model.name, model.engine.path)
        return app

    return on_load


def close_app(model: LoadedModel) -> None:
    """The pool's ``on_unload`` for a router: the model's application closed (its checker and workers)."""
    if model.attached is not None:
        model.attached.state.close()
    log.info("unloaded model %s", model.name)


async def _in_pool(call: Any, name: str) -> Any:
    """``call(name)`` (the pool's acquire, load or unload) on a worker thread, its refusals as HTTP
    errors: 503 when no room came in time, 409 when the model is pinned or in use, 500 when the
    package failed to load."""
    try:
        return await asyncio.to_thread(call, name)
    except PoolBusyError as exc:
        raise APIError(503, str(exc), "server_busy") from None
    except ModelInUseError as exc:
        raise APIError(409, str(exc), code="model_in_use") from None
    except NextokenError as exc:
        raise APIError(500, f"model {name} failed to load: {exc}", "server_error") from None


def _model_named(raw: bytes, pool: ModelPool) -> str:
    """The model a request body names (a model or an adapter; the only model, when it names none
    and there is one), or the 400/404 that says what to name."""
    name = json_object(raw).get("model")
    if name is None and len(pool.names) == 1:
        return pool.names[0]
    names = [*pool.names, *pool.adapters]
    if not isinstance(name, str):
        raise APIError(
            400, f"model is required here: this server serves {', '.join(names)}", param="model", code="model_required"
        )
    if name not in names:
        raise APIError(
            404,
            f"model {name!r} is not served here; the models are {', '.join(names)} (GET /v1/models)",
            code="model_not_found",
            param="model",
        )
    return name


def _forward(pool: ModelPool, model: LoadedModel, raw: bytes) -> Any:
    """A response that hands the request, its body already read, to the model's application, and
    gives the model back to the pool once the answer has gone."""
    from starlette.responses import Response

    class Forward(Response):
        def __init__(self) -> None:
            super().__init__()
            self.pool, self.model, self.raw = pool, model, raw

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await _hand_on(self.pool, self.model, self.raw, scope, receive, send)

    return Forward()


async def _hand_on(pool: ModelPool, model: LoadedModel, raw: bytes, scope: Any, receive: Any, send: Any) -> None:
    """Run ``model``'s application on the request (its body ``raw``), then release the model."""
    replayed = False

    async def replay() -> Mapping[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()  # then what the client does: a disconnect cancels the request

    try:
        await model.attached(dict(scope), replay, send)
    finally:
        pool.release(model)


def serve_models(
    models: Mapping[str, str],
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 8,
    budget: int | None = None,
    pinned: tuple[str, ...] = (),
    wait_s: float = 120.0,
    adapters: Mapping[str, str] | None = None,
    engine_options: dict[str, Any] | None = None,
    scheduler_options: dict[str, Any] | None = None,
    options: ServeOptions | None = None,
    header_timeout_s: float = 10.0,
) -> None:
    """Serve ``models`` (name -> package) from one process until interrupted, within ``budget``
    bytes as planned (default: what the host has free now): :class:`~nextoken.ModelPool`, ``pinned``
    loaded at start and kept, the others on first request; ``adapters`` (name -> folder) each with
    the model it was made for. The options are :func:`serve`'s, for every model; a prefix cache
    only when ``engine_options`` sizes one (each model's is planned)."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise NextokenError("serving needs FastAPI and uvicorn: pip install 'nextoken[serve]'") from None
    from .server import run_app

    options = options or ServeOptions()
    engine_options = dict(engine_options or {})
    if not engine_options.get("prefix_cache_bytes"):
        engine_options["prefix_cache_bytes"] = 0
        engine_options.pop("prefix_cache_dir", None)
        engine_options.pop("prefix_cache_disk_bytes", None)
    pool = ModelPool(
        models,
        budget,
        pinned=pinned,
        max_batch=max_batch,
        engine_options=engine_options,
        scheduler_options=scheduler_options,
        wait_s=wait_s,
        on_load=attach_app(options),
        on_unload=close_app,
        adapters=adapters,
    )
    app = create_router(pool, options)
    listed = ", ".join(
        f"{d['id']} ({d['planned_bytes'] / 2**20:.0f} MiB{', pinned' if d['pinned'] else ''})" for d in pool.describe()
    ) + "".join(f", adapter {name} of {model}" for name, model in pool.adapters.items())
    print(
        f"nextoken: serving {len(models)} models at http://{host}:{port}/v1 within {pool.budget / 2**20:.0f} MiB "
        f"(planned): {listed}; the others load on first request" + ("; API key required" if options.api_key else ""),
        flush=True,
    )
    run_app(app, host, port, header_timeout_s)
