"""The generation loop: prefill, then one-token decode steps, for a batch of prompts.

    prompt ids -> prefill [B, S] (KV cache filled) -> logits [B, V]
      -> logits processors (in order) -> strategy picks tokens [B] -> stop conditions per sequence
      -> text deltas (held back while they may be part of a stop string) -> decode step [B, 1] -> ...

Plugins are resolved once per request into a :class:`Pipeline` of plain callables; the loop makes
one call per processor/strategy/condition per step over the whole batch, and does no I/O: it
yields :class:`StreamEvent` s, and the finished request's :class:`Completion` s are kept.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .errors import ContextWindowError, InvalidRequestError, NextokenError, describe
from .kvcache import StepRunner, grow_mask, pad_batch
from .memory import gpu_memory, peak_rss_bytes, reset_peak_rss
from .tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Provided, Registry

__all__ = [
    "CONTEXT_POLICIES", "fit_prompt", "SamplingParams", "Usage", "Completion", "StreamEvent", "Stop", "Charge", "TokenLogprob",
    "BatchState", "Pipeline", "Generation", "FINISH_REASONS",
]

#: ``stop``: EOS, a stop id or a stop string; ``length``: max_new_tokens; ``context``: the window
#: is full; ``deadline``: the request's wall-time limit. Plugins may add their own.
FINISH_REASONS = ("stop", "length", "context", "deadline")

MAX_TOP_LOGPROBS = 20
#: Stop strings one request may bring, and the characters of each: every step checks each of them,
#: so a request with thousands would slow every request it shares a batch with.
MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 1000
#: logit_bias entries one request may bring, and the range of each bias (OpenAI's).
MAX_LOGIT_BIAS = 1024
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
            raise InvalidRequestError(f"logit_bias keys must be token ids (non-negative integers), not {key!r}") from None
        if isinstance(bias, bool) or not isinstance(bias, (int, float, np.integer, np.floating)) \
                or not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
            raise InvalidRequestError(f"logit_bias[{token}] must be a number in [-100, 100], not {bias!r}")
        out[token] = float(bias)
    return out


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: one typed object, validated when made, before any work.

    ``max_new_tokens`` (>= 1) tokens at most per sequence. ``temperature`` 0 means greedy (the
    default): the most likely token every time; above 0, tokens are sampled from
    softmax(logits / temperature) after ``top_k`` (0: off), ``top_p`` (1: off), ``min_p`` (0: off).
    ``repetition_penalty`` (1: off) divides positive logits of seen tokens and multiplies negative
    ones. ``presence_penalty`` / ``frequency_penalty`` (0: off, each in [-2, 2], OpenAI's rule) subtract
    from the logit of every token already generated: once, or once per time it was generated.
    ``logit_bias`` maps token ids to a bias in [-100, 100] added to their logits (-100 bans a token).
    ``seed`` makes sampling reproducible, per sequence, whatever batch it runs in.
    ``strategy`` names the decoding strategy (None: ``greedy`` at temperature 0, else ``sample``).
    ``stop`` strings (at most 64, each at most 1000 characters) end a sequence and are cut from its text; ``stop_token_ids`` and the model's EOS
    ids (unless ``ignore_eos``) end it too; ``deadline_s`` bounds a request's wall time.
    ``top_logprobs``: None (off), 0 (each token's own log-probability) or N (and the N likeliest).
    ``processors`` / ``stop_conditions`` name third-party plugins to use; ``options`` holds each
    plugin's own options by name; ``cost_meters`` maps meter names to their options.
    ``context_policy``: what happens when a sequence outgrows the model's window (see
    :data:`CONTEXT_POLICIES`); ``protected_prefix``: how many leading prompt tokens (e.g. the
    system prompt) ``truncate`` and ``slide`` never drop.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    strategy: str | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    deadline_s: float | None = None
    top_logprobs: int | None = None
    processors: tuple[str, ...] = ()
    stop_conditions: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    cost_meters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    context_policy: str = "error"
    protected_prefix: int = 0

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise InvalidRequestError(msg)

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or math.isnan(value):
                fail(f"{name} must be a number, not {value!r}")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
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
        if not 0 < number("repetition_penalty") or math.isinf(self.repetition_penalty):
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
        object.__setattr__(self, "options", _frozen_options(self.options, "options"))
        object.__setattr__(self, "cost_meters", _frozen_options(self.cost_meters, "cost_meters"))

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


def fit_prompt(prompt: list[int], params: SamplingParams, window: int, index: int | None = None) -> list[int]:
    """Apply the context policy to one prompt before any work: refuse it (``error``), cut it
    (``truncate``), or leave it for the loop to slide (``slide``)."""
    which = "the prompt" if index is None else f"prompt {index}"
    policy, keep = params.context_policy, params.protected_prefix
    if policy == "truncate" and len(prompt) + params.max_new_tokens > window:
        room = window - params.max_new_tokens
        if room <= keep:
            raise ContextWindowError(
                f"max_new_tokens={params.max_new_tokens} leaves {max(room, 0)} of the {window}-token context window "
                f"for {which}, not more than its protected prefix of {keep} tokens; lower max_new_tokens"
            )
        return prompt[:keep] + prompt[len(prompt) - (room - keep):]
    if len(prompt) > window or (policy == "slide" and len(prompt) >= window):
        raise ContextWindowError(
            f"{which} has {len(prompt)} tokens but the model's context window is {window}; shorten it, "
            "or use context_policy='truncate' to drop its oldest tokens"
        )
    if keep >= window // 2 and policy == "slide":
        raise ContextWindowError(
            f"protected_prefix={keep} must be under half the {window}-token window for context_policy='slide'"
        )
    return prompt


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
            "token_id": self.token_id, "token": self.token, "logprob": self.logprob,
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
    provider: str = ""                 # the ONNX Runtime execution provider that ran it
    kv_cache_bytes: int = 0            # the request's KV cache at its largest (the whole batch)
    peak_memory_bytes: int | None = None   # the process's peak resident memory during the request (Linux)
    #: on CUDA: this process's memory on the GPU after the request (ONNX Runtime's arena keeps its
    #: high-water mark), from NVML; the whole device's used memory where the driver lists no processes
    device_memory_bytes: int | None = None

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
    ``vocab_size``, ``start_time`` (``time.perf_counter()``) and ``request_id``."""

    def __init__(self, params: SamplingParams, prompts: list[list[int]], eos_token_ids: Sequence[int],
                 vocab_size: int) -> None:
        self.request_id = f"req-{next(_ids)}"
        self.params = params
        self.prompts = prompts
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

    def _append(self, tokens: np.ndarray) -> None:
        self.step += 1
        rows = np.flatnonzero(self.alive)
        for row in rows:
            self.generated[row].append(int(tokens[row]))
        if self._presence is not None:
            self._presence[rows, tokens[rows]] = True
        if self._counts is not None:
            self._counts[rows, tokens[rows]] += 1


@dataclass
class _Active:
    """A resolved plugin piece: the callable the loop calls, and where it came from (for errors)."""

    fn: Callable[..., Any]
    provided: "Provided"
    holdback: Callable[[str], int] | None = None


class Pipeline:
    """What one request runs, resolved once from the registry: processors in order, the strategy,
    the stop conditions, the cost meters, and the observers (None when no plugin listens)."""

    def __init__(self, registry: "Registry", params: SamplingParams,
                 engine_meters: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        from .registry import resolve_names

        def active(kind: str, named: Sequence[str]) -> list[_Active]:
            table = registry.provided(kind)
            chosen = {p.name: p for p in resolve_names(kind, named, registry)}
            chosen.update({n: p for n, p in table.items() if p.auto})
            out = []
            for piece in sorted(chosen.values(), key=lambda p: (p.order, p.name)):
                fn = piece.make(params, params.options.get(piece.name, {}))
                if fn is not None:
                    if not callable(fn):
                        raise piece.error(TypeError(f"its factory returned {type(fn).__name__}, not a callable"))
                    out.append(_Active(fn, piece, getattr(fn, "holdback", None)))
            return out

        self.processors = active("logits_processor", params.processors)
        self.stops = active("stop_condition", params.stop_conditions)
        self.text_stops = [s for s in self.stops if s.holdback is not None]
        (strategy,) = resolve_names("strategy", [params.strategy_name], registry)
        self.strategy = _Active(strategy.make(params, params.options.get(strategy.name, {})), strategy)
        meters = {**(engine_meters or {}), **params.cost_meters}
        self.meters = [
            (piece.name, _Active(piece.make(dict(meters[piece.name])), piece))
            for piece in resolve_names("cost_meter", list(meters), registry)
        ]
        self.top_logprobs = params.top_logprobs
        self.registry = registry
        self.on_start = registry.observers("on_request_start")
        self.on_step = registry.observers("on_step")
        self.on_end = registry.observers("on_request_end")


class _Sequence:
    """Per-sequence state of a running request that plugins do not need."""

    __slots__ = ("decoder", "emitted", "finish", "last_token_time", "logprobs")

    def __init__(self, decoder: IncrementalDecoder | None, logprobs: bool) -> None:
        self.decoder = decoder
        self.emitted = 0
        self.finish: Stop | None = None
        self.last_token_time = 0.0
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None


# -- what plugins and the model hand the loop, checked where it enters -------------------------------
# Each check is a shape test and one reduction over the row (max propagates NaN), so it costs a
# small fraction of a step; the reason for a failure is found only once something failed.

def _logits_problem(logits: Any, batch: int, vocab: int, model: bool = False) -> str | None:
    """Why ``logits`` cannot be used as a ``[batch, vocab]`` float array of scores, or None.
    -inf masks a token; NaN, +inf, or a row with no finite score is a fault."""
    if not isinstance(logits, np.ndarray):
        return f"returned {describe(logits)}, not a float numpy array [batch={batch}, vocab={vocab}]"
    if logits.dtype.kind != "f":
        return f"returned a {logits.dtype} array, not floats"
    if logits.shape != (batch, vocab):
        return f"returned an array of shape {list(logits.shape)}, not [batch={batch}, vocab={vocab}]"
    top = logits.max(axis=1)
    if np.isfinite(top).all():
        return None
    for row in range(batch):
        if np.isnan(top[row]):
            return f"are NaN in row {row}" if model else f"returned NaN in row {row}"
        if top[row] == np.inf:
            return f"are +inf in row {row}" if model else f"returned +inf in row {row}"
        if top[row] == -np.inf:
            return (f"are all -inf in row {row}" if model
                    else f"masked every token of row {row} (no finite score is left to choose from)")
    return None


def _tokens(picked: Any, batch: int, vocab: int) -> tuple[np.ndarray, str | None]:
    """A strategy's answer as int64 ``[batch]``, or why it cannot be."""
    arr = np.asarray(picked) if not isinstance(picked, np.ndarray) else picked
    if arr.dtype.kind not in "iu":
        return arr, f"returned {describe(picked)} ({arr.dtype}), not integer token ids"
    if arr.size != batch:
        return arr, f"returned {arr.size} token ids (shape {list(arr.shape)}), not one per row [batch={batch}]"
    tokens = arr.astype(np.int64, copy=False).reshape(batch)
    if batch and (tokens.min() < 0 or tokens.max() >= vocab):
        bad = [int(t) for t in tokens if not 0 <= t < vocab]
        return tokens, f"returned token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
    return tokens, None


def _stops_problem(stops: Any, batch: int) -> str | None:
    """Why a stop condition's answer is not None or ``{row: Stop}``, or None."""
    if stops is None:
        return None
    if not isinstance(stops, Mapping):
        return f"returned {describe(stops)}, not None or a dict of row -> Stop"
    for row, stop in stops.items():
        if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < batch:
            return f"returned a stop for row {row!r}, not a row of the batch [0, {batch})"
        if not isinstance(stop, Stop):
            return f"returned {describe(stop)} for row {row}, not a nextoken.Stop"
        if stop.text_end is not None and (isinstance(stop.text_end, bool) or not isinstance(stop.text_end, int)):
            return f"returned text_end={stop.text_end!r} for row {row}, not an integer or None"
    return None


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    shifted = logits - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class Generation:
    """One request over a batch of prompts: iterate it for :class:`StreamEvent` s; afterwards
    :meth:`completions` gives the results (it runs the rest of the request if needed)."""

    def __init__(self, runner: StepRunner, prompts: Sequence[list[int]], params: SamplingParams,
                 pipeline: Pipeline, tokenizer: Tokenizer | None, eos_token_ids: Sequence[int],
                 pad_token_id: int, context_length: int, device: str, provider: str = "") -> None:
        prompts = [fit_prompt(list(p), params, context_length, i if len(prompts) > 1 else None)
                   for i, p in enumerate(prompts)]
        self.runner = runner
        self.params = params
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.device = device
        self.provider = provider
        self.state = BatchState(params, [list(p) for p in prompts], eos_token_ids, runner.manifest.vocab_size)
        self.seqs = [
            _Sequence(tokenizer.decoder(p) if tokenizer else None, params.top_logprobs is not None)
            for p in self.state.prompts
        ]
        self.start = self.first_token_time = self.prefill_done = 0.0
        #: (step, row, kept token ids) for every slide of the window (policy ``slide``)
        self.slides: list[tuple[int, int, list[int]]] = []
        self.model_seconds = self.prefill_model_seconds = 0.0
        self.kv_cache_bytes = 0
        self.peak_memory_bytes: int | None = None
        self.device_memory_bytes: int | None = None
        self._events: Iterator[StreamEvent] | None = None
        self._completions: list[Completion] | None = None

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._events is None:
            self._events = self._run()
        return self._events

    # -- the loop ---------------------------------------------------------------------------------
    def _begin(self) -> None:
        """Start the request's clock and tell the observers (before its prefill)."""
        pipe = self.pipeline
        if pipe.on_start is not None:
            pipe.registry.call_observer("on_request_start", pipe.on_start, state=self.state)
        reset_peak_rss()
        self.start = self.state.start_time = time.perf_counter()

    def _consume(self, logits: np.ndarray, lengths: np.ndarray | None = None,
                 slide: bool = False) -> tuple[np.ndarray, list[StreamEvent]]:
        """One step of this request given its rows' logits ``[B, V]``: processors, strategy, text,
        stop conditions, context limit (``lengths``: each row's tokens so far, advanced here).
        Returns the picked tokens ``[B]`` and the step's events."""
        pipe, state, seqs = self.pipeline, self.state, self.seqs
        batch = state.batch_size
        problem = _logits_problem(logits, batch, state.vocab_size, model=True)
        if problem:
            raise NextokenError(f"the model's logits at step {state.step} of request {state.request_id} {problem}: "
                                "the package or its precision cannot be trusted on this input; check it with "
                                "`nextoken info --verify` and its parity report")
        for proc in pipe.processors:
            try:
                out = proc.fn(logits, state)
            except Exception as exc:
                raise proc.provided.error(exc) from exc
            problem = _logits_problem(out, batch, state.vocab_size)
            if problem:
                raise proc.provided.error(ValueError(problem))
            logits = out if out.dtype == np.float32 else out.astype(np.float32)
        try:
            picked = pipe.strategy.fn(logits, state)
        except Exception as exc:
            raise pipe.strategy.provided.error(exc) from exc
        tokens, problem = _tokens(picked, batch, state.vocab_size)
        if problem:
            raise pipe.strategy.provided.error(ValueError(problem))
        now = time.perf_counter()
        if state.step == 0:
            self.first_token_time = now
        logprobs = self._logprobs(logits, tokens) if pipe.top_logprobs is not None else None
        state._append(tokens)
        alive_rows = np.flatnonzero(state.alive)
        for row in alive_rows:
            seq = seqs[row]
            seq.last_token_time = now
            if seq.decoder is not None:
                state.texts[row] += seq.decoder.add(int(tokens[row]))
        if pipe.on_step is not None:
            pipe.registry.call_observer("on_step", pipe.on_step, state=state, tokens=tokens)
        # Stop conditions, in order: the first that stops a row names the reason.
        for cond in pipe.stops:
            try:
                stops = cond.fn(tokens, state)
            except Exception as exc:
                raise cond.provided.error(exc) from exc
            problem = _stops_problem(stops, batch)
            if problem:
                raise cond.provided.error(ValueError(problem))
            if stops:
                for row, stop in stops.items():
                    if state.alive[row] and seqs[row].finish is None:
                        seqs[row].finish = stop
        if lengths is None:
            lengths = np.array([len(p) + len(g) - 1 for p, g in zip(state.prompts, state.generated)])
        lengths[alive_rows] += 1
        full = lengths >= self.context_length
        events = []
        for row in alive_rows:
            seq = seqs[row]
            if seq.finish is None and full[row] and not slide:
                seq.finish = Stop("context", f"context window of {self.context_length} tokens is full")
            if seq.finish is not None:
                state.alive[row] = False
                if seq.finish.text_end is not None:
                    # a cut never takes back text a stream has shown: the final text is what was streamed
                    state.texts[row] = state.texts[row][: max(seq.finish.text_end, seq.emitted)]
                elif seq.decoder is not None:
                    state.texts[row] += seq.decoder.flush()
                end = len(state.texts[row])
            elif pipe.text_stops:
                end = len(state.texts[row]) - max(c.holdback(state.texts[row]) for c in pipe.text_stops)
            else:
                end = len(state.texts[row])
            delta = state.texts[row][seq.emitted:end] if end > seq.emitted else ""
            seq.emitted = max(seq.emitted, end)
            lp = None
            if logprobs is not None:
                lp = logprobs[row]
                seq.logprobs.append(lp)
            events.append(StreamEvent(int(row), int(tokens[row]), delta, seq.finish.reason if seq.finish else None, lp))
        return tokens, events

    def _end(self, model_seconds: float, kv_cache_bytes: int) -> None:
        """Close the request: usage, completions, observers."""
        self.model_seconds = model_seconds
        self.kv_cache_bytes = max(self.kv_cache_bytes, kv_cache_bytes)
        self.peak_memory_bytes = peak_rss_bytes()
        if self.device == "cuda":
            gpu = gpu_memory(self.runner.device_id)
            self.device_memory_bytes = None if gpu is None else (gpu.process if gpu.process is not None else gpu.used)
        self._completions = self._finish()
        pipe = self.pipeline
        if pipe.on_end is not None:
            pipe.registry.call_observer("on_request_end", pipe.on_end, state=self.state, completions=self._completions)

    @property
    def finished(self) -> bool:
        return not self.state.alive.any()

    def _run(self) -> Iterator[StreamEvent]:
        state = self.state
        self._begin()
        batch = state.batch_size
        # lengths[row]: tokens of the row's sequence the model has seen or will see next
        lengths = np.array([len(p) for p in state.prompts])
        slide = self.params.context_policy == "slide"
        # GroupQueryAttention graphs (keys placed by the mask) run in place in a fixed buffer long
        # enough for the whole request: no concatenation per step; elsewhere the cache grows.
        slots = None
        if not slide and self.runner.manifest.padding_side == "right":
            slots, logits = self._prefill_in_place(state.prompts)
            cache = slots
        else:
            cache, mask, next_pos, logits = self._prefill(state.prompts)
        self.prefill_done = time.perf_counter()
        self.prefill_model_seconds = cache.run_seconds
        run_seconds = 0.0
        prefilled = [(list(p), 0) for p in state.prompts]     # per row: (the ids prefilled last, tokens generated then)
        while True:
            tokens, events = self._consume(logits, lengths, slide)
            yield from events
            if not state.alive.any():
                break
            full = lengths >= self.context_length
            if slide and (full & state.alive).any():
                # The window is full: keep the protected prefix and the newest tokens, prefill again.
                windows = []
                for row in range(batch):
                    # what the model holds of the row: its last window and what came after it
                    seq_ids = prefilled[row][0] + state.generated[row][prefilled[row][1]:]
                    if not state.alive[row]:
                        windows.append(seq_ids[-1:])
                    elif full[row]:
                        windows.append(self._window(seq_ids))
                        self.slides.append((state.step, row, list(windows[-1])))
                    else:
                        windows.append(seq_ids)
                run_seconds += cache.run_seconds
                self.kv_cache_bytes = max(self.kv_cache_bytes, cache.nbytes())
                cache, mask, next_pos, logits = self._prefill(windows)
                lengths = np.array([len(w) for w in windows])
                prefilled = [(w, len(state.generated[row])) for row, w in enumerate(windows)]
                continue
            if slots is not None:
                # [B, 1] in place: each live row writes at its own length; a finished row rewrites
                # its last position (it is ignored), so no row outgrows its slot.
                held = slots.lengths + state.alive
                logits = self.runner.step(slots, tokens[:, None], slots.mask(held), (held - 1)[:, None], in_place=True)
                slots.lengths = held
                continue
            # Decode step [B, 1]; finished rows ride along on their last token and are ignored.
            mask = grow_mask(mask, self.runner.manifest.padding_side)
            logits = self.runner.step(cache, tokens[:, None], mask, next_pos)
            next_pos = next_pos + 1
        self._end(run_seconds + cache.run_seconds, cache.nbytes())

    def _prefill_in_place(self, prompts: Sequence[list[int]]):
        """Prefill each prompt straight into its row of a fixed buffer (GroupQueryAttention runs a
        prompt over a static cache one row at a time): (the buffer, logits [B, V])."""
        from .kvcache import SlotCache

        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        length = min(int(lengths.max()) + self.params.max_new_tokens, self.context_length)
        slots = SlotCache(self.runner, len(prompts), length)
        rows = []
        for row, prompt in enumerate(prompts):
            rows.append(self.runner.step(slots, np.asarray([prompt], dtype=np.int64), slots.mask(lengths[row:row + 1]),
                                         None, in_place=True, rows=1, first_row=row))
        slots.lengths = lengths
        return slots, np.concatenate(rows, axis=0)

    def _prefill(self, prompts: Sequence[list[int]]):
        """Prefill ``[B, S]`` padded prompts into a new cache: (cache, mask, next positions, logits [B, V])."""
        side = self.runner.manifest.padding_side
        input_ids, mask = pad_batch(prompts, self.pad_token_id, side)
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        cache = self.runner.new_cache(len(prompts))
        if side == "left":
            logits = self.runner.step(cache, input_ids, mask, positions)
        else:  # each row's last token is in its own column
            lengths = np.array([len(p) for p in prompts])
            all_logits = self.runner.step(cache, input_ids, mask, positions, all_logits=True)
            logits = np.ascontiguousarray(all_logits[np.arange(len(prompts)), lengths - 1])
        return cache, mask, mask.sum(axis=1, keepdims=True), logits

    def _window(self, ids: list[int]) -> list[int]:
        """What ``slide`` keeps of a full sequence: the protected prefix and the newest tokens, half a window in all."""
        keep = max(self.context_length // 2, self.params.protected_prefix + 1)
        prefix = ids[: self.params.protected_prefix]
        return prefix + ids[len(ids) - (keep - len(prefix)):]

    def _logprobs(self, logits: np.ndarray, tokens: np.ndarray) -> list[TokenLogprob]:
        """Each row's chosen token and top-N alternatives under the final distribution."""
        logp = _log_softmax(logits)
        n = self.pipeline.top_logprobs or 0
        text = self._token_text
        out = []
        for row in range(len(tokens)):
            top: tuple = ()
            if n:
                idx = np.argpartition(-logp[row], n - 1)[:n] if n < logp.shape[1] else np.arange(logp.shape[1])
                idx = idx[np.argsort(-logp[row, idx], kind="stable")]
                top = tuple((int(i), text(int(i)), float(logp[row, i])) for i in idx)
            tok = int(tokens[row])
            out.append(TokenLogprob(tok, text(tok), float(logp[row, tok]), top))
        return out

    def _token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token_id]) or (self.tokenizer.id_to_token(token_id) or "")

    # -- results ------------------------------------------------------------------------------------
    def _finish(self) -> list[Completion]:
        out = []
        prefill_ms = (self.prefill_done - self.start) * 1e3
        for row, seq in enumerate(self.seqs):
            ids = self.state.generated[row]
            decode_s = seq.last_token_time - self.first_token_time
            usage = Usage(
                prompt_tokens=len(self.state.prompts[row]),
                completion_tokens=len(ids),
                time_to_first_token_ms=(self.first_token_time - self.start) * 1e3,
                prefill_ms=prefill_ms,
                decode_tokens_per_s=(len(ids) - 1) / decode_s if len(ids) > 1 and decode_s > 0 else 0.0,
                wall_ms=(seq.last_token_time - self.start) * 1e3,
                model_ms=self.model_seconds * 1e3,
                steps=self.state.step,
                batch_size=self.state.batch_size,
                device=self.device,
                provider=self.provider,
                kv_cache_bytes=self.kv_cache_bytes,
                peak_memory_bytes=self.peak_memory_bytes,
                device_memory_bytes=self.device_memory_bytes,
            )
            finish = seq.finish or Stop("length")
            completion = Completion(self.state.texts[row], list(ids), finish.reason, usage,
                                    self.state.prompts[row], finish.detail, seq.logprobs)
            for name, meter in self.pipeline.meters:
                try:
                    charge = meter.fn(usage)
                except Exception as exc:
                    raise meter.provided.error(exc) from exc
                if not isinstance(charge, Charge) or not _finite_number(charge.amount):
                    raise meter.provided.error(ValueError(
                        f"returned {describe(charge)}, not a Charge with a finite amount"))
                completion.cost[name] = charge
            out.append(completion)
        return out

    def completions(self) -> list[Completion]:
        """The result of every sequence, running the request to its end first if needed."""
        if self._completions is None:
            for _ in self:
                pass
        if self._completions is None:
            raise NextokenError("this request failed part way (see the error it raised); start a new one")
        return self._completions
