"""``qplug convert SRC DST --to FORMAT``: repack a quantized checkpoint in another format (:func:`qplug.convert`).

Torch and transformers are imported when the command runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import qplug
from qplug.cli.methods import parse_set
from qplug.cli.output import (
    EXIT_OK,
    FORMATTER,
    examples,
    json_value,
    mib,
    quiet_transformers,
    show_progress_lines,
)
from qplug.cli.quantize import _check_destination, _check_source
from qplug.manager import get_plugin_manager

__all__ = ["add_parser", "cmd_convert"]


def cmd_convert(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    src, dst = Path(args.src), Path(args.dst)
    _check_source(src)
    _check_destination(dst, src)
    backend = get_plugin_manager().get_backend(args.to)
    options = parse_set(args.format_option or [], backend.config_class, flag="--format-option")

    show_progress_lines()
    quiet_transformers()
    from qplug.checkpoint import COMPANION_FILES
    from qplug.measure import checkpoint_bytes, peak_memory

    layers: list[str] = []
    qplug.convert(src, dst, backend.name, max_shard_size=args.max_shard_size, on_layer=layers.append, **options)
    finished = time.perf_counter()
    source = qplug.load_config(src / "config.json")
    config = qplug.load_config(dst / "config.json")
    peak = peak_memory()
    copied = [name for name in COMPANION_FILES if (dst / name).is_file()]
    lines = [
        f"Converted {src} ({source.quant_method}) → {dst} ({config.quant_method})",
        f"  layers       {len(layers)} repacked: the same integers, scales and zero points",
        f"  config       {json_value(config.to_diff_dict(), limit=160)}",
        f"  size         {mib(checkpoint_bytes(src))} → {mib(checkpoint_bytes(dst))} of tensors",
        f"  time         {finished - started:.1f} s (loading torch, transformers and the backends' libraries "
        "included)",
        f"  peak memory  {mib(peak)} (max RSS)" if peak else "  peak memory  - (not measurable here)",
    ]
    if copied:
        lines.append(f"  copied       {', '.join(copied)}")
    print("\n".join(lines))
    return EXIT_OK


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``qplug convert``: its arguments, help and handler."""
    p = commands.add_parser(
        "convert", parents=[common], formatter_class=FORMATTER,
        help="repack a quantized checkpoint in another format",
        description="Write the quantized checkpoint in SRC to DST in another format: GPTQ (v1 or v2), AWQ (GEMM "
                    "or GEMV) or compressed-tensors pack-quantized. The same integers, scales and zero points are "
                    "repacked, never re-quantized, so the weights are the same bit for bit; a layer the target "
                    "cannot hold exactly (8-bit weights to AWQ, act-order to AWQ or compressed-tensors, scales "
                    "that would change in float16, ...) is refused, naming it and why. It reads, repacks and "
                    "writes one layer at a time (memory flat in the model's depth) into a directory beside DST, "
                    "renamed over it at the end: a failure leaves an existing DST whole. SRC's tokenizer and "
                    "generation files are copied.",
        epilog=examples("qplug convert ./llama-gptq ./llama-ct --to compressed-tensors",
                        "qplug convert ./llama-ct ./llama-gptq2 --to gptq --format-option checkpoint_format=gptq_v2",
                        "qplug convert ./llama-gptq ./llama-awq --to awq --format-option version=gemv"),
    )
    p.add_argument("src", metavar="SRC", help="the quantized checkpoint directory")
    p.add_argument("dst", metavar="DST", help="where to write the converted checkpoint")
    p.add_argument("--to", required=True, metavar="FORMAT",
                   help="the target backend, by name or alias: gptq, awq, compressed-tensors (ct)")
    p.add_argument("--format-option", metavar="KEY=VALUE", action="append",
                   help="set one field of the target's config that the layers do not decide: checkpoint_format="
                        "gptq|gptq_v2 (gptq), version=gemm|gemv (awq). VALUE is read as JSON when it parses, else "
                        "as a string. Repeatable")
    p.add_argument("--max-shard-size", default="50GB", metavar="SIZE",
                   help="split the weights into model-0000K-of-0000N.safetensors files of at most SIZE "
                        "(bytes, or 5GB, 512MiB, ...), listed in model.safetensors.index.json (default: 50GB)")
    p.set_defaults(handler=cmd_convert)
