"""The generation loop: prefill, then one-token decode steps, for a batch of prompts.

    prompt ids -> prefill [B, S] (KV cache filled) -> logits [B, V]
      -> logits processors (in order) -> strategy picks tokens [B] -> stop conditions per sequence
      -> text deltas (held back while they may be part of a stop string) -> decode step [B, 1] -> ...

Plugins are resolved once per request into a :class:`Pipeline` of plain callables; the loop makes
one call per processor/strategy/condition per step over the whole batch, and does no I/O: each
step returns its :class:`StreamEvent` s, and the finished request's :class:`Completion` s are kept.
A :class:`Generation` is passive: a driver (the scheduler, or your own) hands it each step's logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ContextWindowError, InvalidRequestError, NextokenError, describe, is_integer, is_number
from .probes import MemorySampler
from .registry import Pipeline
from .runner import StepRunner
from .speculation import Speculation, StepCost
from .tokenizer import Decoder, Tokenizer, decoder_for
from .types import BatchState, Charge, Completion, SamplingParams, Stop, StreamEvent, TokenLogprob, Usage

__all__ = ["Generation", "Speculation", "Timings", "fit_prompt"]


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
        return prompt[:keep] + prompt[len(prompt) - (room - keep) :]
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


class _Sequence:
    """Per-sequence state of a running request that plugins do not need."""

    __slots__ = ("decoder", "emitted", "finish", "last_token_time", "logprobs")

    def __init__(self, decoder: Decoder | None, logprobs: bool) -> None:
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
            return (
                f"are all -inf in row {row}"
                if model
                else f"masked every token of row {row} (no finite score is left to choose from)"
            )
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
        if not is_integer(row) or not 0 <= row < batch:
            return f"returned a stop for row {row!r}, not a row of the batch [0, {batch})"
        if not isinstance(stop, Stop):
            return f"returned {describe(stop)} for row {row}, not a nextoken.Stop"
        if stop.text_end is not None and not is_integer(stop.text_end):
            return f"returned text_end={stop.text_end!r} for row {row}, not an integer or None"
    return None


def _finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=1, keepdims=True)
    shifted = logits - top
    with np.errstate(divide="ignore"):
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


@dataclass(frozen=True)
class Timings:
    """When a request's phases happened (``time.perf_counter()`` seconds) and the model time in
    them: ``start`` (begin), ``prefilled`` (its prefill done), ``first_token``, ``last_tokens``
    (each sequence's last token), ``model_seconds`` in all and ``prefill_model_seconds``."""

    start: float
    prefilled: float
    first_token: float
    last_tokens: tuple[float, ...]
    model_seconds: float
    prefill_model_seconds: float


class Generation:
    """One request over a batch of prompts, as passive data: its state, its step and its results.
    :meth:`Engine.start <nextoken.Engine.start>` builds one; nothing runs until something drives it:
    :meth:`Engine.run <nextoken.Engine.run>` (on the caller's thread), :meth:`Scheduler.submit
    <nextoken.Scheduler.submit>` (in a shared batch), or a driver of your own, in this order::

        gen.begin()                            # its clock and observers start
        gen.prefilled(model_seconds)           # its prompts are in the KV cache
        tokens, events = gen.advance(logits)   # one step on its rows' logits [B, V]; repeat
        gen.slide()                            # when gen.needs_slide: the windows to prefill again
        gen.end(model_seconds, kv_cache_bytes) # when gen.finished (or gen.cancel())

    :meth:`advance` is the one implementation of a step: processors, strategy, text, stop
    conditions, the context window. It calls nothing above it: a driver hands it logits and takes
    back tokens and events. Afterwards :meth:`completions` gives the results.
    """

    def __init__(
        self,
        runner: StepRunner,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        pipeline: Pipeline,
        tokenizer: Tokenizer | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        context_length: int,
        device: str,
        provider: str = "",
        step_cost: StepCost | None = None,
    ) -> None:
        """
        Args:
            runner: the package's step runner (its manifest: vocabulary, rope switch).
            prompts: each prompt's token ids (fitted to the window by ``params.context_policy``).
            params: how to generate.
            pipeline: the plugins resolved for this request.
            tokenizer: for text out (None: ids only).
            eos_token_ids: ids that end a sequence.
            pad_token_id: the id rows are padded with.
            context_length: the model's window.
            device: where it runs, as usage reports it.
            provider: the execution provider, as usage reports it.
            step_cost: speculative decoding's learned cost of a step (shared by an engine's requests).
        """
        prompts = [
            fit_prompt(list(p), params, context_length, i if len(prompts) > 1 else None) for i, p in enumerate(prompts)
        ]
        # n choices a prompt: rows prompt 0 choice 0..n-1, prompt 1 choice 0..n-1, ...
        n = params.n
        choices = [j for _ in prompts for j in range(n)]
        prompts = [p for p in prompts for _ in range(n)]
        self.runner = runner
        self.params = params
        self.pipeline = pipeline
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.device = device
        self.provider = provider
        self.state = BatchState(
            params, [list(p) for p in prompts], eos_token_ids, runner.manifest.vocab_size, choices, tokenizer
        )
        #: tokens that end a sequence without text: its EOS ids, when special tokens are kept
        #: in the text (else they decode to nothing anyway)
        self._silent: frozenset[int] = frozenset(
            () if params.skip_special_tokens or params.ignore_eos else eos_token_ids
        )
        self.seqs = [
            _Sequence(
                decoder_for(tokenizer, p, params.skip_special_tokens) if tokenizer else None,
                params.top_logprobs is not None,
            )
            for p in self.state.prompts
        ]
        self.start = self.first_token_time = self.prefill_done = 0.0
        #: (step, row, kept token ids) for every slide of the window (policy ``slide``)
        self.slides: list[tuple[int, int, list[int]]] = []
        self.model_seconds = self.prefill_model_seconds = 0.0
        self.kv_cache_bytes = 0
        #: per sequence: prompt tokens taken from the prefix cache
        self.cached_tokens = [0] * self.state.batch_size
        #: prompt tokens whose KV cache this request stored in the prefix cache
        self.stored_tokens = 0
        #: speculative decoding (None: off); the scheduler uses it while the request decodes alone
        self.speculation = (
            Speculation(pipeline.proposer, params.speculative["k"], step_cost)
            if pipeline.proposer is not None and params.speculative
            else None
        )
        self.peak_memory_bytes: int | None = None
        self.device_memory_bytes: int | None = None
        # per row: tokens the model has seen or will see next; the ids it was last prefilled with,
        # and how many tokens had been generated then (what it holds: those, then what came after)
        self._lengths = np.array([len(p) for p in self.state.prompts])
        self._prefilled = [(list(p), 0) for p in self.state.prompts]
        self._slide = params.context_policy == "slide"
        self._full = False
        #: longrope packages: the length past which a sequence rotates with the long factors
        self._rope_switch = runner.manifest.rope_switch or 0
        self._completions: list[Completion] | None = None

    # -- the step API --------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether a driver has begun it (a request runs once)."""
        return self.start != 0.0

    def begin(self) -> None:
        """Start the request's clock and tell the observers (before its prefill)."""
        if self.started:
            raise InvalidRequestError("this request has already run; start a new one")
        pipe = self.pipeline
        if pipe.on_start is not None:
            pipe.observe("on_request_start", pipe.on_start, state=self.state)
        self.start = self.state.start_time = time.perf_counter()

    def prefilled(self, model_seconds: float) -> None:
        """Its prompts are in the KV cache; ``model_seconds`` the model took."""
        self.prefill_done = time.perf_counter()
        self.prefill_model_seconds = model_seconds

    @property
    def finished(self) -> bool:
        """Whether every sequence has ended."""
        return not self.state.alive.any()

    @property
    def needs_slide(self) -> bool:
        """Whether a live sequence filled the window at the last step (policy ``slide``), or passed
        a longrope package's switch: call :meth:`slide` and prefill what it returns before the next
        step."""
        return self._full

    def advance(self, logits: np.ndarray) -> tuple[np.ndarray, list[StreamEvent]]:
        """One step of this request given its rows' logits ``[B, V]``: processors, strategy, text,
        stop conditions, context limit. Returns the picked tokens ``[B]`` and the step's events."""
        pipe, state, seqs = self.pipeline, self.state, self.seqs
        batch = state.batch_size
        problem = _logits_problem(logits, batch, state.vocab_size, model=True)
        if problem:
            raise NextokenError(
                f"the model's logits at step {state.step} of request {state.request_id} {problem}: "
                "the package or its precision cannot be trusted on this input; check it with "
                "`nextoken info --verify` and its parity report"
            )
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
        alive_rows = state.append(tokens)
        rows, picked = alive_rows.tolist(), tokens.tolist()  # Python ints: the per-row loops index them
        timing = pipe.seconds is not None
        decoding = time.perf_counter() if timing else 0.0
        silent = self._silent
        for row in rows:
            seq = seqs[row]
            seq.last_token_time = now
            if seq.decoder is not None and picked[row] not in silent:
                state.texts[row] += seq.decoder.add(picked[row])
        if timing:
            pipe.timed("tokenizer:decode", decoding)
        if pipe.on_step is not None:
            pipe.observe("on_step", pipe.on_step, state=state, tokens=tokens)
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
        lengths = self._lengths
        lengths[alive_rows] += 1
        full = lengths >= self.context_length if lengths.max() >= self.context_length else None
        events = []
        for row in rows:
            seq = seqs[row]
            if seq.finish is None and full is not None and full[row] and not self._slide:
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
                end = len(state.texts[row]) - max(c.holdback(state.texts[row]) for c in pipe.text_stops if c.holdback)
            else:
                end = len(state.texts[row])
            delta = state.texts[row][seq.emitted : end] if end > seq.emitted else ""
            seq.emitted = max(seq.emitted, end)
            lp = None
            if logprobs is not None:
                lp = logprobs[row]
                seq.logprobs.append(lp)
            events.append(StreamEvent(row, picked[row], delta, seq.finish.reason if seq.finish else None, lp))
        self._full = self._slide and full is not None and bool((full & state.alive).any())
        if self._rope_switch and not self._full:
            # a longrope sequence that just passed the switch: its keys were rotated with the short
            # factors; it is prefilled again whole (the long ones), as transformers does then
            self._full = bool(((lengths == self._rope_switch + 1) & state.alive).any())
        return tokens, events

    def slide(self) -> list[list[int]]:
        """The window is full (or a row passed the rope switch): what each row is prefilled with
        again. A full row keeps its protected prefix and its newest tokens, half a window in all
        (recorded in :attr:`slides`); another live row keeps what it holds; a finished row its last
        token (it rides along)."""
        return self._again(slide=True)

    def resume(self) -> list[list[int]]:
        """The driver took the request's KV cache away (preempted for memory): what each row is
        prefilled with again to go on where it was, every token it holds and its last (a finished
        row: its last token)."""
        return self._again(slide=False)

    def _again(self, slide: bool) -> list[list[int]]:
        state, windows = self.state, []
        for row in range(state.batch_size):
            ids, at = self._prefilled[row]
            held = ids + state.generated[row][at:]  # what the model holds of the row, and its last token
            if not state.alive[row]:
                windows.append(held[-1:])
            elif slide and self._lengths[row] >= self.context_length:
                keep = max(self.context_length // 2, self.params.protected_prefix + 1)
                prefix = held[: self.params.protected_prefix]
                windows.append(prefix + held[len(held) - (keep - len(prefix)) :])
                self.slides.append((state.step, row, list(windows[-1])))
            else:
                windows.append(held)
        self._prefilled = [(w, len(state.generated[row])) for row, w in enumerate(windows)]
        self._lengths = np.array([len(w) for w in windows])
        self._full = False
        return windows

    def cancel(self, reason: str = "cancelled", detail: str = "cancelled by the caller") -> list[StreamEvent]:
        """End every live sequence now with finish ``reason``; their closing events."""
        events = []
        for row in np.flatnonzero(self.state.alive):
            self.seqs[row].finish = Stop(reason, detail)
            events.append(StreamEvent(int(row), None, "", reason))
        self.state.alive[:] = False
        return events

    def end(
        self, model_seconds: float, kv_cache_bytes: int, memory: tuple[int | None, int | None] | None = None
    ) -> list[Completion]:
        """Close the request: usage, cost, completions, observers. ``memory``: (peak resident bytes,
        GPU bytes) as the driver sampled them (default: read now)."""
        self.model_seconds = model_seconds
        self.kv_cache_bytes = max(self.kv_cache_bytes, kv_cache_bytes)
        if memory is None:
            memory = MemorySampler(self.device, self.runner.device_id, 0.0).sample()
        self.peak_memory_bytes, self.device_memory_bytes = memory
        self._completions = self._finish()
        pipe = self.pipeline
        if pipe.on_end is not None:
            pipe.observe("on_request_end", pipe.on_end, state=self.state, completions=self._completions)
        return self._completions

    def timings(self) -> Timings:
        """When its phases happened, and the model time (for benchmarks)."""
        return Timings(
            self.start,
            self.prefill_done,
            self.first_token_time,
            tuple(s.last_token_time for s in self.seqs),
            self.model_seconds,
            self.prefill_model_seconds,
        )

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
        hook_ms = self.pipeline.seconds
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
                cached_tokens=self.cached_tokens[row],
                cache_write_tokens=self.stored_tokens if row == 0 else 0,
                proposed_tokens=self.speculation.proposed if self.speculation and row == 0 else 0,
                accepted_tokens=self.speculation.accepted if self.speculation and row == 0 else 0,
            )
            finish = seq.finish or Stop("length")
            completion = Completion(
                self.state.texts[row],
                list(ids),
                finish.reason,
                usage,
                self.state.prompts[row],
                finish.detail,
                seq.logprobs,
            )
            for name, meter in self.pipeline.meters:
                try:
                    charge = meter.fn(usage)
                except Exception as exc:
                    raise meter.provided.error(exc) from exc
                if not isinstance(charge, Charge) or not _finite_number(charge.amount):
                    raise meter.provided.error(
                        ValueError(f"returned {describe(charge)}, not a Charge with a finite amount")
                    )
                completion.cost[name] = charge
            out.append(completion)
        if hook_ms is not None:
            table = {k: v * 1e3 for k, v in hook_ms.items()}
            for completion in out:
                completion.usage.hook_ms = dict(table)
        return out

    def completions(self) -> list[Completion]:
        """The result of every sequence, once the request has ended."""
        if self._completions is None:
            if self.started:
                raise NextokenError("this request has not ended, or it failed part way (see the error it raised)")
            raise InvalidRequestError(
                "this request has not run: run it with Engine.run, submit it to a Scheduler, or drive it "
                "through the step API"
            )
        return self._completions
