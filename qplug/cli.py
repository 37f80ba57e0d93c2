"""The ``qplug`` command: list backends, check configs, quantize and inspect models, run the demo.

Importing this module imports neither torch nor any backend library, so ``qplug backends`` and the
``config`` commands answer at once; ``quantize``, ``inspect`` and ``demo`` import torch when they
run. Every backend is reached through the plugin registry (names, aliases and the presets each
backend declares), never by a name written here.

Errors are one line on stderr (``qplug: error: ...``) and a non-zero exit code; ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import qplug
from qplug.backend import Backend, normalize_name
from qplug.config import QuantConfig
from qplug.config import read_quantization_config as _read_quantization_config
from qplug.errors import ConfigFileError, QPlugError, QuantConfigError, UnknownBackendError
from qplug.manager import get_plugin_manager

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["CLIError", "build_parser", "main", "parse_set", "resolve_method"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

#: Files of a model directory that ``qplug quantize`` copies to DST unchanged (tokenizer and friends).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
)


class CLIError(QPlugError):
    """A mistake in what the user asked for; printed as one line, exit code 1."""


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Not a terminal (a pipe, a test, the docs): no colour, and a fixed width unless COLUMNS says.
    columns = os.environ.get("COLUMNS", "")
    width = None if stream.isatty() else (int(columns) if columns.isdigit() else 120)
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def _text(value: Any, style: str = ""):
    from rich.text import Text

    return Text("" if value is None else str(value), style=style)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.2f} MiB"
    return f"{n / 1024**3:.2f} GiB"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, QPlugError | OSError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _warn(message: str) -> None:
    print(f"qplug: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _warn(f"{message}")


# --------------------------------------------------------------------------------------------
# Methods, presets and --set
# --------------------------------------------------------------------------------------------


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
        + _failed_plugins_note(unknown)
    )


def _failed_plugins_note(exc: UnknownBackendError) -> str:
    text = str(exc)
    at = text.find(" Plugin ")
    return text[at:] if at >= 0 else ""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_set(items: Sequence[str], config_class: type[QuantConfig]) -> dict[str, Any]:
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
            raise CLIError(f"--set {item!r}: expected KEY=VALUE")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CLIError(
                f"--set {key}: {config_class.__name__} has no field {key!r}{hint}; "
                f"its fields: {', '.join(fields)}"
            )
        out[key] = _parse_value(value)
    return out


def _build_config(method: str | None, config_file: str | None, sets: Sequence[str]) -> tuple[QuantConfig, str]:
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


# --------------------------------------------------------------------------------------------
# qplug backends
# --------------------------------------------------------------------------------------------


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
            "optional_libraries": sorted({_requirement_name(r) for r in b.optional}),
            "devices": list(b.devices),
            "presets": {name: dict(settings) for name, settings in b.presets.items()},
        })
    for p in manager.plugins():
        if p.status in {"failed", "blocked"}:
            rows.append({
                "name": p.name, "aliases": [], "description": "", "plugin": p.name,
                "distribution": p.distribution, "version": p.version,
                "status": "blocked" if p.status == "blocked" else f"failed to load: {p.error}",
                "libraries": {}, "optional_libraries": [], "devices": [], "presets": {},
            })
    return rows


def _requirement_name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name


def _name_cell(name: str, aliases: Sequence[str], provider: str, devices: Sequence[str]):
    text = _text(name, "bold")
    if aliases:
        text.append(f"\n  alias {', '.join(aliases)}", style="dim")
    text.append(f"\n  from {provider}", style="dim")
    if devices:
        text.append(f"\n  runs on {', '.join(devices)}", style="dim")
    return text


def cmd_backends(args: argparse.Namespace) -> int:
    rows = backend_rows()
    if args.json:
        _print_json(rows)
        return EXIT_OK
    console = _console()
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
            _name_cell(row["name"], row["aliases"], provider, row["devices"]), _text(status, style),
            _text(libraries), _text("\n".join(row["presets"])),
        )
    console.print(table)
    others = [p for p in get_plugin_manager().plugins() if p.status == "loaded" and not p.backends]
    if others:
        console.print("Other plugins: " + ", ".join(f"{p.name} ({p.provider})" for p in others), markup=False)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# qplug config show / validate
# --------------------------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    backend, preset, settings = resolve_method(args.name)
    cls = backend.config_class
    try:
        base = cls.from_dict(settings)
    except QuantConfigError as exc:
        if preset:
            raise CLIError(f"preset {preset!r} of {backend.name!r} is not a valid config: {_one_line(exc)}") from exc
        _warn(f"the defaults of {cls.__name__} alone are not a valid config: {_one_line(exc)}")
        _print_json({**cls.defaults(), "quant_method": cls.quant_method})
        return EXIT_OK
    if not args.diff:
        _print_json(base.to_dict())
        return EXIT_OK
    given = qplug.load_config(args.diff)
    if not isinstance(given, cls):
        raise CLIError(f"{args.diff} is a {given.quant_method!r} config, not {backend.name!r}")
    if preset is None:
        _print_json(given.to_diff_dict())
    else:
        base_dict = base.to_dict()
        diff = {k: v for k, v in given.to_dict().items() if k not in base_dict or base_dict[k] != v}
        _print_json({**diff, "quant_method": given.quant_method})
    return EXIT_OK


def _problem(exc: BaseException) -> str:
    if isinstance(exc, QuantConfigError) and exc.field and exc.accepted:
        from qplug.errors import _short_repr

        return f"{exc.field}: {_short_repr(exc.value)} given — {exc.accepted}"
    return _one_line(exc)


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
        _print_json(reports)
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


# --------------------------------------------------------------------------------------------
# qplug quantize
# --------------------------------------------------------------------------------------------


def _check_source(src: Path) -> None:
    if not src.exists():
        raise CLIError(f"SRC {src}: no such directory")
    if not src.is_dir():
        raise CLIError(f"SRC {src}: not a directory (expected a model directory with config.json and safetensors)")
    if not (src / "config.json").is_file():
        raise CLIError(f"SRC {src}: no config.json (is this a Hugging Face model directory?)")
    if not any(src.glob("*.safetensors")):
        raise CLIError(f"SRC {src}: no .safetensors weights (qplug never reads pickled .bin files)")


def _check_destination(dst: Path, src: Path) -> None:
    """Fail before any work when DST cannot be written, or would replace something it should not."""
    if dst.resolve() == src.resolve():
        raise CLIError("DST must differ from SRC (the quantized checkpoint never replaces its source)")
    if dst.exists() and not dst.is_dir():
        raise CLIError(f"DST {dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "config.json").is_file():
        raise CLIError(f"DST {dst}: a non-empty directory that is not a model checkpoint; refusing to replace it")
    parent = dst.absolute().parent
    probe_base = parent
    while not probe_base.exists():
        probe_base = probe_base.parent
    if not probe_base.is_dir():
        raise CLIError(f"DST {dst}: cannot create it: {probe_base} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".probe", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise CLIError(f"DST {dst}: cannot write there: {exc.strerror or exc}") from exc


def load_calibration(path: str | Path, tokenizer_dir: Path | None = None) -> Any:
    """Read ``--calibration FILE``: token ids or texts, in the shape backends accept.

    * ``.safetensors`` — an integer tensor named ``input_ids`` (or the file's only tensor);
    * ``.json`` — a list of token-id lists, or a list of strings;
    * ``.jsonl`` — one sample a line: a token-id list, a string, or ``{"text": ...}`` / ``{"input_ids": ...}``;
    * anything else — plain text, one sample per non-empty line.

    Texts are tokenized with the tokenizer in ``tokenizer_dir`` when there is one; otherwise they
    are passed on as texts (a backend may bring its own tokenizer).
    """
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--calibration {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        tensor = tensors.get("input_ids") if "input_ids" in tensors else (
            next(iter(tensors.values())) if len(tensors) == 1 else None)
        if tensor is None or tensor.is_floating_point():
            raise CLIError(f"--calibration {path}: expected an integer tensor named 'input_ids'")
        return tensor.long()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"--calibration {path}: cannot read: {exc}") from exc
    if suffix == ".json":
        try:
            samples = json.loads(text)
        except ValueError as exc:
            raise CLIError(f"--calibration {path}: not valid JSON: {exc}") from exc
        if not isinstance(samples, list):
            raise CLIError(f"--calibration {path}: expected a JSON list of token-id lists or of strings")
    elif suffix == ".jsonl":
        samples = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise CLIError(f"--calibration {path}:{number}: not valid JSON: {exc}") from exc
            if isinstance(item, dict):
                item = item.get("input_ids", item.get("text"))
            samples.append(item)
    else:
        samples = [line for line in text.splitlines() if line.strip()]
    if not samples:
        raise CLIError(f"--calibration {path}: no samples")
    if all(isinstance(s, str) for s in samples):
        tokenizer = _tokenizer(tokenizer_dir)
        if tokenizer is None:
            return samples
        samples = [tokenizer(s, return_tensors="pt")["input_ids"][0].tolist() for s in samples]
    if not all(isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s)
               for s in samples):
        raise CLIError(f"--calibration {path}: every sample must be a non-empty list of token ids or a string")
    import torch

    if len({len(s) for s in samples}) == 1:
        return torch.tensor(samples, dtype=torch.long)
    return [torch.tensor([s], dtype=torch.long) for s in samples]


def _tokenizer(directory: Path | None) -> Any:
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
    if directory is None or not any((directory / name).is_file() for name in tokenizer_files):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        _warn(f"cannot load the tokenizer in {directory} ({_one_line(exc)}); passing calibration texts as they are")
        return None


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # older or newer transformers: their chatter is harmless
        pass


def _load_model(src: Path, dtype: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise CLIError("qplug quantize loads SRC with transformers, which is not installed: "
                       "pip install 'qplug[transformers]'") from exc
    _quiet_transformers()
    from qplug.config import torch_dtype

    chosen = "auto" if dtype == "auto" else torch_dtype(dtype)
    from packaging.version import Version

    # transformers renamed `torch_dtype` to `dtype` in 4.56; older releases ignore the new name.
    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(src), **{key: chosen})
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"SRC {src}: transformers cannot load it: {_one_line(exc)}") from exc
    return model.eval()


def _skeleton(src: Path) -> Any:
    """SRC's model with its parameters on the meta device, for quantize-on-load."""
    _quiet_transformers()
    from qplug.checkpoint import build_skeleton, read_model_config

    return build_skeleton(read_model_config(src))


def _checkpoint_bytes(src: Path) -> int:
    """Bytes of SRC's tensors, from the safetensors headers (nothing is loaded)."""
    from qplug.checkpoint import weight_files
    from qplug.safetensors_io import SafetensorsFile

    total = 0
    for path in weight_files(src):
        with SafetensorsFile(path) as fh:
            total += sum(fh.nbytes(name) for name in fh.keys())
    return total


@contextlib.contextmanager
def _module_progress(model: Any, names: list[str], snapshot: Any, enabled: bool) -> Iterator[None]:
    """A progress bar over the modules to quantize, advanced as the backend replaces them.

    The backend works in one call, so a watcher thread counts the modules already replaced.
    """
    if not enabled or not names:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("quantizing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=_console(stderr=True), transient=True)
    task = progress.add_task("quantize", total=len(names))
    done = threading.Event()
    targets = set(names)

    def watch() -> None:
        while not done.wait(0.1):
            with contextlib.suppress(Exception):  # the model is changing under us; try again
                progress.update(task, completed=len(targets.intersection(snapshot.replaced(model))))

    watcher = threading.Thread(target=watch, name="qplug-progress", daemon=True)
    with progress:
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
            with contextlib.suppress(Exception):
                progress.update(task, completed=len(targets.intersection(snapshot.replaced(model))))


def _peak_memory() -> int | None:
    """Peak resident memory of this process in bytes (``getrusage``), or ``None`` where unsupported."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _copy_tokenizer_files(src: Path, staging: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        source = src / name
        if source.is_file():
            shutil.copy2(source, staging / name)
            copied.append(name)
    return copied


def cmd_quantize(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    src, dst = Path(args.src), Path(args.dst)
    _check_source(src)
    _check_destination(dst, src)
    config, label = _build_config(args.method, args.config, args.set or [])
    config = config.with_skips(args.skip or [])
    config.check_quantizable()
    backend = get_plugin_manager().backend_for_config(config)
    backend.ensure_available()
    interactive = sys.stderr.isatty()
    status = _console(stderr=True)

    from qplug.demo import linear_snapshot, model_tensor_bytes
    from qplug.modules import select_modules

    calibration = load_calibration(args.calibration, src) if args.calibration else None
    # Data-free backends quantize SRC while reading it, one layer at a time (the float model never
    # sits in memory); calibrating ones need the whole float model loaded first.
    streaming = backend.streams and calibration is None and args.dtype == "auto"
    with status.status(f"loading {src}", spinner="dots") if interactive else contextlib.nullcontext():
        model = _skeleton(src) if streaming else _load_model(src, args.dtype)
    loaded = time.perf_counter()
    size_before = _checkpoint_bytes(src) if streaming else model_tensor_bytes(model)
    snapshot = linear_snapshot(model)
    selection = select_modules(model, config.skip_patterns(), warn_unmatched=False)  # quantize warns
    try:
        with _module_progress(model, list(selection.names), snapshot, enabled=interactive):
            if streaming:
                qplug.load_quantized(src, model, quantization_config=config)
            else:
                qplug.quantize(model, config, calibration=calibration)
    except Exception as exc:
        if calibration is None and "calibration" in str(exc).lower() and not args.debug:
            raise CLIError(f"{_one_line(exc)} (give samples with --calibration FILE)") from exc
        raise
    quantized = time.perf_counter()
    names = snapshot.replaced(model)
    size_after = model_tensor_bytes(model)
    bits = snapshot.bits_per_param(model, names)

    from qplug._io import atomic_directory

    with status.status(f"writing {dst}", spinner="dots") if interactive else contextlib.nullcontext(), \
            atomic_directory(dst) as staging:
        # Weights, config and tokenizer are assembled beside DST and renamed over it in one step.
        qplug.save_quantized(model, staging)
        copied = _copy_tokenizer_files(src, staging)
    saved = time.perf_counter()
    on_disk = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    peak = _peak_memory()

    skipped = {n: why for n, why in selection.skipped.items()}
    for name in selection.names:
        if name not in names:
            skipped[name] = "left as is by the backend"
    reasons = Counter(why if not why.startswith("skip pattern") else "skip patterns" for why in skipped.values())
    skipped_text = f"{len(skipped)} skipped" + (
        " (" + ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())) + ")" if reasons else "")
    lines = [
        f"Quantized {src} → {dst} with {label}",
        f"  modules      {len(names)} quantized, {skipped_text}",
        f"  size         {_mib(size_before)} → {_mib(size_after)} "
        f"({size_before / max(size_after, 1):.2f}× smaller; {_mib(on_disk)} of safetensors on disk)",
        f"  bits/param   {bits:.2f} in the quantized layers" if bits is not None else "  bits/param   -",
        f"  time         {saved - started:.1f} s (load {loaded - started:.1f} s, quantize {quantized - loaded:.1f} s, "
        f"save {saved - quantized:.1f} s)",
        f"  peak memory  {_mib(peak)} (max RSS)" if peak else "  peak memory  - (not measurable here)",
    ]
    if copied:
        lines.append(f"  copied       {', '.join(copied)}")
    print("\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# qplug inspect
# --------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """``{tensor: {"dtype", "shape", "bytes"}}`` from a safetensors file's header (no tensor is read)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise CLIError(f"{path}: not a safetensors file (too short)")
        size = int.from_bytes(raw, "little")
        if size > 100 * 1024 * 1024:
            raise CLIError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(fh.read(size))
        except ValueError as exc:
            raise CLIError(f"{path}: not a safetensors file (bad header: {exc})") from exc
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out[name] = {"dtype": info["dtype"], "shape": list(info["shape"]), "bytes": end - start}
    return out


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint (index order when sharded), found without importing torch."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CLIError(f"{index}: not a safetensors index ({_one_line(exc)})") from exc
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CLIError(f"{directory}: no safetensors weights (qplug never reads pickled .bin files)")
    return files


def _checkpoint_tensors(directory: Path) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {}
    for path in _weight_files(directory):
        if not path.is_file():
            raise CLIError(f"{directory}: weight file {path.name} is missing")
        tensors.update(read_safetensors_header(path))
    return tensors


def _module_rows(tensors: Mapping[str, Mapping[str, Any]], model: Any) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, Mapping[str, Any]]] = {}
    modules = set() if model is None else {name for name, _ in model.named_modules()}
    for name, info in tensors.items():
        module, _, leaf = name.rpartition(".")
        # bitsandbytes nests its statistics under the weight (q_proj.weight.absmax, ...quant_state.*):
        # a tensor belongs to the deepest module its name starts with, when the model is known
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in modules),
                     None)
        if owner is not None:
            module, leaf = owner, name[len(owner) + 1:]
        groups.setdefault(module, {})[leaf] = info
    if model is not None:  # model order reads better than the checkpoint's alphabetical one
        order = {m: i for i, m in enumerate(dict.fromkeys(k.rpartition(".")[0] for k in model.state_dict()))}
        groups = dict(sorted(groups.items(), key=lambda kv: order.get(kv[0], len(order))))
    rows = []
    for module, leaves in groups.items():
        kind = "?"
        shape = None
        if model is not None:
            with contextlib.suppress(AttributeError):
                sub = model.get_submodule(module)
                kind = type(sub).__name__
                if isinstance(getattr(sub, "out_features", None), int) and isinstance(
                        getattr(sub, "in_features", None), int):
                    shape = [sub.out_features, sub.in_features]
        if shape is None:
            first = leaves.get("weight") or next(iter(leaves.values()))
            shape = list(first["shape"])
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = sum(info["bytes"] for info in leaves.values())
        rows.append({
            "module": module, "kind": kind, "shape": shape, "bytes": nbytes,
            "bits": 8 * nbytes / numel if numel else None,
            "tensors": {leaf: f"{info['dtype']}{list(info['shape'])}" for leaf, info in leaves.items()},
        })
    return rows


def _weight_errors(model: Any, source: Path, kinds: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """Per quantized layer: error of its dequantized weight against the float checkpoint in ``source``."""
    import torch
    from safetensors import safe_open

    if not source.is_dir():
        raise CLIError(f"--source {source}: no such directory")
    where = {}
    for path in _weight_files(source):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                where[name] = path
    qplug.dequantize(model)
    errors = {}
    for module, kind in kinds.items():
        sub = model.get_submodule(module)
        if kind in {"Linear", "?"} or not isinstance(sub, torch.nn.Linear):
            continue
        key = f"{module}.weight"
        if key not in where:
            raise CLIError(f"--source {source}: has no tensor {key!r}; is it the float model this was quantized from?")
        with safe_open(str(where[key]), framework="pt") as fh:
            reference = fh.get_tensor(key).double()
        weight = sub.weight.detach().double()
        if weight.shape != reference.shape:
            raise CLIError(f"--source {source}: {key} has shape {list(reference.shape)}, the checkpoint's layer "
                           f"{list(weight.shape)}")
        diff = weight - reference
        errors[module] = {
            "relative_error": float(diff.norm() / reference.norm().clamp_min(1e-30)),
            "max_abs_error": float(diff.abs().max()),
        }
    return errors


def _inspect_kernels(model: Any, rows: list[dict[str, Any]], dtype_name: str | None) -> str:
    """Choose each quantized layer's kernel for inputs of ``dtype_name`` (default: the model's dtype) and
    put it, with the reason, in the rows. Returns the dtype used."""
    import torch

    from qplug.kernels import kernel_report, prepare_kernels

    dtype = getattr(torch, dtype_name) if dtype_name else None
    try:
        prepare_kernels(model, dtype)
    except QPlugError as exc:  # one layer no kernel can run: the others are still worth showing
        _warn(_one_line(exc))
    report = kernel_report(model)
    for row in rows:
        if row["module"] in report:
            row["kernel"] = report[row["module"]]["kernel"]
            row["kernel_reason"] = report[row["module"]]["reason"]
    if dtype is None:
        dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.get_default_dtype())
    return str(dtype).removeprefix("torch.")


def cmd_inspect(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        raise CLIError(f"{directory}: no such directory")
    if not (directory / "config.json").is_file():
        raise CLIError(f"{directory}: no config.json (is this a checkpoint directory?)")
    raw = read_quantization_config(directory / "config.json")
    tensors = _checkpoint_tensors(directory)
    config = model = load_error = None
    try:
        config = qplug.config_from_dict(raw)
    except (UnknownBackendError, QuantConfigError) as exc:
        if args.debug:
            raise
        load_error = _one_line(exc)
    if config is not None:
        method, provider = config.quant_method, get_plugin_manager().get_entry(config.quant_method).plugin.provider
        config_dict, config_diff = config.to_dict(), config.to_diff_dict()
        _quiet_transformers()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = qplug.load_quantized(directory)
        except Exception as exc:
            if args.debug:
                raise
            load_error = _one_line(exc)
    else:  # shapes and bytes still come from the safetensors headers
        method, provider = str(raw.get("quant_method", "?")), "backend not available"
        config_dict = config_diff = raw
    rows = _module_rows(tensors, model)
    dtype = None
    if model is not None:
        dtype = _inspect_kernels(model, rows, args.dtype)
    errors: dict[str, dict[str, float]] = {}
    if args.source:
        if model is None:
            raise CLIError(f"--source needs the model loaded, and it could not be: {load_error}")
        errors = _weight_errors(model, Path(args.source), {r["module"]: r["kind"] for r in rows})
        for row in rows:
            row.update(errors.get(row["module"], {}))
    total_bytes = sum(r["bytes"] for r in rows)
    total_params = sum(_numel(r["shape"]) for r in rows)
    report = {
        "directory": str(directory),
        "method": method,
        "provider": provider,
        "config": config_dict,
        "modules": rows,
        "totals": {
            "modules": len(rows),
            "bytes": total_bytes,
            "parameters": total_params,
            "bits_per_param": 8 * total_bytes / total_params if total_params else None,
        },
        "kernels_for": None if dtype is None else {"dtype": dtype, "device": "cpu"},
        "load_error": load_error,
    }
    if load_error:
        _warn(f"cannot load the model, so module kinds are unknown: {load_error}")
    if args.json:
        _print_json(report)
        return EXIT_OK
    console = _console()
    console.print(f"{directory}: {method} ({provider})", markup=False)
    console.print("config: " + json.dumps(config_diff, sort_keys=True), markup=False)
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, show_footer=True)
    longest = max((len(r["module"]) for r in rows), default=6)
    table.add_column("module", footer=f"{len(rows)} modules", no_wrap=True, min_width=min(longest, 64))
    table.add_column("kind", no_wrap=True)
    table.add_column("shape", justify="right", footer=f"{total_params:,} params", no_wrap=True)
    bits_total = report["totals"]["bits_per_param"]
    table.add_column("bits", justify="right", footer=f"{bits_total:.2f}" if bits_total else "-", no_wrap=True)
    table.add_column("bytes", justify="right", footer=f"{total_bytes:,}", no_wrap=True)
    chosen = Counter(row["kernel"] for row in rows if row.get("kernel"))
    kernels = bool(chosen) and not args.source  # with --source the error columns take the room
    if kernels:
        table.add_column("kernel", no_wrap=True)
    if args.source:
        table.add_column("rel. error", justify="right", no_wrap=True)
        table.add_column("max |Δw|", justify="right", no_wrap=True)
    for row in rows:
        cells = [_text(row["module"]), _text(row["kind"]), _text("×".join(map(str, row["shape"]))),
                 _text(f"{row['bits']:.2f}" if row["bits"] is not None else "-"), _text(f"{row['bytes']:,}")]
        if kernels:
            cells.append(_text(row.get("kernel") or ""))
        if args.source:
            has = "relative_error" in row
            cells += [_text(f"{row['relative_error']:.2e}" if has else ""),
                      _text(f"{row['max_abs_error']:.2e}" if has else "")]
        table.add_row(*cells)
    console.print(table)
    if chosen:
        console.print(f"kernels for {dtype} inputs on the CPU: "
                      + ", ".join(f"{name} ×{count}" for name, count in chosen.most_common()), markup=False)
    # Why any layer did not get its first-choice kernel, once per distinct reason
    fallbacks = Counter((row["kernel"], row["kernel_reason"]) for row in rows
                        if row.get("kernel_reason") not in (None, "", "first choice"))
    for (kernel, reason), count in fallbacks.items():
        console.print(f"{count} layer(s) run {kernel}: {reason}", markup=False)
    if args.source and errors:
        worst = max(errors.items(), key=lambda kv: kv[1]["relative_error"])
        mean = sum(e["relative_error"] for e in errors.values()) / len(errors)
        console.print(f"weight error vs {args.source}: mean relative {mean:.2e}, worst {worst[0]} "
                      f"{worst[1]['relative_error']:.2e}", markup=False)
    return EXIT_OK


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


# --------------------------------------------------------------------------------------------
# qplug demo
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise CLIError("--plot needs matplotlib, which is not installed: pip install 'qplug[plot]'") from exc
    _quiet_transformers()
    from qplug.demo import run_demo, write_plot

    interactive = sys.stderr.isatty()
    status = _console(stderr=True)
    spinner = status.status("building the tiny model", spinner="dots") if interactive else contextlib.nullcontext()
    with spinner as live:
        def on_start(backend: str, preset: str) -> None:
            if live is not None:
                live.update(f"running {backend} ({preset})")

        report = run_demo(all_presets=args.all_presets, seed=args.seed, on_start=on_start,
                          show_warnings=bool(args.debug))
    if args.json:
        _print_json(report.to_dict())
    else:
        _print_demo(report)
    if args.plot:
        path = write_plot(report, args.plot)
        print(f"plot written to {path}")
    return EXIT_ERROR if report.failed else EXIT_OK


def _print_demo(report: Any) -> None:
    from rich import box
    from rich.table import Table

    console = _console()
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
                _text(r.backend, "bold"), _text(r.preset), _text(_fmt(r.bits_per_param, ".2f")),
                _text(_mib(r.size_bytes)), _text(_fmt(r.max_logit_error, ".4f")),
                _text(_fmt(r.mean_logit_error, ".4f")), _text(_fmt(r.forward_ms, ".1f") + " ms"),
                _text(trip + mark(r), "green" if r.round_trip else ("red" if r.round_trip is False else "")),
            )
        else:  # no numbers: the status, and why in a note
            style = "red" if r.status == "failed" else "yellow"
            table.add_row(_text(r.backend, "bold"), _text(r.preset), _text(r.status + mark(r), style),
                          *[_text("")] * 5)
    console.print(table)
    for note in notes:
        console.print(note, markup=False, overflow="ignore", crop=False, soft_wrap=True)
    console.print("max/mean err: |logits − float logits| on the tokens above; bits/param: bytes of the quantized "
                  "layers × 8 / their float parameters; forward: median of 5 passes", markup=False)
    ran = sum(1 for r in report.results if r.status == "ok")
    failed = len(report.failed)
    console.print(f"{ran} run(s) OK, {failed} failed, in {report.seconds:.1f} s", markup=False)


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``qplug`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback when something fails")

    parser = argparse.ArgumentParser(
        prog="qplug", formatter_class=_FORMATTER, parents=[common],
        description="List quantization backends, check configs, quantize and inspect models.",
        epilog=_examples("qplug demo", "qplug backends", "qplug quantize ./llama ./llama-q --method nf4",
                         "qplug COMMAND --help"),
    )
    parser.add_argument("--version", action="version", version=f"qplug {qplug.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = commands.add_parser(
        "backends", parents=[common], formatter_class=_FORMATTER,
        help="list the installed backends and their status",
        description="List every registered backend: aliases, providing distribution, status (available, "
                    "unavailable and why, blocked, failed to load), library versions, devices and presets. "
                    "Imports neither torch nor any backend library.",
        epilog=_examples("qplug backends", "qplug backends --json"),
    )
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(handler=cmd_backends)

    p = commands.add_parser(
        "config", parents=[common], formatter_class=_FORMATTER, help="show or check quantization configs",
        description="Show a backend's default config, or check config files.",
        epilog=_examples("qplug config show bitsandbytes", "qplug config validate model/config.json"),
    )
    config_commands = p.add_subparsers(dest="config_command", metavar="ACTION")
    p.set_defaults(handler=lambda args, parser=p: _missing_subcommand(parser))

    s = config_commands.add_parser(
        "show", parents=[common], formatter_class=_FORMATTER, help="print a backend's default config as JSON",
        description="Print the default config of a backend (name, alias or preset) as JSON; with --diff, only "
                    "what FILE changes relative to it.",
        epilog=_examples("qplug config show bitsandbytes", "qplug config show nf4",
                         "qplug config show bitsandbytes --diff model/config.json"),
    )
    s.add_argument("name", metavar="NAME", help="a backend name, alias or preset (see `qplug backends`)")
    s.add_argument("--diff", metavar="FILE",
                   help="a quantization_config JSON or a model's config.json: print only what differs from NAME")
    s.set_defaults(handler=cmd_config_show)

    s = config_commands.add_parser(
        "validate", parents=[common], formatter_class=_FORMATTER, help="check config files",
        description="Check each FILE: a bare quantization_config JSON or a whole config.json holding one. "
                    "Each problem is printed as `field: value given — what is accepted`.\n\n"
                    "exit status: 0 all valid, 1 some invalid, 2 some unreadable (missing, not JSON, "
                    "no quantization_config).",
        epilog=_examples("qplug config validate quantization_config.json", "qplug config validate */config.json"),
    )
    s.add_argument("files", metavar="FILE", nargs="+", help="config files to check")
    s.add_argument("--json", action="store_true", help="print the reports as JSON")
    s.set_defaults(handler=cmd_config_validate)

    p = commands.add_parser(
        "quantize", parents=[common], formatter_class=_FORMATTER, help="quantize a model directory",
        description="Load the Hugging Face model in SRC (config.json + safetensors), quantize it and write a "
                    "checkpoint transformers can load to DST (written beside DST, then renamed over it). "
                    "The config is built from the preset (--method), then --config FILE, then each --set.",
        epilog=_examples("qplug quantize ./tiny ./tiny-nf4 --method nf4",
                         "qplug quantize ./tiny ./tiny-nf4 --method nf4 --set bnb_4bit_compute_dtype=bfloat16 "
                         "--skip model.layers.0",
                         "qplug quantize ./llama ./llama-gptq --config gptq.json --calibration calib.jsonl"),
    )
    p.add_argument("src", metavar="SRC", help="the floating-point model directory")
    p.add_argument("dst", metavar="DST", help="where to write the quantized checkpoint")
    p.add_argument("--method", "-m", metavar="NAME|PRESET",
                   help="a backend name or alias, a preset, or BACKEND:PRESET (see `qplug backends`)")
    p.add_argument("--config", metavar="FILE", help="start from this quantization_config (or config.json)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append",
                   help="set one config field; VALUE is read as JSON when it parses (4, true, [\"a\"]), "
                        "else as a string. Repeatable")
    p.add_argument("--skip", metavar="PATTERN", action="append",
                   help="leave modules matching PATTERN in floating point (dotted name components, or "
                        "re:REGEX). Repeatable")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration samples for methods that calibrate: .json/.jsonl token ids or texts, "
                        ".safetensors with input_ids, or text with one sample per line")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the dtype SRC is loaded in (default: as stored)")
    p.set_defaults(handler=cmd_quantize)

    p = commands.add_parser(
        "inspect", parents=[common], formatter_class=_FORMATTER, help="describe a quantized checkpoint",
        description="Show a quantized checkpoint's method and config, each module's kind, shape, bits per "
                    "parameter and bytes, and the totals. With --source, also each quantized layer's weight "
                    "error: the layer dequantized against the float weights in FLOATDIR.",
        epilog=_examples("qplug inspect ./tiny-nf4", "qplug inspect ./tiny-nf4 --source ./tiny",
                         "qplug inspect ./tiny-nf4 --json"),
    )
    p.add_argument("dir", metavar="DIR", help="the quantized checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--source", metavar="FLOATDIR", help="the floating-point model DIR was quantized from")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="choose each layer's kernel for inputs of this dtype (default: the model's dtype)")
    p.set_defaults(handler=cmd_inspect)

    p = commands.add_parser(
        "demo", parents=[common], formatter_class=_FORMATTER,
        help="run every installed backend on a tiny model and compare them",
        description="Build a tiny Llama-architecture model with seeded weights (no download), run every "
                    "installed backend's first preset on it (calibrating backends get a short seeded "
                    "calibration set), and print bits per parameter, size, logit error against the float "
                    "model, forward time and whether save → load round-trips. A failing backend is shown "
                    "with its error and the others still run; the exit status is 1 if any failed.",
        epilog=_examples("qplug demo", "qplug demo --all-presets --plot demo.png"),
    )
    p.add_argument("--plot", metavar="FILE.png", help="also draw the results as a PNG chart (needs matplotlib: "
                                                      "pip install 'qplug[plot]')")
    p.add_argument("--all-presets", action="store_true", help="run every preset, not only each backend's first")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights and tokens (default 0)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(handler=cmd_demo)
    return parser


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qplug`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.debug = getattr(args, "debug", False)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    warnings.showwarning = _show_warning
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
        print(f"qplug: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return EXIT_ERROR
