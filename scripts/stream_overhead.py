"""What streaming through the server costs a token, beside the scheduler alone, at batch B.

    python scripts/stream_overhead.py PACKAGE [--batch 8] [--tokens 64] [--rounds 5] [--threads N]

One engine and one scheduler (``max_batch`` B) serve both ways, in rounds that alternate:
- direct: B requests submitted to the scheduler at once, each ``--tokens`` tokens (EOS ignored),
  waited for in the process;
- server: the same B requests as streamed ``/v1/completions`` from B concurrent clients over
  loopback (the app in this process on uvicorn, the clients in a process of their own).
Every token is made a letter (``logit_bias``), so that every step streams text.
Per round, the wall time until every request has ended. The overhead per token is the median
difference over the rounds divided by the tokens each request made (the steps), and its share of
a decode step (the direct median over the steps). Prints one line per round and a summary.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

#: the client process: B concurrent streams, timed from the first request to the last byte
CLIENT = """
import asyncio, json, sys, time
import httpx
spec = json.loads(sys.argv[1])
chunks = 0
async def one(client, prompt):
    global chunks
    async with client.stream("POST", "/v1/completions", json={**spec["body"], "prompt": prompt}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunks += bool(json.loads(line[6:])["choices"])
async def main():
    async with httpx.AsyncClient(base_url=spec["url"], timeout=600) as client:
        await one(client, "warm")
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(client, p) for p in spec["prompts"]))
        return time.perf_counter() - start, time.process_time() - cpu
took, cpu = asyncio.run(main())
print(json.dumps([took, chunks, cpu]))
"""
PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben", "One day, a girl", "The sun was hot", "Tom had"]


def main() -> None:
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
    # every token a character of text, so that every step streams (a random-weight model with the
    # byte tokenizer otherwise picks ids the tokenizer has no text for, and nothing is sent)
    printable = {str(engine.encode(ch)[-1]): 100.0 for ch in "abcdefghijklmnopqrstuvwxyz "}
    params = SamplingParams(
        max_new_tokens=args.tokens,
        temperature=0.0,
        ignore_eos=True,
        logit_bias={int(k): v for k, v in printable.items()},
    )

    def direct() -> float:
        start = time.perf_counter()
        handles = [scheduler.submit(p, params) for p in prompts]
        for h in handles:
            h.result(timeout=600)
        return time.perf_counter() - start

    body = {
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": printable,
        "nextoken": {"ignore_eos": True},
    }

    def streamed() -> tuple[float, int, float]:
        """The B streams from a client process of their own (a client in this process would take
        the server's interpreter lock): its wall time from the first request to the last byte, the
        chunks it read, and the CPU seconds it used meanwhile (on a small host the client's CPU
        is taken from the server's cores: a client elsewhere would not)."""
        spec = json.dumps({"url": f"http://127.0.0.1:{port}", "body": body, "prompts": prompts})
        out = subprocess.run([sys.executable, "-c", CLIENT, spec], capture_output=True, text=True, check=True)
        took, chunks, cpu = json.loads(out.stdout)
        return took, chunks, cpu

    direct()  # warm both ways once
    streamed()
    a, b, cpu = [], [], []
    for r in range(args.rounds):
        a.append(direct())
        took, chunks, used = streamed()
        b.append(took)
        cpu.append(used)
        print(
            f"round {r}: direct {a[-1] * 1e3:.0f} ms, server {b[-1] * 1e3:.0f} ms ({chunks} chunks; "
            f"the client process used {used * 1e3:.0f} ms of CPU meanwhile)",
            flush=True,
        )
    step = statistics.median(a) / args.tokens
    extra = (statistics.median(b) - statistics.median(a)) / args.tokens
    client = statistics.median(cpu) / args.tokens
    print(
        f"batch {args.batch}, {args.tokens} tokens each, threads {engine.threads or 'onnxruntime default'}, spin "
        f"{'on' if engine.spin else 'off'}: decode step {step * 1e3:.2f} ms (direct, median of {args.rounds}); "
        f"streaming through the server adds {extra * 1e3:.3f} ms a step ({100 * extra / step:+.1f}% of a step), "
        f"of which the client's own CPU is up to {client * 1e3:.3f} ms a step: the server's share "
        f"{max(0.0, extra - client) * 1e3:.3f} ms ({100 * max(0.0, extra - client) / step:+.1f}%)"
    )
    server.should_exit = True
    scheduler.close()
    engine.close()


if __name__ == "__main__":
    main()
