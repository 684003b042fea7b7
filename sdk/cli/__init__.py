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
import sys
from collections.abc import Sequence

from ..errors import NextokenError
from . import measure, models, run
from .common import EXIT_ERROR, EXIT_USAGE, UsageError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextoken", description="Portable LLM inference on ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"nextoken {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (models, run, measure):
        group.add_commands(sub)
    parser.set_defaults(commands=dict(sub.choices))  # each command's own parser, for its usage on errors
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "commands", {}).get(args.command, parser)
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")  # the command's usage, exit 2
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
