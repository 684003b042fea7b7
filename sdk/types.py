"""The data types of a request, shared by the engine, the loop, plugins and the server: what a
request asks for (:class:`SamplingParams`), what plugins see and return (:class:`BatchState`,
:class:`Stop`, :class:`Charge`), and what a request gives back (:class:`StreamEvent`,
:class:`Completion`, :class:`Usage`, :class:`TokenLogprob`). A leaf: it imports nothing else of
nextoken but its errors.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidRequestError, is_integer, is_number

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = [
    "CONSTRAINT_FIELDS",
    "CONTEXT_POLICIES",
    "FINISH_REASONS",
    "MAX_CHOICES",
    "PRIORITY_RANGE",
    "BatchState",
    "Charge",
    "Completion",
    "SamplingParams",
    "Stop",
    "StreamEvent",
    "TokenLogprob",
    "ToolCall",
    "Usage",
]

#: ``stop``: EOS, a stop id or a stop string; ``length``: max_new_tokens; ``context``: the window
#: is full; ``deadline``: the request's wall-time limit; ``tool_calls``: a chat answer that called
#: tools. Plugins may add their own.
FINISH_REASONS = ("stop", "length", "context", "deadline", "tool_calls")

MAX_TOP_LOGPROBS = 20
#: Choices one request may ask for (``n``): each is a sequence of the batch.
MAX_CHOICES = 64
#: A request's priority lies in [-PRIORITY_RANGE, PRIORITY_RANGE).
PRIORITY_RANGE = 2**31
#: Tokens a speculative step may guess at most.
MAX_SPECULATIVE = 16
#: Stop strings one request may bring, and the characters of each: every step checks each of them,
#: so a request with thousands would slow every request it shares a batch with.
MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 1000
#: logit_bias entries one request may bring, and the range of each bias (OpenAI's).
MAX_LOGIT_BIAS = 1024
#: Strings a ``choice`` constraint may list (llguidance's parser takes fewer than 2,000 alternatives in a rule).
MAX_CONSTRAINT_CHOICES = 1000
#: The fields that constrain the text (one at most a request).
CONSTRAINT_FIELDS = ("response_format", "regex", "choice", "grammar")
LOGIT_BIAS_RANGE = 100.0

#: What happens when a sequence outgrows the model's context window:
#: ``error`` (the default): a prompt longer than the window is refused before any work, naming both
#: lengths; a generation that fills the window ends with finish reason ``context``. Nothing the
#: caller sent is ever dropped silently.
#: ``truncate``: the oldest prompt tokens after the protected prefix are dropped so that the prompt
#: plus max_new_tokens fits.
#: ``slide``: when a generation fills the window, the oldest tokens after the protected prefix are
#: dropped (the window keeps its newest half) and the kept tokens are prefilled again from position
#: 0, so positions stay correct; generation goes on for as long as max_new_tokens allows.
CONTEXT_POLICIES = ("error", "truncate", "slide")
_ids = itertools.count(1)


def _frozen_options(value: Any, name: str) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise InvalidRequestError(f"{name} must map plugin names to option dicts, e.g. {{'top_k': {{'k': 5}}}}")
    return {str(k): dict(v) for k, v in value.items()}


def _logit_bias(value: Any) -> dict[int, float]:
    """``{token id: bias}`` checked: integer ids (JSON's string keys too), finite biases in range."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"logit_bias must map token ids to biases, e.g. {{50256: -100}}, not {value!r}"[:200])
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, not {len(value)}")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
            if isinstance(key, (bool, float)) or token < 0 or (isinstance(key, str) and not key.strip().isdigit()):
                raise ValueError
        except (TypeError, ValueError):
            raise InvalidRequestError(
                f"logit_bias keys must be token ids (non-negative integers), not {key!r}"
            ) from None
        if not is_number(bias) or not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
            raise InvalidRequestError(f"logit_bias[{token}] must be a number in [-100, 100], not {bias!r}")
        out[token] = float(bias)
    return out


def _check_constraint(params: "SamplingParams", fail: Callable[[str], None]) -> None:
    """The shape of a structured-output request (whether llguidance accepts it is the structured
    plugin's to say, before any work): at most one of response_format, regex, choice, grammar."""
    fmt = params.response_format
    if fmt is not None:
        if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            fail(
                "response_format must be {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', "
                f"'json_schema': {{'schema': {{...}}}}}}, not {fmt!r}"[:300]
            )
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), (Mapping, bool)):
                fail(
                    "response_format json_schema needs 'json_schema': {'name': ..., 'schema': {...}} with the schema "
                    "as a JSON object"
                )
        object.__setattr__(params, "response_format", None if fmt["type"] == "text" else dict(fmt))
    if params.regex is not None and (not isinstance(params.regex, str) or not params.regex):
        fail(f"regex must be a non-empty string, not {params.regex!r}")
    if params.grammar is not None and (not isinstance(params.grammar, str) or not params.grammar.strip()):
        fail(f"grammar must be the text of a Lark grammar, not {params.grammar!r}"[:200])
    choice = params.choice
    choice = () if choice is None else (choice,) if isinstance(choice, str) else choice
    if not isinstance(choice, (list, tuple)) or not all(isinstance(c, str) and c for c in choice):
        fail(f"choice must be a list of non-empty strings, not {params.choice!r}"[:200])
    if len(choice) > MAX_CONSTRAINT_CHOICES:
        fail(f"choice lists {len(choice)} strings; at most {MAX_CONSTRAINT_CHOICES} (for more, a regex or a grammar)")
    object.__setattr__(params, "choice", tuple(choice))
    tags = params.thinking
    if tags is not None:
        if not (
            isinstance(tags, (list, tuple)) and len(tags) == 2 and all(isinstance(t, str) for t in tags) and tags[1]
        ):
            fail(f"thinking must be (start tag, end tag) with an end tag, not {tags!r}"[:200])
        object.__setattr__(params, "thinking", (tags[0], tags[1]))
    given = [name for name in CONSTRAINT_FIELDS if getattr(params, name)]
    if len(given) > 1:
        fail(f"give one constraint at most, not {' and '.join(given)}")


def _field(
    default: Any,
    doc: str,
    *,
    flag: str | None = "",
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    api: str | None = "nextoken",
) -> Any:
    """A SamplingParams field with its documentation, CLI flag ("" : ``--`` and the name with
    dashes; None: none), metavar and choices, and where the server takes it (``api``)."""
    meta = {"doc": doc, "flag": flag, "metavar": metavar, "choices": tuple(choices) if choices else None, "api": api}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: one typed object, validated when made, before any work.

    Each field carries its own documentation (below, and ``dataclasses.fields`` metadata
    ``doc``), its CLI flag (``flag``) and where the server takes it (``api``: ``openai``, a top-level
    OpenAI field; ``nextoken``, the request's ``nextoken`` object); the CLI's flags and the server's
    schema are generated from them, and the ranges are checked here once.
    """

    max_new_tokens: int = _field(128, "(>= 1) tokens at most per sequence", metavar="N", api="openai")
    temperature: float = _field(
        0.0,
        "0 means greedy (the most likely token every time); above 0, tokens are sampled "
        "from softmax(logits / temperature)",
        api="openai",
    )
    top_k: int = _field(0, "keep the k likeliest tokens (0: off)")
    top_p: float = _field(1.0, "keep the likeliest tokens holding this much probability (1: off)", api="openai")
    min_p: float = _field(0.0, "drop tokens under min_p x the top token's probability (0: off)")
    repetition_penalty: float = _field(
        1.0, "divide positive logits of tokens seen (prompt and generated) and multiply negative ones by this (1: off)"
    )
    presence_penalty: float = _field(
        0.0, "subtract from the logit of every token generated so far, in [-2, 2] (0: off; OpenAI's rule)", api="openai"
    )
    frequency_penalty: float = _field(
        0.0, "subtract this times each token's count so far, in [-2, 2] (0: off)", api="openai"
    )
    logit_bias: Mapping[int, float] = _field(
        dict,
        "add a bias in [-100, 100] to token ids' logits (-100 bans a token); CLI: ID=BIAS, repeatable",
        metavar="ID=BIAS",
        api="openai",
    )
    seed: int | None = _field(
        None, "makes sampling reproducible, per sequence, whatever batch it runs in", api="openai"
    )
    strategy: str | None = _field(None, "the decoding strategy's name (default: greedy at temperature 0, else sample)")
    stop: tuple[str, ...] = _field(
        (),
        f"strings that end a sequence, cut from its text (at most {MAX_STOP_STRINGS}, "
        f"each at most {MAX_STOP_LENGTH} characters)",
        metavar="TEXT",
        api="openai",
    )
    stop_token_ids: tuple[int, ...] = _field((), "token ids that end a sequence", flag="--stop-token-id", metavar="ID")
    ignore_eos: bool = _field(False, "do not stop at the model's EOS ids: generate max_new_tokens")
    deadline_s: float | None = _field(
        None, "a request's wall-time limit, seconds", flag="--deadline", metavar="SECONDS"
    )
    top_logprobs: int | None = _field(
        None,
        f"None (off), 0 (each token's own log-probability) or N <= "
        f"{MAX_TOP_LOGPROBS} (and the N likeliest alternatives)",
        metavar="N",
        api=None,
    )
    processors: tuple[str, ...] = _field(
        (), "third-party logits processors to use, by name", flag="--processor", metavar="NAME"
    )
    stop_conditions: tuple[str, ...] = _field(
        (), "third-party stop conditions to use, by name", flag="--stop-condition", metavar="NAME"
    )
    options: Mapping[str, Mapping[str, Any]] = _field(
        dict,
        "each plugin's own options, by plugin name; CLI: NAME.KEY=VALUE, repeatable",
        flag="--option",
        metavar="NAME.KEY=VALUE",
    )
    cost_meters: Mapping[str, Mapping[str, Any]] = _field(
        dict,
        "cost meters to charge, with their options; CLI: a meter's name, repeatable (its options by --option)",
        flag="--cost",
        metavar="METER",
    )
    context_policy: str = _field(
        "error",
        "when a sequence outgrows the window: error (refuse a prompt that does not "
        "fit), truncate (drop its oldest tokens) or slide (the window, while generating)",
        choices=CONTEXT_POLICIES,
    )
    protected_prefix: int = _field(
        0, "leading prompt tokens (e.g. the system prompt) truncate and slide never drop", metavar="N"
    )
    response_format: Mapping[str, Any] | None = _field(
        None,
        "structured output, OpenAI's shape: {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': "
        "{'name': ..., 'schema': {...}}} ({'type': 'text'}: none); CLI: a JSON schema file",
        flag="--json-schema",
        metavar="FILE",
        api="openai",
    )
    regex: str | None = _field(None, "the text must match this regular expression (Rust regex syntax)", metavar="REGEX")
    choice: tuple[str, ...] = _field((), "the text must be one of these strings; CLI: repeatable", metavar="TEXT")
    grammar: str | None = _field(
        None, "the text must follow this Lark grammar (llguidance's dialect); CLI: a file", metavar="FILE"
    )
    skip_special_tokens: bool = _field(
        True,
        "leave special tokens out of the text (off: they stay, e.g. gpt-oss's <|channel|> markup, "
        "which its reasoning parser reads)",
        flag=None,
    )
    thinking: tuple[str, str] | None = _field(
        None,
        "a reasoning model's thinking tags (start, end): the constraint above holds after an optional "
        "thinking block between them, which is free (start empty: the prompt opened it, so the answer "
        "starts inside it); set by chat when a reasoning parser splits the answer",
        flag=None,
        api=None,
    )
    speculative: Mapping[str, Any] | None = _field(
        None,
        "speculative decoding: {'method': 'prompt_lookup', 'k': 4} (a proposer plugin guesses up to k tokens "
        "the model checks in one step; the same text, fewer steps); CLI: METHOD[:K[:MODEL]], MODEL a draft package",
        metavar="METHOD[:K[:MODEL]]",
    )
    record: bool = _field(
        False,
        "keep a record of the request (completion.record) to replay it later; it holds the prompt",
        flag=None,
        api=None,
    )
    n: int = _field(
        1,
        f"choices for each prompt (at most {MAX_CHOICES}): each its own sequence, from one prefill of "
        "the prompt; a seeded sampler draws choice i with seed + i",
        metavar="N",
        api="openai",
    )
    hook_timings: bool = _field(
        False, "time every plugin the request uses (usage.hook_ms; off: nothing is timed and nothing is paid)"
    )
    priority: int = _field(
        0,
        "scheduling priority, lower first (vLLM's convention): a waiting request is admitted before those "
        "of a later rank, and when the batch has no room a running request of a later rank gives way (its "
        "answer so far prefilled again when it comes back); a request's rank rises a level for every "
        "priority_aging seconds it has waited, so none starves",
        metavar="N",
    )
    adapter: str | None = _field(
        None,
        "the LoRA adapter to generate with, by the name it was loaded under (Engine(adapters=...), "
        "load_adapter; a server's model names it); None: the base model",
        flag=None,
        api=None,
    )

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise InvalidRequestError(msg)

        def number(name: str) -> float:
            value = getattr(self, name)
            if not is_number(value) or math.isnan(value):
                fail(f"{name} must be a number, not {value!r}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if not is_integer(value):
                fail(f"{name} must be an integer, not {value!r}")
            return int(value)

        if integer("max_new_tokens") < 1:
            fail(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if number("temperature") < 0 or math.isinf(self.temperature):
            fail(f"temperature must be >= 0 (0 means greedy), not {self.temperature}")
        if integer("top_k") < 0:
            fail(f"top_k must be >= 0 (0: off), not {self.top_k}")
        if not 0 < number("top_p") <= 1:
            fail(f"top_p must be in (0, 1] (1: off), not {self.top_p}")
        if not 0 <= number("min_p") < 1:
            fail(f"min_p must be in [0, 1) (0: off), not {self.min_p}")
        if not number("repetition_penalty") > 0 or math.isinf(self.repetition_penalty):
            fail(f"repetition_penalty must be > 0 (1: off), not {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                fail(f"{name} must be in [-2, 2] (0: off), not {getattr(self, name)}")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.seed is not None and (integer("seed") < 0):
            fail(f"seed must be a non-negative integer, not {self.seed}")
        if self.deadline_s is not None and not number("deadline_s") > 0:
            fail(f"deadline_s must be > 0 seconds, not {self.deadline_s}")
        if self.context_policy not in CONTEXT_POLICIES:
            fail(f"context_policy must be one of {', '.join(CONTEXT_POLICIES)}, not {self.context_policy!r}")
        if integer("protected_prefix") < 0:
            fail(f"protected_prefix must be >= 0 tokens, not {self.protected_prefix}")
        if self.top_logprobs is not None and not 0 <= integer("top_logprobs") <= MAX_TOP_LOGPROBS:
            fail(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], not {self.top_logprobs}")
        if self.temperature == 0 and self.strategy in (None, "greedy"):
            for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0)):
                if getattr(self, name) != off:
                    fail(f"{name} only matters when sampling: temperature is 0 (greedy); set temperature > 0")
        if self.stop is None:
            stop: tuple = ()
        elif isinstance(self.stop, str):
            stop = (self.stop,)
        elif isinstance(self.stop, (list, tuple)):
            stop = tuple(self.stop)
        else:
            fail(f"stop must be a string or a list of strings, not {type(self.stop).__name__}")
        if not all(isinstance(s, str) and s for s in stop):
            fail(f"stop strings must be non-empty strings, not {self.stop!r}")
        if len(stop) > MAX_STOP_STRINGS:
            fail(f"at most {MAX_STOP_STRINGS} stop strings, not {len(stop)}")
        if any(len(s) > MAX_STOP_LENGTH for s in stop):
            fail(f"a stop string may have at most {MAX_STOP_LENGTH} characters")
        object.__setattr__(self, "stop", stop)
        try:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
        except (TypeError, ValueError):
            fail(f"stop_token_ids must be integers, not {self.stop_token_ids!r}")
        for name in ("processors", "stop_conditions"):
            value = getattr(self, name)
            if value is None:
                value = ()
            elif isinstance(value, str):
                value = (value,)
            elif isinstance(value, (list, tuple)):
                value = tuple(value)
            else:
                fail(f"{name} must be a plugin name or a list of them, not {type(value).__name__}")
            object.__setattr__(self, name, value)
        _check_constraint(self, fail)
        spec = self.speculative
        if spec is not None:
            if not isinstance(spec, Mapping) or not isinstance(spec.get("method"), str):
                fail(f"speculative must be {{'method': 'prompt_lookup', 'k': 4}}, not {spec!r}"[:200])
            k = spec.get("k", 4)
            if not is_integer(k) or not 1 <= k <= MAX_SPECULATIVE:
                fail(f"speculative k must be an integer in [1, {MAX_SPECULATIVE}], not {k!r}")
            object.__setattr__(self, "speculative", {**spec, "k": int(k)})
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            fail(f"adapter must be an adapter's name, not {self.adapter!r}")
        if not -PRIORITY_RANGE <= integer("priority") < PRIORITY_RANGE:
            fail(f"priority must be an integer in [-{PRIORITY_RANGE}, {PRIORITY_RANGE}), not {self.priority}")
        if not 1 <= integer("n") <= MAX_CHOICES:
            fail(f"n must be between 1 and {MAX_CHOICES} choices, not {self.n}")
        if not isinstance(self.record, (bool, np.bool_)):
            fail(f"record must be true or false, not {self.record!r}")
        if not isinstance(self.hook_timings, (bool, np.bool_)):
            fail(f"hook_timings must be true or false, not {self.hook_timings!r}")
        object.__setattr__(self, "options", _frozen_options(self.options, "options"))
        object.__setattr__(self, "cost_meters", _frozen_options(self.cost_meters, "cost_meters"))

    @property
    def constrained(self) -> bool:
        """Whether a field of :data:`CONSTRAINT_FIELDS` holds the text to a grammar."""
        return any(getattr(self, name) for name in CONSTRAINT_FIELDS)

    @property
    def strategy_name(self) -> str:
        """The strategy this request uses: ``strategy``, or greedy at temperature 0 and sample above."""
        return self.strategy or ("greedy" if self.temperature == 0 else "sample")

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes``; unknown names are an error listing the known ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return replace(self, **changes)


def _document_fields(cls: type) -> None:
    """Append each field's documentation to the class's (the one place it is written)."""
    lines = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        lines.append(f"    ``{f.name}`` (default {default!r}): {f.metadata['doc']}.")
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n" + "\n".join(lines) + "\n"


_document_fields(SamplingParams)


@dataclass(frozen=True)
class Stop:
    """Why a sequence stops: the finish ``reason``, a ``detail`` for people, and where to cut its
    text (``text_end``, a character index; None keeps all of it)."""

    reason: str
    detail: str = ""
    text_end: int | None = None


@dataclass(frozen=True)
class Charge:
    """What a cost meter charges for one completion."""

    amount: float
    currency: str = "USD"
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the final distribution (after the processors),
    and the ``top`` alternatives as ``(token_id, token_text, logprob)``, likeliest first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()

    @property
    def prob(self) -> float:
        return math.exp(self.logprob)

    def to_dict(self) -> dict:
        return {
            "token_id": self.token_id,
            "token": self.token,
            "logprob": self.logprob,
            "top_logprobs": [{"token_id": i, "token": t, "logprob": lp} for i, t, lp in self.top],
        }


@dataclass
class Usage:
    """What one sequence of a request used. Times are milliseconds of wall clock; ``model_ms`` is
    the part spent inside ONNX Runtime (the rest is tokenising, sampling, plugins, streaming)."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float
    prefill_ms: float
    decode_tokens_per_s: float
    wall_ms: float
    model_ms: float
    steps: int
    batch_size: int
    device: str
    provider: str = ""  # the ONNX Runtime execution provider that ran it
    kv_cache_bytes: int = 0  # the request's KV cache at its largest (the whole batch)
    #: the process's peak resident memory so far (its high-water mark, Linux), sampled when the
    #: request ended: a figure of the process, not of the request (requests share it; under the
    #: scheduler it is sampled at most once a second); ``nextoken.probes.reset_peak_rss`` starts a new window
    peak_memory_bytes: int | None = None
    #: on CUDA: this process's memory on the GPU when the request ended (ONNX Runtime's arena keeps its
    #: high-water mark), from NVML; the whole device's used memory where the driver lists no processes
    device_memory_bytes: int | None = None
    #: prompt tokens whose KV cache came from the prefix cache instead of a prefill
    cached_tokens: int = 0
    #: prompt tokens whose KV cache this request stored in the prefix cache
    cache_write_tokens: int = 0
    #: speculative decoding: tokens the proposer guessed, and how many of them the model kept
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    #: with ``hook_timings``: milliseconds spent in each plugin the request used, by
    #: ``"<hook kind>:<name>"`` (e.g. ``"logits_processor:top_k"``, ``"tokenizer:decode"``)
    hook_ms: dict[str, float] | None = None
    #: a chat answer's tokens that went to its thinking (a reasoning parser split them off)
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "total_tokens": self.total_tokens}

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"prompt {self.prompt_tokens} tok, completion {self.completion_tokens} tok, "
            f"prefill {self.prefill_ms:.1f} ms, ttft {self.time_to_first_token_ms:.1f} ms, "
            f"decode {self.decode_tokens_per_s:.1f} tok/s, wall {self.wall_ms:.1f} ms, "
            f"batch {self.batch_size}, KV {self.kv_cache_bytes / (1 << 20):.1f} MiB"
            + (f", peak {self.peak_memory_bytes / (1 << 20):.0f} MiB" if self.peak_memory_bytes else "")
            + (f", GPU {self.device_memory_bytes / (1 << 20):.0f} MiB" if self.device_memory_bytes else "")
            + f", {self.device}"
        )


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: an ``id`` for the answer's ``tool`` message, the function's
    ``name``, and its ``arguments`` as JSON text."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        """The arguments as Python values."""
        import json

        return json.loads(self.arguments)

    def to_dict(self) -> dict:
        """OpenAI's shape: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Completion:
    """The result for one prompt: the generated text and ids, why it ended, its usage and cost.

    ``token_ids`` are the generated ids, including the EOS/stop id that ended the sequence (as
    transformers' ``generate`` returns them); ``text`` leaves special tokens and stop strings out.
    ``stop_detail`` says exactly what stopped it; ``logprobs`` is filled when requested;
    ``cost`` has each configured meter's :class:`Charge`.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    prompt_token_ids: list[int] = field(default_factory=list)
    stop_detail: str = ""
    logprobs: list[TokenLogprob] | None = None
    cost: dict[str, Charge] = field(default_factory=dict)
    #: the calls a chat answer made (``tools``), parsed out of its text; finish reason ``tool_calls``
    tool_calls: list[ToolCall] | None = None
    #: a reasoning model's thinking, split off its text by a reasoning parser (None: none)
    reasoning: str | None = None
    #: with ``record=True``: the request's record (:mod:`nextoken.records`), to replay it later
    record: dict | None = None

    def to_dict(self) -> dict:
        out = {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "stop_detail": self.stop_detail,
            "usage": self.usage.to_dict(),
            "cost": {k: v.to_dict() for k, v in self.cost.items()},
        }
        if self.logprobs is not None:
            out["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        if self.tool_calls is not None:
            out["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        if self.record is not None:
            out["record"] = self.record
        return out


@dataclass(frozen=True)
class StreamEvent:
    """One step's news for one sequence: ``index`` in the batch, the token it got, the ``text``
    delta now safe to show, ``finish_reason`` once it ends, and ``logprob`` when requested."""

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None


class BatchState:
    """A running request, as plugins see it: ``params``, ``prompts`` and ``generated`` ids and
    ``texts`` per sequence, ``alive`` rows, ``step`` (tokens generated so far), ``eos_token_ids``,
    ``vocab_size``, ``start_time`` (``time.perf_counter()``), ``request_id``, and ``choices``: each
    sequence's choice index among its prompt's ``n`` (0 when ``n`` is 1; a seeded sampler draws
    choice ``i`` with ``seed + i``)."""

    def __init__(
        self,
        params: SamplingParams,
        prompts: list[list[int]],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        choices: Sequence[int] | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """
        Args:
            params: the request's sampling parameters.
            prompts: each sequence's prompt ids.
            eos_token_ids: ids that end a sequence.
            vocab_size: the model's vocabulary.
            choices: each sequence's choice index among its prompt's ``n`` (default: all 0).
            tokenizer: the request's tokenizer (None for a package without one).
        """
        self.request_id = f"req-{next(_ids)}"
        self.params = params
        self.prompts = prompts
        self.choices: list[int] = list(choices) if choices is not None else [0] * len(prompts)
        #: the request's tokenizer (None for a package without one), for plugins that need the vocabulary
        self.tokenizer = tokenizer
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.texts: list[str] = ["" for _ in prompts]
        self.alive = np.ones(len(prompts), dtype=bool)
        self.step = 0
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self.start_time = time.perf_counter()
        self._presence: np.ndarray | None = None
        self._counts: np.ndarray | None = None

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    def presence(self) -> np.ndarray:
        """``[B, V]`` bool: which tokens each sequence holds (prompt and generated). Built on first
        use, then kept up to date each step."""
        if self._presence is None:
            mask = np.zeros((self.batch_size, self.vocab_size), dtype=bool)
            for row, (prompt, gen) in enumerate(zip(self.prompts, self.generated)):
                mask[row, prompt] = True
                mask[row, gen] = True
            self._presence = mask
        return self._presence

    def counts(self) -> np.ndarray:
        """``[B, V]`` int32: how many times each sequence has generated each token (the prompt not
        counted). Built on first use, then kept up to date each step."""
        if self._counts is None:
            counts = np.zeros((self.batch_size, self.vocab_size), dtype=np.int32)
            for row, gen in enumerate(self.generated):
                np.add.at(counts[row], gen, 1)
            self._counts = counts
        return self._counts

    def append(self, tokens: np.ndarray) -> np.ndarray:
        """Record one step's tokens ``[B]`` on the rows still alive (the loop's call; plugins only
        read); returns those rows."""
        self.step += 1
        rows = np.flatnonzero(self.alive)
        picked = tokens.tolist()
        for row in rows.tolist():
            self.generated[row].append(picked[row])
        if self._presence is not None:
            self._presence[rows, tokens[rows]] = True
        if self._counts is not None:
            self._counts[rows, tokens[rows]] += 1
        return rows
