"""High-priority time to first token under a saturating low-priority load, against its idle value.

    python scripts/priority_load.py PACKAGE [--max-batch 4] [--low 48] [--high 20] [--interval 0.25] [--aging 5]

``--high`` requests of priority -1 (16 tokens each) arrive one every ``--interval`` seconds, each
timed from submission to its first token: alone (idle: the same arrivals, nothing else running;
and one at a time, for reference), then while ``--low`` requests of priority 1 (96 tokens each)
fill the batch and the queue, and again with every request at priority 0 (first come, first
served) for contrast. Prints each run's TTFT p50/p95, p95 over the idle p95, the low-priority
requests' longest wait, and the requests preempted for priority. At 0.1 s the high-priority
requests alone need about every row of a batch of 4 (16 tokens take ~0.4 s), so they queue behind
each other whatever the low load does; 0.25 s leaves the lows' interference to measure.
"""

from __future__ import annotations

import argparse
import statistics
import time

from nextoken import Engine, Scheduler

parser = argparse.ArgumentParser()
parser.add_argument("package")
parser.add_argument("--max-batch", type=int, default=4)
parser.add_argument("--low", type=int, default=48)
parser.add_argument("--high", type=int, default=20)
parser.add_argument("--aging", type=float, default=5.0)
parser.add_argument("--interval", type=float, default=0.25, help="seconds between high-priority arrivals")
parser.add_argument("--threads", type=int, default=2)
a = parser.parse_args()

engine = Engine(a.package, threads=a.threads, spin=False, plugins=False)
PROMPT = "Once upon a time, there was a little girl named Lily. She"
HIGH = dict(max_new_tokens=16, ignore_eos=True)
LOW = dict(max_new_tokens=96, ignore_eos=True)


def ttft(handle) -> float:
    return handle.generation.first_token_time - handle.submitted


def p95(values: list[float]) -> float:
    return sorted(values)[max(round(0.95 * len(values)) - 1, 0)]


def run(loaded: bool, high: int, low: int, paced: bool = True) -> tuple[list[float], list[float], int, int]:
    scheduler = Scheduler(engine, max_batch=a.max_batch, priority_aging=a.aging).start()
    try:
        lows = [scheduler.submit(PROMPT + f" {i}", priority=low, **LOW) for i in range(a.low if loaded else 0)]
        if loaded:
            while scheduler.running < a.max_batch:  # the batch is full and the rest wait
                time.sleep(0.01)
        highs = []
        for i in range(a.high):
            handle = scheduler.submit(f"The dog {i} ran", priority=high, **HIGH)
            highs.append(handle)
            if paced:
                time.sleep(a.interval)
            else:
                handle.result()
        for h in highs + lows:
            h.result()
        waits = [h.queued_seconds for h in lows]
        return [ttft(h) for h in highs], waits, scheduler.preempted_for_priority, scheduler.preempted_cache_kept
    finally:
        scheduler.close()


run(False, -1, 1, paced=False)  # warm-up
single = run(False, -1, 1, paced=False)[0]
idle = run(False, -1, 1)[0]
rows = [("one at a time, nothing else", single, [], 0, 0), ("idle: the same arrivals, no low load", idle, [], 0, 0)]
rows.append(("loaded, priorities (high -1, low 1)", *run(True, -1, 1)))
rows.append(("loaded, first come first served (all 0)", *run(True, 0, 0)))
base = p95(idle)
print(
    f"{a.package}: max_batch {a.max_batch}, {a.low} low-priority requests of 96 tokens, {a.high} high of 16 "
    f"every {a.interval} s, aging {a.aging} s, threads {a.threads}"
)
print(
    f"{'run':42} {'high TTFT p50 ms':>17} {'p95 ms':>9} {'p95 / idle':>10} {'low longest wait s':>19} "
    f"{'preempted':>9} {'cache kept':>10}"
)
for name, times, waits, preempted, kept in rows:
    print(
        f"{name:42} {statistics.median(times) * 1e3:17.1f} {p95(times) * 1e3:9.1f} {p95(times) / base:10.2f} "
        f"{(max(waits) if waits else 0.0):19.2f} {preempted:9d} {kept:10d}"
    )
