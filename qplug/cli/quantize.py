"""``qplug quantize SRC DST``: load a float model directory, quantize it, write a checkpoint.

Data-free backends quantize SRC while reading it, one layer at a time; calibrating ones (GPTQ, AWQ)
one decoder block at a time: either way through :func:`qplug.quantize_checkpoint`, so the float
model never sits in memory. A backend that can do neither (or ``--dtype`` other than ``auto``)
loads the whole model first. Torch and transformers are imported when the command runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import qplug
from qplug.cli.methods import build_config
from qplug.cli.output import (
    EXIT_OK,
    FORMATTER,
    CLIError,
    examples,
    mib,
    one_line,
    quiet_transformers,
    show_progress_lines,
)
from qplug.errors import CheckpointError
from qplug.manager import get_plugin_manager

__all__ = ["add_parser", "cmd_quantize", "load_calibration"]


def _check_source(src: Path) -> None:
    if not src.exists():
        raise CLIError(f"SRC {src}: no such directory")
    if not src.is_dir():
        raise CLIError(f"SRC {src}: not a directory (expected a model directory with config.json and safetensors)")
    if not (src / "config.json").is_file():
        raise CLIError(f"SRC {src}: no config.json (is this a Hugging Face model directory?)")
    from qplug.checkpoint import weight_files

    try:  # the files loading will read, found the way loading finds them
        weight_files(src)
    except CheckpointError as exc:
        raise CLIError(f"SRC {exc}") from exc


def _check_destination(dst: Path, src: Path) -> None:
    """Fail before any work when DST cannot be written, or would replace something it should not."""
    if dst.resolve() == src.resolve():
        raise CLIError("DST must differ from SRC (the new checkpoint never replaces its source)")
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


#: Files whose presence makes a directory hold a tokenizer (what AutoTokenizer reads).
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_calibration(path: str | Path, src: Path | None = None, tokenizer_dir: Path | None = None) -> list:
    """Read ``--calibration FILE`` into checked token samples, before any model is loaded.

    The formats and rules are :mod:`qplug.calibration`'s (what ``qplug.quantize`` accepts too).
    Texts are tokenized with the tokenizer in ``tokenizer_dir`` (``--tokenizer``), else the one in
    ``src``; with neither, the error says so.

    :return: :class:`qplug.calibration.Sample` records, which every backend accepts as they are.
    """
    from qplug.calibration import FILE_FORMATS, holds_texts, read_file, token_samples

    data = read_file(path)
    tokenizer = None
    if holds_texts(data):
        directory = tokenizer_dir if tokenizer_dir is not None else src
        if directory is None or not _has_tokenizer(directory):
            where = f"--tokenizer {tokenizer_dir} has" if tokenizer_dir is not None else (
                f"SRC {src} has" if src is not None else "there is")
            raise CLIError(
                f"--calibration {path} holds texts, and {where} no tokenizer to turn them into token ids: "
                f"pass --tokenizer DIR (a directory with {' or '.join(_TOKENIZER_MARKERS[:2])}), or give "
                f"token ids instead ({FILE_FORMATS})"
            )
        tokenizer = _load_tokenizer(directory)
    return token_samples(data, tokenizer=tokenizer)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in _TOKENIZER_MARKERS)


def _load_tokenizer(directory: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise CLIError("calibration texts are tokenized with transformers, which is not installed: "
                       "pip install 'qplug[transformers]'") from exc
    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # any failure of third-party code reads: this directory's tokenizer cannot load
        raise CLIError(f"cannot load the tokenizer in {directory}: {one_line(exc)}") from exc


def _load_model(src: Path, dtype: str) -> Any:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise CLIError("qplug quantize loads SRC with transformers, which is not installed: "
                       "pip install 'qplug[transformers]'")
    quiet_transformers()
    from qplug.checkpoint import load_float_checkpoint
    from qplug.config import torch_dtype

    try:
        model = load_float_checkpoint(src, "auto" if dtype == "auto" else torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"SRC {src}: transformers cannot load it: {one_line(exc)}") from exc
    return model.eval()


def _skeleton(src: Path) -> Any:
    """SRC's model with its parameters on the meta device, for quantize-on-load."""
    quiet_transformers()
    from qplug.checkpoint import build_skeleton, read_model_config

    return build_skeleton(read_model_config(src))


def _copy_tokenizer_files(src: Path, staging: Path) -> list[str]:
    from qplug.checkpoint import COMPANION_FILES  # tokenizer and friends

    copied = []
    for name in COMPANION_FILES:
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
    # Every mistake that needs no model is caught here, before the (long) load.
    config.check_quantizable()
    qplug.check(config)
    backend = get_plugin_manager().backend_for_config(config)
    backend.ensure_available()

    from qplug import progress
    from qplug.calibration import FILE_FORMATS

    show_progress_lines()
    from qplug.checkpoint import weight_files
    from qplug.measure import checkpoint_bytes, linear_snapshot, model_tensor_bytes, peak_memory
    from qplug.modules import select_modules

    # Calibration mistakes are the user's, and cheap to find: before the model loads.
    if args.calibration is None and config.needs_calibration():
        raise CLIError(f"{label} calibrates on sample inputs: give them with --calibration FILE ({FILE_FORMATS})")
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise CLIError(f"--tokenizer {tokenizer_dir}: no such directory")
    calibration = load_calibration(args.calibration, src, tokenizer_dir) if args.calibration else None
    # Data-free backends quantize SRC while reading it, one layer at a time, and calibrating ones one
    # decoder block at a time (the float model never sits in memory); a backend that implements
    # neither hook, or a dtype other than SRC's own, needs the whole float model loaded first.
    entry = get_plugin_manager().get_entry(config.quant_method)
    if calibration is None:
        from_disk = backend.streams and args.dtype == "auto"
    else:
        from_disk = entry.calibrates_blocks and args.dtype == "auto"
    if args.device is not None and not (from_disk and calibration is not None):
        if calibration is None:
            why = "it needs --calibration"
        elif args.dtype != "auto":
            why = "it needs --dtype auto (blocks are calibrated in SRC's own dtype)"
        else:
            why = f"backend {backend.name!r} does not calibrate block by block"
        raise CLIError(f"--device places block-by-block calibration, and {why}")
    with progress.task(f"loading {src}"):
        model = _skeleton(src) if from_disk else _load_model(src, args.dtype)
    loaded = time.perf_counter()
    size_before = checkpoint_bytes(src) if from_disk else model_tensor_bytes(model)
    snapshot = linear_snapshot(model)
    selection = select_modules(model, config.skip_patterns(), warn_unmatched=False)  # quantize warns
    from qplug._io import atomic_directory

    # the backends and quantize_checkpoint report their own progress (qplug.progress)
    with atomic_directory(dst) as staging:
        # Weights, config and tokenizer are assembled beside DST and renamed over it in one step.
        if from_disk:  # disk to disk, layer or block by block: memory flat in the model's depth
            names: list[str] = []
            from qplug.block_resume import resume_directory

            # a calibrating run keeps its finished blocks beside DST itself, not in this run's staging
            # directory: a rerun after an interruption continues after them
            qplug.quantize_checkpoint(src, staging, config, calibration=calibration, device=args.device,
                                      max_shard_size=args.max_shard_size,
                                      on_module=lambda done: names.append(done.module),
                                      restart=args.restart, resume_dir=resume_directory(dst))
            quantized = saved = time.perf_counter()
            size_after = checkpoint_bytes(staging)
            params = sum(snapshot.params[n] for n in names)
            bits = 8 * checkpoint_bytes(staging, names) / params if params else None
        else:
            qplug.quantize(model, config, calibration=calibration)
            quantized = time.perf_counter()
            names = snapshot.replaced(model)
            size_after = model_tensor_bytes(model)
            bits = snapshot.bits_per_param(model, names)
            qplug.save_quantized(model, staging, max_shard_size=args.max_shard_size)
        copied = _copy_tokenizer_files(src, staging)
    saved = time.perf_counter()
    on_disk = sum(f.stat().st_size for f in weight_files(dst))
    peak = peak_memory()

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
        f"save {saved - quantized:.1f} s)" if not from_disk else
        f"  time         {saved - started:.1f} s (read, quantized and written "
        f"{'layer' if calibration is None else 'block'} by block)",
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
                    "The config is built from the preset (--method), then --config FILE, then each --set. "
                    "Data-free methods (bitsandbytes, compressed-tensors RTN, ...) read, quantize and write one "
                    "layer at a time; methods that calibrate (gptq, awq, compressed-tensors with --calibration) "
                    "one decoder block at a time: memory stays flat in the model's depth. A backend that can do "
                    "neither, or --dtype other than auto, loads the whole float model first.",
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
                   help="calibration samples, required by methods that calibrate (gptq, awq): .json/.jsonl "
                        "token ids or texts, .safetensors with input_ids, or text with one sample per line")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="the tokenizer for calibration texts (default: the one in SRC, when it has one)")
    p.add_argument("--device", metavar="DEVICE",
                   help="with --calibration: run each block and the activations on this device (cuda, cuda:1); "
                        "default the CPU")
    p.add_argument("--restart", action="store_true",
                   help="with --calibration: discard the blocks an interrupted run into DST finished and start "
                        "from the first. By default a rerun with the same method, SRC, calibration and torch "
                        "thread count continues after them (kept in .DST.resume beside DST until DST is complete) "
                        "and writes the same bytes; data-free runs always start over")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the dtype SRC is loaded in (default: as stored)")
    p.add_argument("--max-shard-size", default="50GB", metavar="SIZE",
                   help="split the weights into model-0000K-of-0000N.safetensors files of at most SIZE "
                        "(bytes, or 5GB, 512MiB, ...), listed in model.safetensors.index.json (default: 50GB)")
    p.set_defaults(handler=cmd_quantize)
