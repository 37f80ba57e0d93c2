"""CPU inference kernels for bitsandbytes' 4-bit (NF4/FP4) and LLM.int8 weights, declared to :mod:`qplug.kernels`.

bitsandbytes runs a CPU ``Linear4bit`` either by dequantizing the whole weight on every call (CPUs
without AVX512-BF16: several times slower than the float model) or, on AVX512-BF16 CPUs, by
repacking the weight on the first forward for its own bfloat16 kernel (block scales rounded to
bfloat16). ``Linear8bitLt`` quantizes every input row to int8 and multiplies in float32. The
kernels here read the checkpoint tensors as they are stored instead:

``qplug-4bit-cpu``
    * up to :data:`GEMV_MAX_ROWS` input rows (decode; 8 with AVX-512, 4 otherwise): a C GEMV
      (``cpu_kernels.c``) that looks each nibble up in the block's scaled 16-entry code book and
      accumulates in float32, over ranges of output rows on ``torch.get_num_threads()`` threads;
    * more rows (prefill): blocks of :data:`BLOCK_ELEMENTS` weights dequantized by a C kernel (the
      very values bitsandbytes' ``dequantize_4bit`` gives) into a reused buffer, each multiplied by
      torch's matmul -- in bfloat16 for bfloat16 inputs on CPUs with native bfloat16 dot products,
      float32 otherwise (bfloat16 and float16 matmuls without hardware support are several times
      slower than float32). The full float weight never exists.
    * Double quantization is decoded per block inside the kernels (no float32 copy of the scales).
    * GEMV needs ``in_features % 32 == 0`` (every real model's); other shapes take the blocked path.

``qplug-int8-cpu``
    * decode: a C GEMV over the int8 rows, ``y = (x . CB[n]) * SCB[n] / 127`` in float32;
    * prefill: row blocks of ``CB * SCB / 127`` in the matmul dtype, multiplied by torch's matmul.
    * This is bitsandbytes' own CPU training-mode arithmetic (``MatMul8bitFp``:
      ``x @ (CB * SCB / 127).T``) with float inputs. bitsandbytes' *inference* path
      (``MatMul8bitLt``) also quantizes the input rows to int8, keeping the columns whose magnitude
      exceeds ``llm_int8_threshold`` in float (the outlier decomposition); with unquantized inputs
      that decomposition is the identity (outlier and non-outlier columns are both multiplied in
      float), so ``threshold`` changes nothing here, and the results differ from bitsandbytes'
      inference forward by its activation-quantization error only.

Instruction sets: one build of the C kernels holds AVX-512, AVX2+FMA and portable paths; the best
the CPU runs is used unless ``QPLUG_BNB_ISA=avx512|avx2|portable`` asks for one (a path the CPU
cannot run makes the kernel refuse, naming it).

Where these kernels refuse a layer (not on the CPU, an input dtype other than float32/bfloat16/
float16, no C compiler or a failed build, int8 weights still in float for training) the layer runs
bitsandbytes' own forward (kernel ``bitsandbytes``), with one warning per reason on the CPU.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import torch

from qplug_bitsandbytes import _native

__all__ = [
    "BLOCK_ELEMENTS",
    "GEMV_MAX_ROWS",
    "ISAS",
    "ISA_ENV_VAR",
    "dequantize_4bit",
    "forward_4bit",
    "forward_int8",
    "isa",
    "prepare_4bit",
    "prepare_int8",
    "refuses_4bit",
    "refuses_int8",
    "warn_fallback",
]

#: Force an instruction-set path: ``avx512``, ``avx2`` or ``portable`` (default: the best the CPU runs).
ISA_ENV_VAR = "QPLUG_BNB_ISA"
ISAS = {"portable": 0, "avx2": 1, "avx512": 2}
#: Inputs of at most this many rows take the GEMV, per path; more rows the blocked dequantize + matmul one.
#: (Measured on a Zen 4 core: the AVX-512 GEMV costs ~0.25 ms per extra row of a 5632x2048 layer, about
#: a bf16 matmul of 8 rows; the AVX2 one more than twice that.)
GEMV_MAX_ROWS = {"avx512": 8, "avx2": 4, "portable": 4}
#: Weights per dequantized block of the prefill path (4 MiB as float32).
BLOCK_ELEMENTS = 1 << 20
# Below this many output rows per thread one thread does the GEMV (a pool hand-off costs ~20 us).
_GEMV_WEIGHTS_PER_THREAD = 1 << 18
_DEQUANT_ELEMENTS_PER_THREAD = 1 << 17
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

_warned: set[str] = set()
_scratch = threading.local()
_warn_lock = threading.Lock()


def _cpu_isa() -> int:
    lib = _native.library()
    return -1 if lib is None else int(lib.qplug_cpu_isa())


def isa() -> tuple[str | None, str | None]:
    """``(path name, None)`` for the instruction-set path the kernels use, or ``(None, why not)``."""
    lib = _native.library()
    if lib is None:
        return None, f"qplug's C kernels are unavailable ({_native.unavailable_reason()})"
    best = int(lib.qplug_cpu_isa())
    names = {v: k for k, v in ISAS.items()}
    wanted = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if not wanted:
        return names[best], None
    if wanted not in ISAS:
        return None, f"{ISA_ENV_VAR}={wanted!r} is not one of {sorted(ISAS)}"
    if ISAS[wanted] > best:
        return None, f"{ISA_ENV_VAR}={wanted} but this CPU runs at most {names[best]}"
    return wanted, None


@functools.lru_cache(maxsize=1)
def _native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 / AMX): then bf16 matmuls beat float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _matmul_dtype(dtype: torch.dtype, compute_dtype: torch.dtype | None = None) -> torch.dtype:
    """The blocked path's matmul dtype: bfloat16 where the input or the layer's declared compute dtype
    (bitsandbytes' ``compute_dtype``, which bitsandbytes itself computes in) is bfloat16 and the CPU has
    bfloat16 dot products; float32 otherwise (float16 and emulated bfloat16 matmuls are slower)."""
    wants_bf16 = torch.bfloat16 in (dtype, compute_dtype)
    return torch.bfloat16 if wants_bf16 and _native_bf16_matmul() else torch.float32


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
    if device.type != "cpu":
        return f"runs on the CPU only (tensors on {device})"
    if dtype not in _native.DTYPE_CODES:
        return f"inputs of {dtype} (it takes float32, bfloat16, float16)"
    _, why = isa()
    return why


# ---------------------------------------------------------------------------------------------------- 4-bit


class Layout4bit:
    """What the 4-bit kernels read: views of the checkpoint tensors (no copies) and the code book."""

    __slots__ = (
        "absmax",
        "absmax2",
        "blocksize",
        "code",
        "code2",
        "k",
        "n",
        "nested_blocksize",
        "offset",
        "packed",
        "qabsmax",
    )

    def __init__(self, packed, quant_state):
        n, k = (int(d) for d in quant_state.shape)
        self.n, self.k = n, k
        self.packed = packed.reshape(-1).view(torch.uint8)
        self.blocksize = int(quant_state.blocksize)
        self.code = quant_state.code.to(torch.float32).contiguous()
        if quant_state.nested:
            s2 = quant_state.state2
            self.absmax = None
            self.qabsmax = quant_state.absmax.contiguous()
            self.code2 = s2.code.to(torch.float32).contiguous()
            self.absmax2 = s2.absmax.to(torch.float32).contiguous()
            self.nested_blocksize = int(s2.blocksize)
            self.offset = float(quant_state.offset)
        else:  # a float16 / bfloat16 absmax (unusual) becomes float32 here: 4 bytes a block, counted
            self.absmax = quant_state.absmax.to(torch.float32).contiguous()
            self.qabsmax = self.code2 = self.absmax2 = None
            self.nested_blocksize, self.offset = 0, 0.0

    def scale_args(self) -> tuple:
        def ptr(t):
            return None if t is None else t.data_ptr()

        return (ptr(self.absmax), ptr(self.qabsmax), ptr(self.code2), ptr(self.absmax2), self.nested_blocksize,
                self.offset)

    def buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The dequantized block's scratch space: one per thread and dtype, shared by every layer (a
        buffer per layer would add megabytes a layer to the model's memory)."""
        buffers = _scratch.__dict__.setdefault("buffers", {})
        buf = buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


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


def prepare_4bit(layer, device: torch.device, dtype: torch.dtype) -> Layout4bit:
    # bitsandbytes' own kernel may have repacked the weight (AVX512-BF16 CPUs); ours reads the
    # canonical layout, which the module restores exactly (a permutation back, no requantization).
    layer.restore_canonical_layout()
    data, state = layer.canonical_weight()
    return Layout4bit(data, state)


def dequantize_4bit(layout: Layout4bit, first: int, count: int, dtype: torch.dtype,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Flattened weights ``[first, first + count)`` in ``dtype``: bitsandbytes' ``dequantize_4bit`` values."""
    lib = _native.library()
    out = torch.empty(count, dtype=dtype) if out is None else out
    args = (layout.blocksize, layout.code.data_ptr(), *layout.scale_args(), _native.DTYPE_CODES[dtype],
            out.data_ptr(), first)
    packed, isa_code = layout.packed.data_ptr(), ISAS[isa()[0]]
    status = _native.run_in_ranges(lambda start, n: lib.qplug_dequant_4bit(isa_code, packed, first + start, n, *args),
                                   count, _DEQUANT_ELEMENTS_PER_THREAD)
    if any(status):
        raise RuntimeError(f"qplug_dequant_4bit returned {status}")
    return out


def _gemv_4bit(layout: Layout4bit, x: torch.Tensor, isa_code: int) -> torch.Tensor:
    lib = _native.library()
    m, k, n = x.shape[0], layout.k, layout.n
    xr = torch.empty(m, k, dtype=torch.float32)
    if lib.qplug_gemv_4bit_input(x.data_ptr(), _native.DTYPE_CODES[x.dtype], m, k, xr.data_ptr()):
        raise RuntimeError("qplug_gemv_4bit_input failed")
    out = torch.empty(m, n, dtype=torch.float32)
    args = (xr.data_ptr(), m, k, layout.packed.data_ptr(), layout.blocksize, layout.code.data_ptr(),
            *layout.scale_args(), out.data_ptr(), n)
    rows_per_thread = max(1, _GEMV_WEIGHTS_PER_THREAD // k)
    status = _native.run_in_ranges(lambda first, count: lib.qplug_gemv_4bit(isa_code, first, count, *args),
                                   n, rows_per_thread, inline_first=True)
    if any(status):
        raise RuntimeError(f"qplug_gemv_4bit returned {status}")
    return out


def _blocked_4bit(layout: Layout4bit, x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
    k, n = layout.k, layout.n
    mm_dtype = _matmul_dtype(x.dtype, compute_dtype)
    xm = x.to(mm_dtype)
    rows = max(1, min(n, BLOCK_ELEMENTS // k))
    out = torch.empty(x.shape[0], n, dtype=mm_dtype)
    for r0 in range(0, n, rows):
        r = min(rows, n - r0)
        w = dequantize_4bit(layout, r0 * k, r * k, mm_dtype, out=layout.buffer(mm_dtype, rows * k)[: r * k])
        out[:, r0:r0 + r] = xm @ w.view(r, k).T
    return out


def forward_4bit(layer, layout: Layout4bit, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    name, _ = isa()
    if x.shape[0] <= GEMV_MAX_ROWS[name] and layout.k % 32 == 0:
        y = _gemv_4bit(layout, x, ISAS[name])
    else:
        y = _blocked_4bit(layout, x, getattr(layer, "compute_dtype", None))
    y = y.to(x.dtype)
    if layer.bias is not None:
        y += layer.bias.to(x.dtype)
    return y


# ---------------------------------------------------------------------------------------------------- int8


class LayoutInt8:
    """The int8 rows (the checkpoint's ``weight``, not copied) and their float32 scales ``SCB / 127``."""

    __slots__ = ("cb", "scale")

    def __init__(self, cb: torch.Tensor, scb: torch.Tensor):
        self.cb = cb.contiguous()
        # bitsandbytes: CB * (SCB * (1 / 127)); the same float32 scale per row (4 bytes a row, counted)
        self.scale = (scb.to(torch.float32) * (1.0 / 127.0)).contiguous()


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
    if m <= GEMV_MAX_ROWS[name]:
        lib = _native.library()
        xf = x.to(torch.float32).contiguous()
        out = torch.empty(m, n, dtype=torch.float32)
        args = (xf.data_ptr(), m, k, layout.cb.data_ptr(), layout.scale.data_ptr(), out.data_ptr(), n)
        status = _native.run_in_ranges(lambda first, count: lib.qplug_gemv_int8(ISAS[name], first, count, *args),
                                       n, max(1, _GEMV_WEIGHTS_PER_THREAD // k), inline_first=True)
        if any(status):
            raise RuntimeError(f"qplug_gemv_int8 returned {status}")
        y = out
    else:
        mm_dtype = _matmul_dtype(x.dtype)
        xm = x.to(mm_dtype)
        rows = max(1, min(n, BLOCK_ELEMENTS // k))
        y = torch.empty(m, n, dtype=mm_dtype)
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            w = (layout.cb[r0:r0 + r].to(torch.float32) * layout.scale[r0:r0 + r, None]).to(mm_dtype)
            y[:, r0:r0 + r] = xm @ w.T
    y = y.to(x.dtype)
    if layer.bias is not None:
        y += layer.bias.to(x.dtype)
    return y
