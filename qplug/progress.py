"""One progress display for every long operation (quantize, quantize-on-load, load, save).

On a terminal (standard error is a TTY) a task is a live bar drawn with rich, removed when it
ends; nested tasks (a backend's blocks inside the CLI's quantize) share one display. Otherwise
(a pipe, a log file, a notebook's captured stream) a task logs a few lines to the
``qplug.progress`` logger at INFO: when it starts, at each quarter, at least every
:data:`LOG_INTERVAL` seconds, and when it ends. Nothing is written to a pipe unless logging is
configured to show them (the CLI does).

One switch silences it all: ``QPLUG_PROGRESS=0`` in the environment, or ``progress=False`` to
:func:`qplug.quantize`, :func:`qplug.load_quantized` and :func:`qplug.save_quantized` (which
wrap their work in :func:`enabled`). Backends report with :func:`track` or :func:`task`; a
one-off line (a run resuming) goes through :func:`note`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from qplug.environment import env_flag

__all__ = ["ENV_VAR", "LOG_INTERVAL", "Task", "enabled", "is_enabled", "note", "task", "track"]

#: ``QPLUG_PROGRESS=0`` (or false/no/off) silences every progress display.
ENV_VAR = "QPLUG_PROGRESS"
#: Longest silence, in seconds, between two log lines of a running task.
LOG_INTERVAL = 30.0

logger = logging.getLogger("qplug.progress")

T = TypeVar("T")

_switch: contextvars.ContextVar[bool | None] = contextvars.ContextVar("qplug_progress", default=None)


def is_enabled() -> bool:
    """Whether progress is shown here: the innermost :func:`enabled` setting, else ``QPLUG_PROGRESS``."""
    chosen = _switch.get()
    return env_flag(ENV_VAR, default=True) if chosen is None else chosen


@contextlib.contextmanager
def enabled(value: bool | None) -> Iterator[None]:
    """Show (``True``) or silence (``False``) progress inside the block; ``None`` changes nothing."""
    if value is None:
        yield
        return
    token = _switch.set(bool(value))
    try:
        yield
    finally:
        _switch.reset(token)


class Task:
    """One running operation: advance it as units of work complete."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = 0
        self._started = time.monotonic()
        self._live: Any = None
        self._live_id: Any = None
        self._logging = False  # set when the task writes log lines (not on a terminal)
        self._logged_at = self._started
        self._logged_quarter = 0

    def advance(self, amount: int = 1) -> None:
        """Count ``amount`` more units done."""
        self.completed += amount
        if self._live is not None:
            self._live.update(self._live_id, completed=self.completed)
        elif self._logging:
            self._maybe_log()

    # -- log lines (not a terminal) ----------------------------------------------------------

    def _line(self, done: bool = False) -> str:
        unit = f" {self.unit}" if self.unit else ""
        elapsed = time.monotonic() - self._started
        if self.total is None and not self.completed:  # one step of unknown length: no count to give
            return f"{self.description}{' done' if done else ''} ({elapsed:.1f} s)"
        count = f"{self.completed}/{self.total}{unit}" if self.total else f"{self.completed}{unit}"
        return f"{self.description}: {count}{' done' if done else ''} ({elapsed:.1f} s)"

    def _maybe_log(self) -> None:
        now = time.monotonic()
        quarter = 4 * self.completed // self.total if self.total else 0
        if quarter > self._logged_quarter or now - self._logged_at >= LOG_INTERVAL:
            if self.total and self.completed >= self.total:
                return  # the closing line says it
            self._logged_quarter, self._logged_at = quarter, now
            logger.info(self._line())


class _Display:
    """The one live rich display shared by nested tasks on a terminal."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: Any = None
        self._users = 0

    def open(self, task: Task) -> None:
        with self._lock:
            if self._progress is None:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._progress = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True,
                )
                self._progress.start()
            self._users += 1
            task._live = self._progress
            task._live_id = self._progress.add_task(task.description, total=task.total, unit=task.unit)

    def close(self, task: Task) -> None:
        with self._lock:
            if task._live is None:
                return
            self._progress.remove_task(task._live_id)
            task._live = None
            self._users -= 1
            if self._users == 0:
                self._progress.stop()
                self._progress = None


_display = _Display()


def _on_terminal() -> bool:
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


@contextlib.contextmanager
def task(description: str, total: int | None = None, unit: str = "") -> Iterator[Task]:
    """A progress task for the block's duration (silent when progress is off).

    :param description: what runs (``"gptq"``, ``"loading ./tiny"``), the line's first word.
    :param total: how many units make the whole, when known.
    :param unit: what a unit is (``"blocks"``, ``"modules"``), for the log lines.
    """
    current = Task(description, total, unit)
    if not is_enabled():
        yield current
        return
    if _on_terminal():
        _display.open(current)
        try:
            yield current
        finally:
            _display.close(current)
        return
    current._logging = True
    logger.info(current._line())
    failed = False
    try:
        yield current
    except BaseException:
        failed = True
        raise
    finally:
        if not failed:
            logger.info(current._line(done=True))


def note(message: str) -> None:
    """A one-off line about a long operation (a run resumed, saved work discarded), logged to
    ``qplug.progress`` at INFO whether or not progress is shown: it says what a run chose to do."""
    logger.info(message)


def track(iterable: Iterable[T], description: str, total: int | None = None, unit: str = "") -> Iterator[T]:
    """Yield from ``iterable``, counting one unit per item (``total`` defaults to its ``len``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with task(description, total, unit) as current:
        for item in iterable:
            yield item
            current.advance()
