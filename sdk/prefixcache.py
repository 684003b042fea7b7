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

Disk format, version 2: ``DIR/<identity>/<key>.npz``, an uncompressed NumPy archive per entry,
``<key>`` the hex hash of its tokens, with members ``meta`` (JSON: ``format``
``"nextoken-prefix-kv"``, ``version`` 2, ``identity``, ``length``, ``checksum``: the SHA-256 of
the ids' and then every array's bytes), ``ids`` (int64 ``[length]``, compared on load: a hash
collision never serves another prefix) and ``kv_0`` ... ``kv_{2L-1}`` (``[1, kv_heads, length,
head_dim]`` in the KV dtype, in the package's past-input order: each layer's keys, then its
values). An entry is used only when its shapes, dtype and checksum are right; a file that does
not read back so is skipped with one warning (and removed, when it is an entry of this package).

Trust: the checksum catches damage (a truncated, edited or half-copied file), not a writer: who
may write the folder decides what the engine computes from, as who may write the package does.
Keep it writable by the serving user only.
"""

from __future__ import annotations

import builtins
import collections
import hashlib
import json
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .kvcache import KVCache

__all__ = ["DISK_FORMAT", "DISK_VERSION", "DiskTier", "Layout", "PrefixCache", "PrefixStats", "package_identity"]

log = logging.getLogger("nextoken")

DISK_FORMAT = "nextoken-prefix-kv"
DISK_VERSION = 2
#: a partial file (``.<name>.<pid>.<thread>.part``) older than this is a write that died: removed
PARTIAL_AGE_S = 600.0


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


def _keys(ids: Sequence[int], lengths: Sequence[int]) -> dict[int, bytes]:
    """``{n: _key(ids[:n])}`` for each of ``lengths``, in one pass over ``ids`` (linear in its length:
    the hash is fed block by block and read at each length)."""
    data = np.asarray(ids, dtype=np.int64)
    h = hashlib.blake2b(digest_size=16)
    out, at = {}, 0
    for n in sorted(set(lengths)):
        h.update(data[at:n].tobytes())
        at = n
        out[n] = h.copy().digest()
    return out


def _boundaries(length: int, block: int) -> list[int]:
    """The prefix lengths an entry of ``length`` tokens serves: each whole block, and all of it."""
    return sorted({*range(block, length + 1, block), length})


def package_identity(checksums: Mapping[str, str], kv_dtype: str, provider: str) -> str:
    """The disk tier's folder for a package: a hash of its files' checksums, its KV dtype, the
    execution provider and the format version (any change: another folder, nothing shared)."""
    text = json.dumps(
        {
            "format": DISK_FORMAT,
            "version": DISK_VERSION,
            "checksums": dict(checksums),
            "kv_dtype": kv_dtype,
            "provider": provider,
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Layout:
    """What an entry of a package holds: ``arrays`` tensors (keys and values, two a layer), each
    ``[1, kv_heads, length, head_dim]`` of ``dtype``, ``length`` at most ``max_length`` (the window)."""

    arrays: int
    kv_heads: int
    head_dim: int
    dtype: str
    max_length: int


def _checksum(ids: np.ndarray, arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    for array in arrays:
        h.update(np.ascontiguousarray(array).data.cast("B"))
    return h.hexdigest()


def _open_file(path: Path):
    """``path`` opened for reading when it is a regular file (not a link, a FIFO, a device), else
    None; gone between listing and opening (another server evicted it): None."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


class DiskTier:
    """Prefix-cache entries as files (format in the module's doc) under ``directory/identity``,
    the oldest used first out beyond ``capacity_bytes``. ``load`` makes a :class:`KVCache` where
    the engine's cache lives from an entry's arrays; ``layout``: what an entry must hold (checked
    before use; None: not checked). Writes go through one background thread (:meth:`flush` waits
    for them); reads happen when the memory tier misses.

    The folder may be shared by several engines (servers) of the same package: each write ends
    with a scan of the folder, which takes in the entries others wrote, forgets the ones they
    removed and removes the oldest until the folder is within ``capacity_bytes``. Whatever else
    the folder holds (links, FIFOs, files of another format or version, partial files of a write
    that died, entries that do not fit the layout or their checksum) is skipped, never followed
    or waited on; an entry that does not read back whole and right is removed, with one warning."""

    def __init__(
        self,
        directory: str | Path,
        identity: str,
        capacity_bytes: int,
        block: int,
        load: Callable[[list[np.ndarray]], KVCache],
        layout: Layout | None = None,
    ) -> None:
        """
        Args:
            directory: the folder (entries go under ``directory/identity``).
            identity: the package, its KV dtype and provider (:func:`package_identity`).
            capacity_bytes: bytes of entries kept at most.
            block: tokens a block.
            load: makes a :class:`KVCache` where the engine's cache lives from an entry's arrays.
            layout: what an entry must hold (None: not checked).
        """
        self.directory = Path(directory) / identity
        self.directory.mkdir(parents=True, exist_ok=True)
        self.identity, self.capacity_bytes, self.block, self._load = identity, int(capacity_bytes), block, load
        self.layout = layout
        self._lock = threading.Lock()
        self._index: dict[bytes, tuple[str, int]] = {}  # boundary key -> (file, entry length)
        self._files: dict[str, tuple[list[bytes], int, int]] = {}  # file -> (its boundary keys, bytes, length)
        self._skipped: set[str] = set()  # files warned about once, not read again
        self.lengths: collections.Counter[int] = collections.Counter()
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._writer: threading.Thread | None = None
        self.scan()

    @property
    def bytes(self) -> int:
        """Bytes of the files held."""
        with self._lock:
            return sum(size for _, size, _ in self._files.values())

    @property
    def entries(self) -> int:
        """Files held."""
        return len(self._files)

    def _skip(self, name: str, why: str, remove: bool = False) -> None:
        if name not in self._skipped:
            self._skipped.add(name)
            log.warning(
                "nextoken: prefix cache file %s skipped%s: %s",
                self.directory / name,
                " and removed" if remove else "",
                why,
            )
        if remove:
            (self.directory / name).unlink(missing_ok=True)
        self._forget(name)

    def _meta(self, archive) -> dict:
        meta = json.loads(str(archive["meta"]))
        if (
            not isinstance(meta, dict)
            or meta.get("format") != DISK_FORMAT
            or meta.get("version") != DISK_VERSION
            or meta.get("identity") != self.identity
        ):
            raise ValueError(f"not a {DISK_FORMAT} version {DISK_VERSION} file of this package")
        length = meta.get("length")
        limit = self.layout.max_length if self.layout is not None else None
        if not isinstance(length, int) or length < 1 or (limit is not None and length > limit):
            raise ValueError(f"its length {length!r} is not one this package's window ({limit}) holds")
        return meta

    def _ids(self, archive, meta: dict) -> np.ndarray:
        ids = archive["ids"]
        if ids.dtype != np.int64 or ids.shape != (meta["length"],):
            raise ValueError(f"its ids ({ids.dtype} {list(ids.shape)}) are not int64 [{meta['length']}]")
        return ids

    def scan(self) -> None:
        """Bring the index in line with the folder: take in entries not indexed (written by another
        engine, or before a restart), forget the ones gone, remove partial files older than
        :data:`PARTIAL_AGE_S` and the oldest entries beyond the capacity. Linear in what it reads."""
        found = []
        now = time.time()
        try:
            listing = list(os.scandir(self.directory))
        except OSError as exc:
            log.warning("nextoken: prefix cache folder %s unreadable: %s", self.directory, exc)
            return
        for entry in listing:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since the listing
            if entry.name.endswith(".part") and stat.S_ISREG(info.st_mode) and now - info.st_mtime > PARTIAL_AGE_S:
                Path(entry.path).unlink(missing_ok=True)  # a write that died
            elif entry.name.endswith(".npz") and stat.S_ISREG(info.st_mode):
                found.append((info.st_mtime, info.st_size, entry.name))
            elif entry.name.endswith(".npz") and entry.name not in self._skipped:
                self._skip(entry.name, "not a regular file")
        on_disk = {name for _, _, name in found}
        with self._lock:
            held = list(self._files)
        for name in [n for n in held if n not in on_disk]:
            self._forget(name)  # another engine removed it
        for _, size, name in sorted(found):
            if name not in self._files and name not in self._skipped:
                self._take(name, size)
        with self._lock:
            kept = set(self._files)
        total = sum(size for _, size, name in found if name in kept)
        for _, size, name in sorted(found):  # oldest used first
            if total <= self.capacity_bytes:
                break
            if name in kept:
                self._forget(name)
                (self.directory / name).unlink(missing_ok=True)
                total -= size

    def _take(self, name: str, size: int) -> None:
        """Index the entry in file ``name`` (reading its meta and ids only)."""
        if size > self.capacity_bytes:
            self._skip(name, f"{size} bytes, more than the tier's {self.capacity_bytes}")
            return
        handle = _open_file(self.directory / name)
        if handle is None:
            return
        try:
            with handle, np.load(handle, allow_pickle=False) as archive:
                ids = self._ids(archive, self._meta(archive))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped
            # an entry appears whole (written aside, then renamed): one that does not read is damaged
            self._skip(name, str(exc)[:200], remove=True)
            return
        self._register(name, ids.tolist(), size)

    def _register(self, name: str, ids: list[int], size: int) -> None:
        keys = list(_keys(ids, _boundaries(len(ids), self.block)).values())
        with self._lock:
            for key in keys:
                self._index.setdefault(key, (name, len(ids)))
            self._files[name] = (keys, size, len(ids))
            self.lengths[len(ids)] += 1

    def find(self, key: builtins.bytes) -> str | None:
        """The file holding the prefix of boundary ``key``, if any."""
        with self._lock:
            found = self._index.get(key)
        return found[0] if found else None

    def holds(self, ids: Sequence[int]) -> bool:
        """Whether the entry of exactly ``ids`` is on disk."""
        return f"{_key(ids).hex()}.npz" in self._files

    def read(self, name: str) -> tuple[list[int], KVCache] | None:
        """An entry's tokens and keys and values (where the engine's cache lives), checked against
        the layout and its checksum; None when the file is gone (forgotten) or bad (removed, one
        warning)."""
        path = self.directory / name
        handle = _open_file(path)
        if handle is None:
            self._forget(name)
            return None
        try:
            with handle, np.load(handle, allow_pickle=False) as archive:
                meta = self._meta(archive)
                ids = self._ids(archive, meta)
                count = sum(1 for member in archive.files if member.startswith("kv_"))
                arrays = [archive[f"kv_{i}"] for i in range(count)]
            self._check_arrays(meta, ids, arrays)
            cache = self._load(arrays)
        except Exception as exc:  # noqa: BLE001 - a bad file is the file's fault, never the request's
            self._skip(name, str(exc)[:200], remove=True)
            return None
        try:
            os.utime(path)  # used: the last to go
        except OSError:
            pass
        return ids.tolist(), cache

    def _check_arrays(self, meta: dict, ids: np.ndarray, arrays: list[np.ndarray]) -> None:
        layout = self.layout
        if layout is not None:
            shape = (1, layout.kv_heads, meta["length"], layout.head_dim)
            if len(arrays) != layout.arrays:
                raise ValueError(f"{len(arrays)} key and value arrays, not this package's {layout.arrays}")
            bad = next((a for a in arrays if a.shape != shape or a.dtype != np.dtype(layout.dtype)), None)
            if bad is not None:
                raise ValueError(f"an array of {bad.dtype} {list(bad.shape)}, not {layout.dtype} {list(shape)}")
        if meta.get("checksum") != _checksum(ids, arrays):
            raise ValueError("its arrays do not match its checksum (changed or damaged)")

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
            except Exception as exc:  # a full disk fails the write, not the request
                log.warning("nextoken: prefix cache entry not written to %s: %s", self.directory, exc)
            finally:
                self._queue.task_done()

    def _write_one(self, ids: list[int], values: list) -> None:
        name = f"{_key(ids).hex()}.npz"
        if name in self._files:
            return
        arrays = {f"kv_{i}": value.numpy() for i, value in enumerate(values)}
        size = sum(a.nbytes for a in arrays.values())
        if size > self.capacity_bytes:
            return
        ids_array = np.asarray(ids, dtype=np.int64)
        meta = {
            "format": DISK_FORMAT,
            "version": DISK_VERSION,
            "identity": self.identity,
            "length": len(ids),
            "checksum": _checksum(ids_array, list(arrays.values())),
        }
        partial = self.directory / f".{name}.{os.getpid()}.{threading.get_ident()}.part"
        try:
            with open(partial, "wb") as out:
                np.savez(out, meta=np.array(json.dumps(meta)), ids=ids_array, **arrays)
            os.replace(partial, self.directory / name)  # whole or absent: no half-written entry is read
        finally:
            partial.unlink(missing_ok=True)
        self._skipped.discard(name)
        self._register(name, ids, (self.directory / name).stat().st_size)
        self.scan()

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
        """
        Args:
            capacity_bytes: bytes of KV cache kept at most.
            block: tokens a block (entries are whole blocks).
            disk: the second tier, or None.
        """
        if capacity_bytes < 0 or block < 1:
            raise ValueError("the prefix cache needs capacity_bytes >= 0 and block >= 1")
        self.capacity_bytes = int(capacity_bytes)
        self.block = int(block)
        self.disk = disk
        #: entries by the key of their whole prefix: (cache, the boundary keys that lead to it)
        self._entries: collections.OrderedDict[bytes, tuple[KVCache, list[bytes], int]] = collections.OrderedDict()
        #: every block boundary's key -> (the entry's key, tokens of the entry it may use)
        self._index: dict[bytes, tuple[bytes, int]] = {}
        self._lengths: collections.Counter[int] = collections.Counter()  # the entries' lengths
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
            candidates = set(whole) | set(range(self.cut(len(ids)), 0, -self.block))
            keys = _keys(ids, sorted(candidates))  # one pass over the prompt
            for length in sorted(candidates, reverse=True):
                key = keys[length]
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
        for length, key in _keys(ids, _boundaries(len(ids), self.block)).items():
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
