"""The ``nextoken`` command line. Errors are one line on stderr and a non-zero exit, never a traceback.

Every command and flag: ``nextoken COMMAND --help``, or docs/cli.md, whose synopsis is
:func:`reference` (tested to match).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import NextokenError
from . import measure, models, run
from .common import EXIT_ERROR, EXIT_USAGE, UsageError

__all__ = ["main", "reference"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextoken", description="Portable LLM inference on ONNX Runtime.")
    parser.add_argument("--version", action="version", version=f"nextoken {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (models, run, measure):
        group.add_commands(sub)
    parser.set_defaults(commands=dict(sub.choices))  # each command's own parser, for its usage on errors
    return parser


def reference(width: int = 100) -> str:
    """Every command's usage as argparse writes it, ``width`` columns wide: docs/cli.md's synopsis."""
    usages = []
    for command in _parser().get_default("commands").values():
        command.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=width)
        usages.append(command.format_usage().removeprefix("usage: ").rstrip())
    return "\n".join(usages) + "\n"


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
