"""Many models in one process: a pool of packages loaded when asked for and unloaded, least recently
used first, when the memory planner says the next one will not fit beside them.

    pool = ModelPool({"chat": "pkgs/chat", "summary": "pkgs/summary"}, budget=4 << 30)
    with pool.use("chat") as model:           # loads it if needed, and keeps it while in use
        handle = model.scheduler.submit("Once upon a time", SamplingParams(max_new_tokens=32))
        print(handle.result().text)
    pool.close()

Each loaded model is an :class:`~nextoken.Engine` and a running :class:`~nextoken.Scheduler`.
What a model holds is decided before it loads: :func:`~nextoken.tools.memory.plan_memory` at
``max_batch`` sequences of the slot length (weights, KV cache, working memory, its prefix cache),
and the model's scheduler gets that KV cache as its ``kv_budget``, so the plan is a bound, not a
guess. The pool never holds more planned bytes than its budget: a model that does not fit beside
the loaded ones waits until enough of them are idle to unload (least recently used first; pinned
ones never), at most ``wait_s``. Models never load or unload while a request holds them.

LoRA adapters (``adapters={name: folder}``) belong to the package they were made for (the graph
checksum the adapter records): each is loaded with that model, and a request for the adapter's
name holds that model (:meth:`ModelPool.model_of`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import InvalidRequestError, ModelPackageError, NextokenError

__all__ = ["LoadedModel", "ModelInUseError", "ModelPool", "PoolBusyError", "UnknownModelError", "memory_free"]

#: a model's states, as /v1/models shows them
STATES = ("unloaded", "loading", "loaded", "unloading")


class UnknownModelError(InvalidRequestError):
    """A model the pool does not hold; the message names the ones it does."""


class ModelInUseError(InvalidRequestError):
    """An unload refused: the model is pinned, or requests hold it."""


class PoolBusyError(NextokenError):
    """A model could not be loaded in time: the models it would displace stayed in use."""


def memory_free(device: str = "cpu") -> int | None:
    """What the host has free for models now: RAM available (cpu), or free on the GPU (cuda[:N])."""
    from .probes import gpu_memory, meminfo_bytes

    if device.startswith("cuda"):
        gpu = gpu_memory(int(device[5:]) if device[5:].isdigit() else 0)
        return None if gpu is None else gpu.free
    return meminfo_bytes("MemAvailable")


@dataclasses.dataclass
class LoadedModel:
    """A model the pool has loaded: its engine, its running scheduler, and ``attached``: what the
    pool's ``on_load`` made of it (the server's application over it)."""

    name: str
    engine: Any
    scheduler: Any
    attached: Any = None


@dataclasses.dataclass
class _Entry:
    name: str
    path: str
    pinned: bool
    planned_bytes: int
    kv_budget: int
    state: str = "unloaded"
    users: int = 0
    last_used: float = 0.0
    loads: int = 0
    loaded: LoadedModel | None = None
    error: str | None = None
    #: its LoRA adapters: name -> folder
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)


class ModelPool:
    """Packages by name, loaded on demand within a memory budget (see the module's doc)."""

    def __init__(
        self,
        models: Mapping[str, str | Path],
        budget: int | None = None,
        *,
        pinned: Sequence[str] = (),
        max_batch: int = 8,
        engine_options: Mapping[str, Any] | None = None,
        scheduler_options: Mapping[str, Any] | None = None,
        wait_s: float = 120.0,
        on_load: Callable[[LoadedModel], Any] | None = None,
        on_unload: Callable[[LoadedModel], None] | None = None,
        adapters: Mapping[str, str | Path] | None = None,
    ) -> None:
        """
        Args:
            models: name -> package path; the names are what requests ask for.
            budget: bytes the loaded models may hold together, as planned (default: what the host
                has free now, on the engines' device).
            pinned: names loaded now and never unloaded.
            max_batch: each model's scheduler's batch.
            engine_options: :class:`~nextoken.Engine` arguments for every model.
            scheduler_options: more :class:`~nextoken.Scheduler` arguments for every model.
            wait_s: how long a request waits for its model to load (and for room for it).
            on_load: called with each model once loaded; what it returns is its ``attached``.
            on_unload: called with each model before it is closed.
            adapters: LoRA adapter name -> folder (``nextoken adapter``); each goes with the model
                whose package it was made for.
        """
        from .tools.memory import plan_memory

        if not models:
            raise InvalidRequestError("a model pool needs at least one package (name -> path)")
        self.engine_options = dict(engine_options or {})
        self.scheduler_options = {k: v for k, v in dict(scheduler_options or {}).items() if v is not None}
        self.max_batch, self.wait_s = max_batch, wait_s
        self.on_load, self.on_unload = on_load, on_unload
        device = str(self.engine_options.get("device", "auto"))
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        if device == "auto":
            from .device import resolve_device

            self.device = "cuda" if resolve_device("auto").device.startswith("cuda") else "cpu"
        if budget is None:
            budget = memory_free(self.device)
            if budget is None:
                raise InvalidRequestError("the free memory is unknown here: give the pool a budget (--memory-budget)")
        if budget < 1:
            raise InvalidRequestError(f"the memory budget must be a positive number of bytes, not {budget}")
        self.budget = int(budget)
        unknown = sorted(set(pinned) - set(models))
        if unknown:
            raise UnknownModelError(f"pinned {', '.join(unknown)}: not among the models ({', '.join(models)})")
        self._entries: dict[str, _Entry] = {}
        for name, path in models.items():
            if not name or name != name.strip():
                raise InvalidRequestError(f"{name!r} is not a model name (a non-empty name without surrounding spaces)")
            try:
                plan, kv_budget = self._plan(path, plan_memory)
            except (ModelPackageError, InvalidRequestError) as exc:
                raise InvalidRequestError(f"model {name} ({path}): {exc}") from None
            self._entries[name] = _Entry(name, str(path), name in pinned, plan, kv_budget)
        pinned_bytes = sum(e.planned_bytes for e in self._entries.values() if e.pinned)
        if pinned_bytes > self.budget:
            raise InvalidRequestError(
                f"the pinned models plan {_gib(pinned_bytes)}, more than the budget ({_gib(self.budget)}); "
                "pin fewer or raise the budget"
            )
        for name, entry in self._entries.items():
            if entry.planned_bytes > self.budget:
                raise InvalidRequestError(
                    f"model {name} plans {_gib(entry.planned_bytes)} at batch {max_batch}, more than the whole "
                    f"budget ({_gib(self.budget)}); lower --max-batch or --slot-length, or raise the budget"
                )
        #: adapter name -> the model it goes with
        self.adapters: dict[str, str] = {}
        for name, path in dict(adapters or {}).items():
            entry = self._owner(name, str(path))
            entry.adapters[name] = str(path)
            self.adapters[name] = entry.name
        self._cond = threading.Condition()
        self._closed = False
        for name in pinned:
            self.load(name)

    def _owner(self, name: str, path: str) -> _Entry:
        """The model an adapter was made for (its package's graph checksum), or why it has none."""
        from .adapters import read_adapter
        from .manifest import Manifest

        if name in self._entries or name in self.adapters:
            raise InvalidRequestError(f"adapter {name!r}: a model of that name is served already; name it otherwise")
        try:
            config, _tensors = read_adapter(path)
        except ModelPackageError as exc:
            raise InvalidRequestError(f"adapter {name}: {exc}") from None
        made_for = (config.get("package") or {}).get("model_sha256")
        owners = []
        for entry in self._entries.values():
            manifest = Manifest.load(entry.path)
            if made_for and manifest.checksums.get(manifest.model_file) == made_for:
                owners.append(entry)
        if len(owners) != 1:
            have = "none of the models" if not owners else f"several models ({', '.join(e.name for e in owners)})"
            raise InvalidRequestError(
                f"adapter {name} ({path}) was made for {(config.get('package') or {}).get('source') or 'a package'} "
                f"(graph {str(made_for)[:12]}), {have} here; serve the package it was made for once, or make it "
                "again for one of them: nextoken adapter PEFT_DIR --package PKG -o ADAPTER"
            )
        if not Manifest.load(owners[0].path).lora:
            raise InvalidRequestError(f"adapter {name}: model {owners[0].name} takes no adapters")
        return owners[0]

    def model_of(self, name: str) -> str:
        """The model a request for ``name`` (a model's or an adapter's) holds."""
        if name in self.adapters:
            return self.adapters[name]
        return self._entry(name).name

    def _plan(self, path: str | Path, plan_memory: Callable[..., Any]) -> tuple[int, int]:
        """(planned bytes, KV budget) of a package at this pool's batch and slot length."""
        from .manifest import Manifest

        manifest = Manifest.load(path)
        window = manifest.context_length
        context = min(self.scheduler_options.get("slot_length") or min(window, 2048), window)
        prefix = 0 if manifest.embeds else int(self.engine_options.get("prefix_cache_bytes") or 0)
        plan = plan_memory(path, self.max_batch, context, device=self.device, prefix_cache_bytes=prefix)
        kv_budget = self.scheduler_options.get("kv_budget") or plan.kv_cache_bytes
        extra = max(0, kv_budget - plan.kv_cache_bytes)  # an operator's larger KV budget is planned too
        return plan.total_bytes + extra, kv_budget

    # -- what a caller sees ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The models' names, in the order given."""
        return list(self._entries)

    def describe(self, name: str | None = None) -> list[dict[str, Any]]:
        """Each model (or ``name``'s): its state, planned bytes, pinning, requests in hand, loads."""
        with self._cond:
            entries = [self._entry(name)] if name is not None else list(self._entries.values())
            return [
                {
                    "id": e.name,
                    "path": e.path,
                    "state": e.state,
                    "planned_bytes": e.planned_bytes,
                    "pinned": e.pinned,
                    "in_use": e.users,
                    "loads": e.loads,
                    **({"error": e.error} if e.error else {}),
                }
                for e in entries
            ]

    @property
    def held_bytes(self) -> int:
        """Planned bytes of the models loaded, loading or unloading."""
        with self._cond:
            return self._held()

    def _held(self) -> int:
        return sum(e.planned_bytes for e in self._entries.values() if e.state != "unloaded")

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownModelError(
                f"model {name!r} is not served here; the models are {', '.join([*self._entries, *self.adapters])}"
            )
        return entry

    def loaded(self, name: str) -> LoadedModel | None:
        """``name``'s model when it is loaded now (not waiting for it), else None."""
        with self._cond:
            entry = self._entry(name)
            return entry.loaded if entry.state == "loaded" else None

    # -- use -------------------------------------------------------------------------------------------
    def try_acquire(self, name: str) -> LoadedModel | None:
        """``name``'s model, held for the caller (:meth:`release` it), when it is loaded now; None
        when it would have to load (then :meth:`acquire`, which may wait)."""
        with self._cond:
            entry = self._entry(name)
            if entry.state != "loaded" or self._closed:
                return None
            entry.users += 1
            entry.last_used = time.monotonic()
            return entry.loaded

    def acquire(self, name: str, wait_s: float | None = None) -> LoadedModel:
        """``name``'s model, held for the caller until :meth:`release`: loaded first if need be,
        after unloading idle models (least recently used first) until it fits the budget. Waits at
        most ``wait_s`` (default: the pool's) for the load and for room: then PoolBusyError."""
        deadline = time.monotonic() + (self.wait_s if wait_s is None else wait_s)
        with self._cond:
            entry = self._entry(name)
            while True:
                if self._closed:
                    raise PoolBusyError("the model pool is closed")
                if entry.state == "loaded":
                    entry.users += 1
                    entry.last_used = time.monotonic()
                    assert entry.loaded is not None
                    return entry.loaded
                if entry.state == "unloaded":
                    victim = self._room_for(entry)
                    if victim is None and self._held() + entry.planned_bytes <= self.budget:
                        entry.state, entry.error = "loading", None
                        break
                    if victim is not None:
                        self._unload(victim)  # releases the lock while it closes; then look again
                        continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PoolBusyError(self._why_waiting(entry))
                self._cond.wait(left)
        return self._load(entry, hold=True)

    def _room_for(self, entry: _Entry) -> _Entry | None:
        """The model to unload next to make room for ``entry`` (least recently used idle one, never
        pinned), or None when it fits already or nothing can go now."""
        if self._held() + entry.planned_bytes <= self.budget:
            return None
        idle = [e for e in self._entries.values() if e.state == "loaded" and not e.users and not e.pinned]
        return min(idle, key=lambda e: e.last_used) if idle else None

    def _why_waiting(self, entry: _Entry) -> str:
        busy = [f"{e.name} ({e.state}, {e.users} in use)" for e in self._entries.values() if e.state != "unloaded"]
        return (
            f"model {entry.name} ({_gib(entry.planned_bytes)}) could not load within {self.wait_s:g} s: the budget "
            f"({_gib(self.budget)}) is held by {', '.join(busy) or 'nothing'}; retry later"
        )

    def release(self, model: LoadedModel) -> None:
        """Give back a model :meth:`acquire` or :meth:`try_acquire` returned."""
        with self._cond:
            entry = self._entries[model.name]
            entry.users = max(0, entry.users - 1)
            entry.last_used = time.monotonic()
            self._cond.notify_all()

    @contextmanager
    def use(self, name: str) -> Iterator[LoadedModel]:
        """``with pool.use(name) as model:`` :meth:`acquire` and :meth:`release` around the block."""
        model = self.acquire(name)
        try:
            yield model
        finally:
            self.release(model)

    # -- load and unload -------------------------------------------------------------------------------
    def load(self, name: str, wait_s: float | None = None) -> dict[str, Any]:
        """Load ``name`` now (unloading idle models if need be); its description."""
        self.release(self.acquire(name, wait_s))
        return self.describe(name)[0]

    def unload(self, name: str) -> dict[str, Any]:
        """Unload ``name`` now; a ModelInUseError when it is pinned or in use."""
        with self._cond:
            entry = self._entry(name)
            if entry.pinned:
                raise ModelInUseError(f"model {name} is pinned: it stays loaded")
            if entry.users:
                raise ModelInUseError(f"model {name} has {entry.users} requests in hand; unload it when idle")
            if entry.state == "loaded":
                self._unload(entry)
        return self.describe(name)[0]

    def _load(self, entry: _Entry, hold: bool) -> LoadedModel:
        """Open ``entry`` (marked loading, its bytes counted), outside the lock."""
        from .engine import Engine
        from .scheduler import Scheduler

        engine = scheduler = None
        try:
            options = {**self.engine_options, **({"adapters": entry.adapters} if entry.adapters else {})}
            engine = Engine(entry.path, **options)
            scheduler = Scheduler(
                engine, max_batch=self.max_batch, **{**self.scheduler_options, "kv_budget": entry.kv_budget}
            ).start()
            model = LoadedModel(entry.name, engine, scheduler)
            if self.on_load is not None:
                model.attached = self.on_load(model)
        except BaseException as exc:
            if scheduler is not None:
                scheduler.close()
            if engine is not None:
                engine.close()
            with self._cond:
                entry.state, entry.error = "unloaded", f"{type(exc).__name__}: {exc}"
                self._cond.notify_all()
            raise
        with self._cond:
            entry.loaded, entry.state, entry.loads = model, "loaded", entry.loads + 1
            entry.last_used = time.monotonic()
            if hold:
                entry.users += 1
            self._cond.notify_all()
        return model

    def _unload(self, entry: _Entry) -> None:
        """Close ``entry`` (idle, loaded); called and returning with the lock held, released while it
        closes. Its bytes count as held until its memory has gone back to the OS."""
        model, entry.state = entry.loaded, "unloading"
        entry.loaded = None
        self._cond.release()
        try:
            if model is not None:
                try:
                    if self.on_unload is not None:
                        self.on_unload(model)
                finally:
                    model.scheduler.close()
                    model.engine.close()
            del model
            _give_back_heap()
        finally:
            self._cond.acquire()
            entry.loaded, entry.state = None, "unloaded"
            self._cond.notify_all()

    def close(self) -> None:
        """Unload every model (requests still in hand fail with the scheduler's closing error)."""
        with self._cond:
            self._closed = True
            for entry in self._entries.values():
                while entry.state in ("loading", "unloading"):
                    self._cond.wait(1.0)
                if entry.state == "loaded":
                    self._unload(entry)

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _give_back_heap() -> None:
    """Return an unloaded model's memory to the OS now: what its engine freed stays mapped by the
    C allocator otherwise (measured: an fp32 135M model unloaded for an int4 one left the process
    at 620 MiB, not 213), and the next model would load on top of it."""
    import gc

    from .probes import release_free_heap

    gc.collect()
    release_free_heap()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
