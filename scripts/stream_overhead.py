"""What streaming through the server costs a token, beside the scheduler alone, at batch B.

    python scripts/stream_overhead.py PACKAGE [--batch 8] [--tokens 64] [--rounds 5] [--threads N]

One engine and one scheduler (``max_batch`` B) serve both ways, in rounds that alternate:
- direct: B requests submitted to the scheduler at once, each ``--tokens`` tokens (EOS ignored),
  waited for in the process;
- server: the same B requests as streamed ``/v1/completions`` from B concurrent clients over
  loopback (the app in this process on uvicorn, the clients on their own event loop thread).
Per round, the wall time until every request has ended. The overhead per token is the median
difference over the rounds divided by the tokens each request made (the steps), and its share of
a decode step (the direct median over the steps). Prints one line per round and a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben", "One day, a girl", "The sun was hot", "Tom had"]


def main() -> None:
    import httpx
    import uvicorn

    from nextoken import Engine, SamplingParams, Scheduler
    from nextoken.serving.server import create_app

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    engine = Engine(args.package, device="cpu", threads=args.threads, plugins=False)
    scheduler = Scheduler(engine, max_batch=args.batch).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(scheduler, "m"), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0.0, ignore_eos=True)

    def direct() -> float:
        start = time.perf_counter()
        handles = [scheduler.submit(p, params) for p in prompts]
        for h in handles:
            h.result(timeout=600)
        return time.perf_counter() - start

    async def streamed() -> tuple[float, int]:
        body = {"max_tokens": args.tokens, "temperature": 0, "stream": True, "nextoken": {"ignore_eos": True}}
        chunks = 0

        async def one(client: httpx.AsyncClient, prompt: str) -> None:
            nonlocal chunks
            async with client.stream("POST", "/v1/completions", json={**body, "prompt": prompt}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks += bool(json.loads(line[6:])["choices"])

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            await one(client, "warm")
            start = time.perf_counter()
            await asyncio.gather(*(one(client, p) for p in prompts))
            return time.perf_counter() - start, chunks

    direct()  # warm both ways once
    asyncio.run(streamed())
    a, b = [], []
    for r in range(args.rounds):
        a.append(direct())
        took, chunks = asyncio.run(streamed())
        b.append(took)
        print(f"round {r}: direct {a[-1] * 1e3:.0f} ms, server {b[-1] * 1e3:.0f} ms ({chunks} chunks)", flush=True)
    step = statistics.median(a) / args.tokens
    extra = (statistics.median(b) - statistics.median(a)) / args.tokens
    print(
        f"batch {args.batch}, {args.tokens} tokens each, threads {engine.threads}, spin "
        f"{'on' if engine.spin else 'off'}: decode step {step * 1e3:.2f} ms (direct, median of {args.rounds}); "
        f"streaming through the server adds {extra * 1e3:.3f} ms a step ({100 * extra / step:+.1f}% of a step)"
    )
    server.should_exit = True
    scheduler.close()
    engine.close()


if __name__ == "__main__":
    main()
