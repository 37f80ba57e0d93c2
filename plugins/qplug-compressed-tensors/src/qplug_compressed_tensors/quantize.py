"""Making compressed-tensors layers from float ones: round-to-nearest (data-free) or GPTQ (calibrated).

Round-to-nearest uses the compressed-tensors library's own arithmetic (``calculate_qparams`` on each
group's minimum and maximum, then its ``quantize``), so qplug's RTN gives the integers llm-compressor's
``QuantizationModifier`` with the min-max observer gives. Calibrated quantization runs qplug-gptq's
GPTQ algorithm (an optional dependency: ``pip install 'qplug-compressed-tensors[gptq]'``), whose
symmetric grid is compressed-tensors' (scale = absmax / 2**(bits-1) - 0.5) and whose asymmetric zero
points are the same integers shifted by ``2**(bits-1)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from qplug.errors import BackendUnavailableError, IncompatibleModelError

from .config import Scheme
from .linear import CompressedTensorsLinear

__all__ = ["gptq_block_calibration", "gptq_layers", "rtn_integers", "rtn_layer"]


def _args(scheme: Scheme):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=scheme.num_bits, type="int", symmetric=scheme.symmetric,
                            strategy=scheme.strategy, group_size=scheme.group_size)


def rtn_integers(weight: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest ``weight [out, in]`` with compressed-tensors' arithmetic.

    :return: ``(codes, scale, zero)``: unsigned uint8 codes ``[out, in]`` (signed + 2**(bits-1)), the scale in
        the weight's dtype (``[out, groups]``, or ``[1]`` for the tensor strategy) and the unsigned zero points
        of the same shape (``None`` when symmetric).
    """
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = _args(scheme)
    w = weight.detach()
    out_f, in_f = w.shape
    if scheme.strategy == "group":
        grouped = w.reshape(out_f, in_f // scheme.group_size, scheme.group_size)
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    elif scheme.strategy == "channel":
        low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    else:
        low, high = w.amin().reshape(1), w.amax().reshape(1)
    scale, zero_point = calculate_qparams(low, high, args)
    signed = quantize(x=w, scale=scale, zero_point=None if scheme.symmetric else zero_point, args=args,
                      dtype=torch.int8)
    offset = 1 << (scheme.num_bits - 1)
    codes = (signed.to(torch.int16) + offset).to(torch.uint8)
    zero = None if scheme.symmetric else zero_point.to(torch.int16) + offset
    return codes, scale, zero


def rtn_layer(linear: nn.Linear, scheme: Scheme, fmt: str) -> CompressedTensorsLinear:
    """``linear`` quantized round-to-nearest into a :class:`CompressedTensorsLinear` (on its device)."""
    codes, scale, zero = rtn_integers(linear.weight, scheme)
    return CompressedTensorsLinear.from_integers(
        codes, scale, zero, bits=scheme.num_bits, strategy=scheme.strategy, group_size=scheme.group_size,
        format=fmt, bias=linear.bias,
    )


def _gptq_algorithm():
    import importlib

    try:  # by its module name, so an uninstalled (or blocked) qplug_gptq.algorithm is always seen
        algorithm = importlib.import_module("qplug_gptq.algorithm")
    except ImportError as exc:
        raise BackendUnavailableError(
            "compressed-tensors: calibrated quantization runs qplug-gptq's GPTQ, which is not installed: "
            "pip install 'qplug-compressed-tensors[gptq]' (or quantize without calibration: round-to-nearest)",
            backend="compressed-tensors", install="pip install qplug-gptq",
        ) from exc
    return algorithm


def _gptq_settings(assigned: Mapping[str, Scheme]) -> dict[str, dict[str, Any]]:
    """Each module's GPTQ settings from its scheme (refusing the tensor strategy, which GPTQ has no grid for)."""
    for name, scheme in assigned.items():
        if scheme.strategy == "tensor":
            raise IncompatibleModelError(
                f"compressed-tensors: {name}: GPTQ computes a scale per group or per output channel, not one per "
                f"tensor (group {scheme.name!r}); use strategy 'channel' or 'group', or quantize without calibration"
            )
    return {
        name: {"bits": s.num_bits, "group_size": s.group_size if s.strategy == "group" else -1, "sym": s.symmetric,
               "desc_act": s.actorder in ("weight", "static"), "static_groups": s.actorder in ("weight", "static")}
        for name, s in assigned.items()
    }


def _defaults(algorithm, settings: dict[str, dict[str, Any]], damp_percent: float):
    """qplug-gptq's ``GPTQSettings``: the first module's grid (``settings`` gives each module its own)."""
    first = next(iter(settings.values()))
    return algorithm.GPTQSettings(bits=first["bits"], group_size=first["group_size"], damp_percent=damp_percent,
                                  desc_act=first["desc_act"], static_groups=first["static_groups"], sym=first["sym"])


def _batches(calibration: Any) -> list[dict[str, torch.Tensor]]:
    from qplug.calibration import padded_batches, token_samples

    return padded_batches(token_samples(calibration, method="compressed-tensors"))


def _layer(result, linear: nn.Linear, dtype: torch.dtype, scheme: Scheme, fmt: str) -> CompressedTensorsLinear:
    scale = result.scales.t().to(dtype).contiguous()  # compressed-tensors stores scales in the weight's dtype
    zero = None if scheme.symmetric else result.zeros.t().to(torch.int16).contiguous()
    return CompressedTensorsLinear.from_integers(
        result.intweight.t().contiguous(), scale, zero, bits=scheme.num_bits, strategy=scheme.strategy,
        group_size=scheme.group_size, format=fmt, bias=linear.bias,
    )


def gptq_layers(
    model: nn.Module,
    assigned: Mapping[str, Scheme],
    calibration: Any,
    formats: Mapping[str, str],
    *,
    damp_percent: float = 0.01,
) -> dict[str, CompressedTensorsLinear]:
    """Run qplug-gptq's GPTQ over ``assigned`` modules of ``model`` and build their layers.

    ``damp_percent`` defaults to llm-compressor's GPTQModifier dampening (0.01). Activation order
    ``weight``/``static`` processes columns by decreasing Hessian diagonal with groups kept in input order
    (no ``weight_g_idx``), as llm-compressor does.
    """
    algorithm = _gptq_algorithm()
    settings = _gptq_settings(assigned)
    names: Sequence[str] = list(assigned)
    dtypes = {name: model.get_submodule(name).weight.dtype for name in names}
    defaults = _defaults(algorithm, settings, damp_percent)
    results = algorithm.quantize_model(model, names, _batches(calibration), defaults, per_module=settings)
    return {name: _layer(results[name], model.get_submodule(name), dtypes[name], scheme, formats[name])
            for name, scheme in assigned.items()}


def gptq_block_calibration(
    model: nn.Module,
    assigned: Mapping[str, Scheme],
    calibration: Any,
    formats: Mapping[str, str],
    *,
    damp_percent: float = 0.01,
):
    """:func:`gptq_layers` one decoder block at a time: the ``calibrate_blocks`` hook's answer.

    :raises IncompatibleModelError: the model has no list of blocks holding the modules.
    """
    from qplug.blocks import BlockCalibration, find_blocks
    from qplug.modules import set_submodule

    algorithm = _gptq_algorithm()
    settings = _gptq_settings(assigned)
    names = list(assigned)
    found = find_blocks(model, names)
    if found is None:
        raise IncompatibleModelError(
            f"compressed-tensors: {type(model).__name__} has no list of decoder blocks (nn.ModuleList) holding the "
            "layers to quantize, so GPTQ cannot run block by block; load it and call qplug.quantize"
        )
    batches = _batches(calibration)
    defaults = _defaults(algorithm, settings, damp_percent)

    def quantize_block(name: str, block: nn.Module, calls: list) -> list:
        mine = [n for n in names if n.startswith(name + ".")]
        dtypes = {n: model.get_submodule(n).weight.dtype for n in mine}
        results, calls = algorithm.quantize_block(block, name, mine, calls, defaults, per_module=settings)
        for n in mine:
            set_submodule(model, n, _layer(results[n], model.get_submodule(n), dtypes[n], assigned[n], formats[n]))
        return calls

    return BlockCalibration(found[0], batches, names, quantize_block)
