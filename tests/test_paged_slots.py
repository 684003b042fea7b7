"""Paged slots: the slot buffer is reserved address space, backed by memory only where its rows
have written (checked with the kernel's own count, ``mincore``), given back when a slot frees or a
row is cut; the tokens are the fixed slots'; admission counts bytes (``kv_budget``)."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from nextoken import Engine, InvalidRequestError, Scheduler
from nextoken.kvcache import PAGED_HOST, SlotCache, resident_bytes, row_slack

pytestmark = pytest.mark.skipif(not PAGED_HOST, reason="paged slots need anonymous mappings (Linux, macOS)")

ROW = 64 * 4  # one position of one head: 64 fp32 channels, 16 positions a 4 KiB page


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny llama with 64-wide heads and a 2,048-token window: a slot's head is 128 pages."""
    from nextoken.exporters import export, make_tiny_checkpoint

    root = tmp_path_factory.mktemp("paged")
    ckpt = make_tiny_checkpoint(
        root / "ckpt",
        "llama",
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
    )
    export(ckpt, root / "pkg", progress=None)
    with Engine(root / "pkg", device="cpu") as engine:
        yield engine


def _prompts(engine: Engine, n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=int(k)).tolist() for k in rng.integers(5, 120, size=n)]


def _pages_held(scheduler: Scheduler) -> int:
    """Bytes of the pages the running rows' positions are on: what a paged buffer should hold."""
    manifest, page = scheduler.manifest, mmap.PAGESIZE
    per_head = sum(-(-scheduler.kv.held(r) * ROW // page) for r in range(scheduler.kv.rows))
    return per_head * page * manifest.num_kv_heads * len(manifest.past_names())


def test_paged_slots_hold_what_their_rows_wrote_and_give_it_back(engine):
    """Requests joining and leaving a paged buffer of 4 slots x 2,048: at every step the memory
    backing the buffer (the kernel's count) is the buffer's own count, within a page per row and
    head (the idle slots' position 0) of the pages the rows' positions are on, far under the
    reserved size; when every request has ended, nothing is held."""
    scheduler = Scheduler(engine, max_batch=4)
    assert scheduler.paged_slots and scheduler.slot_length == 2048
    prompts = _prompts(engine, 10)
    handles = [scheduler.submit(p, max_new_tokens=8 + 6 * i, ignore_eos=True) for i, p in enumerate(prompts)]
    buffer = None
    slack = 4 * row_slack(engine.manifest)
    while scheduler.step():
        buffer = scheduler.kv.buffer
        assert isinstance(buffer, SlotCache) and buffer.paged
        held = resident_bytes(buffer)
        assert held == scheduler.kv.nbytes() == scheduler.metrics()["kv_buffer_bytes"]
        assert _pages_held(scheduler) <= held <= _pages_held(scheduler) + slack
        assert held < buffer.reserved_bytes() / 20
    assert buffer is not None and resident_bytes(buffer) == scheduler.kv.nbytes() == 0
    fixed = Scheduler(engine, max_batch=4, paged_slots=False, slot_length=2048)
    again = [fixed.submit(p, max_new_tokens=8 + 6 * i, ignore_eos=True) for i, p in enumerate(prompts)]
    while fixed.step():
        assert fixed.kv.nbytes() == fixed.kv_buffer_bytes  # allocated whole
    assert [h.result().token_ids for h in handles] == [h.result().token_ids for h in again]


def test_a_prompt_prefilled_in_chunks_holds_its_pages_from_the_start_and_gives_them_back(engine):
    """A long prompt prefilled in place in chunks has its slot's prompt positions written in order
    first (the pages it will write anyway, taken head by head): the buffer's count holds them from
    the first chunk, the kernel's count agrees, and a cancel gives them all back; done, it gets
    what it gets alone."""
    prompt = _prompts(engine, 1, seed=5)[0] * 3
    alone = engine.generate(prompt, max_new_tokens=6, ignore_eos=True).token_ids
    scheduler = Scheduler(engine, max_batch=2, max_prefill_tokens=32)
    handle = scheduler.submit(prompt, max_new_tokens=6, ignore_eos=True)
    scheduler.step()
    buffer = scheduler.kv.buffer
    assert isinstance(buffer, SlotCache) and buffer.paged and scheduler.kv.reserved == {0}
    whole = -(-len(prompt) * ROW // mmap.PAGESIZE) * mmap.PAGESIZE * engine.manifest.num_kv_heads
    assert resident_bytes(buffer) == scheduler.kv.nbytes() == whole * len(engine.manifest.past_names())
    handle.cancel()
    while scheduler.step():
        pass
    assert resident_bytes(buffer) == scheduler.kv.nbytes() == 0 and not scheduler.kv.reserved
    again = scheduler.submit(prompt, max_new_tokens=6, ignore_eos=True)
    while scheduler.step():
        pass
    assert again.result().token_ids == alone


def test_a_cut_row_and_a_padded_prefill_give_back_their_pages(engine):
    """trim() returns the pages past a row's end (a speculative step's rejected guesses, a shorter
    row of a padded prefill); the page a kept position is on stays."""
    buffer = SlotCache(engine.runner, 2, 2048, paged=True)
    engine.runner.prefill_in_place(buffer, list(range(3, 203)), 0)  # 200 positions: 13 pages a head
    per_page = mmap.PAGESIZE // ROW
    layers = len(engine.manifest.past_names())
    assert resident_bytes(buffer) == buffer.nbytes() == -(-200 // per_page) * mmap.PAGESIZE * layers
    buffer.lengths[0] = 40
    buffer.trim(0, 40)
    assert resident_bytes(buffer) == buffer.nbytes() == -(-40 // per_page) * mmap.PAGESIZE * layers
    buffer.release(0)
    assert resident_bytes(buffer) == buffer.nbytes() == 0


def test_speculative_decoding_in_paged_slots_equals_plain(engine):
    """A request that guesses under a paged scheduler (its rejected guesses' positions cut, their
    pages given back) gets plain decoding's tokens, and holds what it kept."""
    prompt = engine.encode("abc abc abc abc abc")
    plain = engine.generate(prompt, max_new_tokens=40, ignore_eos=True).token_ids
    scheduler = Scheduler(engine, max_batch=2)
    handle = scheduler.submit(
        prompt, max_new_tokens=40, ignore_eos=True, speculative={"method": "prompt_lookup", "k": 8}
    )
    while scheduler.step():
        buffer = scheduler.kv.buffer
        assert buffer is not None and resident_bytes(buffer) == buffer.nbytes()
    assert handle.result().token_ids == plain


def test_admission_and_preemption_count_bytes(engine, monkeypatch):
    """A budget of one and a half requests' reach: newcomers are admitted while their prompts fit
    beside what the running ones hold, whatever max_batch says; when the running ones grow past it
    the newest is preempted and comes back later, its prompt and answer so far prefilled again.
    Every decode step runs within the budget, and every request gets what it gets alone; one that
    could not finish alone within it is refused with the numbers."""
    prompts = _prompts(engine, 6, seed=1)
    new = 30
    alone = [engine.generate(p, max_new_tokens=new, ignore_eos=True).token_ids for p in prompts]
    probe = Scheduler(engine, max_batch=8)
    reach = max(probe._entry_bytes([p + [0] * (new - 1)]) for p in prompts)
    budget = reach * 3 // 2
    scheduler = Scheduler(engine, max_batch=8, kv_budget=budget)
    steps = []
    decode = scheduler._decode

    def checked() -> None:
        steps.append((scheduler.running, scheduler.kv_committed_bytes))
        decode()

    monkeypatch.setattr(scheduler, "_decode", checked)
    handles = [scheduler.submit(p, max_new_tokens=new, ignore_eos=True) for p in prompts]
    while scheduler.step():
        assert scheduler.metrics()["kv_committed_bytes"] == scheduler.kv_committed_bytes
    assert all(committed <= budget for rows, committed in steps if rows > 1)
    assert max(rows for rows, _ in steps) >= 2 and scheduler.preempted >= 1
    assert scheduler.metrics()["preempted"] == scheduler.preempted
    assert [h.result().token_ids for h in handles] == alone
    with pytest.raises(InvalidRequestError, match=r"more than this scheduler's kv_budget .* could not finish"):
        scheduler.submit(prompts[0], max_new_tokens=1500)
    with pytest.raises(InvalidRequestError, match="kv_budget must be a positive"):
        Scheduler(engine, kv_budget=0)


def test_a_request_of_several_sequences_is_preempted_whole(engine):
    """A request of n=2 seeded choices preempted by the growth of an older one comes back with both
    rows prefilled again together: the same tokens as alone."""
    prompts = _prompts(engine, 3, seed=2)
    kw = dict(max_new_tokens=40, ignore_eos=True, temperature=0.9, seed=5)
    alone = [[c.token_ids for c in engine.generate(p, n=2, **kw)] for p in prompts]
    probe = Scheduler(engine, max_batch=8)
    budget = max(probe._entry_bytes([p + [0] * 39] * 2) for p in prompts) * 5 // 4
    scheduler = Scheduler(engine, max_batch=8, kv_budget=budget)
    handles = [scheduler.submit(p, n=2, **kw) for p in prompts]
    while scheduler.step():
        pass
    assert scheduler.preempted >= 1
    assert [[c.token_ids for c in h.results()] for h in handles] == alone


def test_the_default_budget_and_fixed_slots(engine):
    """Paged slots default to the window and a budget of at most the buffer's whole size; fixed
    slots keep the window at most 2,048 and no byte budget."""
    paged = Scheduler(engine, max_batch=4)
    whole = 4 * 2048 * engine.manifest.kv_bytes_per_token()
    assert paged.kv_budget is not None and 0 < paged.kv_budget <= whole
    fixed = Scheduler(engine, max_batch=4, paged_slots=False)
    assert not fixed.paged_slots and fixed.kv_budget is None
    assert Scheduler(engine, kv_backend="concat").kv_budget is None


def test_a_budget_under_one_window_bounds_a_sequence(engine):
    """A budget smaller than one sequence of the window's bytes: the longest sequence is what fits
    in it (the server's requests without max_tokens run to that), and such a request is taken and
    runs to its end."""
    per_token = engine.manifest.kv_bytes_per_token()
    slack = row_slack(engine.manifest)
    scheduler = Scheduler(engine, max_batch=4, kv_budget=300 * per_token + slack)
    assert scheduler.max_sequence_length == 300
    prompt = _prompts(engine, 1)[0]
    handle = scheduler.submit(prompt, max_new_tokens=300 - len(prompt), ignore_eos=True)
    while scheduler.step():
        pass
    assert len(handle.result().token_ids) == 300 - len(prompt)
    with pytest.raises(InvalidRequestError, match="kv_budget"):
        scheduler.submit(prompt, max_new_tokens=301 - len(prompt))


def test_a_preempted_request_cancelled_while_it_waits_ends_alone(engine):
    """Cancelling a request that waits for room after its preemption ends it (finish reason
    cancelled, with what it had); the others get what they get alone."""
    prompts = _prompts(engine, 4, seed=3)
    new = 40
    alone = [engine.generate(p, max_new_tokens=new, ignore_eos=True).token_ids for p in prompts]
    probe = Scheduler(engine, max_batch=8)
    budget = max(probe._entry_bytes([p + [0] * (new - 1)]) for p in prompts) * 3 // 2
    scheduler = Scheduler(engine, max_batch=8, kv_budget=budget)
    handles = [scheduler.submit(p, max_new_tokens=new, ignore_eos=True) for p in prompts]
    victim = None
    while scheduler.step():
        if victim is None and scheduler.preempted:
            victim = scheduler._evicted[0][0]
            victim.cancel()
    assert victim is not None
    for handle, want in zip(handles, alone):
        got = handle.result()
        if handle is victim:
            assert got.finish_reason == "cancelled" and got.token_ids == want[: len(got.token_ids)]
        else:
            assert got.token_ids == want
