"""The engine: a loaded model package, its plugins, and the one way to generate from it."""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

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
from .embedding import Embedder
from .errors import ContextWindowError, InvalidRequestError, ModelPackageError, NextokenError
from .generation import Generation
from .intake import Intake, Prompt, is_single, resolve_params
from .kvbackends import KVBackend, for_request, lora_of
from .manifest import Manifest, TensorSpec
from .prefixcache import DiskTier, Layout, PrefixCache, package_identity
from .probes import release_free_heap
from .reasoning import ReasoningParser, pick_parser, split_answer, thinking_tags
from .registry import Registry, resolve_names
from .runner import CacheOps, StepRunner
from .scheduler import Scheduler
from .speculation import StepCost
from .tokenizer import GuardedTokenizer, Tokenizer, decoder_for
from .toolcalls import ToolFormat, ToolRequest, pick_tool_parser
from .types import Completion, SamplingParams, StreamEvent

__all__ = ["Engine", "Prompt"]

log = logging.getLogger("nextoken")


class Engine:
    """A model package loaded into an ONNX Runtime session, with its plugins, ready to generate.

    >>> with Engine("pkg") as engine:                      # doctest: +SKIP
    ...     print(engine.generate("Once upon a time", max_new_tokens=32).text)

    The engine is heavy and shared; each request's state (its KV cache) lives in the request, so one
    engine serves requests one after another, and a failed request leaves it as it was. A request
    flows down from here: :meth:`start` builds it (through :attr:`intake`), :meth:`run` or a
    :class:`~nextoken.Scheduler` runs it.
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
        chat_template: str | None = None,
        adapters: Mapping[str, str | Path] | None = None,
    ) -> None:
        """
        Args:
            path: the model package (a folder made by ``nextoken export``).
            device: ``"auto"`` (CUDA when it really works, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
            threads: intra-op threads (None: one for a model under 16 MB on the CPU, where a thread
                pool costs more than it gives; else one per physical core).
            spin: thread spinning within a step (None: ``NEXTOKEN_SPIN`` when set, else on when the
                host is quiet, :func:`~nextoken.device.spin_policy`; the choice and why are
                :attr:`spin` and :attr:`spin_reason`).
            plugins: which entry-point plugins load (None: as ``NEXTOKEN_PLUGINS`` says, all when
                unset; False: none; a list: those entry-point names).
            extra_plugins: plugin objects registered on this engine only, before anything is
                resolved (a tokenizer plugin must come this way or by entry point).
            cost_meters: meters charged on every request, ``{name: options}``, e.g.
                ``{"per_token": {"input_per_million": 0.15, "output_per_million": 0.6}}``.
            tf32: on CUDA, let fp32 matrix products run in TensorFloat-32 (faster, ~1e-3 relative
                error; None: ``NEXTOKEN_TF32``, off when unset).
            verify: how the package's files are checked against their export's checksums before
                loading (None: sha256 once, then trusted while sizes and mtimes are unchanged; True:
                sha256 every load; False: sizes only); a changed file is a :class:`ModelPackageError`.
            prefix_cache_bytes: keep the KV cache of prompt prefixes (blocks of 32 tokens) up to
                this many bytes and reuse it for prompts that start the same way (0: off; see
                :mod:`nextoken.prefixcache`).
            prefix_cache_dir: also keep them on disk there, for later engines of the same package.
            prefix_cache_disk_bytes: the disk tier's size.
            chat_template: a Jinja chat template used instead of the package's (None: the package's).
            adapters: LoRA adapters to load now, ``{name: adapter folder}`` (a package exported with
                ``--lora-adapters``; :meth:`load_adapter` loads more later). A request names its
                adapter (``adapter=``); rows with different adapters run in one batch.
        """
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
        if chat_template is not None and not isinstance(chat_template, str):
            raise InvalidRequestError(
                f"chat_template must be a Jinja template's text, not {type(chat_template).__name__}"
            )
        #: a chat template given at load, used instead of the package's (None: the package's)
        self.chat_template_override = chat_template
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
        self.runner = StepRunner(self.session, self.manifest, self.device.device, device_id, self.device.providers)
        #: what a step of n positions costs this model here, as speculative decoding learns it
        self.step_cost = StepCost()
        #: prompt prefixes' KV caches reused across requests (None: off, ``prefix_cache_bytes=0``)
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_dir is not None and prefix_cache_bytes <= 0:
            raise NextokenError(
                "prefix_cache_dir needs prefix_cache_bytes > 0: the disk tier's entries are loaded "
                "into the memory tier (--prefix-cache-mb)"
            )
        if prefix_cache_bytes > 0 and self.manifest.embeds:
            raise NextokenError(
                f"{self.path} makes embeddings and keeps no KV cache; leave the prefix cache off for it"
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
                    2 * m.num_layers, m.num_kv_heads, m.cache_head_dim, kv_dtype(m.kv_dtype).name, m.context_length
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
        #: an embedding package's runs (:meth:`embed`); None for a package that generates
        self.embedder: Embedder | None = None
        if self.manifest.embeds:
            self.embedder = Embedder(self.session, self.manifest.embedding or {}, self.pad_token_id)
        #: where requests come in: prompts and parameters checked and built into a Generation
        self.intake = self._new_intake()
        for name, adapter in (adapters or {}).items():
            self.load_adapter(name, adapter)
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

    def _new_intake(self) -> Intake:
        """The intake over what the engine has loaded (its runner, plugins, tokenizer, ids)."""
        return Intake(
            self.runner,
            self.plugins,
            self.cost_meters,
            self._tokenizer,
            self.eos_token_ids,
            self.pad_token_id,
            self.device.provider,
            self.step_cost,
            str(self.path),
        )

    # -- adapters -------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters loaded, by name (none where the package takes none)."""
        return self.runner.adapters.names if self.runner.adapters is not None else []

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the LoRA adapter folder ``path`` (made by ``nextoken adapter``) under ``name``; the
        requests that name it run with it from now on, beside requests without or with others."""
        if self.runner.adapters is None:
            raise InvalidRequestError(
                f"{self.path} takes no LoRA adapters; export it with `nextoken export MODEL --lora-adapters N "
                "--lora-rank R` (and make each adapter for that package)"
            )
        self.runner.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Unload adapter ``name``; refused while requests use it."""
        if self.runner.adapters is None:
            raise InvalidRequestError(f"{self.path} takes no LoRA adapters")
        self.runner.adapters.unload(name)

    # -- lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the ONNX Runtime session (after the prefix cache's disk writes end). The engine
        cannot generate afterwards."""
        if self.prefix_cache is not None and self.prefix_cache.disk is not None:
            self.prefix_cache.disk.flush()
        self.session = None  # type: ignore[assignment]
        self.runner.close()

    def cache_ops(self) -> CacheOps:
        """The KV cache surgery graphs (join, drop, copy rows where the cache lives), on this
        engine's execution provider; made at the first use and kept."""
        return self.runner.cache_ops()

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
        return self.intake.need_tokenizer().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens left out), through the package's tokenizer."""
        return self.intake.need_tokenizer().decode(ids)

    @property
    def chat_template(self) -> str | None:
        """The chat template conversations are rendered with: the one given at load, else the package's."""
        if self.chat_template_override is not None:
            return self.chat_template_override
        return self._tokenizer.chat_template if self._tokenizer is not None else None

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: ToolRequest | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template (in a sandbox); with
        ``tools``, the tools as the template takes them (or nextoken's fallback system message)."""
        tok = self.intake.need_tokenizer()
        template = self.chat_template
        template_tools = None
        if tools is not None and tools.active:
            messages = tools.messages(messages, template)
            template_tools = tools.template_tools(template)
        text = render_chat(
            template, messages, tok.special_tokens, add_generation_prompt, template_tools, template_kwargs
        )
        ids = tok.encode(text, add_special_tokens=False)
        if not ids:
            raise InvalidRequestError("the chat template rendered these messages to nothing")
        return ids

    # -- generation ------------------------------------------------------------------------------------
    def start(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, **overrides: Any
    ) -> Generation:
        """A request for ``prompts``, built and checked but not run: a passive :class:`Generation`.
        Run it with :meth:`run` (its events as they come, then ``completions()``), hand it to
        :meth:`Scheduler.submit <nextoken.Scheduler.submit>`, or drive it through its step API.

        ``params`` or keyword overrides (``max_new_tokens=``, ``temperature=`` ...) set how to generate.
        Everything, plugins included, is validated and resolved here, before any model work.
        """
        return self.intake.build(prompts, params, overrides)

    def run(self, generation: Generation) -> Iterator[StreamEvent]:
        """Run a request built by :meth:`start` to its end on the caller's thread, yielding its
        events as they come (a :class:`~nextoken.Scheduler` made for it alone,
        :meth:`Scheduler.alone <nextoken.Scheduler.alone>`: the one driver)."""
        return Scheduler.alone(self, generation).run(generation)

    def complete(self, generation: Generation) -> list[Completion]:
        """Run a request built by :meth:`start` to its end on the caller's thread; every sequence's
        :class:`Completion` (``generation`` keeps its timings and state for a look afterwards)."""
        for _ in self.run(generation):
            pass
        return generation.completions()

    def stream(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, **overrides: Any
    ) -> Iterator[StreamEvent]:
        """Stream text deltas as they are generated: :class:`StreamEvent` s, ``index`` naming the prompt."""
        return self.run(self.start(prompts, params, **overrides))

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
        completions = self.complete(generation)
        if generation.params.record:
            from .records import records_of

            for completion, record in zip(completions, records_of(self, generation)):
                completion.record = record
        return completions[0] if is_single(prompts) and generation.params.n == 1 else completions

    def chat(
        self,
        messages: Sequence[Message],
        params: SamplingParams | None = None,
        *,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
        tool_fallback: bool = False,
        reasoning: str | None = "auto",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tool_parser: str = "auto",
        **overrides: Any,
    ) -> Completion | list[Completion]:
        """Answer a conversation (``[{"role": "user", "content": "..."}, ...]``) with the model's chat template.

        ``tools`` (OpenAI's ``[{"type": "function", "function": {"name", "description", "parameters"}}]``)
        go to the model through its template; ``tool_choice`` ``auto`` (default), ``none``,
        ``required`` or ``{"type": "function", "function": {"name": ...}}`` (the last two enforced by a
        grammar); the calls come back in ``completion.tool_calls`` (finish reason ``tool_calls``).
        ``tool_fallback``: for a template that does not take tools, describe them in a system
        message of nextoken's own (:mod:`nextoken.toolcalls`) instead of refusing.
        ``reasoning``: the reasoning parser that splits a thinking model's thinking into
        ``completion.reasoning`` (``"auto"``: ``think`` for a template that closes a think tag;
        None: none; :mod:`nextoken.reasoning`); tool calls are read from the answer after it.
        ``chat_template_kwargs``: more variables for the template (e.g. ``{"enable_thinking": False}``).
        ``tool_parser``: the format calls are written in (``hermes``, ``llama3_json``, ``mistral``,
        a plugin's; ``"auto"``: the template's, :meth:`tool_format`).
        """
        fmt = self.tool_format(tool_parser) if tools is not None else None
        request = ToolRequest.of(tools, tool_choice, parallel_tool_calls, tool_fallback, fmt)
        parser = self.reasoning_parser(reasoning)
        params = resolve_params(params, overrides)
        ids, params = self.chat_prompt(messages, params, request, chat_template_kwargs)
        params = self.after_thinking(params, parser, ids)
        completions = self.generate(ids, params)
        answers = completions if isinstance(completions, list) else [completions]
        if parser is not None:
            self.split_reasoning(answers, parser, ids)
        if request is not None:
            request.finish(answers)
        return completions

    def reasoning_parser(self, name: str | None = "auto") -> ReasoningParser | None:
        """The reasoning parser ``name`` names (a plugin's; ``"auto"``: ``think`` when the chat
        template closes a think tag; None or ``"none"``: none)."""
        chosen = pick_parser(name, self.chat_template)
        if chosen is None:
            return None
        (piece,) = resolve_names("reasoning_parser", [chosen], self.plugins)
        return piece.make(None)

    def after_thinking(
        self, params: SamplingParams, parser: ReasoningParser | None, prompt: Sequence[int]
    ) -> SamplingParams:
        """``params`` as ``parser`` needs them: a constraint (structured output, tool calls) held
        after the answer's thinking, which stays free, when it splits thinking off by tags; the
        special tokens kept in the text when it reads them (gpt-oss's channels, where a constraint
        is refused: not yet). As they are without a parser."""
        if parser is not None and getattr(parser, "needs_special_tokens", False):
            if params.constrained:
                raise InvalidRequestError(
                    "constrained output (response_format, tool_choice required or named, regex, grammar) "
                    "is not yet held inside gpt-oss's channels; leave it out, or ask for no reasoning parser"
                )
            return params.replace(skip_special_tokens=False)
        tags = thinking_tags(parser, self.prompt_tail(prompt)) if parser is not None and params.constrained else None
        return params.replace(thinking=tags) if tags is not None else params

    def tool_format(self, name: str | None = "auto") -> ToolFormat:
        """The tool-call format ``name`` names (a plugin's, ``register_tool_parsers``; ``"auto"``:
        the chat template's, :func:`~nextoken.toolcalls.pick_tool_parser`)."""
        (piece,) = resolve_names("tool_parser", [pick_tool_parser(name, self.chat_template)], self.plugins)
        fmt = piece.make(None)
        if not isinstance(fmt, ToolFormat):
            raise piece.error(TypeError(f"its factory made a {type(fmt).__name__}, not a ToolFormat"))
        return fmt

    def split_reasoning(
        self, completions: Sequence[Completion], parser: ReasoningParser, prompt: Sequence[int]
    ) -> None:
        """Split each finished chat answer's thinking off its text with ``parser`` (in place:
        ``completion.reasoning``, ``usage.reasoning_tokens``); ``prompt``: the ids it answered."""
        tok = self.intake.need_tokenizer()
        tail = self.prompt_tail(prompt)
        for completion in completions:
            decoder = decoder_for(tok, list(prompt[-8:]), not getattr(parser, "needs_special_tokens", False))
            split_answer(completion, parser, tail, [decoder.add(t) for t in completion.token_ids])

    def prompt_tail(self, prompt: Sequence[int]) -> str:
        """The text a prompt ends with (its last 8 tokens): where a template may have opened the
        answer's thinking (:meth:`ReasoningParser.splitter <nextoken.reasoning.ReasoningParser.splitter>`)."""
        return self.intake.need_tokenizer().decode(list(prompt[-8:]))

    def chat_prompt(
        self,
        messages: Sequence[Message],
        params: SamplingParams,
        tools: ToolRequest | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[list[int], SamplingParams]:
        """A conversation's prompt ids and parameters with its tools (:meth:`ToolRequest.of
        <nextoken.toolcalls.ToolRequest.of>`): the parameters held to the calls ``tool_choice`` asks
        for, the tools rendered through the template (with ``template_kwargs``). What :meth:`chat`
        generates from and the server's chat endpoint submits; the answer's calls come from
        ``tools.finish``."""
        if tools is not None:
            params = tools.constrain(params)
        return self.apply_chat_template(messages, tools=tools, template_kwargs=template_kwargs), params

    # -- embeddings ------------------------------------------------------------------------------------
    def embedding_rows(self, inputs: Prompt | Sequence[Prompt], prompt: str | None = None) -> list[list[int]]:
        """The token rows :meth:`embed` runs for ``inputs`` (a text or ids, or a list of them): each
        text after the named ``prompt``'s prefix, tokenised; each row checked against the
        vocabulary and the window."""
        embedder = self.need_embedder()
        self.intake.check_open()
        items: list[Prompt] = [inputs] if is_single(inputs) else list(inputs)  # type: ignore[list-item, arg-type]
        if not items:
            raise InvalidRequestError("embed needs at least one input")
        prefix = embedder.prompt_prefix(prompt)
        rows = []
        for i, item in enumerate(items):
            if isinstance(item, str) and prefix:
                item = prefix + item
            row = self.intake.prompt_ids(item, None if len(items) == 1 else i)
            if len(row) > self.manifest.context_length:
                where = "the input" if len(items) == 1 else f"input {i}"
                raise ContextWindowError(
                    f"{where} is {len(row)} tokens, over this model's {self.manifest.context_length}; shorten it"
                )
            rows.append(row)
        return rows

    def embed(
        self, inputs: Prompt | Sequence[Prompt], *, dimensions: int | None = None, prompt: str | None = None
    ) -> np.ndarray:
        """Embeddings of ``inputs`` (a text or token ids, or a list of them) from a package exported
        with ``--task embed``: a float32 array ``[len(inputs), dimensions]`` (one row for a single
        input), pooled and normalised as the model was trained (:mod:`nextoken.embedding`).
        ``dimensions``: fewer than the model's, for a model trained for it (``truncatable``);
        ``prompt``: the name of one of the model's prompts (e.g. ``"query"``) put before each text
        (None: its default prompt, if any)."""
        embedder = self.need_embedder()
        return embedder.vectors(self.embedding_rows(inputs, prompt), dimensions)

    def need_embedder(self) -> Embedder:
        """The embedding runs, or an error saying this package generates text."""
        if self.embedder is None:
            raise InvalidRequestError(
                f"{self.path} generates text; embeddings come from a package exported with "
                "`nextoken export MODEL --task embed`"
            )
        return self.embedder

    def forward(
        self, input_ids: Sequence[int] | np.ndarray, cached: bool = False, adapter: str | None = None
    ) -> np.ndarray:
        """Logits ``[S, V]`` for every position of one sequence, in one pass with an empty cache;
        ``cached``: the last position's only ``[1, V]``, as generation computes it (all but the last
        token prefilled into the KV cache generation uses, then one decode step). ``adapter``: with
        that LoRA adapter.

        For checks (parity with the source model); generation never needs all positions.
        """
        self.intake.check_open()
        ids = self.intake.prompt_ids(list(np.asarray(input_ids).reshape(-1)))
        lora = None
        if adapter is not None:
            if self.runner.adapters is None:
                raise InvalidRequestError(f"{self.path} takes no LoRA adapters", param="adapter")
            lora = np.array([self.runner.adapters.slot_of(adapter)], dtype=np.int64)
        if cached:
            if len(ids) < 2:
                raise InvalidRequestError("forward(cached=True) needs at least two token ids: a prefill and a step")
            kv = for_request(self.runner, 1, len(ids), self.pad_token_id)
            kv.join(kv.prefill([ids[:-1]], lora=None if lora is None else lora.tolist()))
            return kv.decode(np.asarray(ids[-1:], dtype=np.int64))
        row = np.asarray([ids], dtype=np.int64)
        positions = np.arange(row.shape[1], dtype=np.int64)[None, :]
        cache = self.runner.new_cache(1)
        return self.runner.prefill(
            cache, row, np.ones_like(row), positions, all_logits=True, **lora_of(self.runner, lora)
        )[0]

    def cached_forward(self, max_length: int | None = None) -> "CachedForward":
        """One sequence run piece by piece over a KV cache kept between calls (up to ``max_length``
        positions, default the context window): :meth:`CachedForward.feed` tokens for the logits
        after them, :meth:`CachedForward.truncate` back to a prefix. For plugins that run a model
        alongside generation (a draft model's guesses)."""
        self.intake.check_open()
        return CachedForward(self, max_length or self.manifest.context_length)


class CachedForward:
    """A sequence's keys and values kept between forward passes (:meth:`Engine.cached_forward`):
    ``tokens`` is what the cache holds."""

    def __init__(self, engine: Engine, max_length: int) -> None:
        """
        Args:
            engine: the engine whose model runs.
            max_length: positions the cache holds, at most the model's window.
        """
        if not 1 <= max_length <= engine.manifest.context_length:
            raise InvalidRequestError(f"max_length must be in [1, {engine.manifest.context_length}], not {max_length}")
        self.engine, self.max_length = engine, max_length
        self.tokens: list[int] = []
        self._kv: KVBackend | None = None

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
                self.engine.runner, 1, self.max_length, self.engine.pad_token_id, ops=self.engine.runner.cache_ops
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
            if length > 0 and self._kv is not None:
                self._kv.truncate(0, length)
            self.tokens = self.tokens[:length]
