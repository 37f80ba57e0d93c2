"""``qplug inspect DIR``: a quantized checkpoint's method, config, modules, kernels and sizes.

Shapes and bytes come from the safetensors headers, so a checkpoint whose backend is missing is
still described; module kinds, kernels and ``--source`` errors need the model loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import qplug
from qplug.cli.methods import read_quantization_config
from qplug.cli.output import (
    EXIT_OK,
    FORMATTER,
    CLIError,
    examples,
    make_console,
    one_line,
    print_json,
    quiet_transformers,
    readable_config,
    rich_text,
    warn,
)
from qplug.errors import QPlugError, QuantConfigError, UnknownBackendError
from qplug.manager import get_plugin_manager

__all__ = ["add_parser", "cmd_inspect"]


def _checkpoint_tensors(directory: Path) -> dict[str, dict[str, Any]]:
    """``{tensor: {"dtype", "shape", "bytes"}}`` from the checkpoint's safetensors headers (no tensor is read).

    The files are found and their headers validated by the core (:class:`qplug.checkpoint.CheckpointWeights`),
    the way loading finds and checks them.
    """
    from qplug.checkpoint import CheckpointWeights

    with contextlib.ExitStack() as stack:
        weights = CheckpointWeights(directory, stack)
        return {
            name: {"dtype": fh.dtype_name(name), "shape": list(fh.shape(name)), "bytes": fh.nbytes(name)}
            for name, fh in weights.where.items()
        }


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
    """Per quantized layer: error of its dequantized weight against the float checkpoint in ``source``.

    The float weights are read one at a time with the core's reader (plain reads, no memory map).
    """
    import torch

    from qplug.checkpoint import CheckpointWeights

    if not source.is_dir():
        raise CLIError(f"--source {source}: no such directory")
    qplug.dequantize(model)
    errors = {}
    with contextlib.ExitStack() as stack:
        reference_weights = CheckpointWeights(source, stack)
        for module, kind in kinds.items():
            sub = model.get_submodule(module)
            if kind in {"Linear", "?"} or not isinstance(sub, torch.nn.Linear):
                continue
            key = f"{module}.weight"
            if key not in reference_weights:
                raise CLIError(f"--source {source}: has no tensor {key!r}; is it the float model this was "
                               "quantized from?")
            reference = reference_weights.get(key).double()
            weight = sub.weight.detach().double()
            if weight.shape != reference.shape:
                raise CLIError(f"--source {source}: {key} has shape {list(reference.shape)}, the checkpoint's "
                               f"layer {list(weight.shape)}")
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
        warn(one_line(exc))
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
        load_error = one_line(exc)
    if config is not None:
        method, provider = config.quant_method, get_plugin_manager().get_entry(config.quant_method).plugin.provider
        config_dict, config_diff = readable_config(config.to_dict(), type(config)), config.to_diff_dict()
        quiet_transformers()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = qplug.load_quantized(directory)
        except Exception as exc:
            if args.debug:
                raise
            load_error = one_line(exc)
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
    from qplug.measure import numel

    total_params = sum(numel(r["shape"]) for r in rows)
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
        warn(f"cannot load the model, so module kinds are unknown: {load_error}")
    if args.json:
        print_json(report)
        return EXIT_OK
    console = make_console()
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
        cells = [rich_text(row["module"]), rich_text(row["kind"]), rich_text("×".join(map(str, row["shape"]))),
                 rich_text(f"{row['bits']:.2f}" if row["bits"] is not None else "-"), rich_text(f"{row['bytes']:,}")]
        if kernels:
            cells.append(rich_text(row.get("kernel") or ""))
        if args.source:
            has = "relative_error" in row
            cells += [rich_text(f"{row['relative_error']:.2e}" if has else ""),
                      rich_text(f"{row['max_abs_error']:.2e}" if has else "")]
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


def add_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``qplug inspect``: its arguments, help and handler."""
    p = commands.add_parser(
        "inspect", parents=[common], formatter_class=FORMATTER, help="describe a quantized checkpoint",
        description="Show a quantized checkpoint's method and config, each module's kind, shape, bits per "
                    "parameter and bytes, and the totals. With --source, also each quantized layer's weight "
                    "error: the layer dequantized against the float weights in FLOATDIR.",
        epilog=examples("qplug inspect ./tiny-nf4", "qplug inspect ./tiny-nf4 --source ./tiny",
                         "qplug inspect ./tiny-nf4 --json"),
    )
    p.add_argument("dir", metavar="DIR", help="the quantized checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--source", metavar="FLOATDIR", help="the floating-point model DIR was quantized from")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="choose each layer's kernel for inputs of this dtype (default: the model's dtype)")
    p.set_defaults(handler=cmd_inspect)
