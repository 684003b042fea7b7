"""nextoken's hook specifications: everything a plugin can provide or observe.

A plugin is a plain module (or object) whose functions carry ``@nextoken.hookimpl``; it may accept
any subset of a hook's arguments. Built-ins in ``nextoken.plugins`` register through these same
hooks. Third-party plugins are found through the ``nextoken`` entry-point group, or registered on
one engine with ``engine.register(plugin)``.

Registration hooks (``register_*``) are called once per plugin manager, not per request or token:
each receives a ``register`` callback and calls it once per name it provides; the host owns the
names, and two plugins registering one name is an error naming both. What they register are
*factories*: once per request, nextoken asks each active factory for a plain callable and the
generation loop calls those, one call per step over the whole batch, with no hook dispatch per
token.

Shapes: ``logits`` is a float32 numpy array ``[batch, vocab]``; ``tokens`` is int64 ``[batch]``.
Every answer is checked where it enters the loop (shape, dtype, finite scores, ids inside the
vocabulary, the Stop and Charge types); a wrong one, like an exception, is a
:class:`nextoken.PluginError` naming the plugin and the piece, and ends only the request that used
it. Observers' return values are ignored.
``state`` is the request's :class:`nextoken.BatchState` (prompt and generated ids per sequence,
text so far, the step number, the request's :class:`nextoken.SamplingParams`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .types import BatchState, Completion

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "nextoken"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- what a plugin provides --------------------------------------------------------------------------


@hookspec
def register_tokenizers(register: Callable[..., None]) -> None:
    """Provide tokenizers: ``register(name, factory)``.

    ``factory(package_dir: Path, manifest: Manifest) -> Tokenizer`` loads the tokenizer of a model
    package. A tokenizer has ``encode(text, add_special_tokens=True) -> list[int]``,
    ``decode(ids) -> str`` (special tokens left out), ``adds_bos: bool``, ``chat_template: str | None``,
    ``special_tokens: dict[str, str]`` and ``id_to_token(id) -> str | None``. A package names its
    tokenizer in nextoken.json (``tokenizer``, default ``"hf"``: the built-in ``tokenizers`` one).
    """


@hookspec
def register_logits_processors(register: Callable[..., None]) -> None:
    """Provide logits processors: ``register(name, factory, order=100)``.

    ``factory(params: SamplingParams, options: dict) -> processor | None`` is asked once per
    request; ``None`` means "not active for this request" (e.g. temperature 1). A processor is
    ``processor(logits, state) -> logits``; it may change ``logits`` in place and return it. It may
    set a score to -inf (ban a token), never to NaN or +inf, and must leave each row some finite score.
    Processors run in ascending ``order`` (ties by name). The built-ins: repetition_penalty 10,
    temperature 20, top_k 30, top_p 40, min_p 50; a third-party processor that only bans tokens
    can use any order, one that reshapes probabilities should come after 50.

    Built-ins activate from their SamplingParams fields; any other processor activates when its
    name is in ``SamplingParams.processors``, and gets ``SamplingParams.options[name]``.
    """


@hookspec
def register_strategies(register: Callable[..., None]) -> None:
    """Provide decoding strategies: ``register(name, factory)``.

    ``factory(params: SamplingParams, options: dict) -> strategy``; ``strategy(logits, state) ->
    tokens`` picks the next token of every sequence from the processed logits. The request's
    ``SamplingParams.strategy`` names it (default: ``greedy`` at temperature 0, else ``sample``).
    """


@hookspec
def register_stop_conditions(register: Callable[..., None]) -> None:
    """Provide stop conditions: ``register(name, factory)``.

    ``factory(params: SamplingParams, options: dict) -> condition | None`` (None: not active).
    ``condition(tokens, state) -> dict[int, Stop] | None`` is called after every step with the
    tokens just picked; it returns, for the rows that must stop, a :class:`nextoken.Stop` (the
    finish reason, a detail, and optionally where to cut the text), or None when no row stops.
    A condition that works on text may also have ``holdback(text) -> int``: how many trailing
    characters of a sequence's text to keep from a streaming client because they may yet turn out
    to be a stop marker. A cut (``text_end``) never takes back text already streamed: it is moved to
    the end of what was streamed, so the final text and the stream always agree; a condition that
    cuts text must declare a holdback at least as long as what it may cut. Built-ins activate from SamplingParams fields; others when named in
    ``SamplingParams.stop_conditions``.
    """


@hookspec
def register_cost_meters(register: Callable[..., None]) -> None:
    """Provide cost meters: ``register(name, factory)``.

    ``factory(options: dict) -> meter``; ``meter(usage: Usage) -> Charge`` prices one completed
    sequence. Meters are configured per engine (``Engine(cost_meters={name: options})``) or per
    request (``SamplingParams.cost_meters``); each completion carries every configured meter's charge.
    """


@hookspec
def register_proposers(register: Callable[..., None]) -> None:
    """Provide speculative-decoding proposers: ``register(name, factory)``.

    ``factory(params: SamplingParams, options: dict) -> proposer``; ``proposer(state, row, k) ->
    list[int]`` guesses up to ``k`` tokens that may follow sequence ``row`` (``[]``: no guess). The
    model checks every guess in one step and keeps those it would have chosen itself, so a proposer
    changes speed, never the text. The request's ``SamplingParams.speculative["method"]`` names it.
    """


@hookspec
def register_reasoning_parsers(register: Callable[..., None]) -> None:
    """Provide reasoning parsers: ``register(name, factory)``.

    ``factory(options: dict | None) -> parser``; ``parser.splitter(prompt_tail) -> splitter`` for one
    answer whose prompt ends with ``prompt_tail``; ``splitter.feed(text) -> (reasoning, content)``
    takes the answer's text as it streams and gives what it settles, ``splitter.flush()`` what it
    held back at the end (:mod:`nextoken.reasoning`). A chat names one (``reasoning="think"``;
    ``"auto"``: ``think`` for a template that closes a think tag), and its answer's ``reasoning``
    and text are split by it; tool calls are read from the text after the reasoning.
    """


@hookspec
def register_tool_parsers(register: Callable[..., None]) -> None:
    """Provide tool-call formats: ``register(name, factory)``.

    ``factory(options: dict | None) -> ToolFormat`` (:class:`nextoken.toolcalls.ToolFormat`: tagged
    blocks or bare JSON, the arguments' key): how a template teaches calls to be written, so that
    ``tool_choice`` ``required`` or a named function holds the answer to that format and a streamed
    answer's calls are found in it. A chat names one (``tool_parser="mistral"``; ``"auto"``: picked
    from the chat template, :func:`nextoken.toolcalls.pick_tool_parser`).
    """


# -- what a plugin observes ---------------------------------------------------------------------------


@hookspec
def on_request_start(state: "BatchState") -> None:
    """A request is about to prefill: ``state.prompts`` (ids), ``state.params``, ``state.request_id``."""


@hookspec
def on_step(state: "BatchState", tokens: np.ndarray) -> None:
    """Step ``state.step`` picked ``tokens`` (``[batch]``; rows that already finished included,
    ``state.alive`` tells which are running). The loop asks once per request whether any plugin
    implements this hook and does not call it otherwise, so an unobserved loop pays nothing."""


@hookspec
def on_request_end(state: "BatchState", completions: "list[Completion]") -> None:
    """A request finished (every sequence stopped); ``completions`` are its results."""
