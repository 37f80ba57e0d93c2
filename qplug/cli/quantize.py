"""``qplug quantize SRC DST``: load a float model directory, quantize it, write a checkpoint.

Data-free backends quantize SRC while reading it (the float model never sits in memory); the
others load it whole first. Torch and transformers are imported when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import qplug
from qplug.cli.methods import build_config
from qplug.cli.output import (
    EXIT_OK,
    FORMATTER,
    CLIError,
    examples,
    make_console,
    mib,
    one_line,
    quiet_transformers,
    warn,
)
from qplug.manager import get_plugin_manager

__all__ = ["TOKENIZER_FILES", "add_parser", "cmd_quantize", "load_calibration"]

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
        warn(f"cannot load the tokenizer in {directory} ({one_line(exc)}); passing calibration texts as they are")
        return None


def _load_model(src: Path, dtype: str) -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise CLIError("qplug quantize loads SRC with transformers, which is not installed: "
                       "pip install 'qplug[transformers]'") from exc
    quiet_transformers()
    from qplug.config import torch_dtype

    chosen = "auto" if dtype == "auto" else torch_dtype(dtype)
    from packaging.version import Version

    # transformers renamed `torch_dtype` to `dtype` in 4.56; older releases ignore the new name.
    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(src), **{key: chosen})
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"SRC {src}: transformers cannot load it: {one_line(exc)}") from exc
    return model.eval()


def _skeleton(src: Path) -> Any:
    """SRC's model with its parameters on the meta device, for quantize-on-load."""
    quiet_transformers()
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
                        console=make_console(stderr=True), transient=True)
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
    config, label = build_config(args.method, args.config, args.set or [])
    config = config.with_skips(args.skip or [])
    config.check_quantizable()
    backend = get_plugin_manager().backend_for_config(config)
    backend.ensure_available()
    interactive = sys.stderr.isatty()
    status = make_console(stderr=True)

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
            raise CLIError(f"{one_line(exc)} (give samples with --calibration FILE)") from exc
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
        f"  size         {mib(size_before)} → {mib(size_after)} "
        f"({size_before / max(size_after, 1):.2f}× smaller; {mib(on_disk)} of safetensors on disk)",
        f"  bits/param   {bits:.2f} in the quantized layers" if bits is not None else "  bits/param   -",
        f"  time         {saved - started:.1f} s (load {loaded - started:.1f} s, quantize {quantized - loaded:.1f} s, "
        f"save {saved - quantized:.1f} s)",
        f"  peak memory  {mib(peak)} (max RSS)" if peak else "  peak memory  - (not measurable here)",
    ]
    if copied:
        lines.append(f"  copied       {', '.join(copied)}")
    print("\n".join(lines))
    return EXIT_OK


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``qplug quantize``: its arguments, help and handler."""
    p = commands.add_parser(
        "quantize", parents=[common], formatter_class=FORMATTER, help="quantize a model directory",
        description="Load the Hugging Face model in SRC (config.json + safetensors), quantize it and write a "
                    "checkpoint transformers can load to DST (written beside DST, then renamed over it). "
                    "The config is built from the preset (--method), then --config FILE, then each --set.",
        epilog=examples("qplug quantize ./tiny ./tiny-nf4 --method nf4",
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
