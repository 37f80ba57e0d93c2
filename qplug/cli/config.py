"""``qplug config show`` and ``qplug config validate``: a backend's default config, and config files checked."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import qplug
from qplug.backend import Backend, normalize_name
from qplug.cli.methods import failed_plugins_note, read_quantization_config, resolve_method
from qplug.cli.output import (
    EXIT_OK,
    EXIT_USAGE,
    FORMATTER,
    CLIError,
    examples,
    json_value,
    one_line,
    print_json,
    readable_config,
    warn,
)
from qplug.config import QuantConfig
from qplug.errors import ConfigFileError, QuantConfigError, UnknownBackendError
from qplug.manager import get_plugin_manager

__all__ = ["add_parser", "cmd_config_show", "cmd_config_validate", "validate_file"]


def cmd_config_show(args: argparse.Namespace) -> int:
    backend, preset, settings = resolve_method(args.name)
    cls = backend.config_class
    try:
        base = cls.from_dict(settings)
    except QuantConfigError as exc:
        if preset:
            raise CLIError(f"preset {preset!r} of {backend.name!r} is not a valid config: {one_line(exc)}") from exc
        warn(f"the defaults of {cls.__name__} alone are not a valid config: {one_line(exc)}")
        print_json({**cls.defaults(), "quant_method": cls.quant_method})
        return EXIT_OK
    if not args.diff:
        print_json(readable_config(base.to_dict(), cls))
        return EXIT_OK
    given = qplug.load_config(args.diff)
    if not isinstance(given, cls):
        raise CLIError(f"{args.diff} is a {given.quant_method!r} config, not {backend.name!r}")
    if preset is None:
        print_json(given.to_diff_dict())
    else:
        base_dict = base.to_dict()
        diff = {k: v for k, v in readable_config(given.to_dict(), cls).items()
                if k not in base_dict or base_dict[k] != v}
        print_json({**diff, "quant_method": given.quant_method})
    return EXIT_OK


def _problem(exc: BaseException) -> str:
    """``field: value given — what is accepted``, values spelled as in the JSON file (``true``, ``"nf4"``)."""
    if isinstance(exc, QuantConfigError) and exc.field and exc.accepted:
        accepted = exc.accepted
        if getattr(exc, "choices", None):
            accepted = "expected one of " + ", ".join(json_value(choice) for choice in exc.choices)
        return f"{exc.field}: {json_value(exc.value)} given — {accepted}"
    return one_line(exc)


def _backend_of(data: Mapping[str, Any]) -> tuple[Backend | None, str | None]:
    """The backend ``data`` is for, or ``None`` and why not (as a problem line) when ``quant_method`` names none."""
    manager = get_plugin_manager()
    method = data.get("quant_method")
    try:
        if method is None:
            return manager.infer_backend(dict(data)), None
        if isinstance(method, str):
            return manager.get_backend(method), None
    except UnknownBackendError as exc:
        if method is None:
            return None, one_line(exc)
        names = [name for entry in manager.backend_entries() for name in entry.backend.names]
        close = difflib.get_close_matches(normalize_name(method), names, n=1)
        hint = f" (did you mean {json_value(close[0])}?)" if close else ""
        return None, (f"quant_method: {json_value(method)} given — no installed backend has that name{hint}. "
                      f"Backends: {', '.join(manager.backend_names()) or 'none'} (see `qplug backends`)"
                      + failed_plugins_note(exc))
    return None, None  # not a string: from_dict says so, naming the field


def _config_problems(data: Mapping[str, Any], error: Exception, cls: type[QuantConfig] | None) -> list[str]:
    """Every field of ``data`` that is wrong on its own, plus ``error`` (the first one found)."""
    problems: list[str] = []
    if cls is not None and isinstance(error, QuantConfigError):
        for key, value in data.items():
            if key == "quant_method":
                continue
            try:
                cls.from_dict({key: value})
            except QuantConfigError as exc:
                if exc.field == key and _problem(exc) not in problems:
                    problems.append(_problem(exc))
            except Exception:  # a key that cannot be checked alone is covered by `error`
                continue
    first = _problem(error)
    if first not in problems:
        problems.insert(0, first)
    return problems


def _unknown_key_notes(data: Mapping[str, Any], cls: type[QuantConfig]) -> list[str]:
    """A note per key of ``data`` that ``cls`` does not know (kept as it is), with the closest field."""
    try:
        keys = cls.normalize_dict({k: v for k, v in data.items() if k != "quant_method"})
    except Exception:  # the error itself is reported as a problem; judge the keys as written
        keys = {k: v for k, v in data.items() if k != "quant_method"}
    fields = cls.field_names()
    notes = []
    for key in keys:
        if key in fields or key in cls.file_only_keys:
            continue
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {json_value(close[0])}?)" if close else ""
        notes.append(f"unknown key {json_value(key)} is kept as it is{hint}")
    return notes


def validate_file(path: str) -> dict[str, Any]:
    """Check one config file: ``{"file", "status": valid|invalid|unreadable, "method", "problems", "notes"}``.

    ``method`` is the canonical name of the backend the file is for, ``None`` when no installed one is.
    """
    report: dict[str, Any] = {"file": path, "status": "valid", "method": None, "problems": [], "notes": []}
    try:
        data = read_quantization_config(path)
    except ConfigFileError as exc:
        shown = str(exc)
        for prefix in (f"{path}: ", f"{Path(path) / 'config.json'}: "):
            shown = shown.removeprefix(prefix)
        report.update(status="unreadable", problems=[shown])
        return report
    backend, no_backend = _backend_of(data)
    if backend is not None:
        report["method"] = backend.name
        # Unknown keys are worth a note whatever else is wrong: a misspelt key often is what is wrong.
        report["notes"] = _unknown_key_notes(data, backend.config_class)
    if no_backend is not None:
        report.update(status="invalid", problems=[no_backend])
        return report
    try:
        config = qplug.config_from_dict(data)
    except (QuantConfigError, UnknownBackendError) as exc:
        cls = backend.config_class if backend is not None else None
        report.update(status="invalid", problems=_config_problems(data, exc, cls))
        return report
    report["method"] = config.quant_method
    try:
        qplug.check(config)
    except Exception as exc:  # a plugin vetoed the config
        report["status"] = "invalid"
        report["problems"].append(_problem(exc))
    try:
        config.check_quantizable()
    except QuantConfigError as exc:
        report["notes"].append(f"loads checkpoints, but cannot quantize a float model: {_problem(exc)}")
    return report


def cmd_config_validate(args: argparse.Namespace) -> int:
    reports = [validate_file(path) for path in args.files]
    if args.json:
        print_json(reports)
    else:
        for r in reports:
            if r["status"] == "valid":
                print(f"{r['file']}: valid {r['method']} config")
            elif r["status"] == "invalid":
                what = f" {r['method']} config" if r["method"] else " config: no installed backend reads it"
                print(f"{r['file']}: invalid{what}")
            else:
                print(f"{r['file']}: unreadable: {r['problems'][0]}")
                continue
            for problem in r["problems"]:
                print(f"  {problem}")
            for note in r["notes"]:
                print(f"  note: {note}")
    statuses = {r["status"] for r in reports}
    if "unreadable" in statuses:
        return 2
    return 1 if "invalid" in statuses else EXIT_OK


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``qplug config``: its arguments, help and handler."""
    p = commands.add_parser(
        "config", parents=[common], formatter_class=FORMATTER, help="show or check quantization configs",
        description="Show a backend's default config, or check config files.",
        epilog=examples("qplug config show bitsandbytes", "qplug config validate model/config.json"),
    )
    config_commands = p.add_subparsers(dest="config_command", metavar="ACTION")
    p.set_defaults(handler=lambda args, parser=p: _missing_subcommand(parser))

    s = config_commands.add_parser(
        "show", parents=[common], formatter_class=FORMATTER, help="print a backend's default config as JSON",
        description="Print the default config of a backend (name, alias or preset) as JSON; with --diff, only "
                    "what FILE changes relative to it.",
        epilog=examples("qplug config show bitsandbytes", "qplug config show nf4",
                         "qplug config show bitsandbytes --diff model/config.json"),
    )
    s.add_argument("name", metavar="NAME", help="a backend name, alias or preset (see `qplug backends`)")
    s.add_argument("--diff", metavar="FILE",
                   help="a quantization_config JSON or a model's config.json: print only what differs from NAME")
    s.set_defaults(handler=cmd_config_show)

    s = config_commands.add_parser(
        "validate", parents=[common], formatter_class=FORMATTER, help="check config files",
        description="Check each FILE: a bare quantization_config JSON or a whole config.json holding one. "
                    "Each problem is printed as `field: value given — what is accepted`, values spelled as in JSON; "
                    "each file is named by the canonical name of its backend.\n\n"
                    "exit status: 0 all valid, 1 some invalid, 2 some unreadable (missing, not JSON, "
                    "no quantization_config).",
        epilog=examples("qplug config validate quantization_config.json", "qplug config validate */config.json"),
    )
    s.add_argument("files", metavar="FILE", nargs="+", help="config files to check")
    s.add_argument("--json", action="store_true", help="print the reports as JSON")
    s.set_defaults(handler=cmd_config_validate)


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE
