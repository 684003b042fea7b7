"""A test double for plugin authors: an engine over a scripted model, no ONNX export, no weights.

    from nextoken.testing import FakeEngine, ScriptedModel

    model = ScriptedModel([5, 6, 7, 2], vocab_size=16)      # the model "wants" 5, then 6, 7, EOS
    with FakeEngine(model, eos_token_ids=(2,), extra_plugins=[my_plugin]) as engine:
        got = engine.generate([1, 3], processors=["my_processor"], max_new_tokens=8)
    assert got.token_ids == [5, 6, 7, 2]
    assert model.prefills == 1 and model.decode_steps == 3

Everything but the model is the real thing: :class:`FakeEngine` is an :class:`~nextoken.Engine`
(the same ``start`` / ``generate`` / ``stream`` / ``chat``), with the same registry, plugin
resolution, step (:meth:`Generation.advance <nextoken.Generation.advance>`), stop conditions,
text, usage and cost meters; only the logits come from the script. A plugin's tests run in
milliseconds this way; test it once on a real package too. (The :class:`~nextoken.Scheduler`
needs a real package: it moves real KV caches between requests.)

:class:`CharTokenizer` gives a package-free tokenizer (one character a token) for plugins that
work on text (stop strings, detokenisation).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .device import DeviceChoice
from .engine import Engine
from .errors import InvalidRequestError
from .manifest import Manifest
from .registry import Registry
from .speculation import StepCost
from .tokenizer import GuardedTokenizer, IncrementalDecoder

__all__ = ["CharTokenizer", "FakeEngine", "Script", "ScriptedModel"]

#: What a script answers for a sequence: a token id (made the clear favourite) or logits ``[V]``.
Script = Callable[[list[int], list[int]], int | np.ndarray]


class ScriptedModel:
    """A model whose next-token logits come from a script instead of weights.

    ``script``: a list of token ids (the favourite at each generated position; past its end, the
    last one again), or a callable ``(prompt ids, generated ids) -> token id or logits [V]``.
    A token id becomes logits with that token ``margin`` above every other (0), so greedy picks it
    and sampling mostly does. ``prefills`` and ``decode_steps`` count the model's steps; ``seen``
    holds each row's sequence as the model last saw it."""

    def __init__(
        self, script: Sequence[int] | Script, vocab_size: int = 32, *, context_length: int = 256, margin: float = 10.0
    ) -> None:
        """
        Args:
            script: token ids (the favourite at each generated position), or a callable
                ``(prompt ids, generated ids) -> token id or logits [V]``.
            vocab_size: the vocabulary.
            context_length: the window.
            margin: how far a scripted token's logit stands above the others (0).
        """
        if not callable(script):
            wanted = [int(t) for t in script]
            if not wanted:
                raise InvalidRequestError("a scripted model needs at least one token id")
            script = lambda prompt, generated: wanted[min(len(generated), len(wanted) - 1)]  # noqa: E731
        self.script: Script = script
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.margin = margin
        self.prefills = 0
        self.decode_steps = 0
        self.seen: list[list[int]] = []

    def logits(self, prompt: list[int], generated: list[int]) -> np.ndarray:
        """The script's answer for one sequence, as logits ``[V]``."""
        answer = self.script(list(prompt), list(generated))
        if isinstance(answer, (int, np.integer)):
            row = np.zeros(self.vocab_size, dtype=np.float32)
            row[int(answer)] = self.margin
            return row
        return np.asarray(answer, dtype=np.float32).reshape(self.vocab_size)


class _Cache:
    """What the fake model "caches": each row's prompt and the tokens fed since."""

    def __init__(self, rows: int) -> None:
        self.prompts: list[list[int]] = [[] for _ in range(rows)]
        self.fed: list[list[int]] = [[] for _ in range(rows)]
        self.run_seconds = 0.0

    @property
    def length(self) -> int:
        return max((len(p) + len(f) for p, f in zip(self.prompts, self.fed)), default=0)

    def nbytes(self) -> int:
        return 0


class _Runner:
    """The surface of :class:`~nextoken.runner.StepRunner` the KV backends use, over a script."""

    device, device_id, closed = "cpu", 0, False
    adapters = None  # a scripted model takes no LoRA adapters

    def __init__(self, model: ScriptedModel, manifest: Manifest) -> None:
        self.model, self.manifest = model, manifest

    def close(self) -> None:
        self.closed = True

    def cache_ops(self) -> "_Surgery":
        """Row copies of the scripted model's "cache" (for ``n`` > 1)."""
        return _Surgery()

    def new_cache(self, batch_size: int) -> _Cache:
        return _Cache(batch_size)

    def prefill(
        self,
        cache: _Cache,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray | None,
        all_logits: bool = False,
        lora: np.ndarray | None = None,
    ) -> np.ndarray:
        start = time.perf_counter()
        self.model.prefills += 1
        width = input_ids.shape[1]
        for row in range(len(input_ids)):
            cache.prompts[row] += [int(t) for t, m in zip(input_ids[row], attention_mask[row, -width:]) if m]
        out = self._logits(cache)
        cache.run_seconds += time.perf_counter() - start
        return out

    def decode(
        self,
        cache: _Cache,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray | None,
        lora: np.ndarray | None = None,
    ) -> np.ndarray:
        start = time.perf_counter()
        self.model.decode_steps += 1
        for row, token in enumerate(input_ids[:, 0]):
            cache.fed[row].append(int(token))
        out = self._logits(cache)
        cache.run_seconds += time.perf_counter() - start
        return out

    def _logits(self, cache: _Cache) -> np.ndarray:
        self.model.seen = [p + f for p, f in zip(cache.prompts, cache.fed)]
        return np.stack([self.model.logits(p, f) for p, f in zip(cache.prompts, cache.fed)])


class _Surgery:
    """The cache surgery a scripted model needs: copying rows (a prompt's ``n`` choices)."""

    def select(self, cache: _Cache, rows: Sequence[int], start: int, stop: int) -> _Cache:
        out = _Cache(len(rows))
        out.prompts = [list(cache.prompts[r]) for r in rows]
        out.fed = [list(cache.fed[r]) for r in rows]
        out.run_seconds = cache.run_seconds
        return out


class CharTokenizer:
    """One token a character: id ``i`` is ``alphabet[i]``; ids past the alphabet (and ``bos``) have no text."""

    adds_bos = False
    chat_template: str | None = None
    special_tokens: Mapping[str, str] = {}

    def __init__(self, alphabet: str = "\0\n abcdefghijklmnopqrstuvwxyz.,!?") -> None:
        """
        Args:
            alphabet: the characters, id ``i`` being ``alphabet[i]``.
        """
        self.alphabet = alphabet
        self._ids = {c: i for i, c in enumerate(alphabet)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            raise InvalidRequestError(f"character {exc.args[0]!r} is not in this tokenizer's alphabet") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids if 0 < i < len(self.alphabet))

    def id_to_token(self, token_id: int) -> str | None:
        return self.alphabet[token_id] if 0 <= token_id < len(self.alphabet) else None

    def decoder(self, context: Sequence[int] = ()) -> IncrementalDecoder:
        return IncrementalDecoder(self, context)


class FakeEngine(Engine):
    """An :class:`~nextoken.Engine` over a :class:`ScriptedModel` (see the module's doc).

    ``tokenizer``: a :class:`~nextoken.Tokenizer` (e.g. :class:`CharTokenizer`) for text prompts and
    text out, or None (prompts are token ids, texts are empty). ``plugins`` / ``extra_plugins`` /
    ``cost_meters`` as for :class:`~nextoken.Engine` (entry-point plugins are off by default here:
    a test sees only what it registers)."""

    def __init__(
        self,
        model: ScriptedModel,
        *,
        tokenizer: Any = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int = 0,
        plugins: bool | Sequence[str] | None = False,
        extra_plugins: Sequence[Any] = (),
        cost_meters: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """
        Args:
            model: the scripted model the logits come from.
            tokenizer: a :class:`~nextoken.Tokenizer` for text in and out, or None (ids only).
            eos_token_ids: ids that end a sequence.
            pad_token_id: the id rows are padded with.
            plugins: which entry-point plugins load (False, the default here: none).
            extra_plugins: plugin objects registered on this engine only.
            cost_meters: meters charged on every request, ``{name: options}``.
        """
        self.path = Path("<scripted model>")
        self.manifest = Manifest(
            architecture="scripted",
            num_layers=0,
            num_kv_heads=0,
            head_dim=0,
            kv_dtype="float32",
            vocab_size=model.vocab_size,
            context_length=model.context_length,
            inputs=("input_ids", "attention_mask"),
            outputs=("logits",),
            eos_token_ids=tuple(eos_token_ids),
            pad_token_id=pad_token_id,
            tokenizer_file=None,
            padding_side="left",
        )
        self.verified = "none (a scripted model)"
        self.model = model
        self.step_cost = StepCost()  # as Engine's: speculation's cost line
        self.plugins = Registry(plugins)
        for plugin in extra_plugins:
            self.plugins.register(plugin)
        self.tokenizer = tokenizer
        self._tokenizer = GuardedTokenizer(tokenizer, "the test's tokenizer", model.vocab_size) if tokenizer else None
        self.cost_meters = {k: dict(v) for k, v in (cost_meters or {}).items()}
        self.plugins.check("cost_meter", self.cost_meters)
        self.device = DeviceChoice("cpu", ("ScriptedModel",), "a scripted model: no ONNX Runtime session")
        self.threads, self.spin, self.spin_reason = 1, False, "a scripted model"
        self.session = None
        self.runner = _Runner(model, self.manifest)  # type: ignore[assignment]
        self.prefix_cache = None
        self.chat_template_override = None
        self.eos_token_ids = tuple(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.intake = self._new_intake()
