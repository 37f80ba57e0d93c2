"""``qplug demo``: every installed backend on a tiny seeded model, compared in one table (see :mod:`qplug.demo`)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from qplug.cli.output import (
    EXIT_ERROR,
    EXIT_OK,
    FORMATTER,
    CLIError,
    examples,
    make_console,
    mib,
    print_json,
    quiet_transformers,
    rich_text,
)

__all__ = ["add_parser", "cmd_demo"]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise CLIError("--plot needs matplotlib, which is not installed: pip install 'qplug[plot]'") from exc
    quiet_transformers()
    from qplug.demo import run_demo, write_plot

    interactive = sys.stderr.isatty()
    status = make_console(stderr=True)
    spinner = status.status("building the tiny model", spinner="dots") if interactive else contextlib.nullcontext()
    with spinner as live:
        def on_start(backend: str, preset: str) -> None:
            if live is not None:
                live.update(f"running {backend} ({preset})")

        report = run_demo(all_presets=args.all_presets, seed=args.seed, on_start=on_start,
                          show_warnings=bool(args.debug))
    if args.json:
        print_json(report.to_dict())
    else:
        _print_demo(report)
    if args.plot:
        path = write_plot(report, args.plot)
        print(f"plot written to {path}")
    return EXIT_ERROR if report.failed else EXIT_OK


def _print_demo(report: Any) -> None:
    from rich import box
    from rich.table import Table

    console = make_console()
    console.print(f"qplug demo — {report.model}, {report.parameters:,} parameters; logits compared on "
                  f"{report.eval_tokens[0]}×{report.eval_tokens[1]} seeded tokens (float logits: mean |x| "
                  f"{report.float_logit_scale:.2f}); calibration {report.calibration_tokens[0]}×"
                  f"{report.calibration_tokens[1]} tokens", markup=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("backend", no_wrap=True)
    table.add_column("preset", no_wrap=True)
    for column in ("bits/param", "size", "max err", "mean err", "forward"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("round trip", no_wrap=True)
    # Errors and remarks are numbered and printed whole under the table, one line each.
    notes: list[str] = []

    def mark(r: Any) -> str:
        if not r.note:
            return ""
        notes.append(f"({len(notes) + 1}) {r.backend} {r.preset}: {r.note}")
        return f" ({len(notes)})"

    for r in report.results:
        if r.status in {"ok", "reference"}:
            trip = "-" if r.round_trip is None else ("OK" if r.round_trip else "FAILED")
            table.add_row(
                rich_text(r.backend, "bold"), rich_text(r.preset), rich_text(_fmt(r.bits_per_param, ".2f")),
                rich_text(mib(r.size_bytes)), rich_text(_fmt(r.max_logit_error, ".4f")),
                rich_text(_fmt(r.mean_logit_error, ".4f")), rich_text(_fmt(r.forward_ms, ".1f") + " ms"),
                rich_text(trip + mark(r), "green" if r.round_trip else ("red" if r.round_trip is False else "")),
            )
        else:  # no numbers: the status, and why in a note
            style = "red" if r.status == "failed" else "yellow"
            table.add_row(rich_text(r.backend, "bold"), rich_text(r.preset), rich_text(r.status + mark(r), style),
                          *[rich_text("")] * 5)
    console.print(table)
    for note in notes:
        console.print(note, markup=False, overflow="ignore", crop=False, soft_wrap=True)
    console.print("max/mean err: |logits − float logits| on the tokens above; bits/param: bytes of the quantized "
                  "layers × 8 / their float parameters; forward: median of 5 passes", markup=False)
    ran = sum(1 for r in report.results if r.status == "ok")
    failed = len(report.failed)
    console.print(f"{ran} run(s) OK, {failed} failed, in {report.seconds:.1f} s", markup=False)


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``qplug demo``: its arguments, help and handler."""
    p = commands.add_parser(
        "demo", parents=[common], formatter_class=FORMATTER,
        help="run every installed backend on a tiny model and compare them",
        description="Build a tiny Llama-architecture model with seeded weights (no download), run every "
                    "installed backend's first preset on it (calibrating backends get a short seeded "
                    "calibration set), and print bits per parameter, size, logit error against the float "
                    "model, forward time and whether save → load round-trips. A failing backend is shown "
                    "with its error and the others still run; the exit status is 1 if any failed.",
        epilog=examples("qplug demo", "qplug demo --all-presets --plot demo.png"),
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw the results as a PNG chart (needs matplotlib: "
                                                      "pip install 'qplug[plot]')")
    p.add_argument("--all-presets", action="store_true", help="run every preset, not only each backend's first")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and tokens (default 0)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(handler=cmd_demo)
