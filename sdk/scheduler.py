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

A prompt longer than ``max_prefill_tokens`` is prefilled in chunks of that many tokens, one chunk
per step, between the running batch's decode steps, so a long newcomer delays the others by one
chunk a step instead of its whole prompt at once; it joins the batch when its last chunk is done.

Two KV-cache backends (``kv_backend``). ``concat``, for every graph (present = concat(past, new)):
a joining request's cache is
padded to the batch's length on the graph's padding side (masked out, so attention never sees the
padding), a leaving one's row is dropped, and padding every row shares is trimmed. Joining and
leaving run small ONNX graphs on the cache's device (:class:`~nextoken.kvcache.CacheOps`): the
cache never passes through host memory. ``slots``, for graphs with GroupQueryAttention (packages
from ``import-genai``; the default for them): one fixed buffer ``[max_batch, kv_heads,
slot_length, head_dim]`` per layer (:class:`~nextoken.kvcache.SlotCache`), each request in a slot
of its own; every decode step writes each row's keys and values in place at that row's own length
(no concatenation, no padding, nothing trimmed), a newcomer's prefilled cache is copied into a
free slot, and a leaving request just frees its slot.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from typing import Any, Iterator

import numpy as np

from .errors import InvalidRequestError, NextokenError, SchedulerStoppedError
from .generation import Completion, Generation, SamplingParams, StreamEvent
from .kvcache import CacheOps, KVCache, SlotCache, grow_mask

__all__ = ["Scheduler", "RequestHandle"]

_DONE = object()


class RequestHandle:
    """One submitted request: iterate it (or ``async for``) for its :class:`StreamEvent` s;
    :meth:`result` waits for its :class:`Completion`; :meth:`cancel` ends it at the next step."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.cancelled = False
        self.model_seconds = 0.0

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
        """The completion, once the request has finished (raises what the request raised)."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request has not finished")
        if self._error is not None:
            raise self._error
        return self.generation.completions()[0]

    def cancel(self) -> None:
        """End the request at the next step boundary (finish reason ``cancelled``); its slot is freed."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- scheduler side -----------------------------------------------------------------------------
    def _deliver(self, events: list[StreamEvent]) -> None:
        for event in events:
            self._events.put(event)

    def _finish(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()
        self._events.put(_DONE)


class Scheduler:
    """Continuous batching over one :class:`~nextoken.Engine` (see the module's doc).

    ``max_batch``: sequences decoded together at most; more requests wait their turn.
    ``max_prefill_tokens``: prompt tokens prefilled in one step at most, so a burst of newcomers
    does not stall the running sequences for long; a longer prompt is prefilled in chunks of this
    size, one a step. ``kv_backend``: ``auto`` (``slots`` for GroupQueryAttention graphs, else
    ``concat``), ``concat`` or ``slots``. ``slot_length``: positions per slot (default: the
    model's window, at most 2048); with slots, prompt + max_new_tokens must fit in it, and the
    buffer (:attr:`kv_buffer_bytes`) is held while the scheduler lives.
    Use :meth:`step` to drive it yourself, or :meth:`start` to run it on a background thread.
    """

    def __init__(self, engine: Any, max_batch: int = 8, max_prefill_tokens: int = 4096, kv_backend: str = "auto",
                 slot_length: int | None = None) -> None:
        if max_batch < 1:
            raise InvalidRequestError(f"max_batch must be >= 1, not {max_batch}")
        if max_prefill_tokens < 1:
            raise InvalidRequestError(f"max_prefill_tokens must be >= 1, not {max_prefill_tokens}")
        if kv_backend not in ("auto", "concat", "slots"):
            raise InvalidRequestError(f"kv_backend must be auto, concat or slots, not {kv_backend!r}")
        gqa = engine.manifest.padding_side == "right"     # the graph places keys by the mask: GroupQueryAttention
        if kv_backend == "slots" and not gqa:
            raise InvalidRequestError("kv_backend='slots' needs a graph with GroupQueryAttention (a package made by "
                                      "nextoken import-genai or export --backend genai); use 'concat'")
        self.kv_backend = "slots" if kv_backend == "slots" or (kv_backend == "auto" and gqa) else "concat"
        window = engine.manifest.context_length
        if slot_length is not None and not 1 <= slot_length <= window:
            raise InvalidRequestError(f"slot_length must be between 1 and the model's window ({window}), not {slot_length}")
        self.slot_length = slot_length or min(window, 2048)
        self._slots: SlotCache | None = None
        self._slot_ids: list[int] = []
        self.engine = engine
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._active: list[RequestHandle] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._cache: KVCache | None = None
        self._cache_ops: CacheOps | None = None
        #: a long prompt being prefilled a chunk a step: (handle, its own cache, tokens done)
        self._chunking: tuple[RequestHandle, KVCache, int, list[int], bool] | None = None
        #: running requests whose window slid (context_policy "slide"): their kept tokens, to prefill again
        self._refill: collections.deque[tuple[RequestHandle, list[int]]] = collections.deque()
        self._sliding: set[int] = set()
        #: newcomers being prefilled now (popped from the queue, not yet in the batch)
        self._admitting: list[RequestHandle] = []
        #: why the loop stopped, when it died (None while it runs or was closed in order)
        self.error: BaseException | None = None
        #: requests ended, by how: finished (their own stop), cancelled (by the caller), failed
        self.ended = {"finished": 0, "cancelled": 0, "failed": 0}
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._next_pos = np.zeros((0, 1), dtype=np.int64)
        self._last = np.zeros(0, dtype=np.int64)

    # -- submitting -----------------------------------------------------------------------------------
    def submit(self, prompt: Any, params: SamplingParams | None = None, **overrides: Any) -> RequestHandle:
        """Queue one prompt (text or token ids); validated here, so a bad request raises at once."""
        generation = self.engine.start(prompt, params, **overrides)
        if generation.state.batch_size != 1:
            raise InvalidRequestError("submit one prompt per request; submit a list's prompts one by one")
        slide = generation.params.context_policy == "slide"
        window = self.engine.manifest.context_length
        if slide and self.kv_backend == "slots" and self.slot_length < window:
            raise InvalidRequestError(f"context_policy='slide' slides at the model's window ({window} tokens), which "
                                      f"needs slots of that length, not {self.slot_length}: make the Scheduler "
                                      f"with slot_length={window}")
        if self.kv_backend == "slots" and not slide and self.slot_length < window:
            # slots as long as the window end a request where the window does, as the concat backend
            # does; shorter slots would end it earlier, so a request that needs more is refused
            need = len(generation.state.prompts[0]) + generation.params.max_new_tokens
            if need > self.slot_length:
                raise InvalidRequestError(
                    f"prompt ({len(generation.state.prompts[0])} tokens) + max_new_tokens "
                    f"({generation.params.max_new_tokens}) exceed the slot length ({self.slot_length}); ask for fewer "
                    "tokens, or make the Scheduler with a larger slot_length")
        generation._events = iter(())        # the scheduler drives it; iterating it must not run it again
        handle = RequestHandle(generation)
        with self._cond:
            if self._stop:
                if self.error is not None:
                    raise SchedulerStoppedError(f"this scheduler stopped after a failure ({self.error}); "
                                                "start a new one") from None
                raise SchedulerStoppedError("this scheduler is closed")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    @property
    def max_sequence_length(self) -> int:
        """Prompt + generated tokens one request may reach here: the window, or the slot length."""
        return self.slot_length if self.kv_backend == "slots" else self.engine.manifest.context_length

    @property
    def kv_buffer_bytes(self) -> int:
        """Bytes of the slot buffer (allocated at the first request; 0 with ``concat``)."""
        if self.kv_backend != "slots":
            return 0
        return self.max_batch * self.slot_length * self.engine.manifest.kv_bytes_per_token()

    @property
    def alive(self) -> bool:
        """Whether requests can be submitted: not closed, and the loop has not died."""
        return not self._stop and (self._thread is None or self._thread.is_alive())

    @property
    def running(self) -> int:
        """Sequences in the batch now."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests not decoding yet: queued, or having a long prompt prefilled in chunks."""
        return len(self._waiting) + (self._chunking is not None) + len(self._refill)

    # -- the loop ---------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        """Run :meth:`step` on a background thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nextoken-scheduler", daemon=True)
            self._thread.start()
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
            handle._finish(SchedulerStoppedError("the scheduler was closed before this request finished"))
        self._waiting.clear()
        self._active.clear()
        self._chunking = None
        self._refill.clear()
        self._cache = None
        self._slots = None
        self._slot_ids = []

    def _pending(self) -> list[RequestHandle]:
        return (list(self._waiting) + self._active + ([self._chunking[0]] if self._chunking else [])
                + [h for h, _ in self._refill] + [h for h in self._admitting if h not in self._active])

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._stop and not self._waiting and not self._active and self._chunking is None
                       and not self._refill):
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.step()
            except BaseException as exc:      # e.g. the engine was closed: fail every request, stop
                error = exc if isinstance(exc, NextokenError) else SchedulerStoppedError(
                    f"the scheduler stopped: {type(exc).__name__}: {exc}")
                with self._cond:
                    self._stop = True
                    self.error = error
                    pending = self._pending()
                    self._waiting.clear()
                    self._active.clear()
                    self._chunking = None
                    self._refill.clear()
                    self._admitting = []
                for handle in pending:
                    if not handle.done:
                        self.ended["failed"] += 1
                        handle._finish(error)
                return

    def step(self) -> bool:
        """One scheduling step: drop cancelled requests, decode the batch, admit waiting requests.
        Returns whether work remains."""
        runner = self.engine.runner
        if runner is None:
            raise NextokenError("the engine is closed")
        for handle in self._active:
            if handle.cancelled and not handle.done:
                self._end_early(handle, None)
        self._compact()
        if self._active:
            self._decode(runner)
            self._compact()                                # rows that finished or slid leave before anyone joins
        budget = self.max_prefill_tokens
        if self._chunking is None and self._refill:        # slid windows go before newcomers
            handle, ids = self._refill.popleft()
            self._chunking = (handle, runner.new_cache(1), 0, ids, True)
        if self._chunking is not None:
            budget -= self._next_chunk(runner, budget)
        admit: list[RequestHandle] = []
        with self._cond:
            while self._waiting and (len(self._active) + len(admit) + (self._chunking is not None) + len(self._refill)
                                     < self.max_batch):
                handle = self._waiting[0]
                if handle.cancelled:
                    self._waiting.popleft()
                    self._end_early(handle, None)
                    continue
                size = len(handle.generation.state.prompts[0])
                if size > self.max_prefill_tokens:         # long: prefilled in chunks, one at a time
                    if self._chunking is not None or budget <= 0:
                        break
                    self._waiting.popleft()
                    try:
                        handle.generation._begin()
                    except Exception as exc:
                        self._end_early(handle, exc)
                        continue
                    self._chunking = (handle, runner.new_cache(1), 0, list(handle.generation.state.prompts[0]), False)
                    continue
                if size > budget:
                    break                                  # the rest waits for the next step's budget
                self._waiting.popleft()
                admit.append(handle)
                budget -= size
        if admit:
            self._admit(runner, admit)
        if self._chunking is not None and budget > 0 and self._chunking[2] == 0:
            self._next_chunk(runner, budget)               # a long prompt starts with what is left this step
        self._compact()
        return bool(self._active or self._waiting or self._chunking or self._refill)

    def _consume(self, handle: RequestHandle, logits: np.ndarray, row: int) -> None:
        """The handle's own step on its row of logits. Anything that fails here (its plugins, its
        numbers, its cost meters, its observers) ends that request only."""
        gen = handle.generation
        slide = gen.params.context_policy == "slide"
        try:
            if slide:       # as alone: the model's own length decides when the window slides
                lengths = np.array([self._tokens_held(row)])
                tokens, events = gen._consume(logits, lengths, slide=True)
            else:
                tokens, events = gen._consume(logits)
            self._last[row] = tokens[0]
            if slide and not gen.finished and lengths[0] >= self.engine.manifest.context_length:
                ids = gen.state.prompts[0] + gen.state.generated[0]
                window = gen._window(ids)
                gen.slides.append((gen.state.step, 0, list(window)))
                gen.kv_cache_bytes = max(gen.kv_cache_bytes,
                                         self._tokens_held(row) * self.engine.manifest.kv_bytes_per_token())
                self._sliding.add(id(handle))
                self._refill.append((handle, window))
            if gen.finished:
                kv = self._tokens_held(row) * self.engine.manifest.kv_bytes_per_token()
                gen._end(handle.model_seconds, kv)
        except Exception as exc:
            self._end_early(handle, exc)
            return
        handle._deliver(events)
        if gen.finished:
            self.ended["finished"] += 1
            handle._finish()

    def _end_early(self, handle: RequestHandle, error: BaseException | None) -> None:
        """End a request before its own stop: cancelled by the caller (``error`` None: finish
        reason ``cancelled``, a completion with what it had) or failed (its iteration raises)."""
        if handle.done:
            return
        gen = handle.generation
        if error is None and not gen.finished:
            from .generation import Stop

            gen.seqs[0].finish = Stop("cancelled", "cancelled by the caller")
            gen.state.alive[:] = False
            try:
                gen._end(handle.model_seconds, 0)
            except Exception as exc:          # its cost meter or observer failed: it fails instead
                error = exc
            else:
                handle._deliver([StreamEvent(0, None, "", "cancelled")])
        self.ended["failed" if error is not None else "cancelled"] += 1
        handle._finish(error)

    def _fail_all(self, handles: list[RequestHandle], error: BaseException) -> None:
        """A step that is no one request's fault failed: end the requests in it with the cause."""
        for handle in handles:
            self._end_early(handle, error)

    def _tokens_held(self, row: int) -> int:
        """Positions row ``row`` of the batch holds in the cache."""
        if self.kv_backend == "slots":
            return int(self._slots.lengths[self._slot_ids[row]]) if row < len(self._slot_ids) else 0
        return int(self._mask[row].sum()) if row < len(self._mask) else 0

    def _decode(self, runner) -> None:
        if self.kv_backend == "slots":
            self._decode_slots(runner)
            return
        self._mask = grow_mask(self._mask, self.engine.manifest.padding_side)
        before = self._cache.run_seconds
        try:
            logits = runner.step(self._cache, self._last[:, None], self._mask, self._next_pos)
        except Exception as exc:
            self._fail_all(self._active, exc)
            return
        self._next_pos = self._next_pos + 1
        spent = self._cache.run_seconds - before
        for row, handle in enumerate(self._active):
            handle.model_seconds += spent
            self._consume(handle, logits[row:row + 1], row)

    def _decode_slots(self, runner) -> None:
        """One decode step, in place, over the slots up to the highest one in use (newcomers take
        the lowest free slot); an idle slot among them decodes a pad token at position 0."""
        slots = self._slots
        rows = np.asarray(self._slot_ids)
        used = int(rows.max()) + 1
        ids = np.full((used, 1), self.engine.pad_token_id, dtype=np.int64)
        ids[rows, 0] = self._last
        lengths = np.ones(used, dtype=np.int64)
        lengths[rows] = slots.lengths[rows] + 1
        mask = slots.mask(lengths)
        before = slots.run_seconds
        try:
            logits = runner.step(slots, ids, mask, (lengths - 1)[:, None], in_place=True, rows=used)
        except Exception as exc:
            self._fail_all(self._active, exc)
            return
        slots.lengths[rows] += 1
        spent = slots.run_seconds - before
        for row, handle in enumerate(self._active):
            handle.model_seconds += spent
            self._consume(handle, logits[self._slot_ids[row]][None, :], row)

    def _admit(self, runner, admit: list[RequestHandle]) -> None:
        """Prefill newcomers together and join them to the batch. A request whose start fails (its
        observer) ends alone; when the batched prefill fails, each is prefilled alone, so only the
        requests that fail by themselves end, with their own cause."""
        started = []
        for handle in admit:
            try:
                handle.generation._begin()
            except Exception as exc:
                self._end_early(handle, exc)
            else:
                started.append(handle)
        groups = [started] if started else []
        while groups:
            group = groups.pop()
            self._admitting = group
            try:
                prompts = [h.generation.state.prompts[0] for h in group]
                cache, mask, next_pos, logits = group[0].generation._prefill(prompts)
                self._join(group, cache, mask, next_pos, logits)
            except Exception as exc:
                joined = [h for h in group if h in self._active]
                if joined:                         # the prefill ran; joining failed: no one request's fault
                    self._fail_all(group, exc)
                elif len(group) > 1:
                    groups.extend([h] for h in reversed(group))
                else:
                    self._end_early(group[0], exc)
            finally:
                self._admitting = []

    def _join(self, handles: list[RequestHandle], cache: KVCache, mask: np.ndarray, next_pos: np.ndarray,
              logits: np.ndarray, refill: bool = False) -> None:
        """Merge prefilled requests into the batch and take their first tokens (``refill``: a
        running request back with its slid window)."""
        done = time.perf_counter()
        start_row = len(self._active)
        self._merge(cache, mask, next_pos, len(handles))
        self._active.extend(handles)
        for i, handle in enumerate(handles):
            gen = handle.generation
            if refill:
                handle.model_seconds += cache.run_seconds
            else:
                gen.prefill_done = done
                gen.prefill_model_seconds = handle.model_seconds = cache.run_seconds
            self._consume(handle, logits[i:i + 1], start_row + i)

    def _next_chunk(self, runner, budget: int | None = None) -> int:
        """Prefill the next chunk (at most ``budget`` tokens, default ``max_prefill_tokens``) of the
        long prompt in progress; join the batch after the last. Returns the tokens prefilled."""
        handle, cache, done, prompt, refill = self._chunking
        if handle.cancelled:
            self._chunking = None
            self._end_early(handle, None)
            return 0
        end = min(len(prompt), done + (budget or self.max_prefill_tokens))
        ids = np.asarray([prompt[done:end]], dtype=np.int64)
        try:
            logits = runner.step(cache, ids, np.ones((1, end), dtype=np.int64), np.arange(done, end)[None, :])
        except Exception as exc:
            self._chunking = None
            self._end_early(handle, exc)
            return end - done
        if end < len(prompt):
            self._chunking = (handle, cache, end, prompt, refill)
        else:
            self._chunking = None
            try:
                self._join([handle], cache, np.ones((1, end), dtype=np.int64), np.array([[end]]), logits, refill)
            except Exception as exc:
                self._end_early(handle, exc)
        return end - done

    # -- the shared cache ----------------------------------------------------------------------------
    def _ops(self) -> CacheOps:
        """The cache surgery session, made on first use on the engine's execution provider."""
        if self._cache_ops is None or self._cache_ops.runner is not self.engine.runner:
            self._cache_ops = CacheOps(self.engine.runner, self.engine.device.providers)
        return self._cache_ops

    def _merge(self, cache: KVCache, mask: np.ndarray, next_pos: np.ndarray, n: int) -> None:
        """Append ``n`` prefilled rows to the batch, padding the shorter side's cache and mask (on the
        graph's padding side)."""
        new_tokens = np.zeros(n, dtype=np.int64)
        if self.kv_backend == "slots":
            self._place(cache, mask, new_tokens)
            return
        if self._cache is None or not self._active:
            self._cache, self._mask, self._next_pos = cache, mask, next_pos
            self._last = new_tokens
            return
        width = max(self._mask.shape[1], mask.shape[1])
        left = self.engine.manifest.padding_side == "left"
        self._cache = self._ops().merge(self._cache, cache, width, left)

        def pad(a: np.ndarray, axis: int) -> np.ndarray:
            missing = width - a.shape[axis]
            if missing == 0:
                return a
            shape = list(a.shape)
            shape[axis] = missing
            zeros = np.zeros(shape, dtype=a.dtype)
            return np.concatenate([zeros, a] if left else [a, zeros], axis=axis)

        self._mask = np.concatenate([pad(self._mask, 1), pad(mask, 1)], axis=0)
        self._next_pos = np.concatenate([self._next_pos, next_pos], axis=0)
        self._last = np.concatenate([self._last, new_tokens])

    def _place(self, cache: KVCache, mask: np.ndarray, new_tokens: np.ndarray) -> None:
        """Copy prefilled rows into free slots (the slot buffer is made at the first request)."""
        if self._slots is None:
            self._slots = SlotCache(self.engine.runner, self.max_batch, self.slot_length)
        taken = set(self._slot_ids)
        free = [i for i in range(self.max_batch) if i not in taken][: len(new_tokens)]
        self._ops().write(self._slots, cache, free)
        self._slots.lengths[free] = mask.sum(axis=1)
        self._slot_ids.extend(free)
        self._last = np.concatenate([self._last, new_tokens])

    def _compact(self) -> None:
        """Drop finished rows, and the padding columns every remaining row shares (with slots:
        free their slots)."""
        keep = [i for i, h in enumerate(self._active) if not h.done and id(h) not in self._sliding]
        self._sliding.clear()          # rows that slid leave now; they come back through _refill
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if self.kv_backend == "slots":
            for i, slot in enumerate(self._slot_ids):
                if i not in keep:
                    self._slots.lengths[slot] = 0
            self._slot_ids = [self._slot_ids[i] for i in keep]
            self._last = self._last[keep]
            return
        if not keep:
            self._cache = None
            self._mask = np.zeros((0, 0), dtype=np.int64)
            self._next_pos = np.zeros((0, 1), dtype=np.int64)
            self._last = np.zeros(0, dtype=np.int64)
            return
        mask = self._mask[keep]
        if self.engine.manifest.padding_side == "left":
            cols = slice(int(np.argmax(mask.any(axis=0))), None)    # leading columns no remaining row uses
        else:
            cols = slice(0, int(mask.sum(axis=1).max()))            # trailing columns no remaining row uses
        self._cache = self._ops().select(self._cache, keep, cols.start, cols.stop if cols.stop is not None else mask.shape[1])
        self._mask = np.ascontiguousarray(mask[:, cols])
        self._next_pos = self._next_pos[keep]
        self._last = self._last[keep]
