"""How the ``qplug`` command talks: its error type, exit codes, consoles, tables, JSON and help text.

Imports nothing heavy: rich is imported by the functions that draw with it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from qplug.errors import QPlugError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

FORMATTER = argparse.RawDescriptionHelpFormatter


class CLIError(QPlugError):
    """A mistake in what the user asked for; printed as one line, exit code 1."""


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------


def make_console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Not a terminal (a pipe, a test, the docs): no colour, and a fixed width unless COLUMNS says.
    columns = os.environ.get("COLUMNS", "")
    width = None if stream.isatty() else (int(columns) if columns.isdigit() else 120)
    # emoji=False: text from plugins (descriptions, errors) is printed as written, and rich's emoji
    # table stays unloaded.
    return Console(file=stream, width=width, highlight=False, soft_wrap=False, emoji=False)


def rich_text(value: Any, style: str = "") -> Text:
    from rich.text import Text

    return Text("" if value is None else str(value), style=style)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def mib(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.2f} MiB"
    return f"{n / 1024**3:.2f} GiB"


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, QPlugError | OSError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def warn(message: str) -> None:
    print(f"qplug: warning: {' '.join(str(message).split())}", file=sys.stderr)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    warn(f"{message}")



def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # older or newer transformers: their chatter is harmless
        pass


def examples(*lines: str) -> str:
    """The ``examples:`` block of a command's ``--help``."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def readable_config(data: dict[str, Any], config_class: type | None) -> dict[str, Any]:
    """``data`` (a config's ``to_dict()``) without the keys only files carry for other tools
    (:attr:`~qplug.QuantConfig.file_only_keys`, e.g. transformers' private ``_load_in_4bit``)."""
    hidden = getattr(config_class, "file_only_keys", frozenset())
    return {k: v for k, v in data.items() if k not in hidden}


def json_value(value: Any, limit: int = 80) -> str:
    """``value`` spelled as a JSON file spells it (``true``, ``"nf4"``, ``null``), shortened; Python's
    repr for what JSON cannot hold. The command talks about JSON files in their own notation."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_progress_lines() -> None:
    """Off a terminal, print :mod:`qplug.progress`'s log lines on stderr (``qplug: gptq: 3/24 blocks``).

    On a terminal the live bar draws itself and nothing is logged; ``QPLUG_PROGRESS=0`` silences both.
    Called by the commands that do long work (logging is not imported for the others: cold start).
    """
    import logging

    class StderrHandler(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is when a record arrives (tests swap it between runs)."""

        @property
        def stream(self):  # type: ignore[override]
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property decides
            pass

    logger = logging.getLogger("qplug.progress")
    if any(getattr(h, "qplug_cli", False) for h in logger.handlers):
        return
    handler = StderrHandler()
    handler.qplug_cli = True
    handler.setFormatter(logging.Formatter("qplug: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
