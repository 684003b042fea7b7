"""What every command shares: errors and exit codes, the engine a command opens, the flags of the
runtime, the plugins and generation (those generated from :class:`~nextoken.SamplingParams`), and
printing a generation."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import NextokenError

EXIT_ERROR = 1
#: a command line that cannot work as given (argparse's own status for usage errors)
EXIT_USAGE = 2


class UsageError(NextokenError):
    """The command line is incomplete or contradictory: the command's usage is printed, exit 2."""


def external_plugins(args: argparse.Namespace):
    value = getattr(args, "plugins", None)
    if value is None:
        return None
    if value.strip().lower() == "none":
        return False
    if value.strip().lower() in ("all", "*"):
        return True
    return [v.strip() for v in value.split(",") if v.strip()]


def open_engine(args: argparse.Namespace, package=None):
    from ..engine import Engine

    return Engine(
        package or args.package,
        device=args.device,
        threads=args.threads,
        spin=args.spin,
        plugins=external_plugins(args),
        cost_meters=meters_of(args),
        tf32=args.tf32,
        **prefix_cache_of(args),
        **chat_template_of(args),
    )


def chat_template_of(args: argparse.Namespace) -> dict:
    """``--chat-template FILE`` as the Engine's ``chat_template`` (none when absent)."""
    path = getattr(args, "chat_template", None)
    if path is None:
        return {}
    try:
        return {"chat_template": Path(path).read_text()}
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--chat-template {path}: {getattr(exc, 'strerror', None) or exc}") from None


def chat_template_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template to use instead of the package's",
    )


def prefix_cache_of(args: argparse.Namespace) -> dict:
    """The prefix-cache flags (:func:`prefix_cache_options`) as Engine arguments (none when absent)."""
    if getattr(args, "prefix_cache_mb", None) is None:  # serve's default: sized by the server
        dir_ = getattr(args, "prefix_cache_dir", None)
        return (
            {}
            if dir_ is None
            else {"prefix_cache_dir": dir_, "prefix_cache_disk_bytes": int(args.prefix_cache_disk_mb * (1 << 20))}
        )
    return {
        "prefix_cache_bytes": int(args.prefix_cache_mb * (1 << 20)),
        "prefix_cache_dir": args.prefix_cache_dir,
        "prefix_cache_disk_bytes": int(args.prefix_cache_disk_mb * (1 << 20)),
    }


def option_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def options_of(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in getattr(args, "options", None) or []:
        name, sep, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not (sep and eq and name and key):
            raise NextokenError(
                f"--option {item!r} must look like NAME.KEY=VALUE (e.g. per_token.input_per_million=0.15)"
            )
        out.setdefault(name, {})[key] = option_value(value)
    return out


def meters_of(args: argparse.Namespace) -> dict[str, dict]:
    options = options_of(args)
    return {name: options.get(name, {}) for name in getattr(args, "cost_meters", None) or []}


def logit_bias_of(items: list[str] | None) -> dict[int, float]:
    """``--logit-bias ID=BIAS`` (repeatable) as a dict; a malformed one is an InvalidRequestError."""
    from ..errors import InvalidRequestError

    out: dict[int, float] = {}
    for item in items or ():
        token, _sep, bias = item.partition("=")
        try:
            out[int(token)] = float(bias)
        except ValueError:
            raise InvalidRequestError(f"--logit-bias takes ID=BIAS (e.g. 50256=-100), not {item!r}") from None
    return out


def flagged_fields() -> list:
    """SamplingParams' fields that have a CLI flag, with the flag."""
    from ..types import SamplingParams

    return [
        (f, f.metadata["flag"] or "--" + f.name.replace("_", "-"))
        for f in dataclasses.fields(SamplingParams)
        if f.metadata.get("flag") is not None
    ]


def sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """One flag per SamplingParams field, generated from the field: its type, default, doc, metavar, choices."""
    for f, flag in flagged_fields():
        default = f.default_factory() if callable(f.default_factory) else f.default
        doc = f.metadata["doc"]
        kw: dict = {"dest": f.name, "metavar": f.metadata["metavar"], "help": doc}
        if f.name == "max_new_tokens":
            default = max_new_tokens
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", dest=f.name, help=doc)
            continue
        kind: Callable[[str], Any]
        if isinstance(default, (tuple, dict)):  # repeatable: items, or NAME=VALUE pairs
            kind = int if "int" in str(f.type).split("[")[-1] and "tuple" in str(f.type) else str
            p.add_argument(flag, action="append", type=kind, **kw)
            continue
        hint = str(f.type)
        kind = int if hint.startswith("int") else float if hint.startswith("float") else str
        if f.name == "max_new_tokens":
            kind = positive_int
        p.add_argument(
            flag,
            type=kind,
            default=default,
            choices=f.metadata["choices"],
            **{**kw, "help": f"{doc} (default {default})" if default not in (None, "") else doc},
        )


def params_of(args: argparse.Namespace):
    """SamplingParams from the flags :func:`sampling_flags` made."""
    from ..types import SamplingParams

    options = options_of(args)
    meters = getattr(args, "cost_meters", None) or []
    special = {
        "logit_bias": lambda items: logit_bias_of(items),
        "response_format": lambda path: path and _schema_file(path),
        "grammar": lambda path: path and _read(path, "--grammar"),
        "speculative": lambda text: text and speculative_of(text),
        "options": lambda items: {k: v for k, v in options.items() if k not in meters},
        "cost_meters": lambda items: {},
    }
    kwargs = {}
    for f, _ in flagged_fields():
        value = getattr(args, f.name)
        if f.name in special:
            value = special[f.name](value)
        elif isinstance(f.default, tuple):
            value = tuple(value or ())
        kwargs[f.name] = value
    return SamplingParams(**kwargs)


def _read(path: str, flag: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None


def speculative_of(text: str) -> dict:
    """``--speculative METHOD[:K[:MODEL]]`` as SamplingParams.speculative (MODEL: a draft package)."""
    method, _, rest = text.partition(":")
    k, _, model = rest.partition(":")
    try:
        return {"method": method, **({"k": int(k)} if k else {}), **({"model": model} if model else {})}
    except ValueError:
        raise UsageError(
            f"--speculative takes METHOD[:K[:MODEL]] (e.g. prompt_lookup:4, draft:4:path/to/small-package), "
            f"not {text!r}"
        ) from None


def _schema_file(path: str) -> dict:
    """``--json-schema FILE`` as a response_format."""
    try:
        schema = json.loads(_read(path, "--json-schema"))
    except ValueError as exc:
        raise UsageError(f"--json-schema {path} is not JSON: {exc}") from None
    return {"type": "json_schema", "json_schema": {"name": Path(path).stem, "schema": schema}}


def generate(engine, prompt, args: argparse.Namespace) -> int:
    """Print a generation: streamed (one choice), each choice in turn (``--n`` > 1), or JSON
    (one object; a list of them with ``--n`` > 1); usage and cost on stderr."""
    generation = engine.start(prompt, params_of(args))
    n = generation.params.n
    code = _print_generation(engine, generation, args)
    if getattr(args, "record", None):  # after the text: the record reads the finished request
        from ..records import records_of

        records = records_of(engine, generation)
        Path(args.record).write_text(json.dumps(records[0] if n == 1 else records, indent=1) + "\n")
        print(f"nextoken: record written to {args.record} (it holds the prompt)", file=sys.stderr)
    return code


def _print_generation(engine, generation, args: argparse.Namespace) -> int:
    n = generation.params.n
    if args.json:
        dicts = [c.to_dict() for c in engine.complete(generation)]
        print(json.dumps(dicts[0] if n == 1 else dicts, ensure_ascii=False))
        return 0
    out = sys.stdout
    shown = printable if out.isatty() else (lambda text: text)
    for event in engine.run(generation):
        if n == 1 and event.text:
            out.write(shown(event.text))
            out.flush()
    if n == 1:
        out.write("\n")
        out.flush()
    for index, completion in enumerate(generation.completions()):
        if n > 1:
            print(f"[choice {index}] {shown(completion.text)}", flush=True)
        if completion.logprobs is not None:
            print(f"  {'token':>16} {'prob':>4}   alternatives (token prob), likeliest first", file=sys.stderr)
            for lp in completion.logprobs:
                alternatives = "  ".join(f"{t!r} {math.exp(v):.2f}" for _, t, v in lp.top)
                print(f"  {lp.token!r:>16} {lp.prob:.2f}   {alternatives}", file=sys.stderr)
        line = f"[{completion.finish_reason}] {completion.usage.line()}"
        if completion.cost:
            line += ", cost " + ", ".join(
                f"{c.amount:.6g} {c.currency} ({name})" for name, c in completion.cost.items()
            )
        print(line, file=sys.stderr)
    return 0


def printable(text: str) -> str:
    """Text for a terminal: control characters (an untrained model's ESC bytes ...) as visible escapes."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text)


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def cache_dir() -> Path:
    return Path(os.environ.get("NEXTOKEN_CACHE", Path.home() / ".cache" / "nextoken")).expanduser()


def _within(text: str, kind: type, ok, what: str):
    """``text`` as ``kind`` when ``ok`` of it (and finite), else argparse's error saying it must be ``what``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not ok(value) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text}")
    return value


def positive_int(text: str) -> int:
    return _within(text, int, lambda v: v >= 1, ">= 1")


def positive_float(text: str) -> float:
    return _within(text, float, lambda v: v > 0, "a positive number")


def nonnegative_float(text: str) -> float:
    return _within(text, float, lambda v: v >= 0, "a number >= 0")


def port(text: str) -> int:
    return _within(text, int, lambda v: 0 <= v <= 65535, "a port between 0 and 65535")


def runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (default: CUDA when usable, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: 1 for a model under 16 MB, else one per physical core)",
    )
    p.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="thread spinning within a step: faster on a quiet host, slower on a busy one (default: "
        "NEXTOKEN_SPIN when set, else on when the host's load leaves the threads their cores)",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA: fp32 matrix products in TensorFloat-32, faster and less exact (default: off, or NEXTOKEN_TF32)",
    )


def prefix_cache_options(p: argparse.ArgumentParser, serving: bool = False) -> None:
    default = "a quarter of the memory free after the plan, at most 4 GiB; 0: off" if serving else "0: off"
    p.add_argument(
        "--prefix-cache-mb",
        type=nonnegative_float,
        default=None if serving else 0,
        metavar="MB",
        help=f"reuse the KV cache of prompt prefixes across requests, up to this many MiB (default {default})",
    )
    p.add_argument(
        "--prefix-cache-dir",
        default=None,
        metavar="DIR",
        help="with --prefix-cache-mb: also keep them on disk here, for later runs of the same package",
    )
    p.add_argument(
        "--prefix-cache-disk-mb",
        type=positive_float,
        default=1024,
        metavar="MB",
        help="with --prefix-cache-dir: at most this many MiB of files (default 1024)",
    )


def plugin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugins",
        default=None,
        metavar="all|none|A,B",
        help="which entry-point plugins load (default: NEXTOKEN_PLUGINS, else all)",
    )


def generation_options(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (text, token_ids, finish_reason, usage, cost, logprobs)",
    )
    p.add_argument(
        "--record",
        default=None,
        metavar="FILE",
        help="write the request's record (it holds the prompt) for `nextoken replay`",
    )
    sampling_flags(p, max_new_tokens)
    plugin_options(p)
