"""Where a running batch keeps its KV cache: one protocol, two backends.

A backend owns the cache of the rows being decoded together, with their attention mask, positions
and buffers. Whoever drives generation (the :class:`~nextoken.Scheduler`, for one request or many,
or a driver of your own) asks it for the same five things:

    pre = kv.prefill(prompts)      # run the prompts; not part of the batch yet
    kv.join(pre)                   # their rows join the batch, after the rows already there
    logits = kv.decode(tokens)     # one token a row, every row of the batch
    kv.keep(rows)                  # the others leave
    kv.held(row), kv.nbytes()      # positions a row holds; bytes of cache

:class:`ConcatBackend` (any graph: present = concat(past, new)) pads a joining cache to the
batch's length on the graph's padding side and trims the padding every remaining row shares.
:class:`SlotBackend` (GroupQueryAttention graphs) keeps one fixed buffer of ``slots`` rows, each
request in a slot of its own, written in place at its own length: nothing is concatenated, padded
or trimmed. Joining and leaving run small ONNX graphs on the cache's device
(:class:`~nextoken.kvcache.CacheOps`), so the cache never passes through host memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .errors import NextokenError
from .kvcache import KVCache, SlotCache, grow_mask, pad_batch
from .runner import CacheOps, StepRunner

__all__ = [
    "BACKENDS",
    "BATCHED_LOGITS",
    "ConcatBackend",
    "KVBackend",
    "Prefilled",
    "SlotBackend",
    "for_request",
    "lora_of",
    "prefill_padded",
]

#: The backends by name (``Scheduler(kv_backend=...)``).
BACKENDS = ("concat", "slots")
#: Bytes of logits a batched prefill of right-padded prompts may make (it keeps every position's,
#: since the rows end in different columns); past this each prompt is prefilled in place alone. 64
#: prompts of 100-2,000 tokens on a 49k vocabulary made 1.2 GB batches, and the process kept them.
BATCHED_LOGITS = 256 << 20


@dataclass
class Prefilled:
    """Prompts run through the model, ready to join a batch: each one's last ``logits`` ``[n, V]``,
    the positions each row holds, the model time it took, and where the keys and values are (a
    padded ``cache`` with its ``mask``, or ``slots`` already written in place)."""

    logits: np.ndarray
    lengths: np.ndarray
    seconds: float
    cache: KVCache | None = None
    mask: np.ndarray | None = None
    slots: list[int] | None = None
    #: each row's LoRA adapter slot (None: none for every row)
    lora: np.ndarray | None = None

    @classmethod
    def after(
        cls, runner: StepRunner, cache: KVCache, prompt: Sequence[int], start: int, end: int, lora: int = 0
    ) -> "Prefilled":
        """Run ``prompt[start:end]`` over ``cache``, which holds its first ``start`` tokens (earlier
        chunks, or a cached prefix): one row of ``end`` positions, with adapter slot ``lora``;
        ``seconds`` is all the model time the cache has taken (every chunk)."""
        mask = np.ones((1, end), dtype=np.int64)
        ids = np.array([lora], dtype=np.int64)
        logits = runner.prefill(
            cache,
            np.asarray([prompt[start:end]], dtype=np.int64),
            mask,
            np.arange(start, end)[None, :],
            **lora_of(runner, ids),
        )
        return cls(logits, np.array([end]), cache.run_seconds, cache=cache, mask=mask, lora=ids)

    @property
    def row_lora(self) -> np.ndarray:
        """Each row's adapter slot (0: none)."""
        return np.zeros(len(self.lengths), dtype=np.int64) if self.lora is None else self.lora

    def forked(self, rows: Sequence[int], ops: CacheOps) -> "Prefilled":
        """The prefilled rows ``rows`` (an index may repeat: a prompt's ``n`` choices share its
        prefill), the cache copied where it lives."""
        if self.cache is None or self.mask is None:
            raise NextokenError("only a padded prefill (a cache and its mask) can be forked")
        cache = ops.select(self.cache, rows, 0, self.cache.length)
        return Prefilled(
            self.logits[rows],
            self.lengths[rows],
            self.seconds,
            cache=cache,
            mask=self.mask[rows],
            lora=self.row_lora[list(rows)],
        )


class KVBackend(Protocol):
    """What a driver asks of the running batch's cache (see the module's doc)."""

    name: str
    #: the model time of the last :meth:`decode`, seconds
    last_seconds: float

    @property
    def rows(self) -> int: ...
    @property
    def fixed_length(self) -> int | None:
        """Positions a row can hold at most when the backend holds them in fixed slots (None: the
        window's, grown as needed)."""

    @property
    def slot_count(self) -> int:
        """Fixed slots the backend holds (0: none, rows come and go)."""

    def prefill(
        self, prompts: Sequence[list[int]], fork: Sequence[int] | None = None, lora: Sequence[int] | None = None
    ) -> Prefilled:
        """Run ``prompts`` (each with its adapter slot in ``lora``); ``fork``: the rows to make of them."""

    def join(self, pre: Prefilled) -> None: ...
    def decode(self, tokens: np.ndarray, grow: np.ndarray | None = None) -> np.ndarray: ...
    def keep(self, rows: Sequence[int]) -> None: ...
    def held(self, row: int) -> int: ...
    def nbytes(self) -> int: ...
    def extend(self, row: int, tokens: Sequence[int]) -> np.ndarray: ...
    def truncate(self, row: int, length: int) -> None: ...
    def copy_row(self, row: int) -> KVCache | None:
        """Row ``row``'s keys and values, a cache of its own (its held positions), or None where
        they are not one run of positions."""


def prefill_padded(
    runner: StepRunner, prompts: Sequence[list[int]], pad_id: int, lora: Sequence[int] | None = None
) -> Prefilled:
    """Prefill prompts of any lengths together into a new cache, padded on the graph's side, each
    with its adapter slot in ``lora`` (None: none)."""
    rows_lora = None if lora is None else np.asarray(lora, dtype=np.int64)
    side = runner.manifest.padding_side
    input_ids, mask = pad_batch(prompts, pad_id, side)
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    cache = runner.new_cache(len(prompts))
    lengths = mask.sum(axis=1)
    if side == "left":
        logits = runner.prefill(cache, input_ids, mask, positions, **lora_of(runner, rows_lora))
    else:  # each row's last token is in its own column
        every = runner.prefill(cache, input_ids, mask, positions, all_logits=True, **lora_of(runner, rows_lora))
        logits = np.ascontiguousarray(every[np.arange(len(prompts)), lengths - 1])
    return Prefilled(logits, lengths, cache.run_seconds, cache=cache, mask=mask, lora=rows_lora)


def lora_of(runner: StepRunner, lora: Any) -> dict[str, Any]:
    """``{"lora": lora}`` for a runner whose graph takes adapters, else nothing: a package without
    them is run with the calls it always had (what a wrapped runner method expects)."""
    return {"lora": lora} if getattr(runner, "adapters", None) is not None else {}


def _no_surgery() -> CacheOps:
    """The cache surgery of a backend made for one request: it never joins or drops rows."""
    raise NextokenError("this KV cache was made for one request alone; it cannot take rows from another")


class ConcatBackend:
    """The batch's cache as values that grow by one position a step (any graph)."""

    name = "concat"

    def __init__(self, runner: StepRunner, pad_id: int, ops: Callable[[], CacheOps]) -> None:
        """
        Args:
            runner: the step runner.
            pad_id: the id rows are padded with.
            ops: the cache surgery that joins and drops rows.
        """
        self.runner, self.pad_id, self._ops = runner, pad_id, ops
        self.left = runner.manifest.padding_side == "left"
        self.cache: KVCache | None = None
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.next_pos = np.zeros((0, 1), dtype=np.int64)
        self.lora = np.zeros(0, dtype=np.int64)  # each row's adapter slot
        self.last_seconds = 0.0

    @property
    def rows(self) -> int:
        return len(self.mask)

    @property
    def fixed_length(self) -> int | None:
        return None

    @property
    def slot_count(self) -> int:
        return 0

    def _live(self) -> KVCache:
        """The batch's cache: there is one while any row runs."""
        if self.cache is None:
            raise NextokenError("the batch holds no rows")
        return self.cache

    def prefill(
        self, prompts: Sequence[list[int]], fork: Sequence[int] | None = None, lora: Sequence[int] | None = None
    ) -> Prefilled:
        """Run ``prompts`` (each with its adapter slot in ``lora``); ``fork``: the rows to make of
        them (indices into ``prompts``, repeated for the choices that share a prompt), copied from
        the one prefill."""
        pre = prefill_padded(self.runner, prompts, self.pad_id, lora)
        return pre if fork is None else pre.forked(fork, self._ops())

    def join(self, pre: Prefilled) -> None:
        """Append the rows, each side padded to the longer one (masked out)."""
        if pre.cache is None or pre.mask is None:
            raise NextokenError("a concatenated batch joins padded prefills (a cache and its mask) only")
        next_pos = pre.mask.sum(axis=1, keepdims=True)
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.next_pos, self.lora = pre.cache, pre.mask, next_pos, pre.row_lora
            return
        self.lora = np.concatenate([self.lora, pre.row_lora])
        width = max(self.mask.shape[1], pre.mask.shape[1])
        self.cache = self._ops().merge(self.cache, pre.cache, width, self.left)

        def pad(a: np.ndarray) -> np.ndarray:
            missing = width - a.shape[1]
            if missing == 0:
                return a
            zeros = np.zeros((a.shape[0], missing), dtype=a.dtype)
            return np.concatenate([zeros, a] if self.left else [a, zeros], axis=1)

        self.mask = np.concatenate([pad(self.mask), pad(pre.mask)], axis=0)
        self.next_pos = np.concatenate([self.next_pos, next_pos], axis=0)

    def decode(self, tokens: np.ndarray, grow: np.ndarray | None = None) -> np.ndarray:
        """Every row one position longer (``grow`` is not needed: finished rows ride along)."""
        mask, cache = grow_mask(self.mask, self.runner.manifest.padding_side), self._live()
        before = cache.run_seconds
        logits = self.runner.decode(
            cache, np.asarray(tokens, dtype=np.int64)[:, None], mask, self.next_pos, **lora_of(self.runner, self.lora)
        )
        self.last_seconds = cache.run_seconds - before
        self.mask, self.next_pos = mask, self.next_pos + 1
        return logits

    def keep(self, rows: Sequence[int]) -> None:
        """Drop the other rows, and the padding columns every remaining row shares."""
        rows = list(rows)
        if len(rows) == self.rows:
            return
        self.lora = self.lora[rows]
        if not rows:
            self.cache = None
            self.mask = np.zeros((0, 0), dtype=np.int64)
            self.next_pos = np.zeros((0, 1), dtype=np.int64)
            return
        mask = self.mask[rows]
        if self.left:
            start, stop = int(np.argmax(mask.any(axis=0))), mask.shape[1]  # leading columns no row uses
        else:
            start, stop = 0, int(mask.sum(axis=1).max())  # trailing columns no row uses
        self.cache = self._ops().select(self._live(), rows, start, stop)
        self.mask = np.ascontiguousarray(mask[:, start:stop])
        self.next_pos = self.next_pos[rows]

    def held(self, row: int) -> int:
        return int(self.mask[row].sum()) if row < self.rows else 0

    def nbytes(self) -> int:
        return self.cache.nbytes() if self.cache is not None else 0

    def extend(self, row: int, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens`` after the batch's one row (speculative decoding runs alone); the logits
        after each ``[len(tokens), V]``."""
        if self.rows != 1:
            raise NextokenError("a concatenated cache extends a batch of one sequence only")
        n = len(tokens)
        mask = np.concatenate([self.mask, np.ones((1, n), dtype=self.mask.dtype)], axis=1)
        positions = self.next_pos + np.arange(n)[None, :]
        cache = self._live()
        before = cache.run_seconds
        ids = np.asarray([tokens], dtype=np.int64)
        logits = self.runner.prefill(cache, ids, mask, positions, all_logits=True, **lora_of(self.runner, self.lora))
        self.last_seconds = cache.run_seconds - before
        self.mask, self.next_pos = mask, self.next_pos + n
        return logits[0]

    def copy_row(self, row: int) -> KVCache | None:
        """Row ``row``'s held positions: the last columns on the left-padded side (right-padded
        rows have the padding between their prompt and their answer: None)."""
        if not self.left:
            return None
        width = self.mask.shape[1]
        return self._ops().select(self._live(), [row], width - self.held(row), width)

    def truncate(self, row: int, length: int) -> None:
        """Keep the first ``length`` positions of the batch's one row (what a rejected guess left goes)."""
        drop = self.held(row) - length
        if drop > 0:
            self.cache = self._ops().select(self._live(), [0], 0, self.mask.shape[1] - drop)
            self.mask = np.ascontiguousarray(self.mask[:, :-drop])
            self.next_pos = self.next_pos - drop


class SlotBackend:
    """The batch's cache in a fixed buffer of ``slots`` rows of ``length`` positions, written in
    place (GroupQueryAttention graphs). Row ``i`` of the batch lives in slot ``slot_ids[i]``; a
    newcomer takes the lowest free slot, a leaver frees its own. The buffer is made at the first
    prefill and held while the backend lives.

    One prompt is prefilled straight into its slot; several are prefilled together and copied into
    their slots with ``ops`` (one batched run beats several) when ``batched`` and their logits stay
    within :data:`BATCHED_LOGITS`, else each in place;
    choices that share a prompt (``fork``) get copies of its one prefill."""

    name = "slots"

    def __init__(
        self,
        runner: StepRunner,
        slots: int,
        length: int,
        pad_id: int,
        ops: Callable[[], CacheOps] | None = None,
        batched: bool = True,
        paged: bool | None = None,
    ) -> None:
        """
        Args:
            runner: the step runner.
            slots: rows of the buffer (the batch's most).
            length: positions a slot.
            pad_id: the id rows are padded with.
            ops: the cache surgery (copies a batched prefill into slots; None: each prompt in place).
            batched: whether several prompts are prefilled together.
            paged: hold only the pages the slots write (:class:`~nextoken.kvcache.SlotCache`; None:
                on the CPU).
        """
        self.runner, self.slots, self.length, self.pad_id = runner, slots, length, pad_id
        self.paged = paged
        self._ops = ops or _no_surgery
        self.batched = batched and ops is not None
        self.buffer: SlotCache | None = None
        self.slot_ids: list[int] = []
        self.slot_lora = np.zeros(slots, dtype=np.int64)  # each slot's adapter slot (0: none)
        self.last_seconds = 0.0
        self._kept: tuple | None = None
        #: slots taken by prompts being prefilled in chunks, in place, before they join
        self.reserved: set[int] = set()

    @property
    def rows(self) -> int:
        return len(self.slot_ids)

    @property
    def fixed_length(self) -> int | None:
        return self.length

    @property
    def slot_count(self) -> int:
        return self.slots

    def _buffer(self) -> SlotCache:
        if self.buffer is None:
            self.buffer = SlotCache(self.runner, self.slots, self.length, self.paged)
        return self.buffer

    def _free(self, n: int) -> list[int]:
        taken = set(self.slot_ids) | self.reserved
        return [i for i in range(self.slots) if i not in taken][:n]

    def reserve(self, positions: int) -> int:
        """A free slot for a prompt of ``positions`` to be prefilled into in chunks
        (:meth:`prefill_chunk`) before it joins, its pages taken in order first
        (:meth:`~nextoken.kvcache.SlotCache.touch`); :meth:`unreserve` gives it back if it never
        does."""
        free = self._free(1)
        if not free:
            raise NextokenError("no free slot for a prompt to be prefilled into")
        self.reserved.add(free[0])
        buffer = self._buffer()
        buffer.lengths[free[0]] = 0
        buffer.touch(free[0], positions)
        return free[0]

    def unreserve(self, slot: int) -> None:
        """Give back a reserved slot whose prompt will not join (cancelled, or failed)."""
        self.reserved.discard(slot)
        if self.buffer is not None:
            self.buffer.release(slot)

    def prefill_chunk(self, slot: int, tokens: Sequence[int], start: int, lora: int = 0) -> np.ndarray:
        """Run ``tokens`` (a prompt's positions ``start``..) in place in reserved ``slot``; their
        last logits ``[1, V]``. The model time goes to :attr:`last_seconds`."""
        buffer = self._buffer()
        before = buffer.run_seconds
        logits = self.runner.prefill_in_place(buffer, tokens, slot, **lora_of(self.runner, lora), start=start)
        self.last_seconds = buffer.run_seconds - before
        return logits

    def prefill(
        self, prompts: Sequence[list[int]], fork: Sequence[int] | None = None, lora: Sequence[int] | None = None
    ) -> Prefilled:
        if fork is not None:
            return prefill_padded(self.runner, prompts, self.pad_id, lora).forked(fork, self._ops())
        width = max(map(len, prompts))
        if (
            len(prompts) > 1
            and self.batched
            and len(prompts) * width * self.runner.manifest.vocab_size * 4 <= BATCHED_LOGITS
        ):
            return prefill_padded(self.runner, prompts, self.pad_id, lora)
        buffer = self._buffer()
        before = buffer.run_seconds
        free = self._free(len(prompts))
        rows_lora = np.zeros(len(prompts), dtype=np.int64) if lora is None else np.asarray(lora, dtype=np.int64)
        logits = [
            self.runner.prefill_in_place(buffer, p, slot, **lora_of(self.runner, int(a)))
            for p, slot, a in zip(prompts, free, rows_lora)
        ]
        return Prefilled(
            np.concatenate(logits, axis=0),
            np.array([len(p) for p in prompts]),
            buffer.run_seconds - before,
            slots=free,
            lora=rows_lora,
        )

    def join(self, pre: Prefilled) -> None:
        buffer = self._buffer()
        if pre.slots is None:  # a padded cache: copied into free slots
            free = self._free(len(pre.lengths))
            if pre.cache is None:
                raise NextokenError("a prefill without slots brings its padded cache")
            self._ops().write(buffer, pre.cache, free)
        else:
            free = pre.slots
            self.reserved.difference_update(free)
        buffer.lengths[free] = pre.lengths
        self.slot_lora[free] = pre.row_lora
        for slot, length in zip(free, pre.lengths):
            buffer.trim(slot, int(length))  # a padded prefill wrote past a shorter row's end
        self.slot_ids.extend(free)

    def decode(self, tokens: np.ndarray, grow: np.ndarray | None = None) -> np.ndarray:
        """One step over the slots up to the highest in use: each row writes at its own length (a
        row where ``grow`` is False rewrites its last position; an idle slot among them decodes a
        pad token at position 0). Returns the batch's rows' logits, in order."""
        buffer, (rows, used, idle, in_order) = self._buffer(), self._layout()
        step = 1 if grow is None else grow
        if in_order:  # rows are slots 0..n-1: no gathering
            ids, lengths = np.asarray(tokens, dtype=np.int64)[:, None], buffer.lengths[:used] + step
        else:
            ids = np.full((used, 1), self.pad_id, dtype=np.int64)
            ids[rows, 0] = tokens
            lengths = np.ones(used, dtype=np.int64)
            lengths[rows] = buffer.lengths[rows] + step
        # slots a prompt is being prefilled into: they write a pad past their positions (its next
        # chunk writes over it) and keep their length
        filling = [s for s in idle.tolist() if s in self.reserved] if self.reserved else []
        held = buffer.lengths[filling].copy()
        lengths[filling] = held + 1
        before = buffer.run_seconds
        logits = self.runner.decode_in_place(buffer, ids, lengths, **lora_of(self.runner, self.slot_lora[:used]))
        self.last_seconds = buffer.run_seconds - before
        if len(idle):
            buffer.lengths[idle] = 0
            buffer.lengths[filling] = held
        return logits if in_order else logits[rows]

    def _layout(self) -> tuple[np.ndarray, int, np.ndarray, bool]:
        """(the rows' slots, slots a step runs, idle slots among them, rows == slots 0..n-1),
        worked out again only when rows join or leave."""
        if self._kept is None or self._kept[0] != self.slot_ids:
            rows = np.asarray(self.slot_ids, dtype=np.int64)
            used = int(rows.max()) + 1
            idle = np.setdiff1d(np.arange(used), rows)
            self._kept = (
                list(self.slot_ids),
                (rows, used, idle, used == len(rows) and bool((rows == np.arange(used)).all())),
            )
        return self._kept[1]

    def keep(self, rows: Sequence[int]) -> None:
        self.slot_ids = [self.slot_ids[i] for i in rows]
        buffer, taken = self.buffer, set(self.slot_ids) | self.reserved
        if buffer is None:
            return
        for slot in np.flatnonzero(buffer.high).tolist():  # leavers, and idle slots a step wrote at 0
            if slot not in taken:
                buffer.release(slot)

    def held(self, row: int) -> int:
        return int(self._buffer().lengths[self.slot_ids[row]]) if row < self.rows else 0

    def nbytes(self) -> int:
        """Bytes the buffer holds (paged: the pages its slots have written)."""
        return self.buffer.nbytes() if self.buffer is not None else 0

    def extend(self, row: int, tokens: Sequence[int]) -> np.ndarray:
        """Run ``tokens`` after row ``row``, in place in its slot; the logits after each ``[len(tokens), V]``."""
        buffer = self._buffer()
        before = buffer.run_seconds
        slot = self.slot_ids[row]
        logits = self.runner.extend_in_place(buffer, slot, tokens, **lora_of(self.runner, int(self.slot_lora[slot])))
        self.last_seconds = buffer.run_seconds - before
        return logits

    def copy_row(self, row: int) -> KVCache | None:
        """Row ``row``'s positions 0.. of its slot, copied out (the slot stays the row's until it leaves)."""
        return self._ops().select(self._buffer(), [self.slot_ids[row]], 0, self.held(row))

    def truncate(self, row: int, length: int) -> None:
        """Row ``row`` holds its first ``length`` positions only: a length, nothing copied."""
        slot, buffer = self.slot_ids[row], self._buffer()
        buffer.lengths[slot] = min(int(buffer.lengths[slot]), length)
        buffer.trim(slot, int(buffer.lengths[slot]))

    @property
    def slot_lengths(self) -> list[int]:
        """Positions each slot holds (0: free)."""
        return self.buffer.lengths.tolist() if self.buffer is not None else [0] * self.slots


def for_request(
    runner: StepRunner,
    rows: int,
    length: int,
    pad_id: int,
    slide: bool = False,
    ops: Callable[[], CacheOps] | None = None,
) -> KVBackend:
    """The cache of one request of ``rows`` sequences, up to ``length`` positions each:
    GroupQueryAttention graphs (keys placed by the mask) run in place in a fixed buffer that long
    (nothing concatenated per step; each prompt prefilled in place in its row; allocated whole, as
    long as the request may reach, so it is the request's own to count); other graphs, and a
    request that slides its window (it is prefilled again), grow the cache by concatenation.
    ``ops``: the cache surgery that copies a prompt's prefill to its other choices (``n`` > 1)."""
    if not slide and runner.manifest.padding_side == "right":
        return SlotBackend(runner, rows, length, pad_id, ops, batched=False, paged=False)
    return ConcatBackend(runner, pad_id, ops or _no_surgery)
