"""Cheap content checks of bitsandbytes checkpoint tensors, run when a module loads them.

The shapes and the presence of every tensor are checked in :func:`qplug_bitsandbytes.modules.check_4bit_state`;
here: that a quant-state blob decodes to the object bitsandbytes expects (so a junk blob is a
:class:`qplug.CheckpointError`, not an ``AttributeError`` deep inside bitsandbytes), and that the
statistics are finite floating-point numbers (:func:`qplug.checks.check_tensor`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from bitsandbytes.functional import QuantState

from qplug.checks import check_tensor

__all__ = ["check_4bit_statistics", "quant_state_problem"]


def quant_state_problem(meta: Any) -> str | None:
    """What is wrong with a decoded 4-bit quant-state blob (a JSON object of known keys), or ``None``."""
    if not isinstance(meta, dict):
        return f"it decodes to a JSON {type(meta).__name__}, not an object"
    unknown = sorted(set(meta) - set(QuantState.valid_qs_keys))
    if unknown:
        return f"unknown keys {unknown}"

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_float_dtype(v: Any) -> bool:
        dtype = getattr(torch, v, None) if isinstance(v, str) else None
        return isinstance(dtype, torch.dtype) and dtype.is_floating_point

    shape = meta.get("shape")
    if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
        return f"shape {shape!r} is not a list of sizes"
    if "quant_type" in meta and meta["quant_type"] not in QuantState.valid_quant_types:
        return f"quant_type {meta.get('quant_type')!r} is not one of {list(QuantState.valid_quant_types)}"
    if not is_float_dtype(meta.get("dtype")):
        return f"dtype {meta['dtype']!r} is not a floating-point torch dtype"
    if any(k.startswith("nested_") for k in meta):
        if not is_int(meta.get("nested_blocksize")) or meta["nested_blocksize"] <= 0:
            return f"nested_blocksize {meta.get('nested_blocksize')!r} is not a positive integer"
        if not is_float_dtype(meta.get("nested_dtype")):
            return f"nested_dtype {meta.get('nested_dtype')!r} is not a floating-point torch dtype"
        offset = meta.get("nested_offset")
        if not (isinstance(offset, (int, float)) and not isinstance(offset, bool) and math.isfinite(offset)):
            return f"nested_offset {offset!r} is not a finite number"
    return None


def check_4bit_statistics(name: str, stats: dict[str, torch.Tensor], nested: bool) -> None:
    """Cheap content checks (:mod:`qplug.checks`): the block scales and code books are finite floats."""
    key = f"{name}.weight."
    if nested:  # absmax is itself quantized to uint8 codes, scaled by nested_absmax
        check_tensor(key + "absmax", stats["absmax"], dtypes=(torch.uint8,))
        check_tensor(key + "nested_absmax", stats["nested_absmax"], floating=True, finite=True)
        check_tensor(key + "nested_quant_map", stats["nested_quant_map"], floating=True, finite=True)
    else:
        check_tensor(key + "absmax", stats["absmax"], floating=True, finite=True)
    check_tensor(key + "quant_map", stats["quant_map"], floating=True, finite=True)
