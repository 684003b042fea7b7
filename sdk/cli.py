"""The ``nextoken`` command line. Errors are one line on stderr and a non-zero exit, never a traceback.

    nextoken export SRC -o DIR [--dtype fp16]       Hugging Face checkpoint or hub id -> model package
    nextoken generate DIR PROMPT [--max-new-tokens N] [--ignore-eos] [--json]
    nextoken chat DIR MESSAGE [--system TEXT]        one chat turn with the model's chat template
    nextoken info DIR                               what the package holds, where it would run
    nextoken plugins [--json]                       every registered plugin and what it provides
    nextoken bench DIR [--batch 1,8] [--new N]      prefill and decode speed, time inside/outside the model
    nextoken memory MODEL [--batch B] [--context N] weights + working memory + KV cache against a capacity
    nextoken serve DIR [--port P] [--ray]           OpenAI-compatible HTTP server (continuous batching)
    nextoken cost --requests-per-day N ...          a workload's cost per answer, day, month, year
    nextoken demo [SRC]                             export (an untrained tiny model by default) and generate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from .errors import NextokenError

__all__ = ["main"]

EXIT_ERROR = 1
#: a command line that cannot work as given (argparse's own status for usage errors)
EXIT_USAGE = 2


class UsageError(NextokenError):
    """The command line is incomplete or contradictory: the command's usage is printed, exit 2."""
EXIT_USAGE = 2


def _external_plugins(args: argparse.Namespace):
    value = getattr(args, "plugins", None)
    if value is None:
        return None
    if value.strip().lower() == "none":
        return False
    if value.strip().lower() in ("all", "*"):
        return True
    return [v.strip() for v in value.split(",") if v.strip()]


def _engine(args: argparse.Namespace, package=None):
    from .engine import Engine

    return Engine(package or args.package, device=args.device, threads=args.threads, spin=args.spin,
                  plugins=_external_plugins(args), cost_meters=_meters(args), tf32=args.tf32)


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _options(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in getattr(args, "options", None) or []:
        name, sep, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not (sep and eq and name and key):
            raise NextokenError(f"--option {item!r} must look like NAME.KEY=VALUE (e.g. per_token.input_per_million=0.15)")
        out.setdefault(name, {})[key] = _value(value)
    return out


def _meters(args: argparse.Namespace) -> dict[str, dict]:
    options = _options(args)
    return {name: options.get(name, {}) for name in getattr(args, "cost_meters", None) or []}


def _logit_bias(items: list[str] | None) -> dict[int, float]:
    """``--logit-bias ID=BIAS`` (repeatable) as a dict; a malformed one is an InvalidRequestError."""
    from .errors import InvalidRequestError

    out: dict[int, float] = {}
    for item in items or ():
        token, sep, bias = item.partition("=")
        try:
            out[int(token)] = float(bias)
        except ValueError:
            raise InvalidRequestError(f"--logit-bias takes ID=BIAS (e.g. 50256=-100), not {item!r}") from None
    return out


def _flagged() -> list:
    """SamplingParams' fields that have a CLI flag, with the flag."""
    from .types import SamplingParams

    return [(f, f.metadata["flag"] or "--" + f.name.replace("_", "-"))
            for f in dataclasses.fields(SamplingParams) if f.metadata.get("flag") is not None]


def sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """One flag per SamplingParams field, generated from the field: its type, default, doc, metavar, choices."""
    for f, flag in _flagged():
        default = f.default_factory() if callable(f.default_factory) else f.default
        doc = f.metadata["doc"]
        kw: dict = {"dest": f.name, "metavar": f.metadata["metavar"], "help": doc}
        if f.name == "max_new_tokens":
            default = max_new_tokens
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", dest=f.name, help=doc)
            continue
        if isinstance(default, (tuple, dict)):               # repeatable: items, or NAME=VALUE pairs
            kind = int if "int" in str(f.type).split("[")[-1] and "tuple" in str(f.type) else str
            p.add_argument(flag, action="append", type=kind, **kw)
            continue
        hint = str(f.type)
        kind = int if hint.startswith("int") else float if hint.startswith("float") else str
        if f.name == "max_new_tokens":
            kind = _positive_int
        p.add_argument(flag, type=kind, default=default, choices=f.metadata["choices"],
                       **{**kw, "help": f"{doc} (default {default})" if default not in (None, "") else doc})


def _params(args: argparse.Namespace):
    """SamplingParams from the flags :func:`sampling_flags` made."""
    from .types import SamplingParams

    options = _options(args)
    meters = getattr(args, "cost_meters", None) or []
    special = {"logit_bias": lambda items: _logit_bias(items),
               "options": lambda items: {k: v for k, v in options.items() if k not in meters},
               "cost_meters": lambda items: {}}
    kwargs = {}
    for f, _ in _flagged():
        value = getattr(args, f.name)
        if f.name in special:
            value = special[f.name](value)
        elif isinstance(f.default, tuple):
            value = tuple(value or ())
        kwargs[f.name] = value
    return SamplingParams(**kwargs)


def _cmd_export(args: argparse.Namespace) -> int:
    from nextoken.exporters import export

    export(args.source, args.output, atol=args.atol, check=not args.no_check, dtype=args.dtype, device=args.device,
           quantize=args.quantize,
           block_size=args.block_size, backend=args.backend, genai_python=args.genai_python)
    return 0


def _generate(engine, prompt, args: argparse.Namespace) -> int:
    generation = engine.start(prompt, _params(args))
    if args.json:
        completion = generation.completions()[0]
        print(json.dumps(completion.to_dict(), ensure_ascii=False))
        return 0
    out = sys.stdout
    shown = _printable if out.isatty() else (lambda text: text)
    for event in generation:
        if event.text:
            out.write(shown(event.text))
            out.flush()
    out.write("\n")
    out.flush()
    completion = generation.completions()[0]
    if completion.logprobs is not None:
        print(f"  {'token':>16} {'prob':>4}   alternatives (token prob), likeliest first", file=sys.stderr)
        for lp in completion.logprobs:
            alternatives = "  ".join(f"{t!r} {math.exp(v):.2f}" for _, t, v in lp.top)
            print(f"  {lp.token!r:>16} {lp.prob:.2f}   {alternatives}", file=sys.stderr)
    line = f"[{completion.finish_reason}] {completion.usage.line()}"
    if completion.cost:
        line += ", cost " + ", ".join(f"{c.amount:.6g} {c.currency} ({name})" for name, c in completion.cost.items())
    print(line, file=sys.stderr)
    return 0


def _printable(text: str) -> str:
    """Text for a terminal: control characters (an untrained model's ESC bytes ...) as visible escapes."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text)


def _cmd_generate(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        return _generate(engine, args.prompt, args)


def _cmd_chat(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.message})
        return _generate(engine, engine.apply_chat_template(messages), args)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .registry import Registry

    rows = Registry(_external_plugins(args)).listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['plugin']}  [{row['distribution']}]")
        for kind, names in row["provides"].items():
            print(f"    {kind:18} {', '.join(names)}")
        observed = [h for h in row["hooks"] if h.startswith("on_")]
        if observed:
            print(f"    {'observes':18} {', '.join(observed)}")
    return 0


def _cmd_memory(args: argparse.Namespace) -> int:
    from .memory import plan_memory

    capacity = int(args.capacity * (1 << 30)) if args.capacity is not None else None
    plan = plan_memory(args.model, batch=args.batch, context=args.context, dtype=args.dtype,
                       device=args.device, capacity=capacity)
    out = plan.to_dict()
    if args.measure:
        from .memory import measure_peak

        out["measured"] = measure_peak(args.model, args.batch, plan.context, threads=args.threads)
        out["measured"]["predicted_over_measured"] = plan.total_bytes / out["measured"]["peak_bytes"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(plan.table())
    if args.measure:
        m = out["measured"]
        print(f"{'measured peak':16} {m['peak_bytes'] / (1 << 30):.2f} GiB during generation, "
              f"{m['lifetime_peak_bytes'] / (1 << 30):.2f} GiB with loading "
              f"(predicted/measured {m['predicted_over_measured']:.2f})")
    return 0


def _cmd_import_genai(args: argparse.Namespace) -> int:
    from nextoken.exporters.genai import import_genai

    m = import_genai(args.source, args.output)
    print(f"imported {m.architecture} ({m.num_layers} layers, {m.num_kv_heads} KV heads x {m.head_dim}, {m.precision}, "
          f"padding {m.padding_side}) to {args.output}", file=sys.stderr)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        from .ray_serve import serve_ray

        serve_ray(args.package, host=args.host, port=args.port, replicas=args.replicas, threads=args.threads or 1,
                  max_batch=args.max_batch, api_key=args.api_key, model_name=args.model_name, device=args.device,
                  address=args.ray_address, scheduler_options=_scheduler_options(args), spin=args.spin, tf32=args.tf32)
        return 0
    from .server import serve

    serve(args.package, host=args.host, port=args.port, max_batch=args.max_batch, api_key=args.api_key,
          model_name=args.model_name, device=args.device, threads=args.threads,
          scheduler_options=_scheduler_options(args), spin=args.spin, tf32=args.tf32,
          header_timeout_s=args.header_timeout)
    return 0


def _scheduler_options(args: argparse.Namespace) -> dict:
    return {"max_prefill_tokens": args.max_prefill_tokens, "kv_backend": args.kv_backend,
            "slot_length": args.slot_length}


def _cmd_cost(args: argparse.Namespace) -> int:
    from .cost import per_answer_from_bench, per_answer_from_tokens, project

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
        per_answer = per_answer_from_tokens(args.prompt_tokens, args.completion_tokens,
                                            args.input_price or 0.0, args.output_price or 0.0)
        basis = {"prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
                 "input_per_million": args.input_price or 0.0, "output_per_million": args.output_price or 0.0}
    else:
        raise UsageError("give --per-answer, --input-price/--output-price with a token mix, or --bench FILE --hourly-rate")
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
        print(f"{'devices':14} {basis['devices_needed']:,.2f} busy all day at batch {basis['batch']} "
              f"({basis['tokens_per_s']:,.1f} tok/s measured)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench, run_compare

    if args.compare is not None:
        from .device import spin_policy

        contenders = [c.strip() for c in args.compare.split(",") if c.strip()]
        spin = args.spin
        if spin is None:            # one policy for every contender, decided once, here
            spin, why = spin_policy(args.threads or os.cpu_count())
            print(f"spin {'on' if spin else 'off'} for every contender ({why}; --spin/--no-spin to choose)",
                  file=sys.stderr)
        report = run_compare(args.package, contenders, batches=args.batch, prompt_tokens=args.prompt_tokens,
                             new_tokens=args.new, threads=args.threads, spin=spin, repeat=args.repeat,
                             peers_venv=args.peers_venv, precision=args.precision, checkpoint=args.checkpoint,
                             progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(report.table())
        if args.json:
            Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        if args.plot:
            from .bench import plot_compare

            print(f"chart: {plot_compare(report, args.plot)}", file=sys.stderr)
        return 0
    with _engine(args) as engine:
        report = run_bench(engine, batches=args.batch, prompt_tokens=args.prompt_tokens, new_tokens=args.new,
                           repeat=args.repeat, chain=args.chain)
    print(report.table())
    if report.hooks:
        print(report.hook_table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    if args.verify:                 # every file re-hashed, all that differ named (loading stops at the first)
        from .manifest import Manifest

        bad = Manifest.load(args.package).verify_files(args.package)
        if bad:
            raise NextokenError(f"{args.package} does not match its checksums: {', '.join(bad)}; re-export it")
    with _engine(args) as engine:
        m = engine.manifest
        files = {p.name: p.stat().st_size for p in sorted(engine.path.iterdir()) if p.is_file()}
        info = {
            "package": str(engine.path),
            "architecture": m.architecture,
            "layers": m.num_layers,
            "kv_heads": m.num_kv_heads,
            "head_dim": m.head_dim,
            "kv_dtype": m.kv_dtype,
            "precision": m.precision,
            "vocab_size": m.vocab_size,
            "context_length": m.context_length,
            "bos_token_id": m.bos_token_id,
            "eos_token_ids": list(m.eos_token_ids),
            "pad_token_id": m.pad_token_id,
            "tokenizer": m.tokenizer_file,
            "kv_bytes_per_token": m.kv_bytes_per_token(),
            "kv_bytes_full_context": m.kv_bytes_per_token() * m.context_length,
            "device": engine.device.device,
            "provider": engine.device.provider,
            "device_reason": engine.device.reason,
            "source": m.source,
            "exported_by": dict(m.exported_by),
            "parity": dict(m.parity) if m.parity else None,
            "verified_at_load": engine.verified,
            "files": files,
        }
        if args.verify:
            info["checksums"] = f"{len(m.checksums)} files verified"
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "files":
            value = ", ".join(f"{n} ({_size(s)})" for n, s in value.items())
        elif key == "exported_by":
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "parity" and value:
            value = (f"max |Δ logits| {value['max_abs_diff']:.2e} over {value['positions']} positions against "
                     f"{value.get('reference', 'PyTorch')} (tolerance {value['tolerance']:.1e}, {value['device']})")
        elif key.startswith("kv_bytes"):
            value = _size(value)
        print(f"{key:22} {value}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _cache_dir() -> Path:
    return Path(os.environ.get("NEXTOKEN_CACHE", Path.home() / ".cache" / "nextoken")).expanduser()


def _cmd_demo(args: argparse.Namespace) -> int:
    from nextoken.exporters import export
    from nextoken.exporters.hf import cache_key
    from nextoken.exporters.tiny import DEMO_CONFIG, make_tiny_checkpoint

    cache = _cache_dir()
    if args.source:
        source = args.source
        package = cache / "packages" / cache_key(source)
        label = source
    else:
        source = str(cache / "checkpoints" / "tiny-llama-untrained")
        label = "tiny-llama-untrained (random weights: no model given, so the text is noise)"
        if not (Path(source) / "config.json").is_file():
            print(f"nextoken: building an untrained tiny Llama in {source}", file=sys.stderr)
            make_tiny_checkpoint(source, "llama", **DEMO_CONFIG)
        package = cache / "packages" / cache_key(source)
    if args.force or not (package / "nextoken.json").is_file():
        export(source, package)
    print(f"nextoken: model {label}; package {package}", file=sys.stderr)
    args.package = package
    with _engine(args, package) as engine:
        print(f"nextoken: {engine.device.describe()}", file=sys.stderr)
        print(f"nextoken: prompt {args.prompt!r}", file=sys.stderr)
        return _generate(engine, args.prompt, args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextoken", description="Portable LLM inference on ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"nextoken {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def runtime_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto (default: CUDA when usable, else CPU), cpu, cuda, cuda:N")
        p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: 1 for a model under 16 MB, else one per physical core)")
        p.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                       help="thread spinning within a step: faster on a quiet host, slower on a busy one (default: "
                            "NEXTOKEN_SPIN when set, else on when the host's load leaves the threads their cores)")
        p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                       help="CUDA: fp32 matrix products in TensorFloat-32, faster and less exact (default: off, or NEXTOKEN_TF32)")

    def plugin_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plugins", default=None, metavar="all|none|A,B",
                       help="which entry-point plugins load (default: NEXTOKEN_PLUGINS, else all)")

    def generation_options(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
        p.add_argument("--json", action="store_true",
                       help="print one JSON object (text, token_ids, finish_reason, usage, cost, logprobs)")
        sampling_flags(p, max_new_tokens)
        plugin_options(p)

    p = sub.add_parser("export", help="export a Hugging Face model (hub id or local checkpoint) to a model package")
    p.add_argument("source", help="hub id (org/name) or local transformers checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="package directory to write")
    p.add_argument("--atol", type=float, default=None,
                   help="largest |ONNX - PyTorch| logits allowed (default 1e-3; fp16: 1%% of the largest |logit|)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32",
                   help="weights and KV cache precision (default fp32; fp16 is for CUDA hosts)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where PyTorch traces the model and the parity check runs (default cpu)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantise the weights (MatMulNBits blocks of 8 or 4 bits, int8 activations per row) "
                        "and report accuracy")
    p.add_argument("--block-size", type=int, default=32, help="quantisation block size (default 32)")
    p.add_argument("--backend", choices=("nextoken", "optimum", "genai"), default="nextoken",
                   help="nextoken (default): our own builder, fused operators, KV in place (llama, mistral, qwen2, "
                        "phi3, gemma, gpt2; fp32/fp16; optimum's graph, with a note, otherwise); optimum: optimum's "
                        "generic graph; genai: onnxruntime-genai's builder in its own venv")
    p.add_argument("--genai-python", default=None, metavar="PYTHON",
                   help="with --backend genai: the python of a virtual environment with onnxruntime-genai")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import-genai", help="make a package of a folder built by onnxruntime-genai's model builder")
    p.add_argument("source", help="the builder's output folder (genai_config.json, model.onnx ...)")
    p.add_argument("-o", "--output", required=True, help="package directory to write")
    p.set_defaults(func=_cmd_import_genai)

    p = sub.add_parser("generate", help="generate a continuation of PROMPT, streamed to stdout")
    p.add_argument("package", help="model package directory (from `nextoken export`)")
    p.add_argument("prompt", help="the prompt text")
    generation_options(p)
    runtime_options(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="one chat turn, with the model's chat template")
    p.add_argument("package", help="model package directory")
    p.add_argument("message", help="the user's message")
    p.add_argument("--system", default=None, help="a system message")
    generation_options(p)
    runtime_options(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("plugins", help="list every registered plugin, what it provides, where it came from")
    p.add_argument("--json", action="store_true", help="print JSON")
    plugin_options(p)
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("bench", help="measure prefill and decode speed, and time spent outside the model")
    p.add_argument("package", metavar="MODEL", help="model package (or, with --compare, a checkpoint or hub id)")
    p.add_argument("--batch", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8], metavar="1,8",
                   help="batch sizes (default 1,8)")
    p.add_argument("--prompt-tokens", type=_positive_int, default=128, metavar="N", help="prompt length (default 128)")
    p.add_argument("--new", type=_positive_int, default=128, metavar="N", help="tokens to generate (default 128)")
    p.add_argument("--repeat", type=_positive_int, default=3, metavar="N", help="runs per setting; medians (default 3)")
    p.add_argument("--chain", action="store_true",
                   help="also run the full built-in chain (temperature, top-k, top-p, repetition penalty, 2 stop strings)")
    p.add_argument("--compare", default=None, metavar="optimum,transformers,genai,llamacpp",
                   help="also run these from the same checkpoint, each in its own process, alternating")
    p.add_argument("--precision", choices=("fp32", "int8", "int4"), default="fp32",
                   help="with --compare: nextoken's package quantised so (nextoken export --quantize), genai's built so")
    p.add_argument("--checkpoint", default=None, help="with --compare: the checkpoint the peers start from "
                   "(default: the one the package records)")
    p.add_argument("--peers-venv", default=None, metavar="DIR",
                   help="virtual environment with onnxruntime-genai (default: NEXTOKEN_CACHE/peers/genai-venv)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="with --compare: draw decode tok/s and TTFT by contender and batch (extra: plot)")
    runtime_options(p)
    plugin_options(p)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("memory", help="plan memory: weights + working memory + KV cache, against a capacity")
    p.add_argument("model", help="model package, checkpoint directory, config.json, or hub id (config only)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences at once (default 1)")
    p.add_argument("--context", type=_positive_int, default=None, help="tokens per sequence (default: the window)")
    p.add_argument("--dtype", default=None, help="weights precision: fp32, fp16, bf16, int8, int4 (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--capacity", type=float, default=None, metavar="GIB",
                   help="memory available, GiB (default: the host's RAM, or the GPU's)")
    p.add_argument("--measure", action="store_true",
                   help="also load the package on the CPU, generate at this batch and context, and measure the peak")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for --measure")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_memory)

    p = sub.add_parser("serve", help="serve a package over an OpenAI-compatible HTTP API (extra: serve)")
    p.add_argument("package", help="model package directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=_positive_int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--max-prefill-tokens", type=_positive_int, default=4096,
                   help="prompt tokens prefilled a step; longer prompts go in chunks (default 4096)")
    p.add_argument("--kv-backend", choices=("auto", "concat", "slots"), default="auto",
                   help="KV cache under batching: auto (slots for GroupQueryAttention graphs), concat, slots")
    p.add_argument("--slot-length", type=_positive_int, default=None,
                   help="with slots: positions per slot (default: the window, at most 2048)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the package folder's name)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection that has not sent a complete request head in this time (default 10)")
    p.add_argument("--ray", action="store_true", help="scale out on Ray Serve (extra: ray): one engine per replica")
    p.add_argument("--replicas", type=_positive_int, default=2, help="with --ray: replicas (default 2)")
    p.add_argument("--ray-address", default=None, help="with --ray: join this cluster instead of starting Ray locally")
    runtime_options(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("cost", help="project a workload's cost: per answer, per day, per month, per year")
    p.add_argument("--requests-per-day", type=float, required=True, metavar="N", help="answers a day")
    p.add_argument("--per-answer", type=float, default=None, metavar="USD", help="a given cost per answer")
    p.add_argument("--prompt-tokens", type=float, default=500, metavar="N", help="tokens in, per answer (default 500)")
    p.add_argument("--completion-tokens", type=float, default=200, metavar="N", help="tokens out, per answer (default 200)")
    p.add_argument("--input-price", type=float, default=None, metavar="USD", help="price per million input tokens")
    p.add_argument("--output-price", type=float, default=None, metavar="USD", help="price per million output tokens")
    p.add_argument("--bench", default=None, metavar="FILE", help="a `nextoken bench --json` file: measured throughput")
    p.add_argument("--hourly-rate", type=float, default=None, metavar="USD", help="the device's price per hour (with --bench)")
    p.add_argument("--batch", type=int, default=None, help="the bench batch to cost (default: the fastest)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_cost)

    p = sub.add_parser("info", help="what a model package holds and where it would run")
    p.add_argument("package", help="model package directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verify", action="store_true", help="re-hash every file against the manifest's checksums")
    runtime_options(p)
    plugin_options(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="export a model (default: an untrained tiny Llama, no download) and generate")
    p.add_argument("source", nargs="?", default=None, help="hub id or local checkpoint (default: untrained tiny Llama)")
    p.add_argument("--prompt", default="Once upon a time", help="prompt (default: 'Once upon a time')")
    p.add_argument("--force", action="store_true", help="export again even if the package is cached")
    generation_options(p, max_new_tokens=64)
    runtime_options(p)
    p.set_defaults(func=_cmd_demo)
    parser.set_defaults(commands=dict(sub.choices))      # each command's own parser, for its usage on errors
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "commands", {}).get(args.command, parser)
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")      # the command's usage, exit 2
    try:
        return args.func(args)
    except UsageError as exc:
        command.print_usage(sys.stderr)
        print(f"nextoken {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NextokenError as exc:
        print(f"nextoken: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("nextoken: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
