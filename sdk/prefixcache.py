"""A prefix cache across requests: the KV cache of prompt prefixes, reused instead of prefilled again.

An entry is a prompt's keys and values (``[1, kv_heads, length, head_dim]`` a layer, where the
engine's cache lives, as its prefill made them: nothing is copied to store it). It is found by a
hash of every token up to each multiple of ``block`` tokens in it, and of all its tokens, so it is
reused only after an identical history: by a prompt that continues it (a chat's next turn reuses
the whole previous prompt, as is) or that shares its first blocks (their positions are copied
out). Entries are kept in least-recently-used order within ``capacity_bytes``. A hit's prefill
runs only the rest of the prompt over the entry's values (the graph writes new ones), and the
output is the same tokens as without the cache.

A second tier on disk (:class:`DiskTier`, ``Engine(prefix_cache_dir=...)``) keeps entries across
restarts, for long system prompts: every entry the memory tier takes is also written there (by a
background thread), and a prompt the memory tier misses is looked up there and loaded into it.
Its directory holds one folder per package identity (:func:`package_identity`: the export's file
checksums, the KV dtype, the execution provider and the format version), so a changed model, or
another provider whose numbers differ, never reads another's keys and values.

Disk format, version 1: ``DIR/<identity>/<key>.npz``, an uncompressed NumPy archive per entry,
``<key>`` the hex hash of its tokens, with members ``meta`` (JSON: ``format``
``"nextoken-prefix-kv"``, ``version`` 1, ``identity``, ``length``), ``ids`` (int64 ``[length]``,
compared on load: a hash collision never serves another prefix) and ``kv_0`` ... ``kv_{2L-1}``
(``[1, kv_heads, length, head_dim]`` in the KV dtype, in the package's past-input order: each
layer's keys, then its values). A file that does not read back so is skipped with a warning.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .kvcache import KVCache

__all__ = ["PrefixCache", "PrefixStats", "DiskTier", "package_identity", "DISK_FORMAT", "DISK_VERSION"]

log = logging.getLogger("nextoken")

DISK_FORMAT = "nextoken-prefix-kv"
DISK_VERSION = 1


@dataclass
class PrefixStats:
    """What the cache did: lookups that hit and missed, tokens reused, entries and bytes held, evictions."""

    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0
    entries: int = 0
    bytes: int = 0
    evicted: int = 0
    #: hits served from the disk tier (loaded into memory), and what it holds
    disk_hits: int = 0
    disk_entries: int = 0
    disk_bytes: int = 0


def _key(ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def _boundaries(length: int, block: int) -> list[int]:
    """The prefix lengths an entry of ``length`` tokens serves: each whole block, and all of it."""
    return sorted({*range(block, length + 1, block), length})


def package_identity(checksums: Mapping[str, str], kv_dtype: str, provider: str) -> str:
    """The disk tier's folder for a package: a hash of its files' checksums, its KV dtype, the
    execution provider and the format version (any change: another folder, nothing shared)."""
    text = json.dumps({"format": DISK_FORMAT, "version": DISK_VERSION, "checksums": dict(checksums),
                       "kv_dtype": kv_dtype, "provider": provider}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class DiskTier:
    """Prefix-cache entries as files (format in the module's doc) under ``directory/identity``,
    the oldest used first out beyond ``capacity_bytes``. ``load`` makes a :class:`KVCache` where
    the engine's cache lives from an entry's arrays. Writes go through one background thread
    (:meth:`flush` waits for them); reads happen when the memory tier misses."""

    def __init__(self, directory: str | Path, identity: str, capacity_bytes: int, block: int,
                 load: Callable[[list[np.ndarray]], KVCache]) -> None:
        self.directory = Path(directory) / identity
        self.directory.mkdir(parents=True, exist_ok=True)
        self.identity, self.capacity_bytes, self.block, self._load = identity, int(capacity_bytes), block, load
        self._lock = threading.Lock()
        self._index: dict[bytes, tuple[str, int]] = {}      # boundary key -> (file, entry length)
        self._files: dict[str, tuple[list[bytes], int, int]] = {}  # file -> (its boundary keys, bytes, length)
        self.lengths: collections.Counter[int] = collections.Counter()
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._writer: threading.Thread | None = None
        for path in sorted(self.directory.glob("*.npz"), key=lambda p: p.stat().st_mtime):
            try:
                with np.load(path, allow_pickle=False) as archive:
                    self._check(path, archive)
                    ids = archive["ids"]
            except Exception as exc:
                log.warning("nextoken: prefix cache file %s skipped: %s", path, exc)
                continue
            self._register(path.name, ids.tolist(), path.stat().st_size)

    @property
    def bytes(self) -> int:
        """Bytes of the files held."""
        with self._lock:
            return sum(size for _, size, _ in self._files.values())

    @property
    def entries(self) -> int:
        """Files held."""
        return len(self._files)

    def _check(self, path: Path, archive) -> dict:
        meta = json.loads(str(archive["meta"]))
        if meta.get("format") != DISK_FORMAT or meta.get("version") != DISK_VERSION or \
                meta.get("identity") != self.identity:
            raise ValueError(f"not a {DISK_FORMAT} version {DISK_VERSION} file of this package ({meta})")
        return meta

    def _register(self, name: str, ids: list[int], size: int) -> None:
        keys = [_key(ids[:n]) for n in _boundaries(len(ids), self.block)]
        with self._lock:
            for key in keys:
                self._index.setdefault(key, (name, len(ids)))
            self._files[name] = (keys, size, len(ids))
            self.lengths[len(ids)] += 1

    def find(self, key: bytes) -> str | None:
        """The file holding the prefix of boundary ``key``, if any."""
        with self._lock:
            found = self._index.get(key)
        return found[0] if found else None

    def holds(self, ids: Sequence[int]) -> bool:
        """Whether the entry of exactly ``ids`` is on disk."""
        return f"{_key(ids).hex()}.npz" in self._files

    def read(self, name: str) -> tuple[list[int], KVCache] | None:
        """An entry's tokens and keys and values (where the engine's cache lives); None when the
        file no longer reads back (it is forgotten)."""
        path = self.directory / name
        try:
            with np.load(path, allow_pickle=False) as archive:
                self._check(path, archive)
                ids = archive["ids"].tolist()
                count = sum(1 for member in archive.files if member.startswith("kv_"))
                arrays = [archive[f"kv_{i}"] for i in range(count)]
            os.utime(path)                                  # used: the last to go
        except Exception as exc:
            log.warning("nextoken: prefix cache file %s unreadable, forgotten: %s", path, exc)
            self._forget(name)
            return None
        return ids, self._load(arrays)

    def write(self, ids: Sequence[int], cache: KVCache) -> None:
        """Write the entry of exactly ``ids`` (its values are never written again: read later, on
        the writer's thread); dropped when the writer is 16 entries behind."""
        if self.holds(ids):
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_all, name="nextoken-prefix-disk", daemon=True)
            self._writer.start()
        try:
            self._queue.put_nowait((list(ids), list(cache.values)))
        except queue.Full:
            log.warning("nextoken: prefix cache disk writer behind; an entry was not written")

    def flush(self) -> None:
        """Wait until every write asked for is on disk."""
        if self._writer is not None:
            self._queue.join()

    def _write_all(self) -> None:
        while True:
            ids, values = self._queue.get()
            try:
                self._write_one(ids, values)
            except Exception as exc:                        # a full disk fails the write, not the request
                log.warning("nextoken: prefix cache entry not written to %s: %s", self.directory, exc)
            finally:
                self._queue.task_done()

    def _write_one(self, ids: list[int], values: list) -> None:
        name = f"{_key(ids).hex()}.npz"
        if name in self._files:
            return
        meta = {"format": DISK_FORMAT, "version": DISK_VERSION, "identity": self.identity, "length": len(ids)}
        arrays = {f"kv_{i}": value.numpy() for i, value in enumerate(values)}
        size = sum(a.nbytes for a in arrays.values())
        if size > self.capacity_bytes:
            return
        partial = self.directory / f".{name}.{os.getpid()}.part"
        with open(partial, "wb") as out:
            np.savez(out, meta=np.array(json.dumps(meta)), ids=np.asarray(ids, dtype=np.int64), **arrays)
        os.replace(partial, self.directory / name)          # whole or absent: no half-written entry is read
        self._register(name, ids, (self.directory / name).stat().st_size)
        while self.bytes > self.capacity_bytes:
            with self._lock:
                names = list(self._files)
            oldest = min(names, key=lambda n: (self.directory / n).stat().st_mtime)
            self._forget(oldest)
            (self.directory / oldest).unlink(missing_ok=True)

    def _forget(self, name: str) -> None:
        with self._lock:
            if name not in self._files:
                return
            keys, _, length = self._files.pop(name)
            for key in keys:
                if self._index.get(key, ("",))[0] == name:
                    del self._index[key]
            self.lengths[length] -= 1
            if not self.lengths[length]:
                del self.lengths[length]


class PrefixCache:
    """Block-aligned prompt prefixes and their KV caches, least recently used first out, within
    ``capacity_bytes`` (see the module's doc). An entry of ``L`` tokens serves every block boundary
    up to ``L``: a later prompt that shares only its first blocks reuses those positions. ``disk``:
    the second tier (written through, read on a miss)."""

    def __init__(self, capacity_bytes: int, block: int = 32, disk: DiskTier | None = None) -> None:
        if capacity_bytes < 0 or block < 1:
            raise ValueError("the prefix cache needs capacity_bytes >= 0 and block >= 1")
        self.capacity_bytes = int(capacity_bytes)
        self.block = int(block)
        self.disk = disk
        #: entries by the key of their whole prefix: (cache, the boundary keys that lead to it)
        self._entries: collections.OrderedDict[bytes, tuple[KVCache, list[bytes], int]] = collections.OrderedDict()
        #: every block boundary's key -> (the entry's key, tokens of the entry it may use)
        self._index: dict[bytes, tuple[bytes, int]] = {}
        self._lengths: collections.Counter[int] = collections.Counter()       # the entries' lengths
        self._lock = threading.Lock()
        self._stats = PrefixStats()

    def cut(self, length: int) -> int:
        """The longest cacheable prefix of a ``length``-token prompt: block-aligned, and leaving at
        least one token to prefill (the step that gives the next token's logits)."""
        return (length - 1) // self.block * self.block

    def lookup(self, ids: Sequence[int]) -> tuple[int, KVCache | None]:
        """(tokens reused, a cache whose first that many positions are theirs) for the longest
        cached prefix of ``ids`` that leaves a token to run, in memory or else on disk (loaded into
        memory); (0, None) on a miss. The cache may hold more positions than are reused (an entry
        of a longer prefix): use the first ones only."""
        with self._lock:
            lengths = set(self._lengths) | (set(self.disk.lengths) if self.disk is not None else set())
            whole = [n for n in lengths if n < len(ids) and n % self.block]
            for length in sorted(set(whole) | set(range(self.cut(len(ids)), 0, -self.block)), reverse=True):
                key = _key(ids[:length])
                found = self._index.get(key)
                if found is None and self.disk is not None and (name := self.disk.find(key)) is not None:
                    loaded = self.disk.read(name)
                    if loaded is not None and loaded[0][:length] == list(ids[:length]):
                        self._hold(*loaded)
                        self.stats.disk_hits += 1
                        found = self._index.get(key)
                if found is not None:
                    self._entries.move_to_end(found[0])
                    self.stats.hits += 1
                    self.stats.cached_tokens += length
                    return length, self._entries[found[0]][0]
            self.stats.misses += 1
            return 0, None

    def wants(self, ids: Sequence[int]) -> bool:
        """Whether to store the cache of prompt ``ids`` (not when it is held already)."""
        if len(ids) < self.block or self.capacity_bytes <= 0:
            return False
        with self._lock:
            return _key(ids) not in self._index

    def insert(self, ids: Sequence[int], cache: KVCache) -> None:
        """Hold ``cache`` (the keys and values of exactly ``ids``) as that prefix's entry, found at each
        of its block boundaries not held yet; the least recently used go while the bytes exceed the
        capacity (an entry larger than it is not kept). The disk tier gets it too."""
        with self._lock:
            kept = self._hold(list(ids), cache)
        if kept and self.disk is not None:
            self.disk.write(ids, cache)

    @property
    def stats(self) -> PrefixStats:
        """What the cache did and holds (the disk tier's files as of now)."""
        if self.disk is not None:
            self._stats.disk_entries, self._stats.disk_bytes = self.disk.entries, self.disk.bytes
        return self._stats

    def _hold(self, ids: list[int], cache: KVCache) -> bool:
        """The memory tier's insert (the lock held); whether the entry is new and kept."""
        size = cache.nbytes()
        whole = _key(ids)
        if size > self.capacity_bytes or whole in self._entries:
            return False
        boundaries = []
        for length in _boundaries(len(ids), self.block):
            key = _key(ids[:length])
            if key not in self._index:
                self._index[key] = (whole, length)
                boundaries.append(key)
        self._entries[whole] = (cache, boundaries, len(ids))
        self._lengths[len(ids)] += 1
        self.stats.bytes += size
        while self.stats.bytes > self.capacity_bytes:
            _, (old, keys, length) = self._entries.popitem(last=False)
            for key in keys:
                self._index.pop(key, None)
            self._lengths[length] -= 1
            if not self._lengths[length]:
                del self._lengths[length]
            self.stats.bytes -= old.nbytes()
            self.stats.evicted += 1
        self.stats.entries = len(self._entries)
        return whole in self._entries

    def clear(self) -> None:
        """Drop every entry held in memory (the disk tier keeps its files)."""
        with self._lock:
            self._entries.clear()
            self._index.clear()
            self._lengths.clear()
            self.stats.bytes = self.stats.entries = 0
