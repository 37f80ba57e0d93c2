"""``qplug config show`` and ``qplug config validate``: a backend's default config, and config files checked."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import qplug
from qplug.cli.methods import read_quantization_config, resolve_method
from qplug.cli.output import EXIT_OK, EXIT_USAGE, FORMATTER, CLIError, examples, one_line, print_json, warn
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
        print_json(base.to_dict())
        return EXIT_OK
    given = qplug.load_config(args.diff)
    if not isinstance(given, cls):
        raise CLIError(f"{args.diff} is a {given.quant_method!r} config, not {backend.name!r}")
    if preset is None:
        print_json(given.to_diff_dict())
    else:
        base_dict = base.to_dict()
        diff = {k: v for k, v in given.to_dict().items() if k not in base_dict or base_dict[k] != v}
        print_json({**diff, "quant_method": given.quant_method})
    return EXIT_OK


def _problem(exc: BaseException) -> str:
    if isinstance(exc, QuantConfigError) and exc.field and exc.accepted:
        from qplug.errors import _short_repr

        return f"{exc.field}: {_short_repr(exc.value)} given — {exc.accepted}"
    return one_line(exc)


def _config_problems(data: Mapping[str, Any], error: Exception) -> list[str]:
    """Every field of ``data`` that is wrong on its own, plus ``error`` (the first one found)."""
    problems: list[str] = []
    cls = None
    with contextlib.suppress(Exception):
        method = data.get("quant_method")
        manager = get_plugin_manager()
        backend = manager.get_backend(method) if isinstance(method, str) else manager.infer_backend(dict(data))
        cls = backend.config_class
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


def validate_file(path: str) -> dict[str, Any]:
    """Check one config file: ``{"file", "status": valid|invalid|unreadable, "method", "problems", "notes"}``."""
    report: dict[str, Any] = {"file": path, "status": "valid", "method": None, "problems": [], "notes": []}
    try:
        data = read_quantization_config(path)
    except ConfigFileError as exc:
        shown = str(exc)
        for prefix in (f"{path}: ", f"{Path(path) / 'config.json'}: "):
            shown = shown.removeprefix(prefix)
        report.update(status="unreadable", problems=[shown])
        return report
    try:
        config = qplug.config_from_dict(data)
    except (QuantConfigError, UnknownBackendError) as exc:
        report.update(status="invalid", problems=_config_problems(data, exc))
        report["method"] = data.get("quant_method") if isinstance(data.get("quant_method"), str) else None
        return report
    report["method"] = config.quant_method
    try:
        get_plugin_manager().hook.validate(config=config, model=None)
    except Exception as exc:  # a plugin vetoed the config
        report["status"] = "invalid"
        report["problems"].append(_problem(exc))
    fields = type(config).field_names()
    for key in config.extra_keys:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        report["notes"].append(f"unknown key {key!r} is kept as it is{hint}")
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
                what = f" {r['method']} config" if r["method"] else ""
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
                    "Each problem is printed as `field: value given — what is accepted`.\n\n"
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
