"""CPU inference kernels for bitsandbytes' 4-bit (NF4/FP4) and LLM.int8 weights, declared to :mod:`qplug.kernels`.

bitsandbytes runs a CPU ``Linear4bit`` either by dequantizing the whole weight on every call (CPUs
without AVX512-BF16: several times slower than the float model) or, on AVX512-BF16 CPUs, by
repacking the weight on the first forward for its own bfloat16 kernel (block scales rounded to
bfloat16). ``Linear8bitLt`` quantizes every input row to int8 and multiplies in float32. The
kernels here read the checkpoint tensors as they are stored instead:

``qplug-4bit-cpu``
    qplug's 4-bit code-book kernels (:mod:`qplug.lut4`, shared with the GPTQ and AWQ backends) on the
    stored bytes and ``QuantState``:

    * up to ``qplug.lut4.GEMV_MAX_ROWS`` input rows (decode; 8 with AVX-512, 4 otherwise): a C GEMV
      that looks each nibble up in the block's scaled 16-entry code book and accumulates in float32;
    * more rows (prefill): blocks of weights dequantized by a C kernel (the very values bitsandbytes'
      ``dequantize_4bit`` gives) into a reused buffer, each multiplied by torch's matmul. The full
      float weight never exists.
    * Double quantization is decoded per block inside the kernels (no float32 copy of the scales).
    * GEMV needs ``in_features % 32 == 0`` (every real model's); other shapes take the blocked path.

``qplug-int8-cpu``
    * decode: a C GEMV over the int8 rows, ``y = (x . CB[n]) * SCB[n] / 127`` in float32;
    * prefill: tiles of rows of ``CB * SCB / 127`` dequantized by a C kernel in the matmul dtype,
      multiplied by torch's matmul (:func:`qplug.int_kernels.int8_blocked_matmul`).
    * This is bitsandbytes' own CPU training-mode arithmetic (``MatMul8bitFp``:
      ``x @ (CB * SCB / 127).T``) with float inputs. bitsandbytes' *inference* path
      (``MatMul8bitLt``) also quantizes the input rows to int8, keeping the columns whose magnitude
      exceeds ``llm_int8_threshold`` in float (the outlier decomposition); with unquantized inputs
      that decomposition is the identity (outlier and non-outlier columns are both multiplied in
      float), so ``threshold`` changes nothing here, and the results differ from bitsandbytes'
      inference forward by its activation-quantization error only.

``qplug-llm-int8-cpu`` (opt-in, :func:`forward_int8_inference`)
    bitsandbytes' inference arithmetic for decode: the input rounded to float16, elements at or above the
    threshold set aside (their columns multiplied in float against the dequantized weight columns), each
    row quantized to int8 by its largest remaining magnitude, an exact int8 x int8 C GEMV
    (``vpmaddubsw``), bitsandbytes' scaling ``dot * (absmax * SCB) / 127**2``. Prefill runs
    ``qplug-int8-cpu``'s float path.

Instruction sets: one build of qplug's C kernels holds AVX-512, AVX2+FMA and portable paths; the best
the CPU runs is used unless ``QPLUG_ISA=avx512|avx2|portable`` asks for one (``QPLUG_BNB_ISA``, its
old name, still works; a path the CPU cannot run makes the kernel refuse, naming it).

Where these kernels refuse a layer (not on the CPU, an input dtype other than float32/bfloat16/
float16, no C compiler or a failed build, int8 weights still in float for training) the layer runs
bitsandbytes' own forward (kernel ``bitsandbytes``), with one warning per reason on the CPU.
"""

from __future__ import annotations

import threading
import warnings

import torch

from qplug import lut4, native
from qplug.errors import KernelUnavailableError
from qplug.int_kernels import int8_blocked_matmul
from qplug.native import ISA_ENV_VAR, ISAS, isa

__all__ = [
    "ISAS",
    "ISA_ENV_VAR",
    "dequantize_4bit",
    "forward_4bit",
    "forward_int8",
    "forward_int8_inference",
    "isa",
    "prepare_4bit",
    "prepare_int8",
    "refuses_4bit",
    "refuses_int8",
    "warn_fallback",
]

# Below this many output rows per thread one thread does the GEMV (a pool hand-off costs ~20 us).
_GEMV_WEIGHTS_PER_THREAD = 1 << 18
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_warned: set[str] = set()
_warn_lock = threading.Lock()


def warn_fallback(layer, device: torch.device, why: str) -> None:
    """One warning per reason and process: a CPU layer runs bitsandbytes' (slower) forward."""
    if device.type != "cpu":
        return
    with _warn_lock:
        if why in _warned:
            return
        _warned.add(why)
    warnings.warn(f"{type(layer).__name__} on the CPU runs bitsandbytes' own forward (slower): {why}",
                  RuntimeWarning, stacklevel=4)


def _common_refusal(device: torch.device, dtype: torch.dtype) -> str | None:
    return lut4.refuses(device, dtype)


# ---------------------------------------------------------------------------------------------------- 4-bit


def lut4_weight(packed: torch.Tensor, quant_state) -> lut4.Lut4Weight:
    """bitsandbytes' packed bytes and ``QuantState`` as qplug's 4-bit code-book weight (views, no copies)."""
    n, k = (int(d) for d in quant_state.shape)
    if quant_state.nested:
        s2 = quant_state.state2
        return lut4.Lut4Weight(packed, n, k, int(quant_state.blocksize), quant_state.code,
                               qabsmax=quant_state.absmax.contiguous(), code2=s2.code.to(torch.float32).contiguous(),
                               absmax2=s2.absmax.to(torch.float32).contiguous(), nested_blocksize=int(s2.blocksize),
                               offset=float(quant_state.offset))
    # a float16 / bfloat16 absmax (unusual) becomes float32 here: 4 bytes a block, counted
    return lut4.Lut4Weight(packed, n, k, int(quant_state.blocksize), quant_state.code,
                           absmax=quant_state.absmax.to(torch.float32).contiguous())


def refuses_4bit(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    why = _common_refusal(device, dtype)
    if why is not None:
        return why
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        return "the weight is not quantized"
    if state.quant_type not in ("nf4", "fp4"):
        return f"quant_type {state.quant_type!r}"
    if int(state.blocksize) not in _BLOCKSIZES:
        return f"blocksize {state.blocksize}"
    if len(state.shape) != 2:
        return f"a weight of shape {tuple(state.shape)} (2-D only)"
    return None


def prepare_4bit(layer, device: torch.device, dtype: torch.dtype) -> lut4.Lut4Weight:
    # bitsandbytes' own kernel may have repacked the weight (AVX512-BF16 CPUs); ours reads the
    # canonical layout, which the module restores exactly (a permutation back, no requantization).
    layer.restore_canonical_layout()
    data, state = layer.canonical_weight()
    return lut4_weight(data, state)


def dequantize_4bit(weight: lut4.Lut4Weight, first: int, count: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Flattened weights ``[first, first + count)`` in ``dtype``: bitsandbytes' ``dequantize_4bit`` values."""
    return lut4.dequantize(weight, first, count, dtype, out)


def forward_4bit(layer, weight: lut4.Lut4Weight, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = lut4.decode(weight, x)  # decode shapes: one C call
    if y is None:
        y = lut4.matmul(weight, x, getattr(layer, "compute_dtype", None)).to(x.dtype)
    if layer.bias is not None:
        y += layer.bias.to(x.dtype)
    return y


# ---------------------------------------------------------------------------------------------------- int8


class LayoutInt8:
    """The int8 rows (the checkpoint's ``weight``, not copied), their float32 ``SCB`` and scales ``SCB / 127``."""

    __slots__ = ("cb", "scale", "scb")

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor):
        self.cb = cb.contiguous()
        self.scb = scb.to(torch.float32).contiguous()
        # bitsandbytes: CB * (SCB * (1 / 127)); the same float32 scale per row (4 bytes a row, counted)
        self.scale = (self.scb * (1.0 / 127.0)).contiguous()


def refuses_int8(layer, device: torch.device, dtype: torch.dtype) -> str | None:
    why = _common_refusal(device, dtype)
    if why is not None:
        return why
    if layer.state.has_fp16_weights:
        return "the weight is kept in float for training (has_fp16_weights)"
    if layer.weight.dtype != torch.int8 or layer._scb() is None:
        return "the weight is not quantized to int8"
    return None


def prepare_int8(layer, device: torch.device, dtype: torch.dtype) -> LayoutInt8:
    return LayoutInt8(layer.weight.data, layer._scb())


def forward_int8(layer, layout: LayoutInt8, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    n, k = layout.cb.shape
    m = x.shape[0]
    name, _ = isa()
    if m <= lut4.GEMV_MAX_ROWS[name] and native.openmp():  # decode: one C call (see qplug.lut4.decode)
        y = torch.empty(m, n, dtype=x.dtype)
        status = native.CPU_KERNELS.get().qplug_linear_int8(
            ISAS[name], native.threads_for(n, max(1, _GEMV_WEIGHTS_PER_THREAD // k)), layout.cb.data_ptr(),
            layout.scale.data_ptr(), n, k, x.data_ptr(), native.DTYPE_CODES[x.dtype], m, y.data_ptr(),
            native.DTYPE_CODES[x.dtype])
        if status:
            raise KernelUnavailableError(f"qplug_linear_int8 returned {status}")
    elif m <= lut4.GEMV_MAX_ROWS[name]:
        lib = native.CPU_KERNELS.get()
        xf = x.to(torch.float32).contiguous()
        out = torch.empty(m, n, dtype=torch.float32)
        args = (xf.data_ptr(), m, k, layout.cb.data_ptr(), layout.scale.data_ptr(), out.data_ptr(), n)
        status = native.run_parallel(lib, "qplug_gemv_int8", n, max(1, _GEMV_WEIGHTS_PER_THREAD // k), ISAS[name],
                                     *args, inline_first=True)
        if any(status):
            raise KernelUnavailableError(f"qplug_gemv_int8 returned {status}")
        y = out
    else:  # tiles of CB * (SCB / 127) dequantized by qplug's C kernel, multiplied by torch's matmul
        y = int8_blocked_matmul(x, layout.cb, k, layout.scale, None)
    y = y.to(x.dtype)
    if layer.bias is not None:
        y += layer.bias.to(x.dtype)
    return y


def forward_int8_inference(layer, layout: LayoutInt8, x: torch.Tensor) -> torch.Tensor:
    """``qplug-llm-int8-cpu``: bitsandbytes' inference arithmetic (``MatMul8bitLt``) for decode-sized inputs: rows
    rounded to float16 and quantized to int8 (outlier columns, at or above ``llm_int8_threshold``, multiplied in
    float against their dequantized weight columns), an exact int8 x int8 GEMV in C, bitsandbytes' scaling. Larger
    inputs (prefill) run ``qplug-int8-cpu``'s float path."""
    name, _ = isa()
    m = x.shape[0]
    if m > lut4.GEMV_MAX_ROWS[name]:
        return forward_int8(layer, layout, x)
    x = x.contiguous()
    n, k = layout.cb.shape
    lib = native.CPU_KERNELS.get()
    xq = torch.empty(m, k, dtype=torch.int8)
    absmax = torch.empty(m, dtype=torch.float32)
    outlier = torch.zeros(k, dtype=torch.uint8)
    columns = lib.qplug_llm_int8_input(x.data_ptr(), native.DTYPE_CODES[x.dtype], m, k, float(layer.state.threshold),
                                       xq.data_ptr(), absmax.data_ptr(), outlier.data_ptr())
    out = torch.empty(m, n, dtype=torch.float32)
    status = native.run_parallel(lib, "qplug_gemv_llm_int8", n, max(1, _GEMV_WEIGHTS_PER_THREAD // k), ISAS[name],
                                 xq.data_ptr(), absmax.data_ptr(), m, k, layout.cb.data_ptr(), layout.scb.data_ptr(),
                                 out.data_ptr(), n, inline_first=True)
    if any(status):
        raise KernelUnavailableError(f"qplug_gemv_llm_int8 returned {status}")
    if columns:  # bitsandbytes' decomposition: those columns in the input's dtype against their float weights
        cols = outlier.nonzero().view(-1)
        weights = (layout.cb[:, cols].float() * layout.scb[:, None] * 7.874015718698502e-3).to(x.dtype)
        out.addmm_(x[:, cols].float(), weights.float().t())
    if layer.bias is not None:
        out += layer.bias.float()
    return out.to(x.dtype)
