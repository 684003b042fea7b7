"""Chat templates: a list of role/content messages -> the prompt text the model was trained on.

Templates come from the model (tokenizer_config.json's ``chat_template``) and are rendered in
Jinja's immutable sandbox: the template sees the messages (plain strings in plain dicts), the
special tokens and ``add_generation_prompt``, and no other Python object.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .errors import InvalidRequestError, ModelPackageError

__all__ = ["render_chat", "Message"]

Message = Mapping[str, str]


class TemplateError(InvalidRequestError):
    """The chat template refused the messages (e.g. raise_exception in the template)."""


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template refused the messages: {message}")


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"message {i} must be a dict with string 'role' and 'content', not {m!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render_chat(template: str | None, messages: Sequence[Message], special_tokens: Mapping[str, str],
                add_generation_prompt: bool = True) -> str:
    """Render ``messages`` with ``template`` in a sandbox; a model without a template is a clear error."""
    if not template:
        raise ModelPackageError(
            "this model has no chat template (tokenizer_config.json has no chat_template); "
            "use generate() with a plain prompt instead"
        )
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=_check_messages(messages), add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in special_tokens.items() if isinstance(v, str)},
        )
    except (TemplateError, InvalidRequestError):
        raise
    except JinjaError as exc:
        raise ModelPackageError(f"the model's chat template cannot be rendered: {exc}") from None
