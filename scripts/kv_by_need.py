"""Paged slots against fixed ones: KV memory held against the bytes the requests' tokens hold, and
decode speed on the 16-request workload.

    python scripts/kv_by_need.py PKG [--requests 64 --shortest 100 --longest 2000 --new 64]
        [--rounds 5] [--threads N]

1. ``--requests`` requests of random prompts of ``--shortest``..``--longest`` tokens, all at once,
   into one scheduler with that many paged slots of the package's window: at every decode step the
   memory backing the slot buffer (the kernel's count, ``mincore``) against the bytes the rows'
   positions hold, and what fixed slots would allocate.
2. The 16-request workload (16 prompts of 16-95 tokens, 64 new tokens each, 8 at a time, greedy):
   fixed slots of 2,048 positions against paged slots of the window, alternating, medians; the
   tokens must be identical in every run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

import nextoken
from nextoken.kvcache import resident_bytes


def held_bytes(scheduler: nextoken.Scheduler) -> int:
    return sum(scheduler.kv.held(r) for r in range(scheduler.kv.rows)) * scheduler.manifest.kv_bytes_per_token()


def memory(engine: nextoken.Engine, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.shortest, args.longest + 1, size=args.requests)
    prompts = [rng.integers(3, 250, size=int(n)).tolist() for n in lengths]
    scheduler = nextoken.Scheduler(engine, max_batch=args.requests)
    whole = args.requests * scheduler.slot_length * engine.manifest.kv_bytes_per_token()
    print(
        f"{args.requests} requests of {lengths.min()}-{lengths.max()} prompt tokens (mean {lengths.mean():.0f}), "
        f"{args.new} new each; {args.requests} paged slots of {scheduler.slot_length} positions "
        f"(fixed slots would allocate {whole / 2**30:.1f} GiB); KV budget {scheduler.kv_budget / 2**30:.2f} GiB"
    )
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    handles = [scheduler.submit(p, max_new_tokens=args.new, ignore_eos=True) for p in prompts]
    worst, peak, peak_held, together = 0.0, 0, 1, 0
    while scheduler.step():
        buffer = scheduler.kv.buffer
        if buffer is None or not scheduler.running:
            continue
        held, resident = held_bytes(scheduler), resident_bytes(buffer)
        assert resident == scheduler.kv.nbytes()
        worst = max(worst, resident / held)
        together = max(together, scheduler.running)
        if resident > peak:
            peak, peak_held = resident, held
    seconds = time.perf_counter() - began
    assert all(h.result().usage.completion_tokens == args.new for h in handles)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"  up to {together} decoding together: buffer held {peak / 2**20:.0f} MiB at its peak for "
        f"{peak_held / 2**20:.0f} MiB of tokens ({peak / peak_held:.3f}x; worst step {worst:.3f}x); "
        f"{peak / whole:.4f} of the fixed slots' bytes; after: {scheduler.kv.nbytes()} bytes held; "
        f"process peak RSS +{(rss - rss0) / 2**10:.0f} MiB; {seconds:.0f} s"
    )


def workload(engine: nextoken.Engine, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 250, size=int(n)).tolist() for n in rng.integers(16, 96, size=16)]
    settings = {"fixed slots, 2048": dict(paged_slots=False, slot_length=2048), "paged slots, window": {}}
    speeds: dict[str, list[float]] = {k: [] for k in settings}
    tokens = None
    for _ in range(args.rounds):
        for name, options in settings.items():
            scheduler = nextoken.Scheduler(engine, max_batch=8, **options)
            began = time.perf_counter()
            handles = [scheduler.submit(p, max_new_tokens=64, ignore_eos=True) for p in prompts]
            while scheduler.step():
                pass
            speeds[name].append(16 * 64 / (time.perf_counter() - began))
            got = [h.result().token_ids for h in handles]
            tokens = tokens or got
            assert got == tokens, f"{name}: other tokens"
    base = statistics.median(speeds["fixed slots, 2048"])
    for name, runs in speeds.items():
        print(
            f"  {name:20s} {statistics.median(runs):6.1f} tok/s median ({', '.join(f'{x:.1f}' for x in runs)}) "
            f"{statistics.median(runs) / base:.3f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--shortest", type=int, default=100)
    ap.add_argument("--longest", type=int, default=2000)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", choices=("memory", "workload"), default=None)
    args = ap.parse_args()
    engine = nextoken.Engine(args.package, threads=args.threads)
    print(f"{args.package}: threads {engine.threads}, spin {'on' if engine.spin else 'off'}")
    if args.skip != "memory":
        memory(engine, args)
    if args.skip != "workload":
        print("16 requests of 16-95 prompt tokens, 64 new, 8 at a time:")
        workload(engine, args)


if __name__ == "__main__":
    main()
