"""Commands that run a model: generate, chat, demo, serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..serving.constraints import BUDGET_S
from .common import (
    UsageError,
    cache_dir,
    chat_template_of,
    chat_template_option,
    generate,
    generation_options,
    open_engine,
    port,
    positive_float,
    positive_int,
    prefix_cache_of,
    prefix_cache_options,
    runtime_options,
    speculative_of,
)


def _cmd_generate(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        return generate(engine, args.prompt, args)


def _cmd_chat(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": args.message})
        return generate(engine, engine.apply_chat_template(messages), args)


def _named_paths(items: list[str] | None, flag: str, what: str) -> dict[str, str]:
    """``NAME=PATH`` flags as ``{name: path}``, or the usage error naming the flag."""
    out = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag} takes NAME=PATH ({what}), not {item!r}")
        out[name] = path
    return out


def _cmd_serve(args: argparse.Namespace) -> int:
    from ..serving.server import ServeOptions

    drafts = _named_paths(args.draft, "--draft", "a name requests use, a package's path")
    speculative = args.speculative and speculative_of(args.speculative)
    if speculative and "model" in speculative and speculative["model"] not in drafts:
        path = speculative["model"]  # a path: offered under its folder's name
        speculative["model"] = Path(path).name or path
        drafts.setdefault(speculative["model"], path)
    options = ServeOptions(
        api_key=args.api_key,
        speculative=speculative or None,
        drafts=drafts,
        record_dir=args.record_dir,
        constraint_budget_s=args.constraint_budget,
        max_tokens_default=args.max_tokens_default,
        reasoning_parser=args.reasoning_parser,
        tool_parser=args.tool_parser,
        chat_template_name=Path(args.chat_template).name if args.chat_template else None,
        runtime_adapters=args.runtime_adapters,
    )
    engine_options = {
        "device": args.device,
        "threads": args.threads,
        "spin": args.spin,
        "tf32": args.tf32,
        **prefix_cache_of(args),
        **chat_template_of(args),
    }
    if args.runtime_adapters and not args.api_key:
        raise UsageError("--runtime-adapters lets clients load files by path: give the server an --api-key too")
    adapters = _named_paths(args.lora_modules, "--lora-modules", "the model name requests use, an adapter folder")
    if len(args.package) != 1 or args.models_dir is not None:
        return _serve_models(args, options, engine_options, adapters)
    if adapters:
        engine_options["adapters"] = adapters
    for flag, given in (("--memory-budget-mb", args.memory_budget_mb), ("--pin", args.pin)):
        if given is not None:
            raise UsageError(f"{flag} is for several models (nextoken serve PKG PKG ..., or --models-dir)")
    if args.ray:
        from ..serving.ray_serve import serve_ray

        if args.header_timeout is not None:
            raise UsageError("--header-timeout is not taken with --ray: Ray Serve's HTTP proxy reads the requests")
        engine_options["threads"] = args.threads or 1
        serve_ray(
            args.package[0],
            host=args.host,
            port=args.port,
            replicas=args.replicas,
            max_batch=args.max_batch,
            model_name=args.model_name,
            address=args.ray_address,
            engine_options=engine_options,
            scheduler_options=_scheduler_options(args),
            options=options,
            metrics_port=args.ray_metrics_port,
            metrics_interval=args.ray_metrics_interval,
        )
        return 0
    from ..serving.server import serve

    serve(args.package[0], model_name=args.model_name, **_http_options(args, options, engine_options))
    return 0


def _http_options(args: argparse.Namespace, options, engine_options: dict) -> dict:
    """What serving one model and several over HTTP take alike."""
    return {
        "host": args.host,
        "port": args.port,
        "max_batch": args.max_batch,
        "engine_options": engine_options,
        "scheduler_options": _scheduler_options(args),
        "options": options,
        "header_timeout_s": 10.0 if args.header_timeout is None else args.header_timeout,
    }


def _serve_models(args: argparse.Namespace, options, engine_options: dict, adapters: dict[str, str]) -> int:
    from ..errors import InvalidRequestError
    from ..serving.router import models_in, serve_models

    given = {
        "--ray": args.ray,
        "--draft": args.draft,
        "--speculative": args.speculative,
        "--chat-template": args.chat_template,
        "--served-model-name": args.model_name,
        "--runtime-adapters": args.runtime_adapters,
    }
    for flag, value in given.items():
        if value:
            raise UsageError(f"{flag} is for one model; with several, each is served as its package says")
    try:
        models = models_in(args.package, args.models_dir)
    except InvalidRequestError as exc:
        raise UsageError(str(exc)) from None
    if not models:
        raise UsageError("serve needs a package (nextoken serve PKG), several, or --models-dir DIR")
    serve_models(
        models,
        budget=None if args.memory_budget_mb is None else args.memory_budget_mb << 20,
        pinned=tuple(args.pin or ()),
        wait_s=args.load_timeout,
        adapters=adapters,
        **_http_options(args, options, engine_options),
    )
    return 0


def _scheduler_options(args: argparse.Namespace) -> dict:
    return {
        "max_prefill_tokens": args.max_prefill_tokens,
        "kv_backend": args.kv_backend,
        "slot_length": args.slot_length,
        "paged_slots": args.paged_slots,
        "kv_budget": None if args.kv_budget_mb is None else args.kv_budget_mb << 20,
        "priority_aging": None if args.priority_aging == 0 else args.priority_aging,
    }


def _cmd_demo(args: argparse.Namespace) -> int:
    from nextoken.exporters import export
    from nextoken.exporters.hf import cache_key
    from nextoken.exporters.tiny import DEMO_CONFIG, make_tiny_checkpoint

    cache = cache_dir()
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
    with open_engine(args, package) as engine:
        print(f"nextoken: {engine.device.describe()}", file=sys.stderr)
        print(f"nextoken: prompt {args.prompt!r}", file=sys.stderr)
        return generate(engine, args.prompt, args)


def _cmd_replay(args: argparse.Namespace) -> int:
    from ..tools.replay import replay_all

    reports = replay_all(args.record, package=args.package)
    if args.json:
        dicts = [r.to_dict() for r in reports]
        print(json.dumps(dicts[0] if len(dicts) == 1 else dicts, indent=2))
    else:
        for i, report in enumerate(reports):
            print(report.line() if len(reports) == 1 else f"[choice {i}] {report.line()}")
    return 0 if all(r.identical for r in reports) else 3


def add_commands(sub) -> None:
    """Add this group's commands to the CLI."""
    p = sub.add_parser("replay", help="run a request's record again: the same tokens, or where and why they differ")
    p.add_argument("record", help="a record (generate --record FILE, or the server's --record-dir)")
    p.add_argument("--package", default=None, help="replay on this package instead of the recorded one")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("generate", help="generate a continuation of PROMPT, streamed to stdout")
    p.add_argument("package", help="model package directory (from `nextoken export`)")
    p.add_argument("prompt", help="the prompt text")
    generation_options(p)
    runtime_options(p)
    prefix_cache_options(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="one chat turn, with the model's chat template")
    p.add_argument("package", help="model package directory")
    p.add_argument("message", help="the user's message")
    p.add_argument("--system", default=None, help="a system message")
    chat_template_option(p)
    generation_options(p)
    runtime_options(p)
    prefix_cache_options(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("serve", help="serve packages over an OpenAI-compatible HTTP API (extra: serve)")
    p.add_argument(
        "package",
        nargs="*",
        help="model package directory; several (each PATH or NAME=PATH) serve each under its name, loaded "
        "and unloaded within --memory-budget-mb",
    )
    p.add_argument(
        "--models-dir",
        default=None,
        metavar="DIR",
        help="serve every package folder in DIR too, each under its folder's name",
    )
    p.add_argument(
        "--memory-budget-mb",
        type=positive_int,
        default=None,
        metavar="MB",
        help="with several models: what the loaded ones may hold together, as the memory planner counts "
        "(default: the memory free at start); the least recently used idle one unloads to make room",
    )
    p.add_argument(
        "--pin",
        action="append",
        default=None,
        metavar="NAME",
        help="with several models: load this one at start and never unload it (repeatable)",
    )
    p.add_argument(
        "--load-timeout",
        type=positive_float,
        default=120.0,
        metavar="SECONDS",
        help="with several models: how long a request waits for its model to load, and for room (default 120)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=8, help="sequences decoded together (default 8)")
    p.add_argument(
        "--max-prefill-tokens",
        type=positive_int,
        default=None,
        help="prompt tokens prefilled a step; longer prompts go in chunks (default 4096; 256 on the CPU with "
        "slots; 512 for an int8 KV cache)",
    )
    p.add_argument(
        "--kv-backend",
        choices=("auto", "concat", "slots"),
        default="auto",
        help="KV cache under batching: auto (slots for GroupQueryAttention graphs), concat, slots",
    )
    p.add_argument(
        "--slot-length",
        type=positive_int,
        default=None,
        help="with slots: positions per slot (default: the window with paged slots, else at most 2048)",
    )
    p.add_argument(
        "--paged-slots",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="slots hold only the pages their requests write, so KV memory follows what is held "
        "(default: on, on the CPU; GPUs allocate the slots whole)",
    )
    p.add_argument(
        "--kv-budget-mb",
        type=positive_int,
        default=None,
        metavar="MB",
        help="KV cache the running requests may reach together; admission waits for room "
        "(default with paged slots: half the memory available, at most the slots' whole size)",
    )
    p.add_argument(
        "--priority-aging",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds of waiting that raise a request's rank one priority level, so a low priority is "
        "delayed, never starved (default 5; 0: strict priorities)",
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument(
        "--served-model-name",
        "--model-name",
        dest="model_name",
        default=None,
        help="the model id clients use (default: the package folder's name)",
    )
    chat_template_option(p)
    p.add_argument(
        "--reasoning-parser",
        default="auto",
        metavar="auto|none|NAME",
        help="split chat answers' thinking into reasoning_content (default auto: think for a template "
        "that closes a think tag)",
    )
    p.add_argument(
        "--tool-parser",
        default="auto",
        metavar="auto|hermes|llama3_json|mistral|NAME",
        help="the format tool calls are written and constrained in (default auto: the chat template's)",
    )
    p.add_argument(
        "--max-tokens-default",
        type=positive_int,
        default=None,
        metavar="N",
        help="the most a chat answer gets when its request sets no max_tokens (default: what the window leaves)",
    )
    p.add_argument(
        "--speculative",
        default=None,
        metavar="METHOD[:K[:MODEL]]",
        help="speculative decoding for requests that do not ask otherwise, e.g. prompt_lookup:4; MODEL a "
        "--draft name, or a path (offered under its folder's name)",
    )
    p.add_argument(
        "--lora-modules",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a LoRA adapter (made by nextoken adapter) loaded at start, served as model NAME beside the "
        "package's own name; repeatable (the package must take adapters: export --lora-adapters); with "
        "several models, each goes with the package it was made for",
    )
    p.add_argument(
        "--runtime-adapters",
        action="store_true",
        help="let clients with the API key load and unload adapters by path (POST /v1/load_lora_adapter, "
        "/v1/unload_lora_adapter)",
    )
    p.add_argument(
        "--draft",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a draft package requests may name (nextoken.speculative.model: NAME), loaded at start; "
        "repeatable. Requests never name paths",
    )
    p.add_argument(
        "--constraint-budget",
        type=positive_float,
        default=BUDGET_S,
        metavar="SECONDS",
        help="the longest a request's grammar or schema may take to compile, in a checker process "
        f"(default {BUDGET_S:g})",
    )
    p.add_argument(
        "--record-dir",
        default=None,
        metavar="DIR",
        help="write every request's record here, for `nextoken replay` (they hold prompts: protect DIR)",
    )
    p.add_argument(
        "--header-timeout",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="close a connection that has not sent a complete request head in this time (default 10)",
    )
    p.add_argument("--ray", action="store_true", help="scale out on Ray Serve (extra: ray): one engine per replica")
    p.add_argument("--replicas", type=positive_int, default=2, help="with --ray: replicas (default 2)")
    p.add_argument("--ray-address", default=None, help="with --ray: join this cluster instead of starting Ray locally")
    p.add_argument(
        "--ray-metrics-port",
        type=port,
        default=None,
        metavar="PORT",
        help="with --ray, Ray started here: serve Ray's metrics export (every replica's metrics) on this port",
    )
    p.add_argument(
        "--ray-metrics-interval",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="with --ray: seconds between two copies of a replica's metrics into Ray's export (default 5)",
    )
    runtime_options(p)
    prefix_cache_options(p, serving=True)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="export a model (default: an untrained tiny Llama, no download) and generate")
    p.add_argument("source", nargs="?", default=None, help="hub id or local checkpoint (default: untrained tiny Llama)")
    p.add_argument("--prompt", default="Once upon a time", help="prompt (default: 'Once upon a time')")
    p.add_argument("--force", action="store_true", help="export again even if the package is cached")
    generation_options(p, max_new_tokens=64)
    runtime_options(p)
    p.set_defaults(func=_cmd_demo)
