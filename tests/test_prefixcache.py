"""The prefix cache: prompts that start like an earlier one reuse its KV cache instead of
prefilling it; the same tokens as without the cache, on both KV backends, alone, batched, under the
scheduler and through the server."""

from __future__ import annotations

import json
import pathlib
import time

import pytest

import nextoken
from helpers import serving, wrap_steps
from nextoken import Engine, Scheduler
from nextoken.prefixcache import PrefixCache

SYSTEM = list(range(3, 83))  # an 80-token "system prompt" of byte ids: blocks of 32 -> 64 reusable


class _Entry:
    """A stand-in for a KVCache: its bytes."""

    def __init__(self, size: int) -> None:
        self.size = size

    def nbytes(self) -> int:
        return self.size


def test_hits_need_an_identical_history_and_whole_blocks():
    cache = PrefixCache(1 << 20, block=4)
    assert cache.cut(9) == 8 and cache.cut(8) == 4 and cache.cut(4) == 0  # at least one token left to run
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], _Entry(10))
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 8
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8])[0] == 4  # 8 tokens: the last one must run
    assert cache.lookup([9, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 0  # same tail, other history: a miss
    assert cache.lookup([1, 2, 3, 4, 5, 6, 0, 0])[0] == 4  # a partial block: the whole one before it
    assert (cache.stats.hits, cache.stats.misses) == (3, 1)
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])[1].size == 10  # a longer entry serves a shorter prefix
    longer = PrefixCache(1 << 20, block=4)
    longer.insert([1, 2, 3, 4, 5, 6, 7, 8], _Entry(10))
    assert longer.lookup([1, 2, 3, 4, 0, 0])[0] == 4
    assert not longer.wants([1, 2, 3, 4, 5, 6, 7, 8]) and longer.wants([1, 2, 3, 4, 5])
    turn = PrefixCache(1 << 20, block=4)  # a chat's next turn: the whole
    turn.insert([1, 2, 3, 4, 5, 6], _Entry(10))  # previous prompt, off the blocks
    assert turn.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])[0] == 6 and turn.lookup([1, 2, 3, 4, 5, 6])[0] == 4


def test_least_recently_used_go_first_within_the_bytes():
    cache = PrefixCache(25, block=2)
    for first in (1, 2, 3):
        cache.insert([first, 0], _Entry(10))
    assert cache.stats.entries == 2 and cache.stats.bytes == 20 and cache.stats.evicted == 1
    assert cache.lookup([1, 0, 5])[0] == 0 and cache.lookup([3, 0, 5])[0] == 2  # its boundaries went with it
    cache.insert([9, 9, 9, 9], _Entry(26))  # larger than the whole cache: not kept
    assert cache.stats.entries == 2


@pytest.fixture(params=["nextoken", "optimum"])
def cached_engine(request, tiny_model):
    """Both KV backends: the fused graph (slots) and optimum's (concatenation)."""
    with (
        Engine(tiny_model("llama", request.param)[1], plugins=False, prefix_cache_bytes=64 << 20) as cached,
        Engine(tiny_model("llama", request.param)[1], plugins=False) as plain,
    ):
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
    assert ran[0] == ("prefill", (1, len(SYSTEM) + 2 - 64))  # only what follows the cached prefix
    monkeypatch.undo()
    assert [c.token_ids for c in got] == [
        c.token_ids
        for c in plain.generate(SYSTEM + [7, 8], max_new_tokens=3, ignore_eos=True, n=2, temperature=0.7, seed=1)
    ]
    assert cached.prefix_cache.stats.hits >= 6


def test_requests_sharing_a_prefix_under_the_scheduler(cached_engine):
    cached, plain = cached_engine
    scheduler = Scheduler(cached, max_batch=4)
    handles = [scheduler.submit(SYSTEM + [50 + i], max_new_tokens=10, ignore_eos=True) for i in range(6)]
    while scheduler.step():
        pass
    assert [h.result().token_ids for h in handles] == [
        plain.generate(SYSTEM + [50 + i], max_new_tokens=10, ignore_eos=True).token_ids for i in range(6)
    ]
    assert sum(h.result().usage.cached_tokens == 64 for h in handles) >= 5  # the first stored it


def test_a_prefix_hit_catches_up_in_chunks_like_any_long_prompt(cached_engine, monkeypatch):
    """One admission path: a prompt whose prefix is cached starts from there and catches up what
    follows a chunk a step (at most max_prefill_tokens), between the batch's decode steps."""
    cached, plain = cached_engine
    scheduler = Scheduler(cached, max_batch=2, max_prefill_tokens=16)
    first = scheduler.submit(SYSTEM, max_new_tokens=30, ignore_eos=True)  # stores the system prompt
    for _ in range(8):  # its 80 tokens in chunks of 16, then it decodes
        scheduler.step()
    ran = []
    wrap_steps(monkeypatch, cached.runner, lambda kind, real, *a: ran.append((kind, a[1].shape)) or real(*a))
    tail = [90 + i for i in range(40)]
    second = scheduler.submit(SYSTEM + tail, max_new_tokens=5, ignore_eos=True)
    while scheduler.step():
        pass
    monkeypatch.undo()
    prefills = [shape[1] for kind, shape in ran if "prefill" in kind]
    assert prefills[:3] == [16, 16, 8], ran  # 120 tokens, the 80 stored cached: 40 to run, 16 a step
    assert second.result().usage.cached_tokens == 80
    assert first.result().usage.cache_write_tokens == len(SYSTEM)  # it stored the system prompt
    for handle, prompt, new in ((first, SYSTEM, 30), (second, SYSTEM + tail, 5)):
        assert handle.result().token_ids == plain.generate(prompt, max_new_tokens=new, ignore_eos=True).token_ids


def test_cached_tokens_through_the_server(tiny_llama):
    with serving(tiny_llama[1], "tiny", engine_options={"prefix_cache_bytes": 64 << 20}) as (client, engine, *_):
        first = client.completions.create(model="tiny", prompt=SYSTEM + [9], max_tokens=4, temperature=0)
        second = client.completions.create(model="tiny", prompt=SYSTEM + [10], max_tokens=4, temperature=0)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == 64
        assert second.choices[0].text == engine.generate(SYSTEM + [10], max_new_tokens=4).text


def test_concurrent_requests_sharing_a_prefix_through_the_server(tiny_llama):
    from concurrent.futures import ThreadPoolExecutor

    with serving(tiny_llama[1], "tiny", engine_options={"prefix_cache_bytes": 64 << 20}) as (client, _engine, *_):
        client.completions.create(model="tiny", prompt=SYSTEM + [1], max_tokens=2, temperature=0)  # stores it

        def ask(i: int):
            return client.completions.create(model="tiny", prompt=SYSTEM + [20 + i], max_tokens=6, temperature=0)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        assert all(a.usage.prompt_tokens_details.cached_tokens == 64 for a in answers)
        with Engine(tiny_llama[1], plugins=False) as plain:
            assert [a.choices[0].text for a in answers] == [
                plain.generate(SYSTEM + [20 + i], max_new_tokens=6).text for i in range(6)
            ]


# -- the disk tier ------------------------------------------------------------------------------------


def _disk_engine(package, directory, **kw):
    return Engine(package, plugins=False, prefix_cache_bytes=16 << 20, prefix_cache_dir=directory, **kw)


def test_the_disk_tier_serves_a_later_engine_with_the_same_tokens(stories_package, stories_engine, tmp_path):
    """A long system prompt written by one engine is read by the next (a restart): its tokens are
    reused and the answer is what a fresh prefill gives, greedy and seeded."""
    system = stories_engine.encode("Once upon a time, there was a little girl named Lily. " * 6)
    with _disk_engine(stories_package, tmp_path) as first:
        assert first.generate(system + stories_engine.encode(" She"), max_new_tokens=5).usage.cached_tokens == 0
    (folder,) = tmp_path.iterdir()  # one folder: this package's identity
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
    Manifest.load(changed).with_files(changed).save(changed)  # a consistent package, one file changed
    with _disk_engine(changed, tmp_path / "kv") as other:
        got = other.generate(system + [5], max_new_tokens=2)
        assert got.usage.cached_tokens == 0 and other.prefix_cache.stats.disk_hits == 0
    assert len(list((tmp_path / "kv").iterdir())) == 2  # its own folder, nothing shared
    with _disk_engine(stories_package, tmp_path / "kv", device="cpu") as same:  # the original still hits
        assert same.generate(system + [5], max_new_tokens=2).usage.cached_tokens > 0


def test_the_disk_tier_skips_foreign_files_and_keeps_within_its_bytes(
    stories_package, stories_engine, tmp_path, caplog
):
    import numpy as np

    prompts = [
        stories_engine.encode(f"{word} upon a time, there was a little girl named Lily. " * 4)
        for word in ("Once", "Twice", "Thrice")
    ]
    with _disk_engine(stories_package, tmp_path) as engine:
        engine.generate(prompts[0] + [5], max_new_tokens=1)
        engine.prefix_cache.disk.flush()
        size = engine.prefix_cache.stats.disk_bytes
    (folder,) = tmp_path.iterdir()
    np.savez(folder / "f00.npz", meta=np.array('{"format": "nextoken-prefix-kv", "version": 2}'), ids=np.arange(3))
    (folder / "junk.npz").write_bytes(b"not an archive")
    with _disk_engine(stories_package, tmp_path, prefix_cache_disk_bytes=int(size * 1.5)) as engine:
        assert "skipped" in caplog.text and engine.prefix_cache.stats.disk_entries == 1
        for prompt in prompts[1:]:  # each new entry pushes out the oldest
            engine.generate(prompt + [5], max_new_tokens=1)
            engine.prefix_cache.disk.flush()
        assert engine.prefix_cache.stats.disk_entries == 1 and engine.prefix_cache.stats.disk_bytes <= size * 1.5
    with pytest.raises(nextoken.NextokenError, match="prefix_cache_dir needs prefix_cache_bytes"):
        Engine(stories_package, plugins=False, prefix_cache_dir=tmp_path)


def test_concurrent_requests_through_a_restarted_server_read_the_disk_tier(tiny_llama, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    options = {"prefix_cache_bytes": 64 << 20, "prefix_cache_dir": tmp_path}
    with serving(tiny_llama[1], "tiny", engine_options=options) as (client, *_):
        client.completions.create(model="tiny", prompt=SYSTEM + [1], max_tokens=2, temperature=0)  # written
    with serving(tiny_llama[1], "tiny", engine_options=options) as (client, engine, *_):  # a restart

        def ask(i: int):
            return client.completions.create(model="tiny", prompt=SYSTEM + [20 + i], max_tokens=6, temperature=0)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        assert all(a.usage.prompt_tokens_details.cached_tokens == 64 for a in answers)
        assert engine.prefix_cache.stats.disk_hits >= 1
    with Engine(tiny_llama[1], plugins=False) as plain:
        assert [a.choices[0].text for a in answers] == [
            plain.generate(SYSTEM + [20 + i], max_new_tokens=6).text for i in range(6)
        ]


# -- the disk tier under damage, sharing and strange folders -------------------------------------------


def _entry_file(package, directory, prompt) -> "pathlib.Path":
    with _disk_engine(package, directory) as engine:
        engine.generate(prompt + [5], max_new_tokens=1)
    (folder,) = directory.iterdir()
    (entry,) = folder.glob("*.npz")
    return entry


def _rewrite(entry, change) -> None:
    """Write ``entry`` again with ``change(members)`` applied (its meta, checksum included, kept)."""
    import numpy as np

    with np.load(entry) as archive:
        members = {name: archive[name] for name in archive.files}
    change(members)
    with open(entry, "wb") as out:
        np.savez(out, **members)


@pytest.mark.parametrize("damage", ["values", "shape", "dtype", "truncated", "arrays"])
def test_a_damaged_entry_is_never_served_and_never_fails_a_request(
    stories_package, stories_engine, tmp_path, caplog, damage
):
    """Altered values (the checksum), the wrong shape or dtype, a cut file, an array missing: the
    entry is skipped with one warning and removed; the answer is the one without the cache."""
    import numpy as np

    system = stories_engine.encode("Once upon a time, there was a little girl named Lily. " * 6)
    entry = _entry_file(stories_package, tmp_path, system)
    if damage == "values":
        _rewrite(entry, lambda m: m.update(kv_0=m["kv_0"] + np.float32(0.5)))
    elif damage == "shape":
        _rewrite(entry, lambda m: m.update(kv_0=m["kv_0"][:, :1]))
    elif damage == "dtype":
        _rewrite(entry, lambda m: m.update({k: v.astype(np.float16) for k, v in m.items() if k.startswith("kv_")}))
    elif damage == "arrays":
        _rewrite(entry, lambda m: m.pop("kv_3"))
    else:
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    prompt = system + stories_engine.encode(" The dog")
    with _disk_engine(stories_package, tmp_path) as later:
        for _ in range(2):  # the second: the entry is gone, quietly
            got = later.generate(prompt, max_new_tokens=16)
            assert got.token_ids == stories_engine.generate(prompt, max_new_tokens=16).token_ids
        assert later.prefix_cache.stats.disk_hits == 0
    assert not entry.exists()
    assert caplog.text.count(entry.name) == 1, caplog.text


def test_start_up_takes_whatever_the_folder_holds(stories_package, stories_engine, tmp_path, caplog):
    """Links, a FIFO, an entry of two million ids, partial files of a write that died: start-up
    skips them without following, waiting or hashing for long, and cleans the old partials."""
    import os
    import threading
    import time

    import numpy as np

    system = stories_engine.encode("Once upon a time, there was a little girl named Lily. " * 6)
    entry = _entry_file(stories_package, tmp_path, system)
    folder = entry.parent
    (folder / "dangling.npz").symlink_to(folder / "nowhere.npz")
    (folder / "link.npz").symlink_to(entry)
    os.mkfifo(folder / "fifo.npz")
    meta = json.dumps({"format": "nextoken-prefix-kv", "version": 2, "identity": folder.name, "length": 2_000_000})
    np.savez(folder / "huge.npz", meta=np.array(meta), ids=np.zeros(2_000_000, dtype=np.int64))
    old, new = folder / ".x.npz.1.2.part", folder / ".y.npz.1.2.part"
    old.write_bytes(b"half")
    new.write_bytes(b"half")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    made = []
    loader = threading.Thread(target=lambda: made.append(_disk_engine(stories_package, tmp_path)))
    loader.start()
    loader.join(timeout=120)
    assert not loader.is_alive(), "start-up waited on the folder"
    with made[0] as engine:
        assert engine.prefix_cache.stats.disk_entries == 1
        got = engine.generate(system + [5], max_new_tokens=4)
        assert got.usage.cached_tokens > 0
    assert not old.exists() and new.exists()  # another writer's may still be running
    assert "fifo.npz" in caplog.text and "huge.npz" in caplog.text


@pytest.mark.parametrize("servers", [2, 4])
def test_engines_sharing_a_folder_keep_its_budget(stories_package, stories_engine, tmp_path, caplog, servers):
    """Several engines (servers) write to one folder: each write's scan takes in the others' entries
    and removes the oldest, so the folder stays within the budget, and none stops evicting."""
    prompts = [stories_engine.encode(f"{i} upon a time, there was a little girl named Lily. " * 4) for i in range(12)]
    with _disk_engine(stories_package, tmp_path / "probe") as probe:
        probe.generate(prompts[0] + [5], max_new_tokens=1)
        size = probe.prefix_cache.stats.disk_bytes
    budget = int(size * 2.5)
    engines = [_disk_engine(stories_package, tmp_path / "kv", prefix_cache_disk_bytes=budget) for _ in range(servers)]
    try:
        for i, prompt in enumerate(prompts):
            engine = engines[i % servers]
            engine.generate(prompt + [5], max_new_tokens=1)
            engine.prefix_cache.disk.flush()
            time.sleep(0.02)  # file times tick in jiffies: writes this fast could tie, and the oldest be any
            (folder,) = (tmp_path / "kv").iterdir()
            on_disk = sum(p.stat().st_size for p in folder.glob("*.npz"))
            assert on_disk <= budget, f"{on_disk} bytes on disk after write {i}, budget {budget}"
        for engine in engines:  # each sees the folder as it is
            engine.prefix_cache.disk.scan()
            assert engine.prefix_cache.stats.disk_bytes <= budget
        later = engines[0]
        got = later.generate(prompts[-1] + [7], max_new_tokens=2)  # written by another engine: found
        assert got.usage.cached_tokens > 0
    finally:
        for engine in engines:
            engine.close()
    assert "not written" not in caplog.text


def test_prefix_keys_are_hashed_in_one_pass():
    from nextoken.prefixcache import _boundaries, _key, _keys

    ids = list(range(1000, 1300))
    lengths = _boundaries(len(ids), 32) + [5, 77]
    assert _keys(ids, lengths) == {n: _key(ids[:n]) for n in lengths}
    cache = PrefixCache(1 << 30, block=32)
    cache.insert(ids[:96], _Entry(10))
    long_prompt = ids[:96] + list(range(131_072))  # found in one pass over 131k tokens
    assert cache.lookup(long_prompt)[0] == 96
