"""The ``qplug`` command's entry point: the parser, built from one module per command, and :func:`main`.

Importing the command modules imports neither torch nor any backend library (each imports what it
needs when it runs), so ``qplug backends`` and the ``config`` commands answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Sequence

from qplug.cli import backends, config, convert, demo, inspect, quantize
from qplug.cli.output import (
    EXIT_ERROR,
    EXIT_USAGE,
    FORMATTER,
    examples,
    one_line,
    show_warning,
)
from qplug.errors import QPlugError

__all__ = ["build_parser", "main"]

#: The commands, in the order ``qplug --help`` lists them.
COMMANDS = (backends, config, quantize, convert, inspect, demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qplug`` command."""
    from qplug import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback when something fails")

    parser = argparse.ArgumentParser(
        prog="qplug", formatter_class=FORMATTER, parents=[common],
        description="List quantization backends, check configs, quantize, convert and inspect models.",
        epilog=examples("qplug demo", "qplug backends", "qplug quantize ./llama ./llama-q --method nf4",
                        "qplug COMMAND --help"),
    )
    parser.add_argument("--version", action="version", version=f"qplug {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qplug`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    warnings.showwarning = show_warning
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("qplug: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`qplug backends | head`): not an error worth a message.
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # keeps the interpreter quiet at exit
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        hint = "" if isinstance(exc, QPlugError | OSError) else " (run with --debug for the traceback)"
        print(f"qplug: error: {one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_ERROR
