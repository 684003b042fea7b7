"""Load test of `nextoken serve` on loopback: throughput, latency, golden tokens, cancellation, soak, bad requests.

    python scripts/load_test.py PACKAGE [--levels 1,4,16] [--requests 48] [--max-tokens 32]
        [--golden 500] [--cancel 50] [--soak 2000] [--threads N] [--ray] [--json FILE]

Starts the server in its own process (`nextoken serve PACKAGE`, or `--ray --replicas 2`), then:
1. throughput: ``--requests`` streamed requests at each concurrency level (1 = sequential):
   completion tokens/s, p50/p99 latency and time to first token;
2. golden: every (prompt, max_tokens) pair run alone first, then ``--golden`` requests with random
   arrivals at the highest level: each must be token-identical (greedy) to its run alone;
3. cancellation: ``--cancel`` streams dropped after their first tokens; afterwards nothing may be
   running and the server's memory may not have grown;
4. soak: ``--soak`` short requests; resident memory after the warm-up vs at the end;
5. bad requests: each must be a 4xx with an OpenAI error object, and the next good request served;
6. hostile requests (``--hostile N``): each of tests/test_hostile.py's once (status, time), then N
   of them (every 25th a new spelling of a path as a draft model), the server's threads and memory
   before and after; then fuzzed constraints from 8 seeds, 4 clients at once, while /health is
   polled (its p50/p99) and 8 plain streams run (token-identical to alone).
Everything is bounded in count and time; phases with a count of 0 are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily and Ben went to the park",
    "One day, a girl named Sue",
    "The sun was hot and the sky was blue",
    "Tom had a red ball",
    "In a small house by the sea lived",
    "The cat saw a bird",
    "Mom said",
    "Sam wanted to fly",
    "There was a big tree",
    "The boy and his friend",
    "Anna found a box",
    "It was a rainy day",
    "The bunny hopped",
    "Max the bear",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> int:
    """Resident memory of ``pid`` and its children (Ray's replicas are children) in bytes."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                total += next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class Server:
    def __init__(
        self, package: str, threads: int | None, max_batch: int, ray: bool, replicas: int, kv_backend: str = "auto"
    ):
        self.port = _free_port()
        cmd = [
            sys.executable,
            "-m",
            "nextoken",
            "serve",
            package,
            "--port",
            str(self.port),
            "--max-batch",
            str(max_batch),
            "--model-name",
            "m",
            "--device",
            "cpu",
            "--kv-backend",
            kv_backend,
        ]
        if threads:
            cmd += ["--threads", str(threads)]
        if ray:
            cmd += ["--ray", "--replicas", str(replicas)]
        self.started = time.perf_counter()
        # its log to a file: a pipe nobody reads fills up (an access line a request) and stalls the server
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed when the server stops
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("the server did not answer /health within 180 s")
        self.start_seconds = time.perf_counter() - self.started

    def rss(self) -> int:
        return _rss(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _request(client: httpx.AsyncClient, prompt: str, max_tokens: int, stream: bool = True) -> dict:
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "nextoken": {"ignore_eos": True},
    }
    start = time.perf_counter()
    first = None
    if not stream:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        data = r.json()
        return {
            "latency": time.perf_counter() - start,
            "ttft": None,
            "tokens": data["usage"]["completion_tokens"],
            "ids": data["nextoken"]["token_ids"],
        }
    body["stream_options"] = {"include_usage": True}
    ids, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            if data["choices"] and first is None:
                first = time.perf_counter() - start
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
                ids = data["nextoken"]["token_ids"]
    return {"latency": time.perf_counter() - start, "ttft": first, "tokens": tokens, "ids": ids}


async def _pool(
    base: str, jobs: list[tuple[str, int]], concurrency: int, stream: bool = True, jitter: float = 0.0
) -> tuple[list[dict], float]:
    """Run ``jobs`` (prompt, max_tokens) with ``concurrency`` clients; (results in job order, wall seconds)."""
    results: list[dict | None] = [None] * len(jobs)
    queue: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        queue.put_nowait((i, job))
    rng = random.Random(0)

    async def worker(client):
        while not queue.empty():
            i, (prompt, n) = queue.get_nowait()
            if jitter:
                await asyncio.sleep(rng.random() * jitter)
            results[i] = await _request(client, prompt, n, stream)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return results, time.perf_counter() - start  # type: ignore[return-value]


def throughput(server: Server, levels: list[int], requests: int, max_tokens: int) -> list[dict]:
    rows = []
    jobs = [(PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(requests)]
    asyncio.run(_pool(server.base, jobs[:4], 2))  # warm-up
    for level in levels:
        results, wall = asyncio.run(_pool(server.base, jobs, level))
        tokens = sum(r["tokens"] for r in results)
        lat = [r["latency"] * 1e3 for r in results]
        ttft = [r["ttft"] * 1e3 for r in results if r["ttft"] is not None]
        rows.append(
            {
                "clients": level,
                "requests": len(results),
                "tokens": tokens,
                "wall_s": wall,
                "tok_s": tokens / wall,
                "p50_ms": _pct(lat, 0.5),
                "p99_ms": _pct(lat, 0.99),
                "ttft_p50_ms": _pct(ttft, 0.5),
                "ttft_p99_ms": _pct(ttft, 0.99),
            }
        )
        base = rows[0]["tok_s"]
        r = rows[-1]
        print(
            f"  {level:>3} clients: {r['tok_s']:8.1f} tok/s ({r['tok_s'] / base:.2f}x sequential), "
            f"latency p50 {r['p50_ms']:.0f} / p99 {r['p99_ms']:.0f} ms, TTFT p50 {r['ttft_p50_ms']:.0f} / "
            f"p99 {r['ttft_p99_ms']:.0f} ms",
            flush=True,
        )
    return rows


def golden(server: Server, count: int, concurrency: int, max_tokens: int) -> dict:
    lengths = sorted({max(1, max_tokens // 4), max(1, max_tokens // 2), max_tokens, max_tokens + 7})
    pairs = [(p, n) for p in PROMPTS for n in lengths]
    alone, _ = asyncio.run(_pool(server.base, pairs, 1, stream=False))
    reference = {pair: r["ids"] for pair, r in zip(pairs, alone)}
    rng = random.Random(1)
    jobs = [pairs[rng.randrange(len(pairs))] for _ in range(count)]
    # Streams and whole answers mixed, random arrival gaps: requests join and leave mid-flight.
    half = count // 2
    streamed, wall1 = asyncio.run(_pool(server.base, jobs[:half], concurrency, stream=True, jitter=0.05))
    whole, wall2 = asyncio.run(_pool(server.base, jobs[half:], concurrency, stream=False, jitter=0.05))
    results = streamed + whole
    lost = sum(1 for r in results if r is None or r["ids"] is None)
    wrong = sum(
        1 for job, r in zip(jobs, results) if r is not None and r["ids"] is not None and r["ids"] != reference[job]
    )
    out = {
        "requests": count,
        "distinct": len(pairs),
        "identical": count - lost - wrong,
        "wrong": wrong,
        "lost": lost,
        "wall_s": wall1 + wall2,
    }
    print(f"  golden: {out['identical']}/{count} token-identical to alone, {wrong} wrong, {lost} lost", flush=True)
    return out


async def _drop(base: str, n: int, max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=httpx.Limits(max_connections=n + 4)) as client:

        async def one(i):
            body = {
                "model": "m",
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_tokens,
                "stream": True,
                "temperature": 0,
                "nextoken": {"ignore_eos": True},
            }
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # after the first token: leaving the block hangs up

        await asyncio.gather(*(one(i) for i in range(n)))


def cancellation(server: Server, count: int, max_tokens: int) -> dict:
    asyncio.run(_drop(server.base, count, max_tokens))  # warm-up: the server's threads for `count` streams
    time.sleep(1)
    before = server.rss()
    cancelled = httpx.get(f"{server.base}/health").json().get("ended", {}).get("cancelled", 0)
    start = time.perf_counter()
    asyncio.run(_drop(server.base, count, max_tokens))
    health = {}
    for _ in range(100):
        health = httpx.get(f"{server.base}/health").json()
        if health.get("running", 0) == 0 and health.get("waiting", 0) == 0:
            break
        time.sleep(0.1)
    freed = time.perf_counter() - start
    after = server.rss()
    out = {
        "dropped": count,
        "cancelled": health.get("ended", {}).get("cancelled", 0) - cancelled,
        "running_after": health.get("running"),
        "waiting_after": health.get("waiting"),
        "seconds_to_idle": freed,
        "rss_before": before,
        "rss_after": after,
        "rss_growth_pct": 100 * (after - before) / before if before else None,
    }
    print(
        f"  cancellation: {count} streams dropped, {out['cancelled']} cancelled by the server; then running {out['running_after']}, waiting "
        f"{out['waiting_after']} ({freed:.1f} s); RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB",
        flush=True,
    )
    return out


def soak(server: Server, count: int, concurrency: int) -> dict:
    warm = max(1, count // 10)
    jobs = [(PROMPTS[i % len(PROMPTS)], 8) for i in range(count)]
    asyncio.run(_pool(server.base, jobs[:warm], concurrency, stream=False))
    after_warmup = server.rss()
    results, wall = asyncio.run(_pool(server.base, jobs[warm:], concurrency, stream=False))
    end = server.rss()
    out = {
        "requests": count,
        "failed": sum(1 for r in results if r is None),
        "wall_s": wall,
        "rss_after_warmup": after_warmup,
        "rss_end": end,
        "rss_growth_pct": 100 * (end - after_warmup) / after_warmup,
    }
    print(
        f"  soak: {count} requests in {wall:.0f} s, RSS {after_warmup / 2**20:.0f} -> {end / 2**20:.0f} MiB "
        f"({out['rss_growth_pct']:+.1f}%)",
        flush=True,
    )
    return out


BAD = [
    ("malformed JSON", {"content": b"{not json"}),
    ("unknown model", {"json": {"model": "nope", "prompt": "x"}}),
    ("max_tokens 0", {"json": {"model": "m", "prompt": "x", "max_tokens": 0}}),
    ("max_tokens huge", {"json": {"model": "m", "prompt": "x", "max_tokens": 10**9}}),
    ("temperature -1", {"json": {"model": "m", "prompt": "x", "temperature": -1}}),
    ("a 10 MB body", {"content": b'{"model": "m", "prompt": "' + b"a" * (10 << 20) + b'"}'}),
    ("prompt of the wrong type", {"json": {"model": "m", "prompt": {"a": 1}}}),
    ("no messages", {"json": {"model": "m"}, "path": "/v1/chat/completions"}),
]


def bad_requests(server: Server) -> list[dict]:
    rows = []
    for name, req in BAD:
        path = req.get("path", "/v1/completions")
        headers = {"content-type": "application/json"}
        kwargs = {"json": req["json"]} if "json" in req else {"content": req["content"]}
        r = httpx.post(server.base + path, headers=headers, timeout=60, **kwargs)
        try:
            err = r.json().get("error", {})
        except ValueError:
            err = {}
        good = httpx.post(
            server.base + "/v1/completions", json={"model": "m", "prompt": "after", "max_tokens": 2}, timeout=60
        )
        rows.append(
            {
                "case": name,
                "status": r.status_code,
                "openai_error": bool(err.get("message") and err.get("type")),
                "next_good_request": good.status_code,
            }
        )
        print(
            f"  {name:26} -> {r.status_code} {err.get('type', '-')}: {str(err.get('message', ''))[:70]!r}; "
            f"next request {good.status_code}",
            flush=True,
        )
    return rows


def _status(pid: int, key: str) -> int:
    """A number of /proc/PID/status (``Threads``; ``VmRSS`` in bytes)."""
    with open(f"/proc/{pid}/status") as fh:
        value = next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))
    return value * 1024 if key.startswith("Vm") else value


def hostile(server: Server, count: int) -> dict:
    """Phase 6 (see the module's doc): the requests and generators of tests/test_hostile.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_hostile import COMPLETION, HOSTILE, fuzz_live

    out: dict = {"each": {}}
    with httpx.Client(base_url=server.base, timeout=120) as client:
        for name, (endpoint, body, _) in HOSTILE.items():
            start = time.perf_counter()
            r = client.post(f"/v1/{endpoint}", json=body)
            out["each"][name] = {"status": r.status_code, "ms": (time.perf_counter() - start) * 1e3}
            print(f"  {name:48} -> {r.status_code} in {out['each'][name]['ms']:6.0f} ms", flush=True)
        pid = server.proc.pid
        threads, rss, own = _status(pid, "Threads"), server.rss(), _status(pid, "VmRSS")
        bodies, statuses = list(HOSTILE.values()), collections.Counter()
        start = time.perf_counter()
        for i in range(count):
            endpoint, body, _ = bodies[i % len(bodies)]
            if i % 25 == 0:
                body = {**COMPLETION, "nextoken": {"speculative": {"method": "draft", "model": "/tmp" + "/." * i}}}
            statuses[client.post(f"/v1/{endpoint}", json=body).status_code] += 1
        time.sleep(2)
        out["many"] = {
            "count": count,
            "seconds": time.perf_counter() - start,
            "statuses": dict(statuses),
            "threads_before": threads,
            "threads_after": _status(pid, "Threads"),
            "server_rss_before_mib": own / 2**20,
            "server_rss_after_mib": _status(pid, "VmRSS") / 2**20,
            "with_checkers_before_mib": rss / 2**20,
            "with_checkers_after_mib": server.rss() / 2**20,
        }
        m = out["many"]
        print(
            f"  {count} hostile requests in {m['seconds']:.1f} s: {dict(statuses)}; threads {threads} -> "
            f"{m['threads_after']}; the server's RSS {m['server_rss_before_mib']:.0f} -> "
            f"{m['server_rss_after_mib']:.0f} MiB (with its constraint checkers {m['with_checkers_before_mib']:.0f} -> "
            f"{m['with_checkers_after_mib']:.0f} MiB)",
            flush=True,
        )
        prompts = [f"Stream {i}" for i in range(8)]
        alone = {
            p: client.post(
                "/v1/completions",
                json={"model": "m", "prompt": p, "max_tokens": 24, "temperature": 0, "nextoken": {"ignore_eos": True}},
            ).json()["choices"][0]["text"]
            for p in prompts
        }
    got = fuzz_live(server.base, alone, seeds=8)
    health = got["health"]
    out["fuzz"] = {
        "statuses": dict(got["statuses"]),
        "failures": got["failures"],
        "health_polls": len(health),
        "health_p50_ms": _pct(health, 0.5) * 1e3,
        "health_p99_ms": _pct(health, 0.99) * 1e3,
        "health_max_ms": max(health) * 1e3,
        "streams_identical": got["streamed"] == alone,
    }
    print(
        f"  fuzz: {dict(got['statuses'])}; /health p50 {out['fuzz']['health_p50_ms']:.1f} ms, p99 "
        f"{out['fuzz']['health_p99_ms']:.1f} ms, max {out['fuzz']['health_max_ms']:.1f} ms over {len(health)} polls; "
        f"8 streams identical to alone: {out['fuzz']['streams_identical']}",
        flush=True,
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("package")
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--golden", type=int, default=500)
    p.add_argument("--cancel", type=int, default=50)
    p.add_argument("--soak", type=int, default=2000)
    p.add_argument("--bad", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--hostile", type=int, default=0, metavar="N", help="hostile requests (phase 6; 0: skipped)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ray", action="store_true", help="serve with Ray Serve (--replicas)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--kv-backend", choices=("auto", "concat", "slots"), default="auto")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]
    server = Server(a.package, a.threads, a.max_batch, a.ray, a.replicas, a.kv_backend)
    report: dict = {"package": a.package, "ray": a.ray, "start_s": server.start_seconds}
    print(
        f"server up in {server.start_seconds:.1f} s ({'Ray Serve, ' + str(a.replicas) + ' replicas' if a.ray else 'plain'}),"
        f" RSS {server.rss() / 2**20:.0f} MiB",
        flush=True,
    )
    ok = True
    try:
        if a.requests:
            report["throughput"] = throughput(server, levels, a.requests, a.max_tokens)
        if a.golden:
            report["golden"] = g = golden(server, a.golden, max(levels), a.max_tokens)
            ok &= g["wrong"] == 0 and g["lost"] == 0
        if a.cancel:
            longest = httpx.get(f"{server.base}/health").json().get("max_sequence_length", 512)
            report["cancellation"] = c = cancellation(server, a.cancel, min(256, longest - 32))
            ok &= c["running_after"] == 0 and c["waiting_after"] == 0
        if a.soak:
            report["soak"] = s = soak(server, a.soak, max(levels))
            ok &= s["failed"] == 0
        if a.bad:
            report["bad_requests"] = b = bad_requests(server)
            ok &= all(400 <= r["status"] < 500 and r["openai_error"] and r["next_good_request"] == 200 for r in b)
        if a.hostile:
            report["hostile"] = h = hostile(server, a.hostile)
            ok &= all(400 <= r["status"] < 500 for r in h["each"].values()) and set(h["many"]["statuses"]) <= {400}
            ok &= not h["fuzz"]["failures"] and h["fuzz"]["streams_identical"] and server.proc.poll() is None
    finally:
        server.stop()
    report["passed"] = ok
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    print("PASSED" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
