"""The server's core, shared by every API it speaks (:mod:`nextoken.serving.openai_api` ...):
the operator's options, admission, request parameters, submission, and each request's events
delivered to its handler on the event loop."""
# No `from __future__ import annotations` here: FastAPI reads annotations at run time.

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..engine import Engine
from ..errors import InvalidRequestError, NextokenError, is_number
from ..reasoning import ReasoningParser
from ..scheduler import RequestHandle, Scheduler
from ..toolcalls import CallStream, ToolRequest
from ..types import Completion, SamplingParams, StreamEvent, TokenLogprob
from .constraints import BUDGET_S
from .protocol import APIError, api_error, error_response, json_object, openai_params, parse_body

__all__ = [
    "AnswerStream",
    "ClientGone",
    "Delta",
    "ServeOptions",
    "Service",
    "authorized",
    "coalesce",
    "load_drafts",
    "read_body",
    "refusal",
    "sampling_defaults",
]

log = logging.getLogger("nextoken.serving")

#: generation_config.json keys the server takes as sampling defaults, and their SamplingParams names
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(package: Path) -> dict[str, Any]:
    """The sampling defaults a package's generation_config.json sets (the server's defaults for it)."""
    path = Path(package) / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in GENERATION_DEFAULTS if is_number(config.get(k))}


def authorized(request, api_key: str | None) -> bool:
    """Whether the request carries ``api_key``: ``Authorization: Bearer KEY`` (the scheme in any
    case) as OpenAI's clients send it, or ``x-api-key: KEY`` as Anthropic's do; compared in
    constant time."""
    import hmac

    want = (api_key or "").encode()
    scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), want):
        return True
    other = request.headers.get("x-api-key")
    return other is not None and hmac.compare_digest(other.strip().encode(), want)


def refusal(request, api_key: str | None, max_body_bytes: int) -> Any:
    """The error response for a request without the API key (every path but ``/health``) or with a
    declared body over ``max_body_bytes``, else None."""
    if api_key is not None and request.url.path != "/health" and not authorized(request, api_key):
        return error_response(
            401,
            "missing or wrong API key (Authorization: Bearer ...)",
            "authentication_error",
            code="invalid_api_key",
        )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
        return error_response(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
    return None


async def read_body(request, max_body_bytes: int, timeout_s: float) -> bytes:
    """The body, read a chunk at a time: the size limit holds for chunked uploads too (413), a body
    that stalls ``timeout_s`` between chunks is a 408, and a client gone is :class:`ClientGone`."""
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body stalled for {timeout_s:g} s", code="request_timeout") from None
        except ClientDisconnect:
            raise ClientGone() from None
        size += len(chunk)
        if size > max_body_bytes:
            raise APIError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class ClientGone(Exception):
    """The client went away while its body was read."""


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
    render, tokenise and check requests, off the event loop; ``max_tokens_default``: the most a
    chat answer gets when its request sets no ``max_tokens`` (None: as much as the window leaves);
    ``chat_template_name``: the name of the chat template given at start (``--chat-template``),
    as ``/v1/models`` shows it; ``reasoning_parser``: how chat answers' thinking is split off
    (``auto``: ``think`` for a template that closes a think tag; ``none``; a parser's name), unless
    a request names one (``nextoken.reasoning_parser``); ``tool_parser``: the format tool calls
    are written and constrained in (``auto``: the chat template's; a format's name), unless a
    request names one (``nextoken.tool_parser``); ``runtime_adapters``: clients with the key may
    load and unload LoRA adapters by path (``POST /v1/load_lora_adapter``; off: the adapters given
    at start only, as vLLM keeps it behind a switch: a path is read from the server's disk)."""

    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_pending: int = 256
    body_timeout_s: float = 30.0
    speculative: Mapping[str, Any] | None = None
    drafts: Mapping[str, str] = dataclasses.field(default_factory=dict)
    record_dir: str | None = None
    constraint_budget_s: float = BUDGET_S
    prep_workers: int = 2
    max_tokens_default: int | None = None
    chat_template_name: str | None = None
    reasoning_parser: str = "auto"
    tool_parser: str = "auto"
    runtime_adapters: bool = False


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


@dataclasses.dataclass
class Delta:
    """What one choice made since its handler last looked: its ``text``, its last token, each
    token's log-probability (when asked), and its finish reason once it has one."""

    index: int
    text: str = ""
    token_id: int | None = None
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


def coalesce(events: list[StreamEvent]) -> list[Delta]:
    """Stream events as one :class:`Delta` a choice, in the order choices first appear."""
    out: dict[int, Delta] = {}
    for event in events:
        delta = out.setdefault(event.index, Delta(event.index))
        delta.text += event.text
        if event.token_id is not None:
            delta.token_id = event.token_id
        if event.logprob is not None:
            delta.logprobs.append(event.logprob)
        if event.finish_reason:
            delta.finish_reason = event.finish_reason
    return list(out.values())


class AnswerStream:
    """One choice's answer as it streams, in the pieces every API shows: its thinking
    (``("thinking", text)``, with a reasoning parser), its text (``("text", text)``), and with
    tools its calls as they form (:class:`~nextoken.toolcalls.CallStream`'s ``call`` and
    ``arguments`` pieces); :attr:`calls` holds the calls found."""

    def __init__(self, parser: ReasoningParser | None, tail: str, tools: ToolRequest | None) -> None:
        """
        Args:
            parser: the reasoning parser (None: no thinking is split off).
            tail: the text the prompt ends with (where a template may open the thinking).
            tools: the tools the answer may call (None: all its text is text).
        """
        self.splitter = parser.splitter(tail) if parser is not None else None
        self.calls = CallStream(tools) if tools is not None else None

    def feed(self, text: str, ending: bool = False) -> list[tuple]:
        """The pieces ``text`` settles (``ending``: the answer's last text: nothing is held back)."""
        thought, said = ("", text) if self.splitter is None else self.splitter.feed(text)
        if ending and self.splitter is not None:
            more = self.splitter.flush()
            thought, said = thought + more[0], said + more[1]
        out: list[tuple] = [("thinking", thought)] if thought else []
        if self.calls is None:
            return out + ([("text", said)] if said else [])
        return out + self.calls.feed(said) + (self.calls.flush() if ending else [])

    def settle(self, completion: Completion) -> None:
        """Give the finished ``completion`` the text and calls found as it streamed (with tools)."""
        if self.calls is not None:
            completion.text = self.calls.text.strip()
            if self.calls.calls:
                completion.tool_calls, completion.finish_reason = list(self.calls.calls), "tool_calls"


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Service:
    """The core every API of the server shares, over one :class:`~nextoken.Scheduler`, as
    :class:`ServeOptions` says: admission (the key, the body, the model, the load), request
    parameters and their constraint, submission, and each request's events and result delivered
    to its handler on the event loop. The event loop only moves bytes: a request's body is parsed,
    its prompt rendered and tokenised, its constraint checked and the request submitted on the
    preparation workers; no thread waits for a request (:meth:`events`, :meth:`finished`)."""

    def __init__(self, scheduler: Scheduler[Engine], model_name: str, options: ServeOptions | None = None) -> None:
        """
        Args:
            scheduler: the running scheduler over the served engine.
            model_name: the name clients ask for.
            options: the server's settings (default: :class:`ServeOptions`' defaults).
        """
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

    async def off_loop(self, fn, *args):
        """``fn(*args)`` on a preparation worker, awaited."""
        return await asyncio.wrap_future(self.prep.submit(fn, *args))

    # -- around every request --------------------------------------------------------------------------
    def refuse(self, request) -> Any:
        """The error response for a request without the API key or with a declared body over the
        limit, else None (:func:`refusal`)."""
        return refusal(request, self.api_key, self.max_body_bytes)

    async def read(self, request) -> bytes:
        """The body, read a chunk at a time (:func:`read_body`)."""
        return await read_body(request, self.max_body_bytes, self.body_timeout_s)

    def parse(self, raw: bytes, schema):
        """The body validated against ``schema``, for this server's model or one of its adapters."""
        body = parse_body(raw, schema)
        if body.model is not None and body.model not in self.names:
            raise APIError(
                404,
                f"model {body.model!r} is not served here; GET /v1/models lists {', '.join(map(repr, self.names))}",
                code="model_not_found",
                param="model",
            )
        return body

    @property
    def names(self) -> list[str]:
        """The model names requests may ask for: the package's, then its LoRA adapters' (as vLLM
        serves them: a request's ``model`` picks the adapter)."""
        return [self.model_name, *self.engine.adapters]

    async def adapter_call(self, action: str, request: Any) -> dict[str, Any]:
        """``POST /v1/load_lora_adapter`` (``lora_name``, ``lora_path``) or ``/v1/unload_lora_adapter``
        (``lora_name``), vLLM's shapes: the adapter loaded or unloaded, or the 4xx that says why not."""
        if not self.options.runtime_adapters:
            raise APIError(
                403,
                "loading adapters at run time is off here: start the server with --runtime-adapters (and an "
                "API key), or name the adapters at start with --lora-modules NAME=PATH",
                code="runtime_adapters_off",
            )
        body = json_object(await self.read(request))
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or (action == "load" and not isinstance(path, str)):
            need = "lora_name and lora_path" if action == "load" else "lora_name"
            raise APIError(400, f"{action}ing an adapter takes {need} (strings)", param="lora_name")
        if name == self.model_name:
            raise APIError(400, f"{name!r} is the package's own name; name the adapter otherwise", param="lora_name")
        known = name in self.engine.adapters
        try:
            if action == "load":
                await self.off_loop(self.engine.load_adapter, name, path)
            else:
                self.engine.unload_adapter(name)
        except InvalidRequestError as exc:
            status = 404 if action == "unload" and not known else 409 if "in hand" in str(exc) else 400
            raise APIError(status, str(exc), param="lora_name") from None
        except NextokenError as exc:
            raise APIError(400, str(exc), param="lora_path") from None
        state = "loaded" if action == "load" else "unloaded"
        return {"lora_name": name, "status": state, "adapters": self.engine.adapters}

    def name_of(self, handle: RequestHandle) -> str:
        """The model name an answer carries: the adapter's it ran with, else the package's."""
        return handle.generation.params.adapter or self.model_name

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

    # -- what every API serves -----------------------------------------------------------------------
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
        """``GET /v1/models``: the model served, then its adapters."""
        return {"object": "list", "data": [self.model(name) for name in self.names]}

    def model(self, model_id: str) -> dict:
        """``GET /v1/models/{id}``: the served model or one of its adapters (``parent``: the
        package's name, as vLLM lists them), or a 404 naming those there are."""
        if model_id not in self.names:
            raise APIError(
                404,
                f"model {model_id!r} is not served here; this server serves {', '.join(map(repr, self.names))}",
                code="model_not_found",
                param="model",
            )
        if model_id != self.model_name:
            return {
                "id": model_id,
                "object": "model",
                "created": self.created,
                "owned_by": "nextoken",
                "parent": self.model_name,
                "max_model_len": self.scheduler.max_sequence_length,
            }
        template = self.options.chat_template_name or ("the package's" if self.engine.chat_template else None)
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "nextoken",
            "max_model_len": self.scheduler.max_sequence_length,
            "chat_template": template,
        }

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
        params = openai_params(req, chat, self.defaults)
        model = getattr(req, "model", None)
        if model is not None and model != self.model_name:
            params = params.replace(adapter=model)  # parse() let through adapters' names only
        try:
            params = params.replace(speculative=self.with_draft_path(params.speculative))
        except InvalidRequestError as exc:
            raise api_error(exc, param="nextoken.speculative.model") from None
        self.check_constraint(params)
        return params

    def api_params(
        self,
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        stream: bool,
        nextoken: Any,
        stop: list[str] | None = None,
        response_format: Mapping[str, Any] | None = None,
        top_logprobs: int | None = None,
        model: str | None = None,
    ) -> SamplingParams:
        """The SamplingParams of a Responses or Messages request, through the same mapping (and the
        same defaults, drafts and constraint check) as a chat request's (:meth:`params`)."""
        chat_like = SimpleNamespace(
            max_completion_tokens=max_tokens,
            max_tokens=None,
            logprobs=top_logprobs is not None,
            top_logprobs=top_logprobs,
            stop=stop,
            seed=None,
            n=1,
            response_format=response_format,
            presence_penalty=None,
            frequency_penalty=None,
            logit_bias=None,
            stream=stream,
            stream_options=None,
            temperature=temperature,
            top_p=top_p,
            nextoken=nextoken,
            model=model,
        )
        return self.params(chat_like, True)

    def render(
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        tools: tuple[Any, Any, bool, bool] | None,
        template_kwargs: Mapping[str, Any] | None,
        nextoken: Any,
        max_tokens_given: bool,
        param: str = "messages",
    ) -> tuple[list[int], SamplingParams, ToolRequest | None, ReasoningParser | None]:
        """A conversation rendered for submission, the same for every API: its tools (``(tools,
        tool_choice, parallel, fallback)`` in the chat shape), the template's extra variables, the
        reasoning parser (the request's ``nextoken.reasoning_parser``, else the server's), the
        constraint checked, and, unless the request set a length, as long an answer as the window
        leaves (or the operator's ``max_tokens_default``). Errors are 400s naming their field
        (``param`` for the conversation's)."""
        engine = self.engine
        try:
            parser = engine.reasoning_parser((nextoken and nextoken.reasoning_parser) or self.options.reasoning_parser)
        except NextokenError as exc:
            raise api_error(exc, param="nextoken.reasoning_parser") from None
        try:
            fmt = None
            if tools is not None and tools[0] is not None:
                fmt = engine.tool_format((nextoken and nextoken.tool_parser) or self.options.tool_parser)
        except NextokenError as exc:
            raise api_error(exc, param="nextoken.tool_parser") from None
        try:
            request = ToolRequest.of(*tools, format=fmt) if tools is not None else None
            ids, params = engine.chat_prompt(messages, params, request, template_kwargs)
        except NextokenError as exc:
            raise api_error(exc, param=param) from None
        params = engine.after_thinking(params, parser, ids)
        if request is not None:
            self.check_constraint(params, "tool_choice")
        if not max_tokens_given:  # no hidden cap: the window decides, unless the operator set a default
            room = max(1, self.scheduler.max_sequence_length - len(ids))
            cap = self.options.max_tokens_default
            params = params.replace(max_new_tokens=min(room, cap) if cap else room)
        return ids, params, request, parser

    def check_constraint(self, params: SamplingParams, param: str | None = None) -> None:
        """The request's constraint compiled in the checker process, or the 400 naming its field."""
        found = self.checker.problem(params) if self.checker is not None else None
        if found is not None:
            field, problem = found
            name = param or (field if field == "response_format" else f"nextoken.{field}")
            raise APIError(400, f"{name}: {problem}", param=name)

    async def answer(
        self,
        request: Any,
        prepare: Callable[[bytes], Any],
        stream: Callable[[Any], AsyncIterator[str]],
        finish: Callable[[Any, Completion], Any],
    ) -> Any:
        """The flow of an API whose request has one answer: the body read, then prepared and
        submitted on a preparation worker (``prepare`` returns what has ``handle``, ``rid`` and
        ``stream``); then the events of ``stream`` as server-sent events, or ``finish`` of the whole
        answer (a 499 when the client left first)."""
        raw = await self.read(request)
        prepared = await self.off_loop(prepare, raw)
        if prepared.stream:
            from fastapi.responses import StreamingResponse

            return StreamingResponse(stream(prepared), media_type="text/event-stream")
        completions = await self.finished(request, [prepared.handle], prepared.rid)
        if completions is None:  # nobody reads this
            raise APIError(499, "client closed the request", code="client_closed")
        self.keep_record(prepared.handle, prepared.rid)
        return finish(prepared, completions[0])

    # -- a request's events and result, on the event loop --------------------------------------------
    async def events(self, handles: list[RequestHandle]) -> AsyncIterator[list[Delta]]:
        """What requests make, as their handler can take it: everything that arrived since the
        handler last looked, one :class:`Delta` a choice (a slow reader gets its text coalesced),
        until every request has ended. Request ``i``'s choice ``j`` is index ``i * n + j`` (``n``
        its choices), as OpenAI numbers a list of prompts' choices. Fed from the scheduler's
        thread through an asyncio queue: no thread waits. Then each :meth:`RequestHandle.results
        <nextoken.RequestHandle.results>` is ready (or raises what failed it)."""
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[tuple[int, list[StreamEvent] | None]] = asyncio.Queue()

        def feed(i: int) -> Callable[[list[StreamEvent] | None], object]:
            return lambda events: loop.call_soon_threadsafe(arrived.put_nowait, (i, events))

        for i, handle in enumerate(handles):
            handle.listen(feed(i))
        live = len(handles)
        while live:
            batch = [await arrived.get()]
            while not arrived.empty():
                batch.append(arrived.get_nowait())
            live -= sum(events is None for _, events in batch)
            deltas = coalesce(
                [
                    dataclasses.replace(e, index=i * handles[i].rows + e.index)
                    for i, events in batch
                    if events
                    for e in events
                ]
            )
            if deltas:
                yield deltas

    @staticmethod
    def let_go(handles: list[RequestHandle], rid: str) -> None:
        """After a stream: requests not done are the client's that went away; cancel them (one log line)."""
        if not all(handle.done for handle in handles):
            log.info("client of %s went away mid-stream; its request is cancelled", rid)
            for handle in handles:
                handle.cancel()

    async def finished(self, request: Any, handles: list[RequestHandle], rid: str) -> list[Completion] | None:
        """Every request's choices' completions, in order, or None when the client went away
        first (then its requests are cancelled, with one log line); a failure is its HTTP error
        (:func:`api_error`)."""
        loop = asyncio.get_running_loop()
        done: list[asyncio.Future[None]] = [loop.create_future() for _ in handles]

        def settle(future: asyncio.Future[None]) -> Callable[[list[StreamEvent] | None], object]:
            return lambda events: events is None and loop.call_soon_threadsafe(_settle, future)

        for handle, future in zip(handles, done):
            handle.listen(settle(future))

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        gone: asyncio.Future[Any] = asyncio.ensure_future(disconnected())
        every: asyncio.Future[Any] = asyncio.gather(*done)
        await asyncio.wait([every, gone], return_when=asyncio.FIRST_COMPLETED)
        if not every.done():
            log.info("client of %s went away; its request is cancelled", rid)
            for handle in handles:
                handle.cancel()
            return None
        gone.cancel()
        try:
            return [c for handle in handles for c in handle.results()]
        except NextokenError as exc:
            raise api_error(exc, running=True) from None
