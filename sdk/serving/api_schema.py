"""The server's request bodies as typed schemas (pydantic, which FastAPI brings: extra ``serve``).

Strict: a JSON value of the wrong type is a 400 naming the field, never coerced (``"yes"`` is not
a boolean) and never a 500. Unknown fields are refused by name. The ``nextoken`` object's fields
are generated from :class:`~nextoken.SamplingParams`' own field definitions, so the SDK and the
server accept the same options; SamplingParams then checks their ranges.

OpenAI parameters nextoken does not implement yet are declared, so that a request using them is
refused with a 400 that names the parameter instead of being silently ignored (:data:`REFUSED`).
"""
# No `from __future__ import annotations`: pydantic reads these annotations at run time.

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..types import MAX_CHOICES, MAX_TOP_LOGPROBS, SamplingParams

__all__ = ["NEXTOKEN_FIELDS", "REFUSED", "ChatRequest", "CompletionRequest", "NextokenOptions"]

#: SamplingParams fields a request may set in its ``nextoken`` object (their ``api`` metadata).
NEXTOKEN_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.metadata.get("api") == "nextoken")

#: OpenAI parameters refused with a 400 until nextoken implements them (value that means "unused").
REFUSED = {
    "best_of": 1,
    "suffix": None,
    "functions": None,
    "function_call": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
}
#: nextoken object fields that are the server's, not SamplingParams' (how a chat request takes tools).
SERVER_FIELDS = ("tool_fallback",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


def _nextoken_options() -> type:
    hints = typing.get_type_hints(SamplingParams)
    fields: dict[str, Any] = {name: (hints[name] | None, None) for name in NEXTOKEN_FIELDS}
    fields["tool_fallback"] = (bool | None, None)
    model = create_model("NextokenOptions", __base__=_Strict, **fields)
    model.__doc__ = "nextoken's own parameters, as SamplingParams defines them."
    return model


NextokenOptions = _nextoken_options()


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0)
    user: str | None = None
    nextoken: NextokenOptions | None = None  # type: ignore[valid-type]
    # declared to be refused by name (REFUSED)
    best_of: int | None = None
    response_format: Any | None = None
    tools: Any | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = None
    functions: Any | None = None
    function_call: Any | None = None
    audio: Any | None = None
    modalities: Any | None = None
    prediction: Any | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``: one prompt, text or token ids."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class TextPart(_Strict):
    type: typing.Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message: a role and its text (a string, or text parts). Other fields (name ...) pass."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Common):
    """``POST /v1/chat/completions``: a conversation rendered with the model's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
