"""Commands about model packages: export, import-genai, info, plugins."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import NextokenError
from .common import external_plugins, open_engine, plugin_options, runtime_options, size


def _cmd_export(args: argparse.Namespace) -> int:
    from nextoken.exporters import export

    export(
        args.source,
        args.output,
        atol=args.atol,
        check=not args.no_check,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        block_size=args.block_size,
        backend=args.backend,
        genai_python=args.genai_python,
        task=args.task,
        pooling=args.pooling,
        normalize=args.normalize,
        truncatable=args.truncatable,
        kv_dtype=args.kv_dtype,
        lora_adapters=args.lora_adapters,
        lora_rank=args.lora_rank,
        lora_targets=args.lora_targets.split(",") if args.lora_targets else None,
    )
    return 0


def _cmd_adapter(args: argparse.Namespace) -> int:
    from nextoken.exporters.adapters import make_adapter

    out = make_adapter(args.peft_dir, args.package, args.output)
    print(f"adapter for {args.package} written to {out}", file=sys.stderr)
    return 0


def _cmd_import_genai(args: argparse.Namespace) -> int:
    from nextoken.exporters.genai import import_genai

    m = import_genai(args.source, args.output)
    print(
        f"imported {m.architecture} ({m.num_layers} layers, {m.num_kv_heads} KV heads x {m.head_dim}, {m.precision}, "
        f"padding {m.padding_side}) to {args.output}",
        file=sys.stderr,
    )
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from ..registry import Registry

    rows = Registry(external_plugins(args)).listing()
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


def _cmd_info(args: argparse.Namespace) -> int:
    if args.placement:  # where each node runs, and what fell back
        from ..tools.placement import placement

        report = placement(args.package, args.device, args.threads)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
        return 0
    if args.verify:  # every file re-hashed, all that differ named (loading stops at the first)
        from ..manifest import Manifest

        bad = Manifest.load(args.package).verify_files(args.package)
        if bad:
            raise NextokenError(f"{args.package} does not match its checksums: {', '.join(bad)}; re-export it")
    with open_engine(args) as engine:
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
            "route": m.route,
            "exported_by": dict(m.exported_by),
            "parity": dict(m.parity) if m.parity else None,
            "lora": dict(m.lora) if m.lora else None,  # adapters it takes: how many, rank, targets
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
            value = ", ".join(f"{n} ({size(s)})" for n, s in value.items())
        elif key == "exported_by":
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif key == "parity" and value:
            value = (
                f"max |Δ logits| {value['max_abs_diff']:.2e} over {value['positions']} positions against "
                f"{value.get('reference', 'PyTorch')} (tolerance {value['tolerance']:.1e}, {value['device']})"
            )
        elif key.startswith("kv_bytes"):
            value = size(value)
        print(f"{key:22} {value}")
    return 0


def add_commands(sub) -> None:
    """Add this group's commands to the CLI."""
    p = sub.add_parser("export", help="export a Hugging Face model (hub id or local checkpoint) to a model package")
    p.add_argument("source", help="hub id (org/name) or local transformers checkpoint directory")
    p.add_argument("-o", "--output", required=True, help="package directory to write")
    p.add_argument(
        "--atol",
        type=float,
        default=None,
        help="largest |ONNX - PyTorch| logits allowed (default 1e-3; fp16: 1%% of the largest |logit|)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="weights and KV cache precision (default fp32; fp16 is for CUDA hosts)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where PyTorch traces the model and the parity check runs (default cpu)",
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="quantise the weights (MatMulNBits blocks of 8 or 4 bits, int8 activations per row) and report accuracy",
    )
    p.add_argument("--block-size", type=int, default=32, help="quantisation block size (default 32)")
    p.add_argument(
        "--backend",
        choices=("nextoken", "optimum", "genai"),
        default="nextoken",
        help="nextoken (default): our own builder, fused operators, KV in place (llama, mistral, qwen2, "
        "phi3, gemma, gpt2; fp32/fp16; optimum's graph, with a note, otherwise); optimum: optimum's "
        "generic graph; genai: onnxruntime-genai's builder in its own venv",
    )
    p.add_argument(
        "--genai-python",
        default=None,
        metavar="PYTHON",
        help="with --backend genai: the python of a virtual environment with onnxruntime-genai",
    )
    p.add_argument(
        "--kv-dtype",
        choices=("int8", "int4"),
        default=None,
        help="keep the KV cache in int8 (a quarter of fp32's bytes) or int4 (an eighth); scales calibrated "
        "at export, accuracy against the fp32 cache reported",
    )
    p.add_argument(
        "--task",
        choices=("generate", "embed"),
        default="generate",
        help="generate (default): text, over a KV cache; embed: one vector a text (Engine.embed, /v1/embeddings)",
    )
    p.add_argument(
        "--pooling",
        choices=("last", "mean", "cls"),
        default=None,
        help="with --task embed: how hidden states become a vector (default: the checkpoint's "
        "sentence-transformers config, else last)",
    )
    p.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --task embed: unit vectors (default: as the sentence-transformers config says, else yes)",
    )
    p.add_argument(
        "--truncatable",
        action="store_true",
        help="with --task embed: the model is trained for shorter vectors (Matryoshka), so requests may ask for fewer dimensions",
    )
    p.add_argument(
        "--lora-adapters",
        type=int,
        default=0,
        metavar="N",
        help="the graph takes up to N LoRA adapters at once, chosen per request (rows with different "
        "adapters in one batch; nextoken adapter makes them)",
    )
    p.add_argument(
        "--lora-rank", type=int, default=16, metavar="R", help="with --lora-adapters: the most rank an adapter may have"
    )
    p.add_argument(
        "--lora-targets",
        default=None,
        metavar="LIST",
        help="with --lora-adapters: the projections adapters may train, of q,k,v,o,gate,up,down (default q,k,v,o)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("adapter", help="make a PEFT LoRA checkpoint into an adapter for a package that takes them")
    p.add_argument("peft_dir", help="the PEFT checkpoint's folder (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--package", required=True, help="the package it is for (exported with --lora-adapters)")
    p.add_argument("-o", "--output", required=True, help="adapter folder to write")
    p.set_defaults(func=_cmd_adapter)

    p = sub.add_parser("import-genai", help="make a package of a folder built by onnxruntime-genai's model builder")
    p.add_argument("source", help="the builder's output folder (genai_config.json, model.onnx ...)")
    p.add_argument("-o", "--output", required=True, help="package directory to write")
    p.set_defaults(func=_cmd_import_genai)

    p = sub.add_parser("plugins", help="list every registered plugin, what it provides, where it came from")
    p.add_argument("--json", action="store_true", help="print JSON")
    plugin_options(p)
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("info", help="what a model package holds and where it would run")
    p.add_argument("package", help="model package directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verify", action="store_true", help="re-hash every file against the manifest's checksums")
    p.add_argument(
        "--placement",
        action="store_true",
        help="which execution provider runs each node, the time share of each, and the fallbacks "
        "(one prefill and one decode step, profiled; --json: every node)",
    )
    runtime_options(p)
    plugin_options(p)
    p.set_defaults(func=_cmd_info)
