"""The engine: a loaded model package, its plugins, and the one way to generate from it."""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast, overload

import numpy as np
import onnxruntime as ort

from .chat import Message, render_chat
from .device import (
    DeviceChoice,
    default_threads,
    device_notes,
    heavy_on_cpu,
    resolve_device,
    session_options,
    spin_policy,
)
from .dtypes import kv_dtype
from .errors import ContextWindowError, InvalidRequestError, ModelPackageError, NextokenError
from .generation import Generation
from .kvbackends import for_request
from .manifest import Manifest, TensorSpec
from .prefixcache import DiskTier, Layout, PrefixCache, package_identity
from .probes import release_free_heap
from .registry import Pipeline, Registry
from .runner import CacheOps, StepRunner
from .scheduler import Scheduler
from .speculation import StepCost
from .tokenizer import GuardedTokenizer, Tokenizer
from .toolcalls import ToolRequest
from .types import Completion, SamplingParams, StreamEvent

__all__ = ["Engine", "Prompt"]

log = logging.getLogger("nextoken")

#: A prompt is text, or token ids as they go into the model.
Prompt = str | Sequence[int]


class Engine:
    """A model package loaded into an ONNX Runtime session, with its plugins, ready to generate.

    >>> with Engine("pkg") as engine:                      # doctest: +SKIP
    ...     print(engine.generate("Once upon a time", max_new_tokens=32).text)

    ``device``: ``"auto"`` (CUDA when it really works, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    ``threads``: intra-op threads (None: one for a model under 16 MB on the CPU, where a thread
    pool costs more than it gives; else one per physical core). ``spin``: thread spinning within a
    step (None: NEXTOKEN_SPIN when set, else on when the host is quiet, :func:`spin_policy`; the
    choice and why are ``engine.spin`` and ``engine.spin_reason``).
    ``plugins``: which entry-point plugins load (None: as NEXTOKEN_PLUGINS says, all when unset;
    False: none; a list: those entry-point names). ``extra_plugins``: plugin objects registered on
    this engine only, before anything is resolved (a tokenizer plugin must come this way or by
    entry point). ``cost_meters``: meters charged on every
    request, ``{name: options}``, e.g. ``{"per_token": {"input_per_million": 0.15, "output_per_million": 0.6}}``.
    ``tf32``: on CUDA, let fp32 matrix products run in TensorFloat-32 (faster, ~1e-3 relative error;
    None: the NEXTOKEN_TF32 environment variable, off when unset: fp32 stays fp32).
    ``prefix_cache_bytes``: keep the KV cache of prompt prefixes (blocks of 32 tokens) up to this
    many bytes and reuse it for later prompts that start the same way (0, the default: off; see
    :mod:`nextoken.prefixcache`); ``prefix_cache_dir``: also keep them on disk there, up to
    ``prefix_cache_disk_bytes``, for later engines of the same package (e.g. after a restart).
    ``verify``: how the package's files are checked against the
    checksums of its export before anything is loaded (None: sha256 once, then trusted while sizes and mtimes are unchanged;
    True: sha256 every load; False: sizes only); a changed file is a :class:`ModelPackageError`.

    The engine is heavy and shared; each request's state (its KV cache) lives in the request, so one
    engine serves requests one after another, and a failed request leaves it as it was.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        threads: int | None = None,
        spin: bool | None = None,
        plugins: bool | Sequence[str] | None = None,
        extra_plugins: Sequence[Any] = (),
        cost_meters: Mapping[str, Mapping[str, Any]] | None = None,
        tf32: bool | None = None,
        verify: bool | None = None,
        prefix_cache_bytes: int = 0,
        prefix_cache_dir: str | Path | None = None,
        prefix_cache_disk_bytes: int = 1 << 30,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ModelPackageError(f"model package {self.path} does not exist")
        if not self.path.is_dir():
            raise ModelPackageError(f"{self.path} is a file; a model package is a directory made by `nextoken export`")
        self.manifest = Manifest.load(self.path)
        model_file = self.path / self.manifest.model_file
        if not model_file.is_file():
            raise ModelPackageError(f"{model_file} is missing; re-export the package with `nextoken export`")
        #: how the files were checked at load: "sha256", "stamp", "sizes" or "none (...)"
        self.verified = self.manifest.verify_at_load(self.path, verify)
        kv_dtype(self.manifest.kv_dtype)  # a cache the runtime cannot hold: refused here, by name
        self.manifest.check_values(self.path)
        self.plugins = Registry(plugins)
        for plugin in extra_plugins:
            self.plugins.register(plugin)
        #: the tokenizer plugin's own tokenizer (None for a package without one)
        self.tokenizer: Tokenizer | None = None
        #: the same, with every answer checked where it enters the engine (what the engine uses)
        self._tokenizer: GuardedTokenizer | None = None
        if self.manifest.tokenizer_file:
            self.tokenizer, loader = self.plugins.tokenizer(self.manifest.tokenizer, self.path, self.manifest)
            self._tokenizer = GuardedTokenizer(
                self.tokenizer, f"plugin {loader.plugin!r} (tokenizer {loader.name!r})", self.manifest.vocab_size
            )
        self.cost_meters = {k: dict(v) for k, v in (cost_meters or {}).items()}
        self.plugins.check("cost_meter", self.cost_meters)
        self.device: DeviceChoice = resolve_device(device, tf32)
        if threads is None:
            weights = sum(p.stat().st_size for p in self.path.iterdir() if p.name.startswith(self.manifest.model_file))
            threads = default_threads(self.device.device, weights)
        self.threads = threads
        #: whether the session's threads spin within a step, and why (given, NEXTOKEN_SPIN, or the host's load)
        self.spin, self.spin_reason = spin_policy(threads) if spin is None else (bool(spin), "given")
        options = session_options(threads, self.spin)
        if self.device.device == "cuda":  # to say at load if compute nodes stay on the CPU
            options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=list(self.device.providers))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelPackageError(
                f"{model_file} is not a loadable ONNX graph ({first[:240]}); re-export the package"
            ) from None
        release_free_heap()
        self.manifest.check_graph(
            [TensorSpec.from_node_arg(a) for a in self.session.get_inputs()],
            [TensorSpec.from_node_arg(a) for a in self.session.get_outputs()],
        )
        device_id = 0
        if self.device.device == "cuda":
            device_id = int(dict(self.device.providers[0][1]).get("device_id", 0))
        self.runner = StepRunner(self.session, self.manifest, self.device.device, device_id)
        self._cache_ops: CacheOps | None = None
        self._cache_ops_lock = threading.Lock()
        #: what a step of n positions costs this model here, as speculative decoding learns it
        self.step_cost = StepCost()
        #: prompt prefixes' KV caches reused across requests (None: off, ``prefix_cache_bytes=0``)
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_dir is not None and prefix_cache_bytes <= 0:
            raise NextokenError(
                "prefix_cache_dir needs prefix_cache_bytes > 0: the disk tier's entries are loaded "
                "into the memory tier (--prefix-cache-mb)"
            )
        if prefix_cache_bytes > 0 and self.manifest.rope_switch:
            raise NextokenError(
                f"{self.path} switches its rotary factors at {self.manifest.rope_switch} tokens "
                "(longrope), so a cached prefix cannot serve a prompt on the other side; leave the "
                "prefix cache off for it"
            )
        if prefix_cache_bytes > 0:
            disk = None
            if prefix_cache_dir is not None:
                if not self.manifest.checksums:
                    raise ModelPackageError(
                        f"{self.path} records no checksums, so the prefix cache's disk tier "
                        "cannot tell it from a changed package; export it again"
                    )
                identity = package_identity(self.manifest.checksums, self.manifest.kv_dtype, self.device.provider)
                m = self.manifest
                layout = Layout(
                    2 * m.num_layers, m.num_kv_heads, m.head_dim, kv_dtype(m.kv_dtype).name, m.context_length
                )
                try:
                    disk = DiskTier(
                        prefix_cache_dir, identity, prefix_cache_disk_bytes, 32, self.runner.cache_of, layout
                    )
                except OSError as exc:
                    raise NextokenError(f"prefix_cache_dir {prefix_cache_dir}: {exc.strerror or exc}") from None
            self.prefix_cache = PrefixCache(prefix_cache_bytes, disk=disk)
        self.eos_token_ids: tuple[int, ...] = tuple(self.manifest.eos_token_ids)
        pad = self.manifest.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        log.info("nextoken: %s", self.device.describe())
        for note in device_notes(self.device.device, self.manifest):
            log.warning("nextoken: %s", note)
        if self.device.device == "cuda":
            heavy = heavy_on_cpu(self.session)
            if heavy:
                ops = collections.Counter(op for _, op in heavy)
                log.warning(
                    "nextoken: this CUDA session runs %d compute nodes on the CPU (%s); "
                    "`nextoken info %s --placement --device cuda` lists them",
                    len(heavy),
                    ", ".join(f"{op} x{n}" for op, n in ops.most_common()),
                    self.path,
                )

    # -- lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the ONNX Runtime session (after the prefix cache's disk writes end). The engine
        cannot generate afterwards."""
        if self.prefix_cache is not None and self.prefix_cache.disk is not None:
            self.prefix_cache.disk.flush()
        self.session = None  # type: ignore[assignment]
        self.runner = None  # type: ignore[assignment]
        self._cache_ops = None

    def cache_ops(self) -> CacheOps:
        """The KV cache surgery graphs (join, drop, copy rows where the cache lives), on this
        engine's execution provider; made at the first use and kept."""
        with self._cache_ops_lock:
            if self._cache_ops is None:
                self._cache_ops = CacheOps(self.runner, self.device.providers)
            return self._cache_ops

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plugins -------------------------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin on this engine only (a module or object with ``@nextoken.hookimpl``
        functions); returns the name it is registered under."""
        return self.plugins.register(plugin, name)

    def unregister(self, name: str) -> None:
        """Remove a plugin registered under ``name``."""
        self.plugins.unregister(name)

    # -- prompts -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model gets them (with BOS when the tokenizer adds one)."""
        return self._need_tokenizer().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens left out), through the package's tokenizer."""
        return self._need_tokenizer().decode(ids)

    def _need_tokenizer(self) -> GuardedTokenizer:
        if self._tokenizer is None:
            raise InvalidRequestError(
                f"{self.path} has no tokenizer, so prompts must be token ids; export it from a checkpoint with one"
            )
        return self._tokenizer

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: ToolRequest | None = None
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (in a sandbox); with
        ``tools``, the tools as the template takes them (or nextoken's fallback system message)."""
        tok = self._need_tokenizer()
        template_tools = None
        if tools is not None and tools.active:
            messages = tools.messages(messages, tok.chat_template)
            template_tools = tools.template_tools(tok.chat_template)
        text = render_chat(tok.chat_template, messages, tok.special_tokens, add_generation_prompt, template_tools)
        ids = tok.encode(text, add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("the chat template rendered these messages to nothing")
        return ids

    def _prompt_ids(self, prompt: Prompt, index: int | None = None) -> list[int]:
        where = "the prompt" if index is None else f"prompt {index}"
        if isinstance(prompt, str):
            ids = self.encode(prompt)
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

    def _batch(self, prompts: Prompt | Sequence[Prompt]) -> list[list[int]]:
        """Token ids per prompt."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        if _is_single(prompts):
            return [self._prompt_ids(cast(Prompt, prompts))]
        if not isinstance(prompts, Sequence):
            raise InvalidRequestError(
                f"prompt must be text, token ids or a list of those, not {type(prompts).__name__}"
            )
        if len(prompts) == 0:
            raise InvalidRequestError("no prompt given; pass text, token ids, or a non-empty list of those")
        return [self._prompt_ids(cast(Prompt, p), i) for i, p in enumerate(prompts)]

    # -- generation ------------------------------------------------------------------------------------
    def start(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, **overrides: Any
    ) -> Generation:
        """A :class:`Generation` for ``prompts``: iterate it for stream events, then ask its completions.

        ``params`` or keyword overrides (``max_new_tokens=``, ``temperature=`` ...) set how to generate.
        Everything, plugins included, is validated and resolved here, before any model work.
        """
        self._check_open()
        params = _params(params, overrides)
        outside = [t for t in params.logit_bias if t >= self.manifest.vocab_size]
        if outside:
            raise InvalidRequestError(
                f"logit_bias names token ids outside the vocabulary [0, {self.manifest.vocab_size}): {outside[:5]}"
            )
        pipeline = Pipeline(self.plugins, params, self.cost_meters)
        ids = self._batch(prompts)
        return Generation(
            self.runner,
            ids,
            params,
            pipeline,
            self._tokenizer,
            self.eos_token_ids,
            self.pad_token_id,
            self.manifest.context_length,
            self.device.device,
            self.device.provider,
            driver=self._drive,
            step_cost=self.step_cost,
        )

    def _check_open(self) -> None:
        """Refuse work once the engine is closed (its session is gone)."""
        if self.runner is None:
            raise InvalidRequestError("this engine is closed; load the package again")

    def _drive(self, generation: Generation) -> Iterator[StreamEvent]:
        """Run a request on the caller's thread: the scheduler, made for it alone, run to its end."""
        return Scheduler.alone(self, generation).run(generation)

    def stream(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, **overrides: Any
    ) -> Iterator[StreamEvent]:
        """Stream text deltas as they are generated: :class:`StreamEvent` s, ``index`` naming the prompt."""
        return iter(self.start(prompts, params, **overrides))

    @overload
    def generate(self, prompts: str, params: SamplingParams | None = None, **overrides: Any) -> Completion: ...
    @overload
    def generate(
        self, prompts: Sequence[int], params: SamplingParams | None = None, **overrides: Any
    ) -> Completion: ...
    @overload
    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | None = None, **overrides: Any
    ) -> Completion | list[Completion]: ...

    def generate(self, prompts, params=None, **overrides):
        """Generate to the end. One prompt (text or ids) gives a :class:`Completion`; a list gives a
        list; with ``n`` > 1, each prompt gives ``n`` choices in a row (a list, even for one prompt)."""
        generation = self.start(prompts, params, **overrides)
        completions = generation.completions()
        if generation.params.record:
            from .records import records_of

            for completion, record in zip(completions, records_of(self, generation)):
                completion.record = record
        return completions[0] if _is_single(prompts) and generation.params.n == 1 else completions

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        tool_fallback: bool = False,
        **overrides: Any,
    ) -> Completion | list[Completion]:
        """Answer a conversation (``[{"role": "user", "content": "..."}, ...]``) with the model's chat template.

        ``tools`` (OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters"}}]``)
        go to the model through its template; ``tool_choice`` ``auto`` (default), ``none``,
        ``required`` or ``{"type": "function", "function": {"name": ...}}`` (the last two enforced by a
        grammar); the calls come back in ``completion.tool_calls`` (finish reason ``tool_calls``).
        ``tool_fallback``: for a template that does not take tools, describe them in a system
        message of nextoken's own (:mod:`nextoken.toolcalls`) instead of refusing.
        """
        request = None if tools is None else ToolRequest(tools, tool_choice, parallel_tool_calls, tool_fallback)
        params = _params(params, overrides)
        if request is not None:
            params = request.constrain(params)
        completions = self.generate(self.apply_chat_template(messages, tools=request), params)
        if request is None:
            return completions
        finished = request.finish(completions if isinstance(completions, list) else [completions])
        return finished if isinstance(completions, list) else finished[0]

    def forward(self, input_ids: Sequence[int] | np.ndarray, cached: bool = False) -> np.ndarray:
        """Logits ``[S, V]`` for every position of one sequence, in one pass with an empty cache;
        ``cached``: the last position's only ``[1, V]``, as generation computes it (all but the last
        token prefilled into the KV cache generation uses, then one decode step).

        For checks (parity with the source model); generation never needs all positions.
        """
        self._check_open()
        ids = self._prompt_ids(list(np.asarray(input_ids).reshape(-1)))
        if cached:
            if len(ids) < 2:
                raise InvalidRequestError("forward(cached=True) needs at least two token ids: a prefill and a step")
            kv = for_request(self.runner, 1, len(ids), self.pad_token_id)
            kv.join(kv.prefill([ids[:-1]]))
            return kv.decode(np.asarray(ids[-1:], dtype=np.int64))
        row = np.asarray([ids], dtype=np.int64)
        positions = np.arange(row.shape[1], dtype=np.int64)[None, :]
        return self.runner.prefill(self.runner.new_cache(1), row, np.ones_like(row), positions, all_logits=True)[0]

    def cached_forward(self, max_length: int | None = None) -> "CachedForward":
        """One sequence run piece by piece over a KV cache kept between calls (up to ``max_length``
        positions, default the context window): :meth:`CachedForward.feed` tokens for the logits
        after them, :meth:`CachedForward.truncate` back to a prefix. For plugins that run a model
        alongside generation (a draft model's guesses)."""
        self._check_open()
        return CachedForward(self, max_length or self.manifest.context_length)


class CachedForward:
    """A sequence's keys and values kept between forward passes (:meth:`Engine.cached_forward`):
    ``tokens`` is what the cache holds."""

    def __init__(self, engine: Engine, max_length: int) -> None:
        if not 1 <= max_length <= engine.manifest.context_length:
            raise InvalidRequestError(f"max_length must be in [1, {engine.manifest.context_length}], not {max_length}")
        self.engine, self.max_length = engine, max_length
        self.tokens: list[int] = []
        self._kv: Any = None

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Run ``ids`` after what the cache holds; the logits after each of them ``[len(ids), V]``
        (after the last only when the cache was empty: a prefill)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise InvalidRequestError("feed needs at least one token id")
        if len(self.tokens) + len(ids) > self.max_length:
            raise ContextWindowError(
                f"{len(self.tokens)} + {len(ids)} tokens exceed this cache's {self.max_length} "
                "positions; truncate it first"
            )
        if self._kv is None or not self.tokens:
            self._kv = for_request(
                self.engine.runner, 1, self.max_length, self.engine.pad_token_id, ops=self.engine.cache_ops
            )
            pre = self._kv.prefill([ids])
            self._kv.join(pre)
            logits = pre.logits
        else:
            logits = self._kv.extend(0, ids)
        self.tokens += ids
        return logits

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens' keys and values."""
        if length < len(self.tokens):
            if length > 0:
                self._kv.truncate(0, length)
            self.tokens = self.tokens[:length]


def _is_single(prompts: Any) -> bool:
    """One prompt (text, or a flat sequence of ids) rather than a batch."""
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 1
    return isinstance(prompts, Sequence) and len(prompts) > 0 and all(isinstance(p, (int, np.integer)) for p in prompts)


def _params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    if params is not None and not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"params must be a SamplingParams, not {type(params).__name__}")
    params = params or SamplingParams()
    return params.replace(**overrides) if overrides else params
