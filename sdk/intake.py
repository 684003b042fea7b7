"""Where a request comes in: what a caller sends (prompts, parameters) checked, tokenised and
resolved into a :class:`~nextoken.Generation`, before any model work.

    Intake.build(prompts, params) -> Generation (passive: its step API and its results)
      -> Engine.run / Scheduler.submit / a driver of your own run it

The engine owns one and hands it down to the schedulers made over it, so a scheduler builds a
submitted prompt's request itself, with nothing to call back up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from .errors import InvalidRequestError
from .generation import Generation
from .registry import Pipeline, Registry
from .runner import StepRunner
from .speculation import StepCost
from .tokenizer import GuardedTokenizer
from .types import SamplingParams

__all__ = ["Intake", "Prompt", "is_single", "resolve_params"]

#: A prompt is text, or token ids as they go into the model.
Prompt = str | Sequence[int]


class Intake:
    """Turns prompts and parameters into a :class:`~nextoken.Generation` for one package: every
    check, the tokenizer and the plugins resolved here, so a bad request fails before model work."""

    def __init__(
        self,
        runner: StepRunner,
        plugins: Registry,
        cost_meters: Mapping[str, Mapping[str, Any]],
        tokenizer: GuardedTokenizer | None,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        provider: str,
        step_cost: StepCost,
        source: str,
    ) -> None:
        """
        Args:
            runner: the package's step runner (its manifest gives the vocabulary and window).
            plugins: the engine's plugin registry (a request resolves its pipeline from it).
            cost_meters: meters charged on every request, ``{name: options}``.
            tokenizer: the checked tokenizer, or None for a package without one.
            eos_token_ids: the package's end-of-sequence ids.
            pad_token_id: the id rows are padded with.
            provider: the execution provider, as usage reports it.
            step_cost: speculative decoding's learned cost of a step, shared by the engine's requests.
            source: the package, as errors name it.
        """
        self.runner, self.plugins, self.cost_meters = runner, plugins, cost_meters
        self.tokenizer, self.eos_token_ids, self.pad_token_id = tokenizer, tuple(eos_token_ids), pad_token_id
        self.provider, self.step_cost, self.source = provider, step_cost, source
        self.manifest = runner.manifest

    def check_open(self) -> None:
        """Refuse work once the engine is closed (its session is gone)."""
        if self.runner.closed:
            raise InvalidRequestError("this engine is closed; load the package again")

    def need_tokenizer(self) -> GuardedTokenizer:
        """The tokenizer, or an error saying prompts must be token ids."""
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"{self.source} has no tokenizer, so prompts must be token ids; export it from a checkpoint with one"
            )
        return self.tokenizer

    def prompt_ids(self, prompt: Prompt, index: int | None = None) -> list[int]:
        """One prompt's token ids, checked against the vocabulary."""
        where = "the prompt" if index is None else f"prompt {index}"
        if isinstance(prompt, str):
            ids = self.need_tokenizer().encode(prompt)
            if not ids:
                raise InvalidRequestError(
                    f"{where} is empty and this tokenizer adds no BOS token to start from; give some text"
                )
            return ids
        try:
            ids = [int(t) for t in prompt]
        except (TypeError, ValueError):
            raise InvalidRequestError(
                f"{where} must be text or a sequence of token ids, not {type(prompt).__name__}"
            ) from None
        if not ids:
            raise InvalidRequestError(f"{where} has no token ids; give at least one")
        vocab = self.manifest.vocab_size
        bad = [t for t in ids if t < 0 or t >= vocab]
        if bad:
            raise InvalidRequestError(f"{where} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        return ids

    def batch(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        """Token ids per prompt (one prompt, or a non-empty list of them)."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if is_single(prompts):
            return [self.prompt_ids(cast(Prompt, prompts))]
        if not isinstance(prompts, Sequence):
            raise InvalidRequestError(
                f"prompt must be text, token ids or a list of those, not {type(prompts).__name__}"
            )
        if len(prompts) == 0:
            raise InvalidRequestError("no prompt given; pass text, token ids, or a non-empty list of those")
        return [self.prompt_ids(cast(Prompt, p), i) for i, p in enumerate(prompts)]

    def build(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None, overrides: Mapping[str, Any]
    ) -> Generation:
        """A passive :class:`~nextoken.Generation` for ``prompts`` (nothing has run yet)."""
        self.check_open()
        if self.manifest.embeds:
            raise InvalidRequestError(
                f"{self.source} is an embedding model (exported with --task embed): it makes vectors, "
                "not text; use Engine.embed or /v1/embeddings"
            )
        params = resolve_params(params, overrides)
        vocab = self.manifest.vocab_size
        outside = [t for t in params.logit_bias if t >= vocab]
        if outside:
            raise InvalidRequestError(f"logit_bias names token ids outside the vocabulary [0, {vocab}): {outside[:5]}")
        pipeline = Pipeline(self.plugins, params, self.cost_meters)
        return Generation(
            self.runner,
            self.batch(prompts),
            params,
            pipeline,
            self.tokenizer,
            self.eos_token_ids,
            self.pad_token_id,
            self.manifest.context_length,
            self.runner.device,
            self.provider,
            step_cost=self.step_cost,
        )


def is_single(prompts: Any) -> bool:
    """One prompt (text, or a flat sequence of ids) rather than a batch."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    return isinstance(prompts, Sequence) and len(prompts) > 0 and all(isinstance(p, (int, np.integer)) for p in prompts)


def resolve_params(params: SamplingParams | None, overrides: Mapping[str, Any]) -> SamplingParams:
    """``params`` (default: :class:`~nextoken.SamplingParams`'s defaults) with keyword overrides."""
    if params is not None and not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"params must be a SamplingParams, not {type(params).__name__}")
    params = params or SamplingParams()
    return params.replace(**overrides) if overrides else params
