"""The GPU check: export, parity CPU vs CUDA, and a bench table, on a CUDA host.

    python scripts/gpu_check.py [--stories DIR] [--work DIR] [--json FILE] [--genai-python PY]

Exports stories260k (the real model in ../shared/models) and a Llama with SmolLM2-135M's config
(random weights: speed does not depend on them) in fp32 and fp16; checks that greedy tokens on
CUDA equal the CPU's (stories260k fp32: identical, or the check fails), reports how far fp16 and
the 135M model move; then prints one table: TTFT and decode tokens/s at batch 1, 8 and 32, for
nextoken and, given ``--genai-python`` (an environment with onnxruntime-genai-cuda), for
onnxruntime-genai on the same checkpoint. Exits 1 when a check fails, 2 when CUDA is not usable.
``scripts/gpu_check.sh`` installs what it needs first. ``--device cpu --quick`` runs the same path
on a CPU (the test suite does, so the script cannot rot between GPU runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time"
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def export_all(args, work: Path, export_device: str) -> dict[str, Path]:
    from nextoken.exporters import export, make_random_checkpoint

    made: dict[str, Path] = {}
    sources = {"stories260k": str(args.stories)}
    if not args.quick:
        ckpt = work / "smollm2-135m-random"
        if not (ckpt / "config.json").is_file():
            say("making a random-weight Llama with SmolLM2-135M's config")
            make_random_checkpoint(ckpt, REPO / "tests" / "data" / "configs" / "smollm2-135m.json", context_length=2048)
        sources["135M"] = str(ckpt)
    for name, source in sources.items():
        for dtype in ("fp32", "fp16"):
            out = work / f"{name}-{dtype}"
            if not (out / "nextoken.json").is_file():
                device = export_device if dtype == "fp16" else "cpu"
                start = time.perf_counter()
                report = export(source, out, dtype=dtype, device=device, progress=None)
                say(f"exported {name} {dtype} (traced on {device}) in {time.perf_counter() - start:.1f} s: "
                    f"max |Δ logits| vs PyTorch fp32 = {report.max_abs_diff:.2e} (tolerance {report.atol:.1e})")
            made[f"{name}-{dtype}"] = out
    return made


def parity(packages: dict[str, Path], device: str, new_tokens: int) -> tuple[list[dict], bool]:
    from nextoken import Engine

    rows, ok = [], True
    references: dict[str, list[int]] = {}
    cpu_logits: dict[str, np.ndarray] = {}
    for key, pkg in packages.items():
        model, dtype = key.rsplit("-", 1)
        if dtype == "fp32":
            with Engine(pkg, device="cpu") as cpu:
                references[model] = cpu.generate(PROMPT, max_new_tokens=new_tokens, ignore_eos=True).token_ids
                cpu_logits[model] = cpu.forward(cpu.encode(PROMPT * 4))
        with Engine(pkg, device=device) as eng:
            got = eng.generate(PROMPT, max_new_tokens=new_tokens, ignore_eos=True)
            logits = eng.forward(eng.encode(PROMPT * 4))
            batch = eng.generate([PROMPT, "The dog", "Lily and Ben"], max_new_tokens=new_tokens // 2, ignore_eos=True)
        diff = first_difference(got.token_ids, references[model])
        batch_same = batch[0].token_ids == got.token_ids[: new_tokens // 2]
        row = {"package": key, "device": device, "tokens": len(got.token_ids),
               "identical_to_cpu_fp32": diff is None, "first_difference": diff,
               "max_abs_logit_diff_vs_cpu_fp32": float(np.abs(logits - cpu_logits[model]).max()),
               "batch_row_equals_alone": batch_same,
               "device_memory_mib": (got.usage.device_memory_bytes or 0) / 2**20}
        rows.append(row)
        must_match = model == "stories260k" and dtype == "fp32"
        if must_match and (diff is not None or not batch_same):
            ok = False
        say(f"parity {key} on {device}: greedy {len(got.token_ids)} tokens "
            f"{'identical to CPU fp32' if diff is None else f'first differs at token {diff}'}, "
            f"max |Δ logits| {row['max_abs_logit_diff_vs_cpu_fp32']:.2e}, batch row == alone: {batch_same}"
            + ("  <- MUST be identical" if must_match and diff is not None else ""))
    return rows, ok


def bench(packages: dict[str, Path], device: str, batches: tuple[int, ...], prompt: int, new: int,
          repeat: int) -> list[dict]:
    from nextoken import Engine
    from nextoken.bench import run_bench

    rows = []
    for key, pkg in packages.items():
        if key.startswith("stories260k-fp16"):
            continue
        with Engine(pkg, device=device) as eng:
            report = run_bench(eng, batches, prompt_tokens=prompt, new_tokens=new, repeat=repeat)
        for r in report.rows:
            rows.append({"contender": "nextoken", "package": key, "batch": r.batch, "ttft_ms": r.prefill_ms,
                         "decode_tok_s": r.decode_tokens_per_s, "total_tok_s": r.total_tokens_per_s,
                         "step_ms": r.step_ms, "outside_ms": r.outside_step_ms})
            say(f"bench {key} b{r.batch}: TTFT {r.prefill_ms:.1f} ms, {r.decode_tokens_per_s:.1f} tok/s/seq, "
                f"{r.total_tokens_per_s:.1f} tok/s total")
    return rows


def bench_genai(python: str, checkpoint: Path, work: Path, batches, prompt: int, new: int) -> list[dict]:
    from nextoken.errors import NextokenError
    from nextoken.exporters.genai import run_builder

    rows = []
    for precision in ("fp32", "fp16"):
        target = work / f"genai-{precision}"
        try:
            if not (target / "genai_config.json").is_file():
                run_builder(python, str(checkpoint), target, precision, "cuda")
        except NextokenError as exc:
            say(f"genai {precision}: could not build ({exc})")
            continue
        for batch in batches:
            done = subprocess.run([python, str(REPO / "sdk" / "peers.py"), "genai", "--model", str(target),
                                   "--batch", str(batch), "--prompt", str(prompt), "--new", str(new)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                say(f"genai {precision} b{batch}: failed ({(done.stderr or done.stdout).strip().splitlines()[-1:]})")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"contender": "genai", "package": f"135M-{precision}", "batch": batch, "ttft_ms": r["ttft_ms"],
                         "decode_tok_s": r["decode_tok_s"], "total_tok_s": r["total_tok_s"]})
            say(f"bench genai 135M-{precision} b{batch}: TTFT {r['ttft_ms']:.1f} ms, {r['decode_tok_s']:.1f} tok/s/seq")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| contender | package | batch | TTFT ms | decode tok/s/seq | tok/s total |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['package']} | {r['batch']} | {r['ttft_ms']:.1f} | "
                     f"{r['decode_tok_s']:.1f} | {r['total_tok_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stories", type=Path, default=REPO.parent / "shared" / "models" / "stories260k")
    p.add_argument("--work", type=Path, default=None, help="where packages go (default: a temporary folder)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the script without a GPU")
    p.add_argument("--quick", action="store_true", help="stories260k only, short runs (a smoke test of the script)")
    p.add_argument("--genai-python", default=None, help="python of an environment with onnxruntime-genai-cuda")
    p.add_argument("--json", type=Path, default=None, help="write everything measured here")
    args = p.parse_args(argv)

    import onnxruntime as ort

    from nextoken.device import cuda_status
    from nextoken.memory import gpu_memory

    say(f"python {platform.python_version()}, onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})")
    if args.device.startswith("cuda"):
        usable, why = cuda_status(int(args.device.split(":")[1]) if ":" in args.device else 0)
        say(f"CUDA: {why}")
        if not usable:
            return 2
        gpu = gpu_memory(0)
        if gpu:
            say(f"GPU: {gpu.name}, {gpu.free / 2**30:.1f} of {gpu.total / 2**30:.1f} GiB free")
    if not (args.stories / "config.json").is_file():
        say(f"stories260k not found at {args.stories}; pass --stories DIR")
        return 1
    try:
        import torch
        export_device = "cuda" if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    except ImportError:
        say("the export stack is missing: pip install 'nextoken[export]'")
        return 1
    work = args.work or Path(tempfile.mkdtemp(prefix="nextoken-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    packages = export_all(args, work, export_device)
    new = 16 if args.quick else 128
    parity_rows, ok = parity(packages, args.device, 32 if args.quick else 128)
    batches = (1, 2) if args.quick else (1, 8, 32)
    bench_rows = bench(packages, args.device, batches, 32 if args.quick else 128, new, 1 if args.quick else 3)
    if args.genai_python and not args.quick:
        bench_rows += bench_genai(args.genai_python, work / "smollm2-135m-random", work, batches, 128, new)
    print(table(bench_rows), flush=True)
    say(f"parity: {'PASSED' if ok else 'FAILED'} (stories260k fp32 greedy on {args.device} identical to the CPU's)")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "parity": parity_rows, "bench": bench_rows,
                                         "passed": ok, "seconds": time.perf_counter() - T0}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
