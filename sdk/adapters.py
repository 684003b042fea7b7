"""LoRA adapters chosen per request, rows with different adapters (and rows with none) in one step.

A package exported with ``--lora-adapters N --lora-rank R`` takes, for every targeted projection of
every layer, the low-rank pairs of N adapters as inputs (``lora.{layer}.{group}.a [T x N x R, in]``:
every A turned and stacked, for the T targets of a group that read the same input; and
``lora.{layer}.{target}.b [out, N x R]``: every B turned, side by side) and each row's adapter slot
as ``lora_ids [batch]`` (1 to N; 0: none): the graph adds ``(x @ A) @ B`` to the projection with
the other adapters' part zeroed in between, so each row gets its own. An
adapter file (``nextoken adapter PEFT_DIR --package PKG -o ADAPTER``) holds those pairs for one
adapter, already in the package's layout (the scale ``alpha / r`` folded into B, q, k and v side by
side, a smaller rank padded with zeros, so the result is exact).

:class:`AdapterTable` is the engine's: the adapters' slots in memory (bound once by address on the
CPU; copied to the device on CUDA), loaded and unloaded while the engine runs; a row's slot is
held by its request until it ends, so an adapter in use is never overwritten.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InvalidRequestError, ModelPackageError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LORA_GROUPS",
    "AdapterTable",
    "lora_groups",
    "no_adapter_feeds",
    "read_adapter",
]

#: an adapter's files: what it was made from and for, and its tensors
ADAPTER_CONFIG = "nextoken_adapter.json"
ADAPTER_WEIGHTS = "adapter.npz"
#: the targets that read the same input, whose A share one graph input (stacked in this order)
LORA_GROUPS = (("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")), ("down", ("down",)))


def lora_groups(targets: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The groups of :data:`LORA_GROUPS` ``targets`` reach, each with its targeted members in order."""
    out = [(group, [t for t in members if t in targets]) for group, members in LORA_GROUPS]
    return [(group, members) for group, members in out if members]


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """An adapter folder's config and tensors (``lora.{layer}.{site}.a`` / ``.b``, one adapter's)."""
    folder = Path(path)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise ModelPackageError(
            f"{folder}: not a nextoken adapter (no {ADAPTER_CONFIG}); make one from a PEFT checkpoint with "
            "`nextoken adapter PEFT_DIR --package PKG -o ADAPTER`"
        )
    import zipfile

    try:
        config = json.loads(config_path.read_text())
        with np.load(folder / ADAPTER_WEIGHTS) as data:  # no pickles: arrays only
            tensors = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelPackageError(
            f"{folder}: the adapter cannot be read ({exc}); make it again with `nextoken adapter`"
        ) from None
    if not isinstance(config, dict):
        raise ModelPackageError(f"{folder}/{ADAPTER_CONFIG} is not an adapter's config; make it again")
    return config, tensors


def no_adapter_feeds(inputs: Sequence[Any], batch: int) -> dict[str, np.ndarray]:
    """Feeds for a LoRA graph's adapter inputs that apply no adapter (all rows slot 0, zero pairs),
    from the session's input metadata; empty for a graph without them."""
    feeds: dict[str, np.ndarray] = {}
    for meta in inputs:
        if meta.name == "lora_ids":
            feeds[meta.name] = np.zeros(batch, dtype=np.int64)
        elif meta.name.startswith("lora."):
            feeds[meta.name] = np.zeros(meta.shape, dtype=np.float16 if "float16" in meta.type else np.float32)
    return feeds


class AdapterTable:
    """The adapters an engine holds: their slots (the graph's adapter inputs), by name."""

    def __init__(self, inputs: Sequence[Any], manifest: Any, device: str = "cpu", device_id: int = 0) -> None:
        """
        Args:
            inputs: the session's input metadata (the ``lora.*`` inputs give the slots' shapes).
            manifest: the package's manifest (its ``lora`` and checksums: what adapters must match).
            device: where the slots live (``cpu`` or ``cuda``).
            device_id: the device's index.
        """
        import onnxruntime as ort

        self.manifest, self.device, self.device_id = manifest, device, device_id
        spec = manifest.lora or {}
        self.capacity, self.rank = int(spec.get("adapters", 0)), int(spec.get("rank", 0))
        #: an adapter file's A of a target -> (the graph input holding it, the target's place in its group)
        self.a_of: dict[str, tuple[str, int]] = {}
        groups = lora_groups(spec.get("targets", ()))
        self.host: dict[str, np.ndarray] = {}
        for meta in inputs:
            if meta.name.startswith("lora."):
                dtype = np.float16 if "float16" in meta.type else np.float32
                self.host[meta.name] = np.zeros([int(d) for d in meta.shape], dtype=dtype)
                if meta.name.endswith(".a"):
                    _, layer, group, _ = meta.name.split(".")
                    members = dict(groups)[group]
                    for j, target in enumerate(members):
                        self.a_of[f"lora.{layer}.{target}.a"] = (meta.name, j)
        # on the CPU the values share the host arrays' memory: writing a slot is all a load takes
        self.values = {
            name: ort.OrtValue.ortvalue_from_numpy(array, device, device_id) for name, array in self.host.items()
        }
        self.slots: dict[str, int] = {}  # name -> slot (1..capacity)
        self.users = np.zeros(self.capacity + 1, dtype=np.int64)
        self.lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        """The adapters loaded, by name."""
        return sorted(self.slots)

    def load(self, name: str, path: str | Path) -> int:
        """Load the adapter at ``path`` under ``name`` into a free slot; its slot. An adapter made
        for another package, or over this package's rank or targets, is refused by name."""
        if not name or name != name.strip():
            raise InvalidRequestError(f"{name!r} is not an adapter name (a non-empty name without surrounding spaces)")
        config, tensors = read_adapter(path)
        self._check(name, config, tensors)
        with self.lock:
            if name in self.slots:
                raise InvalidRequestError(f"adapter {name!r} is loaded already; unload it first to replace it")
            free = [s for s in range(1, self.capacity + 1) if s not in self.slots.values()]
            if not free:
                raise InvalidRequestError(
                    f"all {self.capacity} adapter slots are taken ({', '.join(self.names)}); unload one, or "
                    "export the package with more (--lora-adapters)"
                )
            slot = free[0]
            self._write(slot, tensors)
            self.slots[name] = slot
        return slot

    def unload(self, name: str) -> None:
        """Unload ``name`` (its slot zeroed and freed); refused while requests use it."""
        with self.lock:
            slot = self.slot_of(name)
            if self.users[slot]:
                raise InvalidRequestError(
                    f"adapter {name!r} has {self.users[slot]} requests in hand; unload it when idle"
                )
            self._write(slot, {})
            del self.slots[name]

    def slot_of(self, name: str) -> int:
        """``name``'s slot, or an InvalidRequestError naming the adapters there are."""
        slot = self.slots.get(name)
        if slot is None:
            loaded = ", ".join(self.names) or "none"
            raise InvalidRequestError(f"adapter {name!r} is not loaded (loaded: {loaded})", param="adapter")
        return slot

    def hold(self, name: str | None) -> int:
        """A request's slot for ``name`` (0 for None), held until :meth:`release`."""
        if name is None:
            return 0
        with self.lock:
            slot = self.slot_of(name)
            self.users[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        """Give back a slot :meth:`hold` returned."""
        if slot:
            with self.lock:
                self.users[slot] = max(0, self.users[slot] - 1)

    def bind(self, binding: Any) -> None:
        """Bind every slot's tensors (by address: a later load shows in kept bindings too)."""
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)

    # -- inside -----------------------------------------------------------------------------------
    def _part(self, key: str, slot: int) -> np.ndarray:
        """Slot ``slot``'s (1 to capacity) part of an adapter file's tensor ``key`` in the graph's
        inputs, shaped as the file holds it (A ``[in, rank]``, B ``[rank, out]``): a view of its
        group's rows (A is stored turned and stacked) or of its B's columns (turned too)."""
        width, at = self.capacity * self.rank, (slot - 1) * self.rank
        if key.endswith(".a"):
            name, j = self.a_of[key]
            return self.host[name][j * width + at : j * width + at + self.rank].T
        return self.host[key][:, at : at + self.rank].T

    def _write(self, slot: int, tensors: Mapping[str, np.ndarray]) -> None:
        for key in [*self.a_of, *(n for n in self.host if n.endswith(".b"))]:
            self._part(key, slot)[...] = tensors.get(key, 0)
        if self.device != "cpu":
            for name, array in self.host.items():
                self.values[name].update_inplace(array)

    def _check(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> None:
        made_for = config.get("package") or {}
        mine = self.manifest.checksums.get(self.manifest.model_file)
        if made_for.get("model_sha256") and mine and made_for["model_sha256"] != mine:
            raise InvalidRequestError(
                f"adapter {name!r} was made for another package ({made_for.get('source') or '?'}, graph "
                f"{made_for['model_sha256'][:12]}), not this one ({mine[:12]}); make it again for this package: "
                "nextoken adapter PEFT_DIR --package PKG -o ADAPTER"
            )
        for key, array in tensors.items():
            if not np.isfinite(array).all():
                # the graph multiplies every adapter's products by each row's 0 or 1: a non-finite
                # value would reach the rows of other adapters too (0 x inf is NaN)
                raise InvalidRequestError(f"adapter {name!r}: its tensor {key} holds values that are not finite")
            known = key in self.a_of or (key.endswith(".b") and key in self.host)
            slot_shape = self._part(key, 1).shape if known else None
            if slot_shape is None or tuple(array.shape) != tuple(slot_shape):
                raise InvalidRequestError(
                    f"adapter {name!r}: its tensor {key} {list(array.shape)} has no place in this package's "
                    f"adapter inputs ({list(slot_shape) if slot_shape else 'none of that name'}); make it again "
                    "for this package"
                )
