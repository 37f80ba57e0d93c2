"""What ``--method``, ``--config`` and ``--set`` select: a backend, a preset, a config.

Every backend is reached through the plugin registry (names, aliases and the presets each backend
declares), never by a name written here.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qplug.backend import Backend, normalize_name
from qplug.cli.output import CLIError
from qplug.config import QuantConfig
from qplug.config import read_quantization_config as _read_quantization_config
from qplug.errors import UnknownBackendError
from qplug.manager import get_plugin_manager

__all__ = ["build_config", "parse_set", "read_quantization_config", "resolve_method"]


def read_quantization_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`qplug.config.read_quantization_config`, where a directory stands for its ``config.json``."""
    path = Path(path)
    return _read_quantization_config(path / "config.json" if path.is_dir() else path)


def resolve_method(name: str) -> tuple[Backend, str | None, dict[str, Any]]:
    """The backend, preset name and preset settings ``--method`` selects.

    ``name`` is a backend name or alias (case-insensitive), a preset name some backend declares, or
    ``BACKEND:PRESET``. A backend name wins over a preset of the same name.

    :raises CLIError: nothing matches (listing backends and presets), or the preset is ambiguous.
    """
    manager = get_plugin_manager()
    key = normalize_name(name)
    head, sep, tail = key.partition(":")
    if sep:
        backend = manager.get_backend(head)
        for preset, settings in backend.presets.items():
            if normalize_name(preset) == tail:
                return backend, preset, dict(settings)
        known = ", ".join(backend.presets) or "none"
        raise CLIError(f"backend {backend.name!r} has no preset {tail!r}; its presets: {known}")
    try:
        return manager.get_backend(key), None, {}
    except UnknownBackendError as exc:
        unknown = exc
    hits = [
        (entry.backend, preset, dict(settings))
        for entry in manager.backend_entries()
        for preset, settings in entry.backend.presets.items()
        if normalize_name(preset) == key
    ]
    if len(hits) == 1:
        return hits[0]
    if hits:
        options = ", ".join(f"{b.name}:{p}" for b, p, _ in hits)
        raise CLIError(f"preset {name!r} is declared by several backends; choose one of {options}")
    backends = manager.backend_names()
    presets = sorted({p for e in manager.backend_entries() for p in e.backend.presets})
    close = difflib.get_close_matches(key, [*(n for e in manager.backend_entries() for n in e.backend.names),
                                            *presets], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise CLIError(
        f"no backend or preset named {name!r}.{hint} Backends: {', '.join(backends) or 'none'}; "
        f"presets: {', '.join(presets) or 'none'} (see `qplug backends`)"
        + failed_plugins_note(unknown)
    )


def failed_plugins_note(exc: UnknownBackendError) -> str:
    """The part of ``exc`` that names plugins which failed to load (they may be the backend asked for)."""
    text = str(exc)
    at = text.find(" Plugin ")
    return text[at:] if at >= 0 else ""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_set(items: Sequence[str], config_class: type[QuantConfig], flag: str = "--set") -> dict[str, Any]:
    """``["bits=4", "sym=false", "group_size=128"]`` → ``{"bits": 4, "sym": False, ...}``.

    Values are read as JSON when they parse (numbers, true/false/null, lists, objects), else taken
    as strings. A key the config class does not have is an error listing the fields it has.
    """
    out: dict[str, Any] = {}
    fields = config_class.field_names()
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"{flag} {item!r}: expected KEY=VALUE")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CLIError(
                f"{flag} {key}: {config_class.__name__} has no field {key!r}{hint}; "
                f"its fields: {', '.join(fields)}"
            )
        out[key] = _parse_value(value)
    return out


def build_config(method: str | None, config_file: str | None, sets: Sequence[str]) -> tuple[QuantConfig, str]:
    """The config ``quantize`` applies: preset, then ``--config`` file, then ``--set`` (each overriding)."""
    data: dict[str, Any] = {}
    preset = None
    backend = None
    if method:
        backend, preset, data = resolve_method(method)
    if config_file:
        from_file = read_quantization_config(config_file)
        file_method = from_file.get("quant_method")
        if backend is None:
            backend = (get_plugin_manager().get_backend(file_method) if isinstance(file_method, str)
                       else get_plugin_manager().infer_backend(dict(from_file)))
        elif isinstance(file_method, str) and get_plugin_manager().get_backend(file_method) is not backend:
            raise CLIError(f"--config {config_file} is a {file_method!r} config, but --method selects {backend.name!r}")
        data.update({k: v for k, v in from_file.items() if k != "quant_method"})
    if backend is None:
        raise CLIError("say which method to use: --method NAME (a backend or preset; see `qplug backends`) "
                       "or --config FILE")
    data.update(parse_set(sets, backend.config_class))
    config = backend.config_class.from_dict(data)
    label = backend.name + (f" (preset {preset})" if preset else "")
    return config, label

