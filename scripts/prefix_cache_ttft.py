"""Time to first token with a 1,000-token shared prefix + 50 new tokens: no cache, the memory tier
warm, and the disk tier warm (a new engine, as after a restart, reading what an earlier one wrote).

    python scripts/prefix_cache_ttft.py PACKAGE [THREADS]
"""

import statistics
import sys
import tempfile

import numpy as np

import nextoken

pkg, threads = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
rng = np.random.default_rng(0)
opts = dict(plugins=False, threads=threads, spin=False)
with nextoken.Engine(pkg, **opts) as probe:
    vocab = probe.manifest.vocab_size
prefix = rng.integers(3, vocab, 1000).tolist()
suffixes = [rng.integers(3, vocab, 50).tolist() for _ in range(4)]


def ttft(engine, suffix):
    return engine.generate(prefix + suffix, max_new_tokens=1).usage.time_to_first_token_ms


with tempfile.TemporaryDirectory() as disk, nextoken.Engine(pkg, **opts) as plain:
    cache = dict(prefix_cache_bytes=1 << 30, prefix_cache_dir=disk)
    with nextoken.Engine(pkg, **opts, **cache) as first:
        first.generate(prefix + suffixes[0], max_new_tokens=1)  # writes the prefix's entry
        memory = statistics.median(ttft(first, s) for s in suffixes[1:])
        first.prefix_cache.disk.flush()
        held = first.prefix_cache.stats
    cold = statistics.median(ttft(plain, s) for s in suffixes[1:])
    loads = []
    for s in suffixes[1:]:  # each a fresh engine: a restart
        with nextoken.Engine(pkg, **opts, **cache) as later:
            loads.append(ttft(later, s))
            assert later.prefix_cache.stats.disk_hits == 1
    warm_disk = statistics.median(loads)
print(f"{pkg} (threads {threads}, spin off): TTFT, 1,000-token shared prefix + 50 new tokens, medians of 3")
print(f"  no cache        {cold:8.1f} ms")
print(f"  memory tier     {memory:8.1f} ms  ({memory / cold:.2f}x)")
print(f"  disk tier       {warm_disk:8.1f} ms  ({warm_disk / cold:.2f}x; a new engine loading the entry)")
print(
    f"  {held.entries} entries (a prompt each): {held.bytes / 2**20:.1f} MiB in memory, "
    f"{held.disk_bytes / 2**20:.1f} MiB in {held.disk_entries} files on disk"
)
