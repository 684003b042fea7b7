"""The GPU check: export, parity CPU vs CUDA, and a bench table, on a CUDA host.

    python scripts/gpu_check.py [--stories DIR] [--work DIR] [--json FILE] [--genai-python PY]

Exports stories260k (the real model in ../shared/models) and a Llama with SmolLM2-135M's config
(random weights: speed does not depend on them) in fp32 and fp16, one model at a time; checks that
greedy tokens on CUDA equal the CPU's, alone and under continuous batching (stories260k fp32:
identical, or the check fails), reports how far fp16 and the 135M model move; then prints one
table: TTFT and decode tokens/s at batch 1, 8 and 32 for nextoken (the 135M fp32 package also with
TF32) and, given ``--genai-python`` (an environment with onnxruntime-genai-cuda), for
onnxruntime-genai on its own build of the same checkpoint and nextoken on that same graph.
Exits 1 when a check fails, 2 when CUDA is not usable (with
what is missing), 3 when stopped early (SIGTERM: the table and ``--json`` keep what was measured).
``scripts/gpu_check.sh`` installs what it needs first. ``--device cpu --quick`` runs the same path
on a CPU (the test suite does, so the script cannot rot between GPU runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
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


def random_135m(work: Path) -> Path:
    """A Llama with SmolLM2-135M's config and random weights (speed does not depend on them)."""
    from nextoken.exporters import make_random_checkpoint

    ckpt = work / "smollm2-135m-random"
    if not (ckpt / "config.json").is_file():
        say("making a random-weight Llama with SmolLM2-135M's config")
        make_random_checkpoint(ckpt, REPO / "tests" / "data" / "configs" / "smollm2-135m.json", context_length=2048)
    return ckpt


def export_model(name: str, source: Path, work: Path, export_device: str, target: str = "cpu") -> dict[str, Path]:
    """``name``-fp32 and ``name``-fp16 through the default export (the fp16 one checked on
    ``export_device``). For a CUDA ``target`` the fp32 package is optimum's graph: onnxruntime's CUDA
    GroupQueryAttention is fp16/bf16 only, so the fused fp32 graph would run attention on the CPU."""
    from nextoken.exporters import export

    made: dict[str, Path] = {}
    for dtype in ("fp32", "fp16"):
        out = work / f"{name}-{dtype}"
        if not (out / "nextoken.json").is_file():
            device = export_device if dtype == "fp16" else "cpu"
            backend = "optimum" if dtype == "fp32" and target.startswith("cuda") else "nextoken"
            start = time.perf_counter()
            report = export(str(source), out, dtype=dtype, device=device, backend=backend, progress=None)
            say(
                f"exported {name} {dtype} ({backend}, checked on {device}) in {time.perf_counter() - start:.1f} s: "
                f"max |Δ logits| vs PyTorch fp32 = {report.max_abs_diff:.2e} (tolerance {report.atol:.1e})"
            )
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
        row = {
            "package": key,
            "device": device,
            "tokens": len(got.token_ids),
            "identical_to_cpu_fp32": diff is None,
            "first_difference": diff,
            "max_abs_logit_diff_vs_cpu_fp32": float(np.abs(logits - cpu_logits[model]).max()),
            "batch_row_equals_alone": batch_same,
            "device_memory_mib": (got.usage.device_memory_bytes or 0) / 2**20,
        }
        rows.append(row)
        must_match = model == "stories260k" and dtype == "fp32"
        if must_match and (diff is not None or not batch_same):
            ok = False
        say(
            f"parity {key} on {device}: greedy {len(got.token_ids)} tokens "
            f"{'identical to CPU fp32' if diff is None else f'first differs at token {diff}'}, "
            f"max |Δ logits| {row['max_abs_logit_diff_vs_cpu_fp32']:.2e}, batch row == alone: {batch_same}"
            + ("  <- MUST be identical" if must_match and diff is not None else "")
        )
    return rows, ok


def scheduler_parity(key: str, pkg: Path, device: str, reference_device: str, tokens: int) -> dict:
    """Continuous batching on ``device``: four requests of different lengths join a running batch
    and leave it at different steps (the KV cache padded, joined and cut on the device, or written
    into slots for GroupQueryAttention graphs); each must get the tokens it gets alone on
    ``reference_device``."""
    from nextoken import Engine, Scheduler

    prompts = [PROMPT, "The dog ran", "Lily and Ben went to the park with their mom", "Once"]
    lengths = [tokens, max(tokens // 2, 2), max(tokens * 3 // 4, 2), max(tokens // 3, 2)]
    with Engine(pkg, device=reference_device) as ref:
        alone = [ref.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(prompts, lengths)]
    with Engine(pkg, device=device) as eng:
        scheduler = Scheduler(eng, max_batch=4)
        handles = []
        for prompt, n in zip(prompts, lengths):
            handles.append(scheduler.submit(prompt, max_new_tokens=n, ignore_eos=True))
            for _ in range(3):
                scheduler.step()
        while scheduler.step():
            pass
        got = [h.result().token_ids for h in handles]
        backend = scheduler.kv_backend
    same = sum(g == a for g, a in zip(got, alone))
    say(
        f"scheduler {key} on {device} ({backend} cache): {same} of {len(got)} requests joining and leaving mid-batch "
        f"got the tokens they get alone on {reference_device}"
    )
    return {"package": key, "device": device, "kv_backend": backend, "identical": same, "requests": len(got)}


def bench(
    packages: dict[str, Path], device: str, batches: tuple[int, ...], prompt: int, new: int, repeat: int
) -> list[dict]:
    from nextoken import Engine
    from nextoken.tools.bench import run_bench

    rows = []
    runs = []
    for key, pkg in packages.items():
        if key.startswith("stories260k-fp16") or (key.endswith("-fp16") and device == "cpu"):
            continue  # stories260k is too small for fp16 to matter; CPUs have no fast fp16 kernels
        runs.append((key, pkg, False))
        if key.endswith("-fp32") and device.startswith("cuda") and not key.startswith("stories260k"):
            runs.append((f"{key}+tf32", pkg, True))  # what TensorFloat-32 (off by default) would give
    for key, pkg, tf32 in runs:
        with Engine(pkg, device=device, tf32=tf32) as eng:
            report = run_bench(eng, batches, prompt_tokens=prompt, new_tokens=new, repeat=repeat)
        for r in report.rows:
            rows.append(
                {
                    "contender": "nextoken",
                    "package": key,
                    "batch": r.batch,
                    "ttft_ms": r.prefill_ms,
                    "decode_tok_s": r.decode_tokens_per_s,
                    "total_tok_s": r.total_tokens_per_s,
                    "step_ms": r.step_ms,
                    "outside_ms": r.outside_step_ms,
                }
            )
            say(
                f"bench {key} b{r.batch}: TTFT {r.prefill_ms:.1f} ms, {r.decode_tokens_per_s:.1f} tok/s/seq, "
                f"{r.total_tokens_per_s:.1f} tok/s total"
            )
    return rows


def bench_genai(
    python: str, checkpoint: Path, work: Path, batches, prompt: int, new: int, device: str, repeat: int, results: dict
) -> list[dict]:
    """onnxruntime-genai on its own build of ``checkpoint``, and nextoken on that same graph (imported;
    its continuous batching too, in slots where the graph has GroupQueryAttention)."""
    from nextoken.errors import NextokenError
    from nextoken.exporters.genai import import_genai, run_builder

    rows = []
    for precision in ("fp32", "fp16") if device.startswith("cuda") else ("fp32",):
        target = work / f"genai-{precision}"
        try:
            if not (target / "genai_config.json").is_file():
                run_builder(python, str(checkpoint), target, precision, "cuda" if device.startswith("cuda") else "cpu")
        except NextokenError as exc:
            say(f"genai {precision}: could not build ({exc})")
            continue
        for batch in batches:
            done = subprocess.run(
                [
                    python,
                    str(REPO / "sdk" / "tools" / "peers.py"),
                    "genai",
                    "--model",
                    str(target),
                    "--batch",
                    str(batch),
                    "--prompt",
                    str(prompt),
                    "--new",
                    str(new),
                ],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                say(f"genai {precision} b{batch}: failed ({(done.stderr or done.stdout).strip().splitlines()[-1:]})")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "contender": "genai",
                    "package": f"135M-{precision}",
                    "batch": batch,
                    "ttft_ms": r["ttft_ms"],
                    "decode_tok_s": r["decode_tok_s"],
                    "total_tok_s": r["total_tok_s"],
                }
            )
            say(f"bench genai 135M-{precision} b{batch}: TTFT {r['ttft_ms']:.1f} ms, {r['decode_tok_s']:.1f} tok/s/seq")
        imported = work / f"nextoken-on-genai-{precision}"
        try:
            if not (imported / "nextoken.json").is_file():
                import_genai(target, imported)
            rows += bench({f"135M-{precision}, genai's graph": imported}, device, batches, prompt, new, repeat)
            results["scheduler"].append(
                scheduler_parity(f"135M-{precision}, genai's graph", imported, device, device, prompt)
            )
        except NextokenError as exc:  # e.g. a graph nextoken declines to import, with the reason
            say(f"nextoken on genai's {precision} graph: {exc}")
        except Exception as exc:
            failed(f"nextoken on genai's {precision} graph", exc, results)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| contender | package | batch | TTFT ms | decode tok/s/seq | tok/s total |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['contender']} | {r['package']} | {r['batch']} | {r['ttft_ms']:.1f} | "
            f"{r['decode_tok_s']:.1f} | {r['total_tok_s']:.1f} |"
        )
    return "\n".join(lines)


def cuda_usable(device: str) -> bool:
    """Probe CUDA; when it fails, print what a fix needs (which library, where the CUDA wheels are),
    and try once more after PyTorch has loaded its own CUDA libraries."""
    import os

    from nextoken.device import _nvidia_library_dirs, cuda_status
    from nextoken.probes import gpu_memory

    device_id = int(device.split(":")[1]) if ":" in device else 0
    usable, why = cuda_status(device_id)
    say(f"CUDA: {why}")
    if not usable:
        say(f"  nvidia library folders on sys.path: {_nvidia_library_dirs() or 'none'}")
        say(f"  LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')!r}")
        try:
            import torch

            if torch.cuda.is_available():
                torch.zeros(1, device="cuda")  # loads PyTorch's CUDA runtime, cuBLAS and cuDNN
                cuda_status.cache_clear()
                usable, why = cuda_status(device_id)
                say(
                    f"  after PyTorch {torch.__version__} loaded its CUDA libraries: {why}"
                    + ("  <- nextoken's own preload missed them: worth a fix" if usable else "")
                )
            else:
                say(f"  PyTorch {torch.__version__} sees no GPU either")
        except ImportError:
            pass
    if usable:
        gpu = gpu_memory(device_id)
        if gpu:
            say(f"GPU: {gpu.name}, {gpu.free / 2**30:.1f} of {gpu.total / 2**30:.1f} GiB free")
    return usable


def failed(what: str, exc: Exception, results: dict, fatal: bool = True) -> None:
    """Report a step that raised; the run goes on with the next one. ``fatal``: the check fails."""
    import traceback

    say(f"{what}: FAILED ({type(exc).__name__}: {str(exc)[:400]})")
    traceback.print_exc()
    results["errors"].append(f"{what}: {type(exc).__name__}: {str(exc)[:400]}")
    results["passed"] = results["passed"] and not fatal


def measure_model(name, source, work, export_device, args, tokens, new, batches, results) -> None:
    """Export ``name`` in fp32 and fp16, check parity (and batching, for stories260k), bench it."""
    packages = export_model(name, source, work, export_device, args.device)
    rows, ok = parity(packages, args.device, tokens)
    results["parity"] += rows
    results["passed"] = results["passed"] and ok
    if name == "stories260k":  # fp32 on the device must batch like the CPU alone, token for token
        check = scheduler_parity("stories260k-fp32", packages["stories260k-fp32"], args.device, "cpu", tokens)
        results["scheduler"].append(check)
        results["passed"] = results["passed"] and check["identical"] == check["requests"]
    save(args.json, results)
    results["bench"] += bench(packages, args.device, batches, tokens, new, 1 if args.quick else 3)
    save(args.json, results)


def save(path: Path | None, results: dict) -> None:
    if path:
        path.write_text(json.dumps({**results, "seconds": time.perf_counter() - T0}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stories", type=Path, default=REPO.parent / "shared" / "models" / "stories260k")
    p.add_argument("--work", type=Path, default=None, help="where packages go (default: a temporary folder)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the script without a GPU")
    p.add_argument("--quick", action="store_true", help="stories260k only, short runs (a smoke test of the script)")
    p.add_argument("--genai-python", default=None, help="python of an environment with onnxruntime-genai-cuda")
    p.add_argument("--batches", default="1,8,32", help="batch sizes to bench (default 1,8,32)")
    p.add_argument("--tokens", type=int, default=128, help="prompt tokens, new tokens and parity tokens (default 128)")
    p.add_argument("--json", type=Path, default=None, help="write everything measured here (after each step)")
    args = p.parse_args(argv)

    import onnxruntime as ort

    say(
        f"python {platform.python_version()}, onnxruntime {ort.__version__} ({', '.join(ort.get_available_providers())})"
    )
    if args.device.startswith("cuda") and not cuda_usable(args.device):
        return 2
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
    tokens = 32 if args.quick else args.tokens
    new = 16 if args.quick else args.tokens
    batches = (1, 2) if args.quick else tuple(int(b) for b in args.batches.split(","))
    results = {
        "device": args.device,
        "parity": [],
        "scheduler": [],
        "bench": [],
        "errors": [],
        "passed": True,
        "finished": False,
    }

    def stop(signum, frame):  # `timeout` ends a run gone long: keep what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        models = (
            {"stories260k": args.stories} if args.quick else {"stories260k": args.stories, "135M": random_135m(work)}
        )
        for name, source in models.items():  # one model at a time: a run cut short still reports the first
            try:
                measure_model(name, source, work, export_device, args, tokens, new, batches, results)
            except Exception as exc:  # one broken step must not cost the rest of a scarce GPU run
                failed(f"{name}", exc, results)
        if args.genai_python and not args.quick:
            try:
                results["bench"] += bench_genai(
                    args.genai_python, work / "smollm2-135m-random", work, batches, tokens, new, args.device, 3, results
                )
            except Exception as exc:
                failed("genai", exc, results, fatal=False)
        results["finished"] = True
    except KeyboardInterrupt as exc:
        say(f"stopped early ({exc}); what was measured so far follows")
    finally:
        print(table(results["bench"]), flush=True)
        save(args.json, results)
    ok = results["passed"]
    say(
        f"check: {'PASSED' if ok else 'FAILED'} (stories260k fp32 on {args.device}: greedy tokens identical to the "
        f"CPU's, alone and under continuous batching; {len(results['errors'])} step(s) raised)"
    )
    return (0 if ok else 1) if results["finished"] else 3


if __name__ == "__main__":
    sys.exit(main())
