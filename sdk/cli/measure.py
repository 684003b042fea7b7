"""Commands that measure and project: bench, memory, cost."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import NextokenError
from .common import UsageError, open_engine, plugin_options, positive_int, runtime_options, speculative_of


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..tools.bench import run_bench, run_compare

    if args.compare is not None:
        from ..device import spin_policy

        contenders = [c.strip() for c in args.compare.split(",") if c.strip()]
        spin = args.spin
        if spin is None:  # one policy for every contender, decided once, here
            spin, why = spin_policy(args.threads or os.cpu_count())
            print(
                f"spin {'on' if spin else 'off'} for every contender ({why}; --spin/--no-spin to choose)",
                file=sys.stderr,
            )
        reports = []
        for length in args.prompt_tokens:  # one comparison a prompt length, each alternating its contenders
            compared = run_compare(
                args.package,
                contenders,
                batches=args.batch,
                prompt_tokens=length,
                new_tokens=args.new,
                threads=args.threads,
                spin=spin,
                repeat=args.repeat,
                peers_venv=args.peers_venv,
                precision=args.precision,
                checkpoint=args.checkpoint,
                progress=lambda m: print(m, file=sys.stderr, flush=True),
                block_size=args.block_size,
            )
            print(compared.table())
            reports.append(compared)
        if args.json:
            out = [r.to_dict() for r in reports]
            Path(args.json).write_text(json.dumps(out[0] if len(out) == 1 else out, indent=2) + "\n")
        if args.plot:
            from ..tools.bench import plot_compare

            for compared in reports:
                target = args.plot if len(reports) == 1 else f"{Path(args.plot).stem}-{compared.prompt_tokens}.png"
                print(f"chart: {plot_compare(compared, target)}", file=sys.stderr)
        return 0
    if args.speculative:
        from ..tools.bench import run_speculative

        with open_engine(args) as engine:
            speculated = run_speculative(
                engine, [speculative_of(t) for t in args.speculative], new_tokens=args.new, repeat=args.repeat
            )
        print(speculated.table())
        if args.json:
            Path(args.json).write_text(json.dumps(speculated.to_dict(), indent=2) + "\n")
        return 0
    with open_engine(args) as engine:
        report = None
        for length in args.prompt_tokens:  # one table: a row a setting, batch and prompt length
            one = run_bench(
                engine,
                batches=args.batch,
                prompt_tokens=length,
                new_tokens=args.new,
                repeat=args.repeat,
                chain=args.chain,
                constrained=args.constrained,
            )
            if report is None:
                report = one
            else:
                report.rows += one.rows
        assert report is not None  # at least one length
    print(report.table())
    if report.hooks:
        print(report.hook_table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    from ..tools.memory import plan_memory

    capacity = int(args.capacity * (1 << 30)) if args.capacity is not None else None
    plan = plan_memory(
        args.model,
        batch=args.batch,
        context=args.context,
        dtype=args.dtype,
        device=args.device,
        capacity=capacity,
        prefix_cache_bytes=int(args.prefix_cache_mb * (1 << 20)),
    )
    out = plan.to_dict()
    if args.measure:
        from ..tools.memory import measure_peak

        out["measured"] = measure_peak(args.model, args.batch, plan.context, threads=args.threads)
        out["measured"]["predicted_over_measured"] = plan.total_bytes / out["measured"]["peak_bytes"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(plan.table())
    if args.measure:
        m = out["measured"]
        print(
            f"{'measured peak':16} {m['peak_bytes'] / (1 << 30):.2f} GiB during generation, "
            f"{m['lifetime_peak_bytes'] / (1 << 30):.2f} GiB with loading "
            f"(predicted/measured {m['predicted_over_measured']:.2f})"
        )
    return 0


def _cmd_cost(args: argparse.Namespace) -> int:
    from ..tools.cost import per_answer_from_bench, per_answer_from_tokens, project

    basis: dict = {}
    if args.per_answer is not None:
        per_answer, basis = args.per_answer, {"given": "cost per answer"}
    elif args.bench:
        if args.hourly_rate is None:
            raise UsageError("--bench needs --hourly-rate (the device's price per hour)")
        try:
            bench = json.loads(Path(args.bench).read_text())
        except (OSError, ValueError) as exc:
            raise NextokenError(f"cannot read the bench file {args.bench}: {exc}") from None
        try:
            basis = per_answer_from_bench(bench, args.completion_tokens, args.hourly_rate, args.batch)
        except ValueError as exc:
            raise NextokenError(str(exc)) from None
        per_answer = basis["per_answer"]
        basis["devices_needed"] = args.requests_per_day * basis["device_seconds"] / 86400.0
    elif args.input_price is not None or args.output_price is not None:
        per_answer = per_answer_from_tokens(
            args.prompt_tokens, args.completion_tokens, args.input_price or 0.0, args.output_price or 0.0
        )
        basis = {
            "prompt_tokens": args.prompt_tokens,
            "completion_tokens": args.completion_tokens,
            "input_per_million": args.input_price or 0.0,
            "output_per_million": args.output_price or 0.0,
        }
    else:
        raise UsageError(
            "give --per-answer, --input-price/--output-price with a token mix, or --bench FILE --hourly-rate"
        )
    out = {**project(per_answer, args.requests_per_day), "basis": basis}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'per answer':14} ${f'{per_answer:.8f}'.rstrip('0').rstrip('.')}")
    print(f"{'answers a day':14} {args.requests_per_day:,.0f}")
    print(f"{'per day':14} ${out['per_day']:,.2f}")
    print(f"{'per month':14} ${out['per_month']:,.2f}  (30 days)")
    print(f"{'per year':14} ${out['per_year']:,.2f}")
    if "devices_needed" in basis:
        print(
            f"{'devices':14} {basis['devices_needed']:,.2f} busy all day at batch {basis['batch']} "
            f"({basis['tokens_per_s']:,.1f} tok/s measured)"
        )
    return 0


def add_commands(sub) -> None:
    """Add this group's commands to the CLI."""
    p = sub.add_parser("bench", help="measure prefill and decode speed, and time spent outside the model")
    p.add_argument("package", metavar="MODEL", help="model package (or, with --compare, a checkpoint or hub id)")
    p.add_argument(
        "--batch",
        type=lambda t: [int(x) for x in t.split(",")],
        default=[1, 8],
        metavar="1,8",
        help="batch sizes (default 1,8)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=lambda t: [positive_int(x) for x in t.split(",")],
        default=[128],
        metavar="N[,N...]",
        help="prompt lengths (default 128; e.g. 2000,8000 for long contexts)",
    )
    p.add_argument("--new", type=positive_int, default=128, metavar="N", help="tokens to generate (default 128)")
    p.add_argument("--repeat", type=positive_int, default=3, metavar="N", help="runs per setting; medians (default 3)")
    p.add_argument(
        "--chain",
        action="store_true",
        help="also run the full built-in chain (temperature, top-k, top-p, repetition penalty, 2 stop strings)",
    )
    p.add_argument(
        "--constrained", action="store_true", help="also run under a JSON schema (constrained decoding; setting 'json')"
    )
    p.add_argument(
        "--speculative",
        action="append",
        default=None,
        metavar="METHOD[:K[:MODEL]]",
        help="instead: decode tok/s at batch 1 with this speculation against plain decoding, on a prompt "
        "the model's story repeats and on one with nothing to copy (repeatable: one row each)",
    )
    p.add_argument(
        "--compare",
        default=None,
        metavar="optimum,transformers,genai,llamacpp",
        help="also run these from the same checkpoint, each in its own process, alternating",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "int8", "int4"),
        default="fp32",
        help="with --compare: nextoken's package quantised so (nextoken export --quantize), genai's built so",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --compare and --precision int8/int4: every contender's weights in blocks of N (default 32: "
        "nextoken's, genai's and llama.cpp's own; larger blocks decode faster and less exactly)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="with --compare: the checkpoint the peers start from (default: the one the package records)",
    )
    p.add_argument(
        "--peers-venv",
        default=None,
        metavar="DIR",
        help="virtual environment with onnxruntime-genai (default: NEXTOKEN_CACHE/peers/genai-venv)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    p.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="with --compare: draw decode tok/s and TTFT by contender and batch (extra: plot)",
    )
    runtime_options(p)
    plugin_options(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("memory", help="plan memory: weights + working memory + KV cache, against a capacity")
    p.add_argument("model", help="model package, checkpoint directory, config.json, or hub id (config only)")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences at once (default 1)")
    p.add_argument("--context", type=positive_int, default=None, help="tokens per sequence (default: the window)")
    p.add_argument(
        "--dtype", default=None, help="weights precision: fp32, fp16, bf16, int8, int4 (default: the model's)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--capacity",
        type=float,
        default=None,
        metavar="GIB",
        help="memory available, GiB (default: the host's RAM, or the GPU's)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="also load the package on the CPU, generate at this batch and context, and measure the peak",
    )
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for --measure")
    p.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=0,
        metavar="MB",
        help="plan a prefix cache of this many MiB too (serve --prefix-cache-mb; default 0: off)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser("cost", help="project a workload's cost: per answer, per day, per month, per year")
    p.add_argument("--requests-per-day", type=float, required=True, metavar="N", help="answers a day")
    p.add_argument("--per-answer", type=float, default=None, metavar="USD", help="a given cost per answer")
    p.add_argument("--prompt-tokens", type=float, default=500, metavar="N", help="tokens in, per answer (default 500)")
    p.add_argument(
        "--completion-tokens", type=float, default=200, metavar="N", help="tokens out, per answer (default 200)"
    )
    p.add_argument("--input-price", type=float, default=None, metavar="USD", help="price per million input tokens")
    p.add_argument("--output-price", type=float, default=None, metavar="USD", help="price per million output tokens")
    p.add_argument("--bench", default=None, metavar="FILE", help="a `nextoken bench --json` file: measured throughput")
    p.add_argument(
        "--hourly-rate", type=float, default=None, metavar="USD", help="the device's price per hour (with --bench)"
    )
    p.add_argument("--batch", type=int, default=None, help="the bench batch to cost (default: the fastest)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_cost)
