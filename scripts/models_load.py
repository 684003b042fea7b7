"""Three packages whose plans exceed the memory budget, served by one process in a round robin of
requests: the server's peak resident memory against the budget, and every answer against the same
package served alone.

    python scripts/models_load.py PKG_A PKG_B PKG_C --budget-mb 1400 [--rounds 6] [--clients 3]

Each package is first served alone (``nextoken serve PKG``) for the reference answers (greedy, the
same prompts). Then one ``nextoken serve PKG_A PKG_B PKG_C --memory-budget-mb B`` takes
``--rounds`` rounds of one request per model in turn (every model change may unload another),
then ``--clients`` clients at once, each going round the models; its resident memory is sampled
every 10 ms (VmRSS) and its peak read from the kernel (VmHWM) before it stops. Prints the plans,
the loads, the peak against the process's idle size plus the budget, and the answers that differ.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["Once upon a time", "The little dog", "She opened the door and"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "nextoken", "serve", *args, "--port", str(port), "--device", "cpu"]
    command += ["--max-batch", str(a.max_batch), "--prefix-cache-mb", "0", "--threads", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not start: {' '.join(command)}")


def ask(base: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": a.tokens, "temperature": 0}
    body["nextoken"] = {"ignore_eos": True}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


parser = argparse.ArgumentParser()
parser.add_argument("packages", nargs=3)
parser.add_argument("--budget-mb", type=int, required=True)
parser.add_argument("--rounds", type=int, default=6)
parser.add_argument("--clients", type=int, default=3)
parser.add_argument("--tokens", type=int, default=16)
parser.add_argument("--max-batch", type=int, default=4)
a = parser.parse_args()
names = [Path(p).resolve().name for p in a.packages]

reference: dict[tuple[str, str], str] = {}
for name, package in zip(names, a.packages):
    proc, base = start([package])
    try:
        for prompt in PROMPTS:
            reference[name, prompt] = ask(base, name, prompt)
        alone_peak = status_kib(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{name} served alone: peak RSS {alone_peak / 1024:.0f} MiB")

proc, base = start([*a.packages, "--memory-budget-mb", str(a.budget_mb)])
idle = status_kib(proc.pid, "VmRSS")
plans = {m["id"]: m["planned_bytes"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
samples: list[int] = []
stop = threading.Event()


def watch() -> None:
    while not stop.is_set():
        samples.append(status_kib(proc.pid, "VmRSS"))
        time.sleep(0.01)


watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
differ: list[tuple[str, str]] = []
answered = 0
start_t = time.perf_counter()
try:
    for r in range(a.rounds):
        for name in names:
            prompt = PROMPTS[r % len(PROMPTS)]
            answered += 1
            if ask(base, name, prompt) != reference[name, prompt]:
                differ.append((name, prompt))
    serial_s = time.perf_counter() - start_t

    def client(k: int) -> None:
        global answered
        for r in range(a.rounds):
            name = names[(k + r) % len(names)]
            prompt = PROMPTS[(k + r) % len(PROMPTS)]
            answered += 1
            if ask(base, name, prompt) != reference[name, prompt]:
                differ.append((name, prompt))

    workers = [threading.Thread(target=client, args=(k,)) for k in range(a.clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    models = httpx.get(f"{base}/v1/models").json()["data"]
    peak = status_kib(proc.pid, "VmHWM")
finally:
    stop.set()
    proc.terminate()
    proc.wait(30)

mib = 1 << 20
print(f"budget {a.budget_mb} MiB; plans: " + ", ".join(f"{n} {b / mib:.0f} MiB" for n, b in plans.items()))
print(f"sum of plans {sum(plans.values()) / mib:.0f} MiB (> budget: {sum(plans.values()) > a.budget_mb * mib})")
print("loads: " + ", ".join(f"{m['id']} {m['loads']}" for m in models))
print(f"{answered} requests ({a.rounds} serial rounds in {serial_s:.1f} s, then {a.clients} clients at once)")
print(
    f"server RSS: idle {idle / 1024:.0f} MiB, sampled max {max(samples) / 1024:.0f} MiB, peak (VmHWM) "
    f"{peak / 1024:.0f} MiB; peak - idle = {(peak - idle) / 1024:.0f} MiB against the budget {a.budget_mb} MiB: "
    f"{'within' if (peak - idle) / 1024 <= a.budget_mb else 'OVER'}"
)
print(f"answers identical to each model served alone: {answered - len(differ)}/{answered}")
for name, prompt in differ:
    print(f"  differs: {name} on {prompt!r}")
