"""``qplug backends``: every registered backend, its status, libraries, devices and presets.

Listing imports neither torch nor any backend library, and nothing else that listing does not need.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from qplug.backend import split_requirement
from qplug.cli.output import EXIT_OK, FORMATTER, examples, make_console, print_json, rich_text
from qplug.manager import get_plugin_manager

__all__ = ["add_parser", "backend_rows", "cmd_backends"]


def backend_rows() -> list[dict[str, Any]]:
    """One dict per backend (and per plugin that failed to load or is blocked), as ``--json`` prints."""
    manager = get_plugin_manager()
    entries = manager.backend_entries()
    providers: dict[str, list[str]] = {}
    for e in entries:
        for n in e.backend.names:
            providers.setdefault(n, []).append(e.plugin.provider)
    rows = []
    for e in entries:
        b = e.backend
        clash = [n for n in b.names if len(providers[n]) > 1]
        missing = b.missing_requirements()
        if clash:
            others = [p for p in providers[clash[0]] if p != e.plugin.provider]
            status = (f"conflict: {clash[0]!r} is also provided by {', '.join(others)}" if others
                      else f"conflict: {clash[0]!r} is provided twice")
        elif missing:
            status = "unavailable: missing " + ", ".join(missing)
        else:
            status = "available"
        rows.append({
            "name": b.name,
            "aliases": list(b.aliases),
            "description": b.description,
            "plugin": e.plugin.name,
            "distribution": e.plugin.distribution,
            "version": e.plugin.version,
            "status": status,
            "libraries": b.library_versions(),
            "optional_libraries": sorted({split_requirement(r)[0] for r in b.optional}),
            "devices": list(b.devices),
            "presets": {name: dict(settings) for name, settings in b.presets.items()},
            "refuses": dict(b.refuses),
        })
    for p in manager.plugins():
        if p.status in {"failed", "blocked"}:
            rows.append({
                "name": p.name, "aliases": [], "description": "", "plugin": p.name,
                "distribution": p.distribution, "version": p.version,
                "status": "blocked" if p.status == "blocked" else f"failed to load: {p.error}",
                "libraries": {}, "optional_libraries": [], "devices": [], "presets": {}, "refuses": {},
            })
    return rows


def _name_cell(name: str, aliases: Sequence[str], provider: str, devices: Sequence[str],
               refuses: Sequence[str]) -> Any:
    text = rich_text(name, "bold")
    if aliases:
        text.append(f"\n  alias {', '.join(aliases)}", style="dim")
    text.append(f"\n  from {provider}", style="dim")
    if devices:
        text.append(f"\n  runs on {', '.join(devices)}", style="dim")
    for what in refuses:  # the reasons are in --json and in the error a refused checkpoint gets
        text.append(f"\n  refuses {what}", style="dim")
    return text


def cmd_backends(args: argparse.Namespace) -> int:
    rows = backend_rows()
    if args.json:
        print_json(rows)
        return EXIT_OK
    console = make_console()
    if not rows:
        console.print("No qplug backends are installed: install a distribution with an entry point in the "
                      "'qplug' group, or register a plugin at run time (qplug.register_plugin).", markup=False)
        return EXIT_OK
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("backend", no_wrap=True)
    table.add_column("status", min_width=9)
    table.add_column("libraries", no_wrap=True)
    table.add_column("presets", overflow="fold")
    for row in rows:
        status = row["status"]
        style = "green" if status == "available" else ("yellow" if status.startswith(("unavailable", "blocked"))
                                                       else "red")
        provider = f"{row['distribution']} {row['version'] or ''}".strip() if row["distribution"] else row["plugin"]
        libraries = "\n".join(
            f"{name} {version}" if version else
            f"{name} ({'optional, absent' if name in row['optional_libraries'] else 'missing'})"
            for name, version in row["libraries"].items()
        )
        table.add_row(
            _name_cell(row["name"], row["aliases"], provider, row["devices"], list(row["refuses"])),
            rich_text(status, style),
            rich_text(libraries), rich_text("\n".join(row["presets"])),
        )
    console.print(table)
    others = [p for p in get_plugin_manager().plugins() if p.status == "loaded" and not p.backends]
    if others:
        console.print("Other plugins: " + ", ".join(f"{p.name} ({p.provider})" for p in others), markup=False)
    return EXIT_OK


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``qplug backends``: its arguments, help and handler."""
    p = commands.add_parser(
        "backends", parents=[common], formatter_class=FORMATTER,
        help="list the installed backends and their status",
        description="List every registered backend: aliases, providing distribution, status (available, "
                    "unavailable and why, blocked, failed to load), library versions, devices, presets, and "
                    "what checkpoints of its format may hold that it refuses (--json: with the reasons). "
                    "Imports neither torch nor any backend library.",
        epilog=examples("qplug backends", "qplug backends --json"),
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(handler=cmd_backends)
