"""A prefix cache across requests: the KV cache of prompt prefixes, reused instead of prefilled again.

An entry is a prompt's keys and values (``[1, kv_heads, length, head_dim]`` a layer, where the
engine's cache lives, as its prefill made them: nothing is copied to store it). It is found by a
hash of every token up to each multiple of ``block`` tokens in it, and of all its tokens, so it is
reused only after an identical history: by a prompt that continues it (a chat's next turn reuses
the whole previous prompt, as is) or that shares its first blocks (their positions are copied
out). Entries are kept in least-recently-used order within ``capacity_bytes``. A hit's prefill
runs only the rest of the prompt over the entry's values (the graph writes new ones), and the
output is the same tokens as without the cache.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .kvcache import KVCache

__all__ = ["PrefixCache", "PrefixStats"]


@dataclass
class PrefixStats:
    """What the cache did: lookups that hit and missed, tokens reused, entries and bytes held, evictions."""

    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0
    entries: int = 0
    bytes: int = 0
    evicted: int = 0


def _key(ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class PrefixCache:
    """Block-aligned prompt prefixes and their KV caches, least recently used first out, within
    ``capacity_bytes`` (see the module's doc). An entry of ``L`` tokens serves every block boundary
    up to ``L``: a later prompt that shares only its first blocks reuses those positions."""

    def __init__(self, capacity_bytes: int, block: int = 32) -> None:
        if capacity_bytes < 0 or block < 1:
            raise ValueError("the prefix cache needs capacity_bytes >= 0 and block >= 1")
        self.capacity_bytes = int(capacity_bytes)
        self.block = int(block)
        #: entries by the key of their whole prefix: (cache, the boundary keys that lead to it)
        self._entries: collections.OrderedDict[bytes, tuple[KVCache, list[bytes], int]] = collections.OrderedDict()
        #: every block boundary's key -> (the entry's key, tokens of the entry it may use)
        self._index: dict[bytes, tuple[bytes, int]] = {}
        self._lengths: collections.Counter[int] = collections.Counter()       # the entries' lengths
        self._lock = threading.Lock()
        self.stats = PrefixStats()

    def cut(self, length: int) -> int:
        """The longest cacheable prefix of a ``length``-token prompt: block-aligned, and leaving at
        least one token to prefill (the step that gives the next token's logits)."""
        return (length - 1) // self.block * self.block

    def lookup(self, ids: Sequence[int]) -> tuple[int, KVCache | None]:
        """(tokens reused, a cache whose first that many positions are theirs) for the longest
        cached prefix of ``ids`` that leaves a token to run; (0, None) on a miss. The cache may hold
        more positions than are reused (an entry of a longer prefix): use the first ones only."""
        with self._lock:
            whole = [n for n in self._lengths if n < len(ids) and n % self.block]
            for length in sorted(set(whole) | set(range(self.cut(len(ids)), 0, -self.block)), reverse=True):
                found = self._index.get(_key(ids[:length]))
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
        capacity (an entry larger than it is not kept)."""
        size = cache.nbytes()
        if size > self.capacity_bytes:
            return
        with self._lock:
            whole = _key(ids)
            if whole in self._entries:
                return
            boundaries = []
            for length in [*range(self.block, len(ids) + 1, self.block), len(ids)]:
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

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._index.clear()
            self._lengths.clear()
            self.stats.bytes = self.stats.entries = 0
