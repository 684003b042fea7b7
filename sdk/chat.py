"""Chat templates: a list of role/content messages -> the prompt text the model was trained on.

Templates come from the model (tokenizer_config.json's ``chat_template``) and are rendered in
Jinja's immutable sandbox: the template sees the messages (plain strings in plain dicts), the
special tokens and ``add_generation_prompt``, and no other Python object. A render is bounded:
at most :data:`MAX_RENDER_SECONDS` of loops and :data:`MAX_RENDER_CHARS` of output (a template
that loops without end, or multiplies a string into gigabytes, is an error, not a stalled server).
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import InvalidRequestError, ModelPackageError

__all__ = ["MAX_RENDER_CHARS", "MAX_RENDER_SECONDS", "Message", "render_chat"]

Message = Mapping[str, Any]

#: The longest a chat template may render, and the most characters it may produce.
MAX_RENDER_SECONDS = 2.0
MAX_RENDER_CHARS = 4 << 20

_deadline = threading.local()


class TemplateError(InvalidRequestError):
    """The chat template refused the messages (e.g. raise_exception in the template)."""


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template refused the messages: {message}")


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, Mapping) else None
        content = m.get("content") if isinstance(m, Mapping) else None
        if content is None and calls:  # an assistant turn that only called tools
            content = ""
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise InvalidRequestError(f"message {i} must be a dict with string 'role' and 'content', not {m!r}")
        checked: dict[str, Any] = {"role": m["role"], "content": content}
        if calls is not None:
            if not isinstance(calls, list) or not all(isinstance(c, Mapping) for c in calls):
                raise InvalidRequestError(f"message {i}: tool_calls must be a list of calls")
            checked["tool_calls"] = [dict(c) for c in calls]
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                checked[key] = m[key]
        out.append(checked)
    return out


class _RenderLimit(ModelPackageError):
    """A chat template went past the render limits."""


def _check_time() -> None:
    if time.perf_counter() > getattr(_deadline, "at", float("inf")):
        raise _RenderLimit(f"the model's chat template ran past {MAX_RENDER_SECONDS:g} s; it loops without end")


def _range(*args: int):
    """``range`` for templates: bounded in length, and stopped at the render's deadline."""
    r = range(*args)
    if len(r) > 100_000:
        raise _RenderLimit(f"the model's chat template asked for a range of {len(r)} numbers (at most 100000)")
    for i in r:
        _check_time()
        yield i


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            _check_time()
            if operator == "**" and isinstance(right, int) and abs(right) > 1000:
                raise _RenderLimit(f"the model's chat template raised a number to the power {right}")
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if (
                        isinstance(seq, (str, list, tuple))
                        and isinstance(times, int)
                        and len(seq) * times > MAX_RENDER_CHARS
                    ):
                        raise _RenderLimit(f"the model's chat template made a value over {MAX_RENDER_CHARS} long")
            return super().call_binop(context, operator, left, right)

    env = Env(trim_blocks=True, lstrip_blocks=True, autoescape=False, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["range"] = _range
    return env.from_string(template)


def _check_extra(extra: Mapping[str, Any] | None, special_tokens: Mapping[str, str]) -> dict[str, Any]:
    """A request's template variables: JSON values under identifiers that the template's own
    variables (messages, tools, add_generation_prompt, the special tokens) do not use."""
    if not extra:
        return {}
    if not isinstance(extra, Mapping):
        raise InvalidRequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    reserved = {"messages", "tools", "add_generation_prompt", *special_tokens}
    for key, value in extra.items():
        if not isinstance(key, str) or not key.isidentifier() or key in reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs: {key!r} is not a name a request may set (an identifier other than "
                f"{', '.join(sorted(reserved))})",
                param="chat_template_kwargs",
            )
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise InvalidRequestError(
                f"chat_template_kwargs.{key} must be a JSON value", param="chat_template_kwargs"
            ) from None
    return dict(extra)


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    special_tokens: Mapping[str, str],
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Render ``messages`` (and ``tools``, as transformers passes them) with ``template`` in a
    sandbox, within the render limits; a model without a template is a clear error. ``extra``: more
    variables for the template (a request's ``chat_template_kwargs``: JSON values, under names the
    template's own variables do not use)."""
    if not template:
        raise ModelPackageError(
            "this model has no chat template (tokenizer_config.json has no chat_template), so it cannot take "
            "messages; send a plain prompt instead (Engine.generate, `nextoken generate`, or POST /v1/completions)"
        )
    from jinja2 import TemplateError as JinjaError

    checked = _check_messages(messages)
    variables = _check_extra(extra, special_tokens)
    _deadline.at = time.perf_counter() + MAX_RENDER_SECONDS
    try:
        compiled = _compile(template)
        out, size = [], 0
        for piece in compiled.generate(
            messages=checked,
            add_generation_prompt=add_generation_prompt,
            **({"tools": list(tools)} if tools else {}),
            **{k: v for k, v in special_tokens.items() if isinstance(v, str)},
            **variables,
        ):
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise _RenderLimit(f"the model's chat template rendered over {MAX_RENDER_CHARS} characters")
            _check_time()
            out.append(piece)
        return "".join(out)
    except (TemplateError, InvalidRequestError, _RenderLimit):
        raise
    except JinjaError as exc:
        raise ModelPackageError(f"the model's chat template cannot be rendered: {exc}") from None
    except (RecursionError, MemoryError, OverflowError, TypeError, ValueError, ArithmeticError) as exc:
        raise ModelPackageError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        _deadline.at = float("inf")
