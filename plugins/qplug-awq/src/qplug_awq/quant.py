"""Group-wise round-to-nearest quantisation of a weight matrix (the arithmetic AWQ applies).

Zero-point (asymmetric) quantisation, per group of ``group_size`` input channels::

    scale = max(max(w) - min(w), 1e-5) / (2**bits - 1)
    zero  = clamp(-round(min(w) / scale), 0, 2**bits - 1)
    q     = clamp(round(w / scale) + zero, 0, 2**bits - 1)

Symmetric quantisation (``zero_point=False``)::

    scale = max(max|w|, 1e-5) / (2**(bits-1) - 1)
    q     = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1) + 2**(bits-1)
    zero  = 2**(bits-1)

The symmetric case is stored with a constant zero point of ``2**(bits-1)``, so it
fits the same unsigned checkpoint layout (every AWQ kernel reads ``qzeros``).
All arithmetic happens in the dtype of ``w`` (autoawq quantises in float16).
"""

from __future__ import annotations

import torch

from qplug.errors import IncompatibleModelError

__all__ = ["pseudo_quantize", "quantize_weight"]


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    if w.dim() != 2:
        raise IncompatibleModelError(f"weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    g = w.shape[1] if group_size in (-1, 0) else group_size
    if w.shape[1] % g:
        raise IncompatibleModelError(f"group_size={group_size} does not divide in_features={w.shape[1]}")
    return w.reshape(-1, g), g


def _params(wg: torch.Tensor, bits: int, zero_point: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    if zero_point:
        max_int, min_int = 2**bits - 1, 0
        max_val = wg.amax(dim=1, keepdim=True)
        min_val = wg.amin(dim=1, keepdim=True)
        scales = (max_val - min_val).clamp(min=1e-5) / max_int
        zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    else:
        max_int, min_int = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
        scales = wg.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / max_int
        zeros = torch.zeros_like(scales)
    return scales, zeros, min_int, max_int


def pseudo_quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """Quantise and immediately dequantise ``w`` (shape kept, dtype of ``w``)."""
    wg, _ = _grouped(w, group_size)
    scales, zeros, min_int, max_int = _params(wg, bits, zero_point)
    q = torch.clamp(torch.round(wg / scales) + zeros, min_int, max_int)
    return ((q - zeros) * scales).reshape(w.shape)


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``w [out, in]``; return ``(iweight [out, in], izeros [out, groups], scales [out, groups])``.

    ``iweight`` and ``izeros`` are unsigned (``0 <= v < 2**bits``); ``scales`` has the dtype of ``w``.
    """
    out_features, in_features = w.shape
    wg, g = _grouped(w, group_size)
    scales, zeros, min_int, max_int = _params(wg, bits, zero_point)
    q = torch.clamp(torch.round(wg / scales) + zeros, min_int, max_int)
    offset = 0 if zero_point else 2 ** (bits - 1)
    groups = in_features // g
    iweight = (q.to(torch.int16) + offset).reshape(out_features, in_features)
    izeros = (zeros.to(torch.int16) + offset).reshape(out_features, groups)
    return iweight, izeros, scales.reshape(out_features, groups)
