"""The prefix cache: prompts that start like an earlier one reuse its KV cache instead of
prefilling it; the same tokens as without the cache, on both KV backends, alone, batched, under the
scheduler and through the server."""

from __future__ import annotations

import pytest

import nextoken
from nextoken import Engine, Scheduler
from nextoken.prefixcache import PrefixCache
from helpers import serving, wrap_steps

SYSTEM = list(range(3, 83))                 # an 80-token "system prompt" of byte ids: blocks of 32 -> 64 reusable


class _Entry:
    """A stand-in for a KVCache: its bytes."""

    def __init__(self, size: int) -> None:
        self.size = size

    def nbytes(self) -> int:
        return self.size


def test_hits_need_an_identical_history_and_whole_blocks():
    cache = PrefixCache(1 << 20, block=4)
    assert cache.cut(9) == 8 and cache.cut(8) == 4 and cache.cut(4) == 0      # at least one token left to run
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], _Entry(10))
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 8
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8])[0] == 4                   # 8 tokens: the last one must run
    assert cache.lookup([9, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 0                # same tail, other history: a miss
    assert cache.lookup([1, 2, 3, 4, 5, 6, 0, 0])[0] == 4                   # a partial block: the whole one before it
    assert (cache.stats.hits, cache.stats.misses) == (3, 1)
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])[1].size == 10          # a longer entry serves a shorter prefix
    longer = PrefixCache(1 << 20, block=4)
    longer.insert([1, 2, 3, 4, 5, 6, 7, 8], _Entry(10))
    assert longer.lookup([1, 2, 3, 4, 0, 0])[0] == 4
    assert not longer.wants([1, 2, 3, 4, 5, 6, 7, 8]) and longer.wants([1, 2, 3, 4, 5])
    turn = PrefixCache(1 << 20, block=4)                                     # a chat's next turn: the whole
    turn.insert([1, 2, 3, 4, 5, 6], _Entry(10))                              # previous prompt, off the blocks
    assert turn.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 6 and turn.lookup([1, 2, 3, 4, 5, 6])[0] == 4


def test_least_recently_used_go_first_within_the_bytes():
    cache = PrefixCache(25, block=2)
    for first in (1, 2, 3):
        cache.insert([first, 0], _Entry(10))
    assert cache.stats.entries == 2 and cache.stats.bytes == 20 and cache.stats.evicted == 1
    assert cache.lookup([1, 0, 5])[0] == 0 and cache.lookup([3, 0, 5])[0] == 2     # its boundaries went with it
    cache.insert([9, 9, 9, 9], _Entry(26))                                    # larger than the whole cache: not kept
    assert cache.stats.entries == 2


@pytest.fixture(params=["nextoken", "optimum"])
def cached_engine(request, tiny_model):
    """Both KV backends: the fused graph (slots) and optimum's (concatenation)."""
    with Engine(tiny_model("llama", request.param)[1], plugins=False, prefix_cache_bytes=64 << 20) as cached, \
            Engine(tiny_model("llama", request.param)[1], plugins=False) as plain:
        yield cached, plain


def test_the_same_tokens_with_and_without_the_cache(cached_engine, monkeypatch):
    cached, plain = cached_engine
    prompts = [SYSTEM + [90, 91, 92], SYSTEM + [100], SYSTEM[:70] + [5, 6], SYSTEM[:40] + [1]]
    for kw in (dict(), dict(temperature=0.9, seed=4)):
        for prompt in prompts:
            want = plain.generate(prompt, max_new_tokens=12, ignore_eos=True, **kw)
            got = cached.generate(prompt, max_new_tokens=12, ignore_eos=True, **kw)
            assert got.token_ids == want.token_ids
    ran = []
    wrap_steps(monkeypatch, cached.runner, lambda kind, real, *a: ran.append((kind, a[1].shape)) or real(*a))
    got = cached.generate(SYSTEM + [7, 8], max_new_tokens=3, ignore_eos=True, n=2, temperature=0.7, seed=1)
    assert [c.usage.cached_tokens for c in got] == [64, 64]
    assert ran[0] == ("prefill", (1, len(SYSTEM) + 2 - 64))                  # only what follows the cached prefix
    monkeypatch.undo()
    assert [c.token_ids for c in got] == [c.token_ids for c in plain.generate(
        SYSTEM + [7, 8], max_new_tokens=3, ignore_eos=True, n=2, temperature=0.7, seed=1)]
    assert cached.prefix_cache.stats.hits >= 6


def test_requests_sharing_a_prefix_under_the_scheduler(cached_engine):
    cached, plain = cached_engine
    scheduler = Scheduler(cached, max_batch=4)
    handles = [scheduler.submit(SYSTEM + [50 + i], max_new_tokens=10, ignore_eos=True) for i in range(6)]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == [
        plain.generate(SYSTEM + [50 + i], max_new_tokens=10, ignore_eos=True).token_ids for i in range(6)]
    assert sum(h.result().usage.cached_tokens == 64 for h in handles) >= 5     # the first stored it


def test_cached_tokens_through_the_server(tiny_llama):
    with serving(tiny_llama[1], "tiny", engine_options={"prefix_cache_bytes": 64 << 20}) as (client, engine, *_):
        first = client.completions.create(model="tiny", prompt=SYSTEM + [9], max_tokens=4, temperature=0)
        second = client.completions.create(model="tiny", prompt=SYSTEM + [10], max_tokens=4, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == 64
        assert second.choices[0].text == engine.generate(SYSTEM + [10], max_new_tokens=4).text


def test_concurrent_requests_sharing_a_prefix_through_the_server(tiny_llama):
    from concurrent.futures import ThreadPoolExecutor

    with serving(tiny_llama[1], "tiny", engine_options={"prefix_cache_bytes": 64 << 20}) as (client, engine, *_):
        client.completions.create(model="tiny", prompt=SYSTEM + [1], max_tokens=2, temperature=0)   # stores it

        def ask(i: int):
            return client.completions.create(model="tiny", prompt=SYSTEM + [20 + i], max_tokens=6, temperature=0)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        assert all(a.usage.prompt_tokens_details.cached_tokens == 64 for a in answers)
        with Engine(tiny_llama[1], plugins=False) as plain:
            assert [a.choices[0].text for a in answers] == [
                plain.generate(SYSTEM + [20 + i], max_new_tokens=6).text for i in range(6)]


# -- the disk tier ------------------------------------------------------------------------------------

def _disk_engine(package, directory, **kw):
    return Engine(package, plugins=False, prefix_cache_bytes=16 << 20, prefix_cache_dir=directory, **kw)


def test_the_disk_tier_serves_a_later_engine_with_the_same_tokens(stories_package, stories_engine, tmp_path):
    """A long system prompt written by one engine is read by the next (a restart): its tokens are
    reused and the answer is what a fresh prefill gives, greedy and seeded."""
    system = stories_engine.encode("Once upon a time, there was a little girl named Lily. " * 6)
    with _disk_engine(stories_package, tmp_path) as first:
        assert first.generate(system + stories_engine.encode(" She"), max_new_tokens=5).usage.cached_tokens == 0
    (folder,) = tmp_path.iterdir()                                  # one folder: this package's identity
    assert [p.suffix for p in folder.iterdir()] == [".npz"]
    for kw in (dict(), dict(temperature=0.9, seed=4)):
        prompt = system + stories_engine.encode(" The dog")
        with _disk_engine(stories_package, tmp_path) as later:
            got = later.generate(prompt, max_new_tokens=24, **kw)
            stats = later.prefix_cache.stats
        assert 64 <= got.usage.cached_tokens < len(prompt) and stats.disk_hits == 1
        assert got.token_ids == stories_engine.generate(prompt, max_new_tokens=24, **kw).token_ids


def test_a_changed_package_never_reads_the_disk_tier(stories_package, stories_engine, tmp_path):
    import shutil

    from nextoken.manifest import Manifest

    system = stories_engine.encode("Once upon a time, there was a little girl named Lily. " * 6)
    with _disk_engine(stories_package, tmp_path / "kv") as first:
        first.generate(system + [5], max_new_tokens=2)
    changed = tmp_path / "changed"
    shutil.copytree(stories_package, changed)
    config = changed / "generation_config.json"
    config.write_text(config.read_text().rstrip().rstrip("}") + ', "note": "edited"}\n')
    Manifest.load(changed).with_files(changed).save(changed)        # a consistent package, one file changed
    with _disk_engine(changed, tmp_path / "kv") as other:
        got = other.generate(system + [5], max_new_tokens=2)
        assert got.usage.cached_tokens == 0 and other.prefix_cache.stats.disk_hits == 0
    assert len(list((tmp_path / "kv").iterdir())) == 2              # its own folder, nothing shared
    with _disk_engine(stories_package, tmp_path / "kv", device="cpu") as same:   # the original still hits
        assert same.generate(system + [5], max_new_tokens=2).usage.cached_tokens > 0


def test_the_disk_tier_skips_foreign_files_and_keeps_within_its_bytes(stories_package, stories_engine, tmp_path, caplog):
    import numpy as np

    prompts = [stories_engine.encode(f"{word} upon a time, there was a little girl named Lily. " * 4)
               for word in ("Once", "Twice", "Thrice")]
    with _disk_engine(stories_package, tmp_path) as engine:
        engine.generate(prompts[0] + [5], max_new_tokens=1)
        engine.prefix_cache.disk.flush()
        size = engine.prefix_cache.stats.disk_bytes
    (folder,) = tmp_path.iterdir()
    np.savez(folder / "f00.npz", meta=np.array('{"format": "nextoken-prefix-kv", "version": 2}'), ids=np.arange(3))
    (folder / "junk.npz").write_bytes(b"not an archive")
    with _disk_engine(stories_package, tmp_path, prefix_cache_disk_bytes=int(size * 1.5)) as engine:
        assert "skipped" in caplog.text and engine.prefix_cache.stats.disk_entries == 1
        for prompt in prompts[1:]:                                  # each new entry pushes out the oldest
            engine.generate(prompt + [5], max_new_tokens=1)
            engine.prefix_cache.disk.flush()
        assert engine.prefix_cache.stats.disk_entries == 1 and engine.prefix_cache.stats.disk_bytes <= size * 1.5
    with pytest.raises(nextoken.NextokenError, match="prefix_cache_dir needs prefix_cache_bytes"):
        Engine(stories_package, plugins=False, prefix_cache_dir=tmp_path)


def test_concurrent_requests_through_a_restarted_server_read_the_disk_tier(tiny_llama, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    options = {"prefix_cache_bytes": 64 << 20, "prefix_cache_dir": tmp_path}
    with serving(tiny_llama[1], "tiny", engine_options=options) as (client, *_):
        client.completions.create(model="tiny", prompt=SYSTEM + [1], max_tokens=2, temperature=0)   # written
    with serving(tiny_llama[1], "tiny", engine_options=options) as (client, engine, *_):           # a restart
        def ask(i: int):
            return client.completions.create(model="tiny", prompt=SYSTEM + [20 + i], max_tokens=6, temperature=0)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        assert all(a.usage.prompt_tokens_details.cached_tokens == 64 for a in answers)
        assert engine.prefix_cache.stats.disk_hits >= 1
    with Engine(tiny_llama[1], plugins=False) as plain:
        assert [a.choices[0].text for a in answers] == [
            plain.generate(SYSTEM + [20 + i], max_new_tokens=6).text for i in range(6)]
