"""The OpenAI protocol's side of the server: request bodies into :class:`~nextoken.SamplingParams`,
results into OpenAI's response shapes, and the one map from an error to its HTTP answer. No I/O:
the services (:mod:`nextoken.serving.core`, :mod:`nextoken.serving.openai_api`) call these."""
# No `from __future__ import annotations`: pydantic and FastAPI read annotations at run time.

import json
from typing import Any

from ..errors import InvalidRequestError, PluginError, SchedulerStoppedError
from ..types import Completion, SamplingParams, TokenLogprob

__all__ = [
    "FINISH",
    "APIError",
    "api_error",
    "chat_logprobs",
    "completion_logprobs",
    "error_response",
    "extras_of",
    "logprobs_of",
    "openai_params",
    "parse_body",
    "prompt_logprobs",
    "usage_of",
]

#: OpenAI's finish reasons for nextoken's.
FINISH = {
    "stop": "stop",
    "length": "length",
    "context": "length",
    "deadline": "length",
    "cancelled": "stop",
    "tool_calls": "tool_calls",
}


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


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
    """An OpenAI-shaped error response."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def json_object(raw: bytes) -> dict[str, Any]:
    """A body without a schema of its own (load and unload calls, a router's look at ``model``) as
    a JSON object, or the 400 that says it is not one."""
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def parse_body(raw: bytes, schema):
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


def openai_params(req, chat: bool, defaults: dict[str, float]) -> SamplingParams:
    """SamplingParams from a validated request (and its ``nextoken`` extras)."""
    from .api_schema import REFUSED

    for name, unused in REFUSED.items():
        value = getattr(req, name, None)
        if value is not None and value != unused:
            raise APIError(400, f"{name} is not supported by this server yet; leave it out", param=name)
    from .api_schema import SERVER_FIELDS

    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")

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
        seed=None if req.seed is None else req.seed % 2**64,
        top_logprobs=logprobs,
        n=req.n,
        response_format=req.response_format,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=req.logit_bias or {},
    )
    if max_tokens is not None:
        kwargs["max_new_tokens"] = max_tokens
    priority = getattr(req, "priority", None)
    if priority is not None:
        if "priority" in extras and extras["priority"] != priority:
            raise APIError(
                400, "priority is given twice, differently (top level and nextoken.priority)", param="priority"
            )
        kwargs["priority"] = priority
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


def completion_logprobs(items: list, offset: int, first: str | None = None) -> dict:
    """OpenAI's legacy completions ``logprobs`` object for ``items`` (TokenLogprob), text from
    ``offset``; each token's alternatives include the token itself (OpenAI reports the sampled
    token even with ``logprobs: 0``). ``first``: an echoed prompt's first token, which has no
    log-probability (nothing came before it)."""
    offsets, at = [], offset
    if first is not None:
        offsets.append(at)
        at += len(first)
    for lp in items:
        offsets.append(at)
        at += len(lp.token)
    lead: list = [] if first is None else [None]
    return {
        "tokens": ([] if first is None else [first]) + [lp.token for lp in items],
        "token_logprobs": lead + [lp.logprob for lp in items],
        "top_logprobs": lead + [{**{t: v for _, t, v in lp.top}, lp.token: lp.logprob} for lp in items],
        "text_offset": offsets,
    }


def chat_logprobs(items: list) -> dict:
    """OpenAI's chat ``logprobs`` object (``content``: one entry per token, with its alternatives)."""

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for _, t, v in lp.top]} for lp in items
        ],
        "refusal": None,
    }


def logprobs_of(items: list | None, chat: bool, offset: int) -> dict | None:
    if items is None:
        return None
    return chat_logprobs(items) if chat else completion_logprobs(items, offset)


def usage_of(completions: list[Completion], n: int = 1) -> dict:
    """OpenAI's usage of a request: each prompt counted once (its ``n`` choices are in a row),
    every choice's tokens."""
    firsts = completions[::n]
    prompt = sum(c.usage.prompt_tokens for c in firsts)
    generated = sum(c.usage.completion_tokens for c in completions)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": sum(c.usage.cached_tokens for c in firsts)},
        "completion_tokens_details": {"reasoning_tokens": sum(c.usage.reasoning_tokens for c in completions)},
    }


def prompt_logprobs(logits: Any, ids: list[int], top: int, text: Any) -> list[TokenLogprob]:
    """Each prompt token after the first, with its log-probability under the model given the ones
    before it and the ``top`` likeliest there (``logits``: the model's ``[S, V]`` over ``ids``;
    ``text``: a token's text), as echo with logprobs reports them."""
    import numpy as np

    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    out = []
    for i in range(1, len(ids)):
        row = logp[i - 1]
        best = np.argsort(-row, kind="stable")[:top] if top else np.zeros(0, dtype=np.int64)
        alternatives = tuple((int(t), text(int(t)), float(row[t])) for t in best)
        out.append(TokenLogprob(ids[i], text(ids[i]), float(row[ids[i]]), alternatives))
    return out


def extras_of(completions: list[Completion]) -> dict:
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
