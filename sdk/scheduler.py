"""Continuous batching: many requests share one running batch, joining and leaving at step boundaries.

    scheduler = Scheduler(engine, max_batch=8).start()
    handle = scheduler.submit("Once upon a time", max_new_tokens=64)   # from any thread
    for event in handle:                                              # or: async for event in handle
        print(event.text, end="")
    scheduler.close()

Each step decodes every running sequence at once (decode first), then prefills the requests that
are waiting, as far as ``max_batch`` allows, and merges them into the batch. Every request keeps
its own sampling parameters, plugins, stop conditions and seed: its step is its own
:class:`~nextoken.Generation`'s, on its row of the batch's logits.

Every prompt not in the batch yet is a request whose computed tokens lag its tokens
(:class:`CatchUp`): a long prompt, a prompt whose prefix the prefix cache holds (it starts from
there), or a slid window coming back. They catch up in order, at most ``max_prefill_tokens`` a step
between the running batch's decode steps, so a long newcomer delays the others by one chunk a step
instead of its whole prompt at once; each joins the batch when it has caught up. Short newcomers
with nothing cached catch up together, in one run.

It is the one driver of generation: ``Engine.generate``, ``Engine.stream`` and ``Engine.run`` run
a scheduler made for their request (:meth:`Scheduler.alone`; a list of prompts is one request of
several sequences) to its end on the caller's thread (:meth:`Scheduler.run`), so a request alone
and a thousand sharing a batch take the same path.

The request path flows down: the engine builds a passive :class:`~nextoken.Generation` (through its
:class:`~nextoken.intake.Intake`), the scheduler runs it, the KV backend and the runner run the
model. The scheduler sees the engine as a :class:`Host` (the runner, the manifest, the intake, the
prefix cache), read once when it is made; it calls nothing above it.

The batch's KV cache lives in a backend (:mod:`nextoken.kvbackends`, ``kv_backend``): ``concat``
for every graph (a joining request's cache padded to the batch's length, a leaving one's row
dropped), or ``slots`` for GroupQueryAttention graphs (the default for them: one fixed buffer
``[max_batch, kv_heads, slot_length, head_dim]`` per layer, each request in a slot of its own,
written in place). The scheduler keeps admission, chunked prefill and the order of work; each
request's step is its own :class:`~nextoken.Generation`'s :meth:`~nextoken.Generation.advance`,
the same one ``Engine.generate`` runs.

Requests are served in the order of their rank: their ``priority`` (lower first), raised a level for
every ``priority_aging`` seconds they have waited, then the order they came in. A rank is fixed when
a request is submitted (its priority plus its arrival time over ``priority_aging``), so a request of
priority ``p`` is passed only by requests of priority ``q`` that arrive within ``(p - q) x
priority_aging`` seconds after it: delayed, never starved. When the batch has no room (rows, or KV
bytes within ``kv_budget``) for the first request waiting, running requests of a later rank give way
to it, the latest first (vLLM's recompute preemption: they come back, in rank order, with their
prompt and answer so far prefilled again; the same tokens).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from . import threads
from .adapters import AdapterTable
from .dtypes import QUANTISED_KV
from .errors import InvalidRequestError, NextokenError, SchedulerStoppedError
from .generation import Generation
from .intake import Intake, Prompt
from .kvbackends import BACKENDS, ConcatBackend, KVBackend, Prefilled, SlotBackend, for_request
from .kvcache import PAGED_HOST, KVCache, row_slack
from .manifest import Manifest
from .metrics import Metrics
from .prefixcache import PrefixCache
from .probes import MemorySampler, meminfo_bytes
from .runner import StepRunner
from .types import Completion, SamplingParams, StreamEvent

__all__ = [
    "PREFILL_TOKENS",
    "PREFILL_TOKENS_INT8_CACHE",
    "Host",
    "RequestHandle",
    "Scheduler",
    "default_prefill_tokens",
]

_DONE = object()


class Host(Protocol):
    """What a scheduler needs of the engine it serves (an :class:`~nextoken.Engine` is one), read
    once when the scheduler is made."""

    @property
    def runner(self) -> StepRunner: ...
    @property
    def manifest(self) -> Manifest: ...
    @property
    def intake(self) -> Intake: ...
    @property
    def prefix_cache(self) -> PrefixCache | None: ...
    @property
    def pad_token_id(self) -> int: ...


HostT = TypeVar("HostT", bound=Host)


class RequestHandle:
    """One submitted request: iterate it (or ``async for``) for its :class:`StreamEvent` s;
    :meth:`result` waits for its :class:`Completion`; :meth:`cancel` ends it at the next step."""

    def __init__(self, generation: Generation, sink: list[list[StreamEvent]] | None = None) -> None:
        """
        Args:
            generation: the request it stands for.
            sink: where a driver on this thread collects each step's events (:meth:`Scheduler.run`);
                None: a queue the consumer reads from any thread.
        """
        self.generation = generation
        #: sequences (rows of the batch) the request has: one for a submitted request
        self.rows = generation.state.batch_size
        self._sink = sink  # events for a driver on this thread (Scheduler.run)
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._listener: Callable[[list[StreamEvent] | None], object] | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.cancelled = False
        self.model_seconds = 0.0
        #: where it stands in the queue: (priority + arrival / priority_aging, arrival order); lower first
        self.rank: tuple[float, int] = (0.0, 0)
        #: when it was queued (``time.perf_counter()``)
        self.submitted = 0.0
        #: the LoRA adapter slot its rows run with (0: none), held from the adapters' table until it ends
        self.lora = 0
        self._adapters: AdapterTable | None = None

    def hold_adapter(self, adapters: AdapterTable | None) -> None:
        """Take the slot of the adapter the request names (``params.adapter``) until it ends: an
        InvalidRequestError when the package takes none or that one is not loaded."""
        name = self.generation.params.adapter
        if name is None:
            return
        if adapters is None:
            raise InvalidRequestError(
                f"adapter {name!r}: this package takes no LoRA adapters; export it with --lora-adapters N",
                param="adapter",
            )
        self.lora, self._adapters = adapters.hold(name), adapters

    @property
    def queued_seconds(self) -> float:
        """Seconds it waited in the queue before it began (so far, while it waits)."""
        start = self.generation.start or time.perf_counter()
        return max(start - self.submitted, 0.0) if self.submitted else 0.0

    # -- consumer side ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            item = self._events.get()
            if item is _DONE:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def __aiter__(self):
        return self._async_events()

    async def _async_events(self):
        loop = asyncio.get_running_loop()
        while True:
            item = await loop.run_in_executor(None, self._events.get)
            if item is _DONE:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        """The completion (the first choice's, with ``n`` > 1), once the request has finished
        (raises what the request raised)."""
        return self.results(timeout)[0]

    def results(self, timeout: float | None = None) -> list[Completion]:
        """Every choice's completion (``n`` of them), once the request has finished."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request has not finished")
        if self._error is not None:
            raise self._error
        return self.generation.completions()

    def cancel(self) -> None:
        """End the request at the next step boundary (finish reason ``cancelled``); its slot is freed."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def error(self) -> BaseException | None:
        """What ended the request, when it failed (None while it runs, or when it ended well)."""
        return self._error

    def listen(self, listener: Callable[[list[StreamEvent] | None], object]) -> None:
        """Hand each step's events to ``listener`` instead of queueing them for iteration (what was
        queued already goes to it now, in order); ``None`` once the request has ended (its
        :attr:`error` or :meth:`results` are ready). It is called on the scheduler's thread and must
        not block: an event loop's listener passes the list on with ``call_soon_threadsafe``, so no
        thread waits for a request. A listener that raises is taken for a consumer gone: the
        request is cancelled."""
        with self._lock:
            self._listener = listener
            queued = []
            while not self._events.empty():
                queued.append(self._events.get_nowait())
            events = [e for e in queued if e is not _DONE]
            if events:
                self._tell(events)
            if len(events) < len(queued):
                self._tell(None)

    def _tell(self, events: list[StreamEvent] | None) -> None:
        try:
            self._listener(events)  # type: ignore[misc]
        except Exception:  # the consumer is gone (its loop closed): nobody wants the rest
            self.cancelled = True

    # -- scheduler side -----------------------------------------------------------------------------
    def deliver(self, events: list[StreamEvent]) -> None:
        """Hand a step's events to the consumer (the scheduler's call)."""
        if self._sink is not None:
            self._sink.append(events)
            return
        with self._lock:
            if self._listener is not None:
                self._tell(list(events))
                return
            for event in events:
                self._events.put(event)

    def complete(self, error: BaseException | None = None) -> None:
        """End the request, with ``error`` when it failed (the scheduler's call)."""
        self._error = error
        if self._adapters is not None:
            self._adapters.release(self.lora)
            self._adapters = None
        self._done.set()
        if self._sink is None:
            with self._lock:
                if self._listener is not None:
                    self._tell(None)
                else:
                    self._events.put(_DONE)


@dataclass
class CatchUp:
    """A request whose computed tokens lag its tokens: its ``cache`` holds the first ``done`` of
    ``prompt``'s keys and values (none yet, a cached prefix's, or the chunks so far), and it catches
    up within each step's prefill budget, then joins the batch. One path for a long prompt, a
    prompt whose prefix is cached, and a slid window coming back (``refill``). ``cached``: it goes
    through the prefix cache: what that holds of the prompt is looked up when its turn comes (so it
    finds what the requests before it stored), and its own keys and values are stored when it has
    caught up."""

    handle: RequestHandle
    cache: KVCache | None
    done: int
    prompt: list[int]
    refill: bool = False
    cached: bool = False
    #: the slot it is prefilled into in place, in chunks (slot backends, one sequence, no prefix
    #: cache; ``cache`` is None), and the model time its chunks took
    slot: int | None = None
    seconds: float = 0.0


#: Prompt tokens prefilled a step by default (CUDA, and graphs without slots); with an int8 KV
#: cache fewer, since onnxruntime's CPU GroupQueryAttention has no fast prompt path for a quantised
#: cache and its cost grows with the chunk: a 4,000-token prompt on the 135M config took 27.6 s
#: whole, 18.8 s in chunks of 1,024 and 17.3 s in chunks of 512 (the fp32 cache: 8.9 s whole).
#: On the CPU a GroupQueryAttention graph's prompts run in chunks of PREFILL_TOKENS_CPU, in place
#: in their slots: the 135M config, fp32, 2 threads: 1,900 tokens in 2.43 s against 3.02 s whole,
#: 8,000 in 19.0 s against 21.5 s in chunks of 4,096 (int4, 1,900: 3.36 s against 3.84 s)
PREFILL_TOKENS, PREFILL_TOKENS_INT8_CACHE, PREFILL_TOKENS_CPU = 4096, 512, 256


def default_prefill_tokens(manifest: Manifest, in_place_on_cpu: bool = False) -> int:
    """The prompt tokens a step prefills by default for a package: its cache's dtype decides, and
    whether its prompts run in place in slots on the CPU (``in_place_on_cpu``)."""
    if manifest.kv_dtype in QUANTISED_KV:
        return PREFILL_TOKENS_INT8_CACHE
    return PREFILL_TOKENS_CPU if in_place_on_cpu else PREFILL_TOKENS


class Scheduler(Generic[HostT]):
    """Continuous batching over one :class:`~nextoken.Engine` (see the module's doc).

    ``max_batch``: sequences decoded together at most; more requests wait their turn.
    ``max_prefill_tokens``: prompt tokens prefilled in one step at most, so a burst of newcomers
    does not stall the running sequences for long; a longer prompt is prefilled in chunks of this
    size, one a step. ``kv_backend``: ``auto`` (``slots`` for GroupQueryAttention graphs, else
    ``concat``), ``concat`` or ``slots``. ``slot_length``: positions per slot (default: the
    model's window with paged slots, else the window at most 2048); with slots, prompt +
    max_new_tokens must fit in it. ``paged_slots`` (default: on the CPU): the slot buffer is
    reserved address space and holds only the pages its rows write (a slot that frees gives them
    back), so KV memory follows what the running requests hold, not ``max_batch x slot_length``;
    else the buffer (:attr:`kv_buffer_bytes`) is allocated whole. ``kv_budget``: bytes of KV cache
    the requests in hand may hold together (:attr:`kv_committed_bytes`): a newcomer is admitted
    when its prompt fits beside what they hold, and when their growth passes the budget the newest
    running request is preempted (its cache given back) and comes back, before any newcomer, when
    there is room, its prompt and answer so far prefilled again: the same tokens. A request that
    could not finish alone within the budget (prompt + max_new_tokens) is refused. Default: with
    paged slots, half the host memory available now, at most the slots' whole size; else none
    (the fixed buffer is the limit).
    ``kv``: a KV backend made for
    one request, used instead of making one (:meth:`alone` passes it); that request's usage counts
    the backend's whole cache.
    Use :meth:`step` to drive it yourself, :meth:`start` to run it on a background thread, or
    :meth:`run` to run one request on this thread.
    """

    def __init__(
        self,
        engine: HostT,
        max_batch: int = 8,
        max_prefill_tokens: int | None = None,
        kv_backend: str = "auto",
        slot_length: int | None = None,
        kv: KVBackend | None = None,
        paged_slots: bool | None = None,
        kv_budget: int | None = None,
        priority_aging: float | None = 5.0,
    ) -> None:
        """
        Args:
            engine: the engine to serve (any :class:`Host`); kept as :attr:`engine` for its owner.
            max_batch: sequences decoded together at most.
            max_prefill_tokens: prompt tokens prefilled in one step at most (longer prompts:
                chunks; None: :func:`default_prefill_tokens` for the package's cache).
            kv_backend: ``auto``, ``concat`` or ``slots``.
            slot_length: positions per slot (default: the window with paged slots, else at most 2048).
            kv: a backend made for one request (what :meth:`alone` passes).
            paged_slots: slots hold only the pages they write (None: on the CPU).
            kv_budget: bytes of KV cache the requests in hand may hold together (None: see above).
            priority_aging: seconds of waiting that raise a request's rank one priority level
                (None: priorities are strict, and a low one may wait for ever under load).
        """
        if max_batch < 1:
            raise InvalidRequestError(f"max_batch must be >= 1, not {max_batch}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise InvalidRequestError(f"max_prefill_tokens must be >= 1, not {max_prefill_tokens}")
        if priority_aging is not None and not priority_aging > 0:
            raise InvalidRequestError(f"priority_aging must be > 0 seconds (None: no aging), not {priority_aging}")
        if kv_backend not in ("auto", *BACKENDS):
            raise InvalidRequestError(f"kv_backend must be auto, concat or slots, not {kv_backend!r}")
        #: the engine served, for its owner (the scheduler reads what it needs of it here, once)
        self.engine: HostT = engine
        self.runner, self.manifest, self.intake = engine.runner, engine.manifest, engine.intake
        self.prefix_cache, self.pad_token_id = engine.prefix_cache, engine.pad_token_id
        gqa = self.manifest.padding_side == "right"  # the graph places keys by the mask: GroupQueryAttention
        if kv_backend == "slots" and not gqa:
            raise InvalidRequestError(
                "kv_backend='slots' needs a graph with GroupQueryAttention (a package made by "
                "nextoken export or import-genai); use 'concat'"
            )
        window = self.manifest.context_length
        if slot_length is not None and not 1 <= slot_length <= window:
            raise InvalidRequestError(
                f"slot_length must be between 1 and the model's window ({window}), not {slot_length}"
            )
        if paged_slots is None:
            paged_slots = self.runner.device == "cpu" and PAGED_HOST
        elif paged_slots and (self.runner.device != "cpu" or not PAGED_HOST):
            raise InvalidRequestError(
                "paged_slots needs the cache in host memory on Linux or macOS; on a GPU slots are allocated whole"
            )
        #: whether the slots hold only the pages they write (see the class's doc)
        self.paged_slots: bool = paged_slots and kv_backend != "concat" and gqa and kv is None
        self.slot_length = slot_length or (window if self.paged_slots else min(window, 2048))
        self.max_batch = max_batch
        if max_prefill_tokens is None:  # in place in slots on the CPU: smaller chunks run faster
            in_place = gqa and kv_backend != "concat" and self.runner.device == "cpu"
            max_prefill_tokens = default_prefill_tokens(self.manifest, in_place)
        self.max_prefill_tokens: int = max_prefill_tokens
        #: the running batch's KV cache (:mod:`nextoken.kvbackends`)
        self.kv: KVBackend
        if kv is not None:  # made for one request (Scheduler.alone)
            self.kv = kv
        elif kv_backend == "slots" or (kv_backend == "auto" and gqa):
            self.kv = SlotBackend(
                self.runner,
                max_batch,
                self.slot_length,
                self.pad_token_id,
                self.runner.cache_ops,
                paged=self.paged_slots,
            )
        else:
            self.kv = ConcatBackend(self.runner, self.pad_token_id, self.runner.cache_ops)
        self.kv_backend: str = self.kv.name
        if kv_budget is not None and kv_budget < 1:
            raise InvalidRequestError(f"kv_budget must be a positive number of bytes, not {kv_budget}")
        #: bytes of KV cache the requests in hand may hold together (None: no limit beyond the rows)
        self.kv_budget: int | None = kv_budget if kv_budget is not None else self._default_kv_budget()
        #: requests preempted for memory, waiting for room to come back (each with its rows' tokens)
        self._evicted: collections.deque[tuple[RequestHandle, list[list[int]]]] = collections.deque()
        #: of those, the caches kept of requests that gave way for a row (by id): they come back
        #: with their last token run over it, not their whole history prefilled again
        self._parked: dict[int, KVCache] = {}
        #: requests preempted so far (for memory, or for a request of an earlier rank)
        self.preempted = 0
        #: of those, preempted for a request of an earlier rank
        self.preempted_for_priority = 0
        #: of those, kept a copy of their cache (short of a row only) and came back over it
        self.preempted_cache_kept = 0
        #: seconds of waiting that raise a request's rank one priority level (None: strict priorities)
        self.priority_aging = priority_aging
        self._arrivals = itertools.count(1)
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._active: list[RequestHandle] = []
        self._rows = 0  # rows of the batch: the active requests' sequences
        self._leaving = 0  # active requests that ended or slid this step
        self._alone = kv is not None  # a backend made for one request: its whole cache is its own
        self._last = np.zeros(0, dtype=np.int64)  # each row's last token, fed at the next step
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        #: requests catching up to their prompts (slid windows first, then in the order they came)
        self._catching_up: collections.deque[CatchUp] = collections.deque()
        #: running requests whose window slid (context_policy "slide"): each sequence's kept tokens, to prefill again
        self._refill: collections.deque[tuple[RequestHandle, list[list[int]]]] = collections.deque()
        self._sliding: set[int] = set()
        #: newcomers being prefilled now (popped from the queue, not yet in the batch)
        self._admitting: list[RequestHandle] = []
        self._memory = MemorySampler(self.runner.device, self.runner.device_id)
        #: why the loop stopped, when it died (None while it runs or was closed in order)
        self.error: BaseException | None = None
        #: requests ended, by how: finished (their own stop), cancelled (by the caller), failed
        self.ended = {"finished": 0, "cancelled": 0, "failed": 0}
        #: what the scheduler has done, for :meth:`metrics` and the server's /metrics
        self.stats = Metrics()

    # -- submitting -----------------------------------------------------------------------------------
    def submit(
        self, request: Generation | Prompt, params: SamplingParams | None = None, **overrides: Any
    ) -> RequestHandle:
        """Queue one request: a :class:`~nextoken.Generation` the engine built (``engine.start``), or
        one prompt (text or token ids) with ``params`` / keyword overrides, built here by the
        engine's intake. Validated now, so a bad request raises at once."""
        if isinstance(request, Generation):
            if params is not None or overrides:
                raise InvalidRequestError(
                    "a request built by engine.start carries its own parameters; give them to start(), not submit()"
                )
            generation = request
        else:
            generation = self.intake.build(request, params, overrides)
        if generation.started:
            raise InvalidRequestError("this request has already run; start a new one")
        if generation.state.batch_size != generation.params.n:
            raise InvalidRequestError("submit one prompt per request; submit a list's prompts one by one")
        if generation.params.n > self.max_batch:
            raise InvalidRequestError(
                f"n={generation.params.n} choices need {generation.params.n} sequences at once, "
                f"more than this scheduler's max_batch ({self.max_batch})"
            )
        slide = generation.params.context_policy == "slide"
        window = self.manifest.context_length
        fixed = self.kv.fixed_length
        if slide and fixed is not None and fixed < window:
            raise InvalidRequestError(
                f"context_policy='slide' slides at the model's window ({window} tokens), which "
                f"needs slots of that length, not {self.slot_length}: make the Scheduler "
                f"with slot_length={window}"
            )
        if fixed is not None and not slide and fixed < window:
            # slots as long as the window end a request where the window does, as the concat backend
            # does; shorter slots would end it earlier, so a request that needs more is refused
            need = len(generation.state.prompts[0]) + generation.params.max_new_tokens
            if need > self.slot_length:
                raise InvalidRequestError(
                    f"prompt ({len(generation.state.prompts[0])} tokens) + max_new_tokens "
                    f"({generation.params.max_new_tokens}) exceed the slot length ({self.slot_length}); ask for fewer "
                    "tokens, or make the Scheduler with a larger slot_length"
                )
        handle = RequestHandle(generation)
        need = self._need(handle)
        if self.kv_budget is not None and need > self.kv_budget:
            raise InvalidRequestError(
                f"this request may reach {need / 2**20:.1f} MiB of KV cache ({handle.rows} x (prompt "
                f"{len(generation.state.prompts[0])} + max_new_tokens {generation.params.max_new_tokens}) positions), "
                f"more than this scheduler's kv_budget ({self.kv_budget / 2**20:.1f} MiB), so it could not finish even "
                "alone; ask for fewer tokens, "
                "or give the scheduler a larger kv_budget"
            )
        handle.hold_adapter(self.runner.adapters)
        with self._cond:
            if self._stop:
                handle.complete()  # gives its adapter back
                if self.error is not None:
                    raise SchedulerStoppedError(
                        f"this scheduler stopped after a failure ({self.error}); start a new one"
                    ) from None
                raise SchedulerStoppedError("this scheduler is closed")
            self._enqueue(handle)
            self._cond.notify()
        return handle

    def _enqueue(self, handle: RequestHandle) -> None:
        """Rank ``handle`` (see the module's doc) and queue it in rank order."""
        priority, aging = handle.generation.params.priority, self.priority_aging
        handle.submitted = time.perf_counter()
        handle.rank = (priority + time.monotonic() / aging if aging else float(priority), next(self._arrivals))
        if not self._waiting or self._waiting[-1].rank <= handle.rank:
            self._waiting.append(handle)  # the usual case: a rank after every one waiting
        else:
            self._waiting.insert(bisect.bisect(self._waiting, handle.rank, key=_rank), handle)

    @classmethod
    def alone(cls, engine: HostT, generation: Generation) -> "Scheduler[HostT]":
        """A scheduler for one request of any number of sequences, run on the caller's thread by
        :meth:`run` (what ``Engine.generate`` and ``Engine.stream`` do): its KV cache is made for that
        request (:func:`~nextoken.kvbackends.for_request`) and counted to it whole, and its prompts are
        prefilled whole (but for an int8 cache's, whose prompt path is faster in chunks:
        :data:`PREFILL_TOKENS_INT8_CACHE` a step, and on the CPU one prompt in slots, in place in
        chunks of :data:`PREFILL_TOKENS_CPU`, faster than whole)."""
        state, params = generation.state, generation.params
        window = engine.manifest.context_length
        length = min(max(len(p) for p in state.prompts) + params.max_new_tokens, window)
        slide = params.context_policy == "slide"
        runner = engine.runner
        kv = for_request(runner, state.batch_size, length, engine.pad_token_id, slide, runner.cache_ops)
        in_place = isinstance(kv, SlotBackend) and runner.device == "cpu" and state.batch_size == 1
        chunked = engine.manifest.kv_dtype in QUANTISED_KV or in_place
        return cls(
            engine,
            max_batch=state.batch_size,
            max_prefill_tokens=(
                default_prefill_tokens(engine.manifest, in_place)
                if chunked
                else max(window, sum(map(len, state.prompts)))
            ),
            slot_length=kv.fixed_length,
            kv=kv,
        )

    def run(self, generation: Generation) -> Iterator[StreamEvent]:
        """Run ``generation`` to its end on this thread, yielding its events as they come."""
        if self._thread is not None:
            raise InvalidRequestError(
                "this scheduler runs on its own thread (start()); submit() to it instead of run()"
            )
        if generation.started:
            raise InvalidRequestError("this request has already run; start a new one")
        steps: list[list[StreamEvent]] = []  # each step's events, as the step made them
        handle = RequestHandle(generation, sink=steps)
        handle.hold_adapter(self.runner.adapters)
        self._enqueue(handle)
        while not handle.done:
            self.step()
            for events in steps:
                yield from events
            steps.clear()
        if handle.error is not None:
            raise handle.error

    def metrics(self) -> dict[str, Any]:
        """What the scheduler has done (:class:`~nextoken.metrics.Metrics`) and holds now: running and
        waiting requests, KV cache bytes in use and allocated, slots in use, prefix-cache hits."""
        out = self.stats.snapshot()
        rows = self._rows
        try:
            held = sum(self.kv.held(row) for row in range(rows))
        except (IndexError, ValueError):  # rows joined or left while this was read
            held = 0
        out.update(
            running=rows,
            waiting=self.waiting,
            kv_cache_bytes=held * self.manifest.kv_bytes_per_token(),
            kv_buffer_bytes=self.kv.nbytes(),
            kv_committed_bytes=self.kv_committed_bytes,
            kv_budget_bytes=self.kv_budget or 0,
            preempted=self.preempted,
            preempted_for_priority=self.preempted_for_priority,
            preempted_cache_kept=self.preempted_cache_kept,
            slots=self.kv.slot_count,
            slots_used=rows if self.kv.slot_count else 0,
        )
        cache = self.prefix_cache
        if cache is not None:
            stats = cache.stats
            out["prefix_cache"] = {
                "hits": stats.hits,
                "misses": stats.misses,
                "cached_tokens": stats.cached_tokens,
                "bytes": stats.bytes,
                "entries": stats.entries,
                "evicted": stats.evicted,
            }
        return out

    def _default_kv_budget(self) -> int | None:
        """Paged slots: half the host memory available now, at most the whole buffer's bytes (fixed
        slots: None, the buffer is the limit)."""
        if not self.paged_slots:
            return None
        whole = self.max_batch * self.slot_length * self.manifest.kv_bytes_per_token()
        available = meminfo_bytes("MemAvailable")
        return whole if available is None else max(min(whole, available // 2), 1)

    def _need(self, handle: RequestHandle) -> int:
        """Bytes of KV cache a request may reach: its rows x (prompt + max_new_tokens), within a
        slot (or the window), and a page per head and layer a row of slack (paged slots)."""
        gen = handle.generation
        positions = min(
            max(map(len, gen.state.prompts)) + gen.params.max_new_tokens,
            self.kv.fixed_length or self.manifest.context_length,
        )
        return handle.rows * self._row_bytes(positions)

    def _row_bytes(self, positions: int) -> int:
        """Bytes a row of ``positions`` holds: with paged slots, and a page per head and layer of slack."""
        slack = row_slack(self.manifest) if self.paged_slots else 0
        return positions * self.manifest.kv_bytes_per_token() + slack

    def _entry_bytes(self, rows: list[list[int]]) -> int:
        """Bytes rows of these tokens hold once prefilled, and their next position."""
        return sum(self._row_bytes(len(r) + 1) for r in rows)

    @property
    def kv_committed_bytes(self) -> int:
        """Bytes of KV cache the requests in hand hold or are about to: the running rows with
        their next position, the prompts catching up or coming back. What admission and preemption
        count against :attr:`kv_budget`."""
        rows = self._rows
        try:
            held = sum(self.kv.held(r) for r in range(rows))
        except (IndexError, ValueError):  # rows joined or left while this was read
            held = 0
        # each row with its next position, and its slack: summed, not a row at a time
        total = (held + rows) * self.manifest.kv_bytes_per_token() + rows * self._row_bytes(0)
        total += sum(self._entry_bytes([c.prompt] * c.handle.rows) for c in self._catching_up)
        total += sum(cache.nbytes() for cache in list(self._parked.values()))
        return total + sum(self._entry_bytes(w) for _, w in self._refill)

    def _make_room(self) -> None:
        """Before a decode step: while what the running requests will hold passes
        :attr:`kv_budget`, the one of the latest rank leaves the batch (its cache given back) to
        come back, in rank order, when there is room (vLLM's recompute preemption: a request's
        prompt and answer so far are prefilled again, cheaper than keeping a copy of its cache, and
        the same tokens)."""
        budget = self.kv_budget
        if budget is None:
            return
        while self._parked and self.kv_committed_bytes > budget:  # kept caches go first
            self._parked.pop(next(iter(self._parked)))
        while len(self._active) > 1 and self.kv_committed_bytes > budget:
            self._preempt(max(self._active, key=_rank))

    def _give_way(self) -> bool:
        """Before a decode step: while the first request waiting has no room (rows, or bytes within
        :attr:`kv_budget`), running requests of a later rank leave the batch for it, the latest
        first, to come back as :meth:`_make_room`'s do. True when it outranks a running request and
        has room now: it is admitted before the step, not after (its first token a step sooner)."""
        if not self._waiting or not self._active or self._alone:
            return False
        head = self._waiting[0]
        if head.cancelled:
            return False
        need = self._entry_bytes(head.generation.state.prompts) if self.kv_budget is not None else 0
        urgent = False
        while self._active:
            victim = max(self._active, key=_rank)
            if victim.rank[0] <= head.rank[0]:
                return urgent  # nothing running ranks after it: it waits its turn (or came in now)
            urgent = True
            rows = self._rows + sum(c.handle.rows for c in self._catching_up) + head.rows
            if rows <= self.max_batch and (self.kv_budget is None or self.kv_committed_bytes + need <= self.kv_budget):
                return True
            self._preempt(victim, room_for=need)
            self.preempted_for_priority += 1
        return urgent

    def _preempt(self, handle: RequestHandle, room_for: int | None = None) -> None:
        """``handle`` leaves the batch (its cache given back) to come back, in rank order, with its
        prompt and answer so far prefilled again. Given way for a request needing ``room_for``
        bytes: a request of one sequence whose cache the backend can copy out, where that copy and
        those bytes fit within :attr:`kv_budget` (short of a row, not of bytes), keeps the copy and
        comes back over it, only its last token run (a step of one token, not its history)."""
        windows = handle.generation.resume()
        if room_for is not None and handle.rows == 1:
            row = sum(h.rows for h in itertools.takewhile(lambda h: h is not handle, self._active))
            held, budget = self.kv.held(row), self.kv_budget
            copy = held * self.manifest.kv_bytes_per_token()
            fits = budget is None or self.kv_committed_bytes - self._row_bytes(held + 1) + copy + room_for <= budget
            if fits and held == len(windows[0]) - 1:  # everything but its last token, which runs next
                cache = self.kv.copy_row(row)
                if cache is not None:
                    self._parked[id(handle)] = cache
                    self.preempted_cache_kept += 1
        entry = (handle, windows)
        self._evicted.insert(bisect.bisect(self._evicted, handle.rank, key=lambda e: e[0].rank), entry)
        self._sliding.add(id(handle))  # its rows leave as a slid request's do
        self._leaving += 1
        self.preempted += 1
        self._compact()

    @property
    def max_sequence_length(self) -> int:
        """Prompt + generated tokens one request may reach here: the window, or the slot length,
        and no more than one sequence's cache can hold within :attr:`kv_budget` (the server's
        requests without ``max_tokens`` run to it)."""
        limit = self.kv.fixed_length or self.manifest.context_length
        budget = self.kv_budget
        if budget is not None:
            limit = min(limit, max((budget - self._row_bytes(0)) // self.manifest.kv_bytes_per_token(), 1))
        return limit

    @property
    def kv_buffer_bytes(self) -> int:
        """Bytes of the slot buffer (made at the first request; 0 with ``concat``): allocated
        whole, or with paged slots the address space reserved (the memory held is
        ``metrics()["kv_buffer_bytes"]``)."""
        if self.kv_backend != "slots":
            return 0
        return self.max_batch * self.slot_length * self.manifest.kv_bytes_per_token()

    @property
    def alive(self) -> bool:
        """Whether requests can be submitted: not closed, and the loop has not died."""
        return not self._stop and (self._thread is None or self._thread.is_alive())

    @property
    def running(self) -> int:
        """Sequences in the batch now."""
        return self._rows

    @property
    def waiting(self) -> int:
        """Requests not decoding yet: queued, or having a long prompt prefilled in chunks."""
        return len(self._waiting) + len(self._catching_up) + len(self._refill) + len(self._evicted)

    # -- the loop ---------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Run :meth:`step` on a background thread until :meth:`close`."""
        if self._thread is None:
            # a large stack: the structured plugin compiles requests' grammars on this thread
            self._thread = threads.start(threading.Thread(target=self._loop, name="nextoken-scheduler", daemon=True))
        return self

    def close(self) -> None:
        """Stop the background thread; requests still waiting or running fail with a clear error."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for handle in self._pending():
            handle.complete(SchedulerStoppedError("the scheduler was closed before this request finished"))
        self._clear()

    def _clear(self) -> None:
        self._waiting.clear()
        self._active.clear()
        self._rows = self._leaving = 0
        for item in self._catching_up:
            self._unreserve(item)
        self._catching_up.clear()
        self._refill.clear()
        self._evicted.clear()
        self._parked.clear()
        self._admitting = []
        self.kv.keep([])
        self._last = np.zeros(0, dtype=np.int64)

    def _pending(self) -> list[RequestHandle]:
        return (
            list(self._waiting)
            + self._active
            + [c.handle for c in self._catching_up]
            + [h for h, _ in self._refill]
            + [h for h, _ in self._evicted]
            + [h for h in self._admitting if h not in self._active]
        )

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (
                    not self._stop
                    and not self._waiting
                    and not self._active
                    and not self._catching_up
                    and not self._refill
                    and not self._evicted
                ):
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.step()
            except BaseException as exc:  # e.g. the engine was closed: fail every request, stop
                error = (
                    exc
                    if isinstance(exc, NextokenError)
                    else SchedulerStoppedError(f"the scheduler stopped: {type(exc).__name__}: {exc}")
                )
                with self._cond:
                    self._stop = True
                    self.error = error
                    pending = self._pending()
                    self._clear()
                for handle in pending:
                    if not handle.done:
                        self.ended["failed"] += 1
                        handle.complete(error)
                        self.stats.failed(error)
                return

    def step(self) -> bool:
        """One scheduling step: drop cancelled requests, decode the batch, admit waiting requests.
        Returns whether work remains."""
        runner = self.runner
        if runner.closed:
            raise NextokenError("the engine is closed")
        for handle in self._active:
            if handle.cancelled and not handle.done:
                self._end_early(handle, None)
        self._compact()
        if self._give_way():  # a request that outranks a running one: in before the step
            self._schedule(runner)
        self._make_room()
        if self._active:
            self._decode()
            self._compact()  # rows that finished or slid leave before anyone joins
        if self._waiting or self._refill or self._catching_up or self._evicted:
            self._schedule(runner)
        return bool(self._active or self._waiting or self._catching_up or self._refill or self._evicted)

    def _schedule(self, runner: StepRunner) -> None:
        """Bring in what waits, within the step's prefill budget and the batch's rows. Every prompt
        not in the batch yet is one idea, a request whose computed tokens lag its tokens
        (:class:`CatchUp`), caught up in order: slid windows first, then newcomers as they came.
        Newcomers with nothing cached and a short prompt are caught up together in one run (the
        cheapest way for several); a long prompt, or one whose prefix is cached, a chunk a step."""
        budget = self.max_prefill_tokens
        refills: list[CatchUp] = []
        while self._refill:  # slid windows: they go before newcomers
            budget -= self._come_back(runner, *self._refill.popleft(), refills)
        self._catching_up.extendleft(reversed(refills))
        if any(h.cancelled for h, _ in self._evicted):  # cancelled while it waited for room
            cancelled = [h for h, _ in self._evicted if h.cancelled]
            self._evicted = collections.deque(e for e in self._evicted if not e[0].cancelled)
            for handle in cancelled:
                self._parked.pop(id(handle), None)
                self._end_early(handle, None)
        room = None if self.kv_budget is None else self.kv_budget - self.kv_committed_bytes
        while (
            self._evicted
            and not (self._waiting and self._waiting[0].rank < self._evicted[0][0].rank)  # rank order
            and self._rows + sum(c.handle.rows for c in self._catching_up) + self._evicted[0][0].rows <= self.max_batch
        ):
            need = self._entry_bytes(self._evicted[0][1])
            parked = self._parked.get(id(self._evicted[0][0]))
            if parked is not None:  # counted already: the slot it goes back to takes a little more
                need = max(need - parked.nbytes(), 0)
            if room is not None and need > room and (self._active or self._catching_up):
                break  # it waits for room
            room = None if room is None else room - need
            budget -= self._come_back(runner, *self._evicted.popleft(), self._catching_up)
        budget = self._catch_up(budget)
        admit: list[RequestHandle] = []
        with self._cond:
            in_hand = self._rows + sum(c.handle.rows for c in self._catching_up)
            while (
                self._waiting
                and (not self._evicted or self._waiting[0].rank < self._evicted[0][0].rank)  # rank order
                and in_hand + self._waiting[0].rows <= self.max_batch
            ):
                handle = self._waiting[0]
                if room is not None:
                    need = self._entry_bytes(handle.generation.state.prompts)
                    if need > room:
                        break  # it waits for room
                    room -= need
                if handle.cancelled:
                    self._waiting.popleft()
                    self._end_early(handle, None)
                    continue
                gen = handle.generation
                size = sum(map(len, gen.state.prompts))
                single = handle.rows == gen.params.n  # one prompt (its n choices share its prefill)
                if single and (self.prefix_cache is not None or size > self.max_prefill_tokens):
                    if budget <= 0:
                        break
                    self._waiting.popleft()
                    in_hand += handle.rows
                    try:
                        gen.begin()
                    except Exception as exc:
                        self._end_early(handle, exc)
                        continue
                    prompt = list(gen.state.prompts[0])
                    # an adapter's keys and values are its own: the prefix cache holds the base model's
                    cached = self.prefix_cache is not None and not handle.lora
                    self._catching_up.append(self._catch_up_item(handle, prompt, cached=cached))
                    continue
                if size > budget and (admit or budget < self.max_prefill_tokens):
                    break  # the rest waits for the next step's budget
                self._waiting.popleft()
                admit.append(handle)
                budget -= size
                in_hand += handle.rows
        if admit:
            self._admit(admit)
        self._catch_up(budget)  # newcomers start with what is left this step
        self._compact()

    def _come_back(
        self,
        runner: StepRunner,
        handle: RequestHandle,
        windows: list[list[int]],
        queue: "list[CatchUp] | collections.deque[CatchUp]",
    ) -> int:
        """A running request's rows back after a slide or a preemption, ``windows`` prefilled again:
        one sequence catches up like a prompt (queued on ``queue``), several are prefilled together
        now. Returns the prompt tokens spent now."""
        if handle.rows == 1:
            parked = self._parked.pop(id(handle), None)
            if parked is not None:  # its kept cache back in the batch; its last token is its next input
                self._rejoin(handle, parked, windows[0][-1])
                return 0
            queue.append(self._catch_up_item(handle, windows[0], refill=True))
            return 0
        self._prefill_and_join([handle], windows, refill=True)
        return sum(map(len, windows))

    def _rejoin(self, handle: RequestHandle, cache: KVCache, last: int) -> None:
        """A request that gave way back in the batch over the copy of its cache (every position but
        its last token's): the copy joins as a prefill would, and its last token is the row's input
        at the next decode step, as it was when it left. Nothing runs now."""
        held = cache.length
        lora = np.array([handle.lora], dtype=np.int64)
        mask = np.ones((1, held), dtype=np.int64)
        pre = Prefilled(np.zeros((1, 0), np.float32), np.array([held]), 0.0, cache=cache, mask=mask, lora=lora)
        self._enter([handle], pre, np.array([last], dtype=np.int64))

    def _catch_up_item(
        self, handle: RequestHandle, prompt: list[int], refill: bool = False, cached: bool = False
    ) -> CatchUp:
        """A prompt to catch up: in place in a slot of its own where the backend has slots (one
        sequence, no prefix cache), else in a cache of its own that joins when it is done."""
        slots = self.kv if isinstance(self.kv, SlotBackend) else None
        if slots is not None and handle.rows == 1 and not cached:
            return CatchUp(handle, None, 0, prompt, refill=refill, slot=slots.reserve(len(prompt)))
        return CatchUp(handle, self.runner.new_cache(1), 0, prompt, refill=refill, cached=cached)

    def _drop(self, item: CatchUp, error: BaseException | None) -> None:
        """A catching-up request that will not join: its slot given back, the request ended."""
        self._catching_up.remove(item)
        self._unreserve(item)
        self._end_early(item.handle, error)

    def _unreserve(self, item: CatchUp) -> None:
        """Give back the slot ``item`` was being prefilled into, if any."""
        if item.slot is not None and isinstance(self.kv, SlotBackend):
            self.kv.unreserve(item.slot)

    def _reuse(self, item: CatchUp, cache: PrefixCache) -> None:
        """Start ``item`` from what the prefix cache holds of its prompt (a fresh newcomer's)."""
        assert item.cache is not None  # prompts through the prefix cache catch up in caches of their own
        reused, entry = cache.lookup(item.prompt)
        if entry is not None and entry.length == reused:
            item.cache.values = list(entry.values)  # read, never written: the step makes new values
        elif entry is not None:  # a longer prefix's entry: its first positions
            item.cache.values = self.runner.cache_ops().select(entry, [0], 0, reused).values
        item.done = reused
        item.handle.generation.cached_tokens[:] = [reused] * item.handle.rows

    def _catch_up(self, budget: int) -> int:
        """Run what the catching-up requests lack, in order, at most ``budget`` tokens; each that has
        caught up joins the batch (its prompt's keys and values stored in the prefix cache first,
        when asked; copied to its ``n`` choices). Returns the budget left."""
        while self._catching_up and budget > 0:
            item = self._catching_up[0]
            handle, prompt = item.handle, item.prompt
            if handle.cancelled:
                self._drop(item, None)
                continue
            cache = self.prefix_cache if item.cached else None
            try:
                if cache is not None and item.done == 0:
                    self._reuse(item, cache)
                end = min(len(prompt), item.done + budget)
            except Exception as exc:
                self._drop(item, exc)
                continue
            switch = self.manifest.rope_switch
            if switch and len(prompt) > switch:
                end = len(prompt)  # longrope: all of a prompt past the switch rotates with the long factors
            budget -= end - item.done
            try:
                pre = self._prefill_chunk(item, end)
            except Exception as exc:
                self._drop(item, exc)
                continue
            if end < len(prompt):
                item.done = end
                break  # the budget is spent
            self._catching_up.popleft()
            try:
                if cache is not None and item.cache is not None and cache.wants(prompt):
                    stored = self.runner.new_cache(1)
                    stored.values = list(item.cache.values)  # the prompt's own, as the prefill made them
                    cache.insert(prompt, stored)
                    handle.generation.stored_tokens = len(prompt)
                if handle.rows > 1:
                    pre = pre.forked([0] * handle.rows, self.runner.cache_ops())
            except Exception as exc:
                self._end_early(handle, exc)
                continue
            try:
                self._join([handle], pre, item.refill)
            except Exception as exc:
                self._fail_all([handle], exc)
        return budget

    def _prefill_chunk(self, item: CatchUp, end: int) -> Prefilled:
        """Run ``item.prompt[item.done:end]`` over what it holds: in its slot, or its own cache."""
        lora = item.handle.lora
        if item.cache is not None:
            return Prefilled.after(self.runner, item.cache, item.prompt, item.done, end, lora)
        assert item.slot is not None and isinstance(self.kv, SlotBackend)
        logits = self.kv.prefill_chunk(item.slot, item.prompt[item.done : end], item.done, lora)
        item.seconds += self.kv.last_seconds
        rows_lora = np.array([lora], dtype=np.int64)
        return Prefilled(logits, np.array([end]), item.seconds, slots=[item.slot], lora=rows_lora)

    def _advance(self, handle: RequestHandle, logits: np.ndarray, start: int) -> None:
        """The handle's own step on its rows of logits (from row ``start``). Anything that fails here
        (its plugins, its numbers, its cost meters, its observers) ends that request only."""
        gen = handle.generation
        try:
            tokens, events = gen.advance(logits)
            if handle.rows == self._rows:  # the whole batch: its tokens are the next inputs
                self._last = tokens
            else:
                self._last[start : start + handle.rows] = tokens
            if gen.needs_slide:  # it leaves the batch, and comes back with its windows prefilled again
                gen.kv_cache_bytes = max(gen.kv_cache_bytes, self._kv_bytes(handle, start))
                self._sliding.add(id(handle))
                self._leaving += 1
                self._refill.append((handle, gen.slide()))
            finished = gen.finished
            if finished:
                gen.end(handle.model_seconds, self._kv_bytes(handle, start), self._memory.sample())
        except Exception as exc:
            self._end_early(handle, exc)
            return
        handle.deliver(events)
        if finished:
            self.ended["finished"] += 1
            self._leaving += 1
            handle.complete()
            self.stats.ended(gen.completions(), "finished", gen.params.priority, handle.queued_seconds)

    def _kv_bytes(self, handle: RequestHandle, start: int) -> int:
        """Bytes of KV cache a request holds: the whole cache of a scheduler made for it alone, else
        its rows' positions."""
        if self._alone:
            return self.kv.nbytes()
        per_token = self.manifest.kv_bytes_per_token()
        return sum(self.kv.held(row) for row in range(start, start + handle.rows)) * per_token

    def _end_early(self, handle: RequestHandle, error: BaseException | None) -> None:
        """End a request before its own stop: cancelled by the caller (``error`` None: finish
        reason ``cancelled``, a completion with what it had) or failed (its iteration raises)."""
        if handle.done:
            return
        gen = handle.generation
        if error is None and not gen.finished:
            events = gen.cancel()
            try:
                gen.end(handle.model_seconds, 0, self._memory.sample())
            except Exception as exc:  # its cost meter or observer failed: it fails instead
                error = exc
            else:
                handle.deliver(events)
        self.ended["failed" if error is not None else "cancelled"] += 1
        self._leaving += 1
        handle.complete(error)
        if error is not None:
            self.stats.failed(error)
        else:
            self.stats.ended(gen.completions(), "cancelled", gen.params.priority, handle.queued_seconds)

    def _fail_all(self, handles: list[RequestHandle], error: BaseException) -> None:
        """A step that is no one request's fault failed: end the requests in it with the cause."""
        for handle in handles:
            self._end_early(handle, error)

    def _decode(self) -> None:
        """One token for every row of the batch, then each request's own step on its rows (a
        finished sequence of a request that goes on rides along on its last token)."""
        active = self._active
        spec = active[0].generation.speculation if self._rows == 1 else None
        if spec is not None and spec.off:  # it stopped guessing: a plain step, as without
            spec = None
        if spec is not None and self._speculate(active[0]):
            return
        grow = None
        if self._rows != len(active):  # requests of several sequences
            grow = (
                active[0].generation.state.alive
                if len(active) == 1
                else np.concatenate([h.generation.state.alive for h in active])
            )
        began = time.perf_counter() if spec is not None else 0.0  # timed for speculation's cost line only
        try:
            logits = self.kv.decode(self._last, grow)
        except Exception as exc:
            self._fail_all(active, exc)
            return
        if spec is not None:  # a plain step of a request that speculates
            spec.stepped(1, time.perf_counter() - began)
        spent, start = self.kv.last_seconds, 0
        for handle in active:
            handle.model_seconds += spent
            self._advance(handle, logits[start : start + handle.rows], start)
            start += handle.rows

    def _speculate(self, handle: RequestHandle) -> bool:
        """A speculative step for the batch's one sequence: its proposer guesses up to k tokens, the
        model runs the last token and the guesses in one step, and the request takes its own step on
        each position's logits in turn while its token is the guess (the first that differs, or the
        one after the last guess, is its own choice): the same tokens as plain decoding, fewer
        steps. What the guesses left in the cache past that is cut (a length, with slots). Returns
        False when there was no guess (the caller decodes plainly)."""
        start = time.perf_counter()  # a step's cost is its wall time: guessing and binding too
        gen = handle.generation
        spec = gen.speculation
        if spec is None:
            return False
        held = self.kv.held(0)
        room = min(self.max_sequence_length, self.manifest.context_length) - held - 1
        room = min(room, gen.params.max_new_tokens - len(gen.state.generated[0]) - 1)
        switch = self.manifest.rope_switch
        if switch and held < switch:  # a longrope check step stays on the short side of the switch
            room = min(room, switch - held - 1)
        try:
            guess = spec.propose(gen.state, room)
        except Exception as exc:
            self._end_early(handle, exc)
            return True
        if not guess:
            return False
        try:
            logits = self.kv.extend(0, [int(self._last[0])] + guess)
        except Exception as exc:
            self._fail_all([handle], exc)
            return True
        seconds = time.perf_counter() - start
        handle.model_seconds += self.kv.last_seconds
        taken = kept = 0
        for i in range(len(guess) + 1):
            self._advance(handle, logits[i : i + 1], 0)
            taken += 1
            if handle.done or gen.finished or gen.needs_slide:
                break
            if i == len(guess) or int(self._last[0]) != guess[i]:
                break
            kept += 1
        spec.record(len(guess), kept, seconds)
        if not handle.done and id(handle) not in self._sliding:
            self.kv.truncate(0, held + taken)
        return True

    def _admit(self, admit: list[RequestHandle]) -> None:
        """Prefill newcomers together and join them to the batch. A request whose start fails (its
        observer) ends alone; when the batched prefill fails, each is prefilled alone, so only the
        requests that fail by themselves end, with their own cause."""
        started = []
        for handle in admit:
            try:
                handle.generation.begin()
            except Exception as exc:
                self._end_early(handle, exc)
            else:
                started.append(handle)
        groups = [started] if started else []
        while groups:
            group = groups.pop()
            failed = self._prefill_and_join(group, *_shared_prefills(group))
            if failed is not None:
                if len(group) > 1:
                    groups.extend([h] for h in reversed(group))
                else:
                    self._end_early(group[0], failed)

    def _prefill_and_join(
        self, group: list[RequestHandle], prompts: list[list[int]], fork: list[int] | None = None, refill: bool = False
    ) -> BaseException | None:
        """Prefill ``prompts`` and join the group to the batch (``fork``: which prompt each of the
        group's sequences starts from, when choices share one). Returns the prefill's failure
        (nothing joined); a failure to join is no one request's fault: it ends the whole group."""
        self._admitting = group
        rows = [h.lora for h in group for _ in range(h.rows)]
        lora = rows if fork is None else [rows[fork.index(p)] for p in range(len(prompts))]
        try:
            pre = self.kv.prefill(prompts, fork, lora)
        except Exception as exc:
            return exc
        finally:
            self._admitting = []
        try:
            self._join(group, pre, refill)
        except Exception as exc:
            self._fail_all(group, exc)
        return None

    def _enter(self, handles: list[RequestHandle], pre: Prefilled, last: np.ndarray) -> None:
        """The rows of ``pre`` join the backend's batch, after the rows there, as ``handles``'s, with
        ``last`` their inputs at the next decode step."""
        self.kv.join(pre)
        self._active.extend(handles)
        self._rows += len(last)
        self._last = np.concatenate([self._last, last])

    def _join(self, handles: list[RequestHandle], pre: Prefilled, refill: bool = False) -> None:
        """Join prefilled requests to the batch and take their first tokens (``refill``: a
        running request back with its slid windows)."""
        start = self._rows
        self._enter(handles, pre, np.zeros(sum(h.rows for h in handles), dtype=np.int64))
        offset = 0
        for handle in handles:
            if refill:
                handle.model_seconds += pre.seconds
            else:
                handle.generation.prefilled(pre.seconds)
                handle.model_seconds = pre.seconds
            self._advance(handle, pre.logits[offset : offset + handle.rows], start + offset)
            offset += handle.rows

    # -- the shared cache ----------------------------------------------------------------------------
    def _compact(self) -> None:
        """Drop the rows of requests that ended and of requests that slid (they come back through
        the refill queue)."""
        if not self._leaving:
            return
        self._leaving = 0
        rows: list[int] = []
        kept: list[RequestHandle] = []
        start = 0
        for handle in self._active:
            if not handle.done and id(handle) not in self._sliding:
                kept.append(handle)
                rows.extend(range(start, start + handle.rows))
            start += handle.rows
        self._sliding.clear()
        if len(rows) == self._rows:
            return
        self._active, self._rows = kept, len(rows)
        self.kv.keep(rows)
        self._last = self._last[rows]


def _rank(handle: RequestHandle) -> tuple[float, int]:
    return handle.rank


def _shared_prefills(group: list[RequestHandle]) -> tuple[list[list[int]], list[int] | None]:
    """The prompts a group needs prefilled (a prompt's ``n`` choices share one), and which of them
    each sequence starts from (None: one each)."""
    prompts: list[list[int]] = []
    fork: list[int] = []
    for handle in group:
        state = handle.generation.state
        for prompt, choice in zip(state.prompts, state.choices):
            if choice == 0:
                prompts.append(prompt)
            fork.append(len(prompts) - 1)
    return prompts, (fork if len(fork) != len(prompts) else None)
