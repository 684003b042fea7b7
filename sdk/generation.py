"""The generation loop: prefill, then one-token decode steps, for a batch of prompts.

    prompt ids -> prefill [B, S] (KV cache filled) -> logits [B, V] -> strategy picks [B]
      -> stop conditions per sequence -> text deltas -> decode step [B, 1] -> ...

The loop does no I/O: it yields :class:`StreamEvent` s, and :func:`collect` folds them into
:class:`Completion` s. The logits -> token seam is one call over the whole batch (``strategy``);
the sampling plugins of later releases plug in there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import ContextWindowError, InvalidRequestError
from .kvcache import StepRunner
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["SamplingParams", "Usage", "Completion", "StreamEvent", "FINISH_REASONS"]

#: ``stop``: an EOS/stop token; ``length``: max_new_tokens reached; ``context``: the window is full.
FINISH_REASONS = ("stop", "length", "context")

Strategy = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: validated when made, before any work.

    ``max_new_tokens``: most tokens to generate per sequence (>= 1).
    ``ignore_eos``: keep going past EOS ids, so exactly ``max_new_tokens`` come out (for benchmarks).
    ``stop_token_ids``: extra ids that end a sequence, besides the model's EOS ids.
    ``strategy``: the decoding strategy's registered name (``greedy``).
    """

    max_new_tokens: int = 128
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    strategy: str = "greedy"

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)):
            raise InvalidRequestError(f"max_new_tokens must be an integer >= 1, not {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class Usage:
    """What one sequence of a request used. Times are milliseconds of wall clock."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float
    prefill_ms: float
    decode_tokens_per_s: float
    wall_ms: float
    batch_size: int
    device: str

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
            f"batch {self.batch_size}, {self.device}"
        )


@dataclass
class Completion:
    """The result for one prompt: the generated text and ids, why it ended, and its usage.

    ``token_ids`` are the generated ids, including the EOS/stop id that ended the sequence (as
    transformers' ``generate`` returns them); ``text`` leaves special tokens out.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    prompt_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
        }


@dataclass(frozen=True)
class StreamEvent:
    """One step's news for one sequence: ``index`` in the batch, the token it got (None for a
    final flush), the ``text`` delta that token completes, and ``finish_reason`` once it ends."""

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None = None


class _Sequence:
    """Per-sequence state of a running request."""

    __slots__ = ("prompt", "ids", "decoder", "text", "finish_reason", "last_token_time")

    def __init__(self, prompt: list[int], decoder: IncrementalDecoder | None) -> None:
        self.prompt = prompt
        self.ids: list[int] = []
        self.decoder = decoder
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.last_token_time = 0.0


class Generation:
    """One request over a batch of prompts: iterate it for :class:`StreamEvent` s; afterwards
    :meth:`completions` gives the results."""

    def __init__(self, runner: StepRunner, prompts: Sequence[list[int]], params: SamplingParams,
                 strategy: Strategy, tokenizer: Tokenizer | None, eos_token_ids: Sequence[int],
                 pad_token_id: int, context_length: int, device: str) -> None:
        self.runner = runner
        self.params = params
        self.strategy = strategy
        self.context_length = context_length
        self.pad_token_id = pad_token_id
        self.device = device
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(eos_token_ids)
        self.stop_ids = np.array(sorted(stops), dtype=np.int64)
        for i, p in enumerate(prompts):
            if len(p) > context_length:
                which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                raise ContextWindowError(
                    f"{which} has {len(p)} tokens but the model's context window is {context_length}; "
                    "shorten it"
                )
        self.seqs = [_Sequence(list(p), tokenizer.decoder(p) if tokenizer else None) for p in prompts]
        self.start = self.first_token_time = self.prefill_done = 0.0
        self._events: Iterator[StreamEvent] | None = None

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._events is None:
            self._events = self._run()
        return self._events

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> Iterator[StreamEvent]:
        self.start = time.perf_counter()
        batch = len(self.seqs)
        width = max(len(s.prompt) for s in self.seqs)
        # Left padding: every row's last prompt token sits in the last column.
        input_ids = np.full((batch, width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row, seq in enumerate(self.seqs):
            input_ids[row, width - len(seq.prompt):] = seq.prompt
            mask[row, width - len(seq.prompt):] = 1
        positions = np.cumsum(mask, axis=1) - 1
        positions[mask == 0] = 1
        next_pos = positions[:, -1:] + 1                                  # [B, 1]
        cache = self.runner.new_cache(batch)

        logits = self.runner.step(cache, input_ids, mask, positions)     # prefill: [B, S] -> [B, V]
        self.prefill_done = time.perf_counter()
        alive = np.ones(batch, dtype=bool)
        limit = self.params.max_new_tokens
        step = 0
        while True:
            tokens = np.asarray(self.strategy(logits), dtype=np.int64)   # [B]
            now = time.perf_counter()
            if step == 0:
                self.first_token_time = now
            step += 1
            stopped = np.isin(tokens, self.stop_ids)
            for row in np.flatnonzero(alive):
                seq = self.seqs[row]
                token = int(tokens[row])
                seq.ids.append(token)
                seq.last_token_time = now
                delta = seq.decoder.add(token) if seq.decoder else ""
                if stopped[row]:
                    seq.finish_reason = "stop"
                elif step >= limit:
                    seq.finish_reason = "length"
                elif len(seq.prompt) + step >= self.context_length:
                    seq.finish_reason = "context"
                if seq.finish_reason is not None:
                    alive[row] = False
                    if seq.decoder:
                        delta += seq.decoder.flush()
                seq.text.append(delta)
                yield StreamEvent(int(row), token, delta, seq.finish_reason)
            if not alive.any():
                return
            # Decode step [B, 1]; finished rows ride along on their last token and are ignored.
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits = self.runner.step(cache, tokens[:, None], mask, next_pos)
            next_pos = next_pos + 1

    # -- results ------------------------------------------------------------------------------------
    def completions(self) -> list[Completion]:
        """The result of every sequence; run the generation to its end first."""
        if any(s.finish_reason is None for s in self.seqs):
            for _ in self:
                pass
        out = []
        prefill_ms = (self.prefill_done - self.start) * 1e3
        for seq in self.seqs:
            n = len(seq.ids)
            decode_s = seq.last_token_time - self.first_token_time
            usage = Usage(
                prompt_tokens=len(seq.prompt),
                completion_tokens=n,
                time_to_first_token_ms=(self.first_token_time - self.start) * 1e3,
                prefill_ms=prefill_ms,
                decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                wall_ms=(seq.last_token_time - self.start) * 1e3,
                batch_size=len(self.seqs),
                device=self.device,
            )
            out.append(Completion("".join(seq.text), seq.ids, seq.finish_reason or "length", usage, seq.prompt))
        return out
