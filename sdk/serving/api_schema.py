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

__all__ = [
    "ACCEPTED",
    "NEXTOKEN_FIELDS",
    "REFUSED",
    "SEED_RANGE",
    "ChatRequest",
    "CompletionRequest",
    "CountTokensRequest",
    "EmbedOptions",
    "EmbeddingsRequest",
    "MessagesRequest",
    "NextokenOptions",
    "ResponsesRequest",
]

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
SERVER_FIELDS = ("tool_fallback", "reasoning_parser", "tool_parser")
#: Newer OpenAI fields accepted and what they mean here: none changes the answer.
ACCEPTED = {
    "user": "ignored (an end-user id for the provider's abuse monitoring)",
    "metadata": "ignored (key-value tags for the provider's stored completions)",
    "store": "ignored (nothing is stored; request records are the operator's --record-dir)",
    "service_tier": "ignored (one tier); answers say service_tier 'default'",
    "reasoning_effort": "ignored (the template's own switches are chat_template_kwargs)",
    "prompt_cache_key": "ignored (the prefix cache keys on the prompt's tokens themselves)",
    "safety_identifier": "ignored (an end-user id for the provider's abuse monitoring)",
    "verbosity": "ignored (the answer's length is max_tokens and the model's)",
}
#: The seed range OpenAI's clients send (an int64, or a uint64); a negative seed is taken modulo 2**64.
SEED_RANGE = (-(2**63), 2**64)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


def _nextoken_options() -> type:
    hints = typing.get_type_hints(SamplingParams)
    fields: dict[str, Any] = {name: (hints[name] | None, None) for name in NEXTOKEN_FIELDS}
    fields["tool_fallback"] = (bool | None, None)
    fields["reasoning_parser"] = (str | None, None)
    fields["tool_parser"] = (str | None, None)
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
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    priority: int | None = None  # vLLM's field (SamplingParams.priority), as its clients send it
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
    """``POST /v1/completions``: a prompt (text or token ids), or a list of them."""

    prompt: str | list[int] | list[str] | list[list[int]]
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
        return "\n".join(part.text for part in self.content)  # as vLLM and llama.cpp's server join parts


class ChatRequest(_Common):
    """``POST /v1/chat/completions``: a conversation rendered with the model's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = None


class ResponsesRequest(_Strict):
    """``POST /v1/responses``: OpenAI's Responses API (input items, instructions, function tools,
    ``text.format``, a stored conversation continued by ``previous_response_id``)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    reasoning: dict[str, Any] | None = None
    user: str | None = None
    truncation: typing.Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    background: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    nextoken: NextokenOptions | None = None  # type: ignore[valid-type]


class MessagesRequest(_Strict):
    """``POST /v1/messages``: Anthropic's Messages API (system, messages of content blocks, tools,
    tool_choice, stop_sequences, thinking)."""

    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = None
    top_k: int | None = Field(None, ge=1)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    # accepted without effect: prompt caching is automatic (the prefix cache), one place, one speed
    cache_control: dict[str, Any] | None = None
    inference_geo: str | None = None
    speed: str | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None
    diagnostics: dict[str, Any] | None = None
    container: Any | None = None
    nextoken: NextokenOptions | None = None  # type: ignore[valid-type]


class EmbedOptions(_Strict):
    """nextoken's own embedding options: ``prompt``, the name of one of the model's prompts put
    before each text (e.g. ``"query"``; its sentence-transformers config names them)."""

    prompt: str | None = None


class EmbeddingsRequest(_Strict):
    """``POST /v1/embeddings``: texts or token ids (one, or a list), as floats or base64."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: typing.Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    nextoken: EmbedOptions | None = None


class CountTokensRequest(_Strict):
    """``POST /v1/messages/count_tokens``: what a Messages request's prompt would take."""

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
