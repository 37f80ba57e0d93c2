"""4-bit code-book weights multiplied on the CPU by qplug's C kernels (:data:`qplug.native.CPU_KERNELS`).

A :class:`Lut4Weight` is the form both bitsandbytes' NF4/FP4 weights and affine integer weights
(GPTQ, AWQ) take here: the ``[n, k]`` codes row-major, two per byte (element ``2j`` in the high
nibble of byte ``j``), and per block of ``blocksize`` consecutive (flattened) elements a scale and
optionally a zero point, so that a weight is ``(code[nibble] - zero) * scale`` in float32. Scales
may be double-quantized the way bitsandbytes stores them (8-bit codes of a nested block scale).

:func:`matmul` computes ``x @ W.T``:

* up to :data:`GEMV_MAX_ROWS` input rows (decode): a C GEMV that looks each nibble up in the block's
  16-entry table (``(code - zero) * scale``, formed once per block) and accumulates in float32, over
  ranges of output rows on ``torch.get_num_threads()`` threads (:func:`decode` runs it, with the input
  conversion, the bias and the output rounding, in one C call: the per-token path of the kernels);
* more rows (prefill): tiles of rows dequantized by a C kernel and multiplied by torch's matmul
  (:func:`qplug.blocked.matmul`), in bfloat16 where the input (or the layer's compute dtype) is
  bfloat16 and the CPU has bfloat16 dot products, float32 otherwise. The full float weight never
  exists.

AVX-512, AVX2+FMA and portable paths live in one build; :func:`qplug.native.isa` says which runs.
"""

from __future__ import annotations

import torch

from qplug import blocked, native
from qplug.blocked import matmul_dtype

__all__ = ["GEMV_MAX_ROWS", "INT8_ACTIVATION_BLOCK", "Lut4Weight", "decode", "decode_int8_activations", "dequantize",
           "gemv_int8_activations", "int8_activations_refuse", "matmul", "matmul_dtype", "refuses"]

#: Inputs of at most this many rows take the GEMV, per path; more rows the blocked dequantize + matmul one.
#: (Measured on a Zen 4 core: the AVX-512 GEMV costs ~0.25 ms per extra row of a 5632x2048 layer, about
#: a bf16 matmul of 8 rows; the AVX2 one more than twice that.)
GEMV_MAX_ROWS = {"avx512": 8, "avx2": 4, "portable": 4}
# Below this many output rows per thread one thread does the GEMV (a pool hand-off costs ~20 us).
_GEMV_WEIGHTS_PER_THREAD = 1 << 18
_DEQUANT_ELEMENTS_PER_THREAD = 1 << 17



class Lut4Weight:
    """Codes, code book and block scales (see the module docstring); tensors are used as given, not copied.

    :param packed: uint8, ``n * k / 2`` bytes.
    :param code: the 16 float32 values a nibble stands for (``0..15`` for affine integers).
    :param absmax: float32 scale per block, or ``None`` when double-quantized (``qabsmax`` ...).
    :param zeros: float32 zero point per block, or ``None``.
    """

    __slots__ = ("_slots", "_weight_args", "absmax", "absmax2", "blocksize", "code", "code2", "k", "n",
                 "nested_blocksize", "offset", "packed", "qabsmax", "zeros")

    def __init__(self, packed: torch.Tensor, n: int, k: int, blocksize: int, code: torch.Tensor, *,
                 absmax: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
                 qabsmax: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                 absmax2: torch.Tensor | None = None, nested_blocksize: int = 0, offset: float = 0.0) -> None:
        if (absmax is None) == (qabsmax is None):
            raise ValueError("Lut4Weight takes either absmax or qabsmax (double quantization)")
        self.packed = packed.reshape(-1).view(torch.uint8)
        self.n, self.k, self.blocksize = n, k, blocksize
        self.code = code.to(torch.float32).contiguous()
        self.absmax, self.zeros = absmax, zeros
        self.qabsmax, self.code2, self.absmax2 = qabsmax, code2, absmax2
        self.nested_blocksize, self.offset = nested_blocksize, offset

    def scale_args(self) -> tuple:
        def ptr(t):
            return None if t is None else t.data_ptr()

        return (ptr(self.absmax), ptr(self.zeros), ptr(self.qabsmax), ptr(self.code2), ptr(self.absmax2),
                self.nested_blocksize, self.offset)

    def weight_args(self) -> tuple:
        """``(packed, blocksize, code, *scale_args())`` as the C kernels take them, worked out once (the GEMV
        runs per token and layer; the tensors this object holds keep their storage)."""
        try:
            return self._weight_args
        except AttributeError:
            self._weight_args = (self.packed.data_ptr(), self.blocksize, self.code.data_ptr(), *self.scale_args())
            return self._weight_args

    def slots(self) -> torch.Tensor:
        """The same arguments as the int64 slots ``qplug_linear_4bit`` reads (``QPLUG_W4_*`` in the C source;
        the offset as its float32 bits), worked out once."""
        try:
            return self._slots
        except AttributeError:
            packed, blocksize, code, absmax, zeros, qabsmax, code2, absmax2, nested, offset = self.weight_args()
            offset_bits = int(torch.tensor(offset, dtype=torch.float32).view(torch.int32))
            self._slots = torch.tensor([packed, self.n, self.k, blocksize, code, absmax or 0, zeros or 0,
                                        qabsmax or 0, code2 or 0, absmax2 or 0, nested, offset_bits],
                                       dtype=torch.int64)
            return self._slots


def refuses(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot take inputs of ``dtype`` on ``device`` here, or ``None``."""
    if device.type != "cpu":
        return f"runs on the CPU only (tensors on {device})"
    if dtype not in native.DTYPE_CODES:
        return f"inputs of {dtype} (it takes float32, bfloat16, float16)"
    return native.isa()[1]


def dequantize(weight: Lut4Weight, first: int, count: int, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Flattened weights ``[first, first + count)`` in ``dtype`` (float32 values rounded once)."""
    lib = native.CPU_KERNELS.get()
    out = torch.empty(count, dtype=dtype) if out is None else out
    args = (weight.blocksize, weight.code.data_ptr(), *weight.scale_args(), native.DTYPE_CODES[dtype],
            out.data_ptr(), first)
    packed, isa_code = weight.packed.data_ptr(), native.ISAS[native.isa()[0]]
    if native.openmp():  # on torch's own threads (see qplug.native.run_parallel)
        threads = native.threads_for(count, _DEQUANT_ELEMENTS_PER_THREAD)
        status = [lib.qplug_dequant_4bit_parallel(isa_code, threads, packed, first, count, *args)]
    else:
        status = native.run_in_ranges(lambda start, n: lib.qplug_dequant_4bit(isa_code, packed, first + start, n,
                                                                              *args), count,
                                      _DEQUANT_ELEMENTS_PER_THREAD)
    if any(status):
        raise RuntimeError(f"qplug_dequant_4bit returned {status}")
    return out


def _takes_gemv(weight: Lut4Weight, rows: int, isa_name: str) -> bool:
    """Whether ``rows`` input rows of ``weight`` take the GEMV (decode) rather than the blocked path."""
    return rows <= GEMV_MAX_ROWS[isa_name] and weight.k % 32 == 0 and weight.blocksize % 32 == 0


def decode(weight: Lut4Weight, x: torch.Tensor, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """``x[:, perm] @ W.T + bias`` rounded once to ``out_dtype`` (default ``x``'s) for a contiguous 2-D ``x``, or
    ``None`` where this path does not take it (more than :data:`GEMV_MAX_ROWS` rows, rows not of whole
    32-element chunks, a build without OpenMP): the GEMV of :func:`matmul` (same float32 sums) with the
    input conversion, the gather, the float32 ``bias`` and the rounding in the same C call. Per token and
    layer that is one buffer and one call instead of four buffers, three calls, a cast and an add."""
    return _one_call("qplug_linear_4bit", weight, x, perm, bias, out_dtype)


def _one_call(function: str, weight: Lut4Weight, x: torch.Tensor, perm: torch.Tensor | None,
              bias: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.Tensor | None:
    """Run the C decode entry point ``function`` (the arguments of ``qplug_linear_4bit``), or ``None`` where
    the GEMV does not take ``x``."""
    name, _ = native.isa()
    rows = x.shape[0]
    if name is None or not _takes_gemv(weight, rows, name) or not native.openmp():
        return None
    out_dtype = out_dtype or x.dtype
    out = torch.empty(rows, weight.n, dtype=out_dtype)
    threads = native.threads_for(weight.n, max(1, _GEMV_WEIGHTS_PER_THREAD // weight.k))
    status = getattr(native.CPU_KERNELS.get(), function)(
        native.ISAS[name], threads, weight.slots().data_ptr(), x.data_ptr(), native.DTYPE_CODES[x.dtype], rows,
        None if perm is None else perm.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
        native.DTYPE_CODES[out_dtype])
    if status:
        raise RuntimeError(f"{function} returned {status}")
    return out


def _gemv(weight: Lut4Weight, x: torch.Tensor, isa_code: int, perm: torch.Tensor | None) -> torch.Tensor:
    lib = native.CPU_KERNELS.get()
    m, k, n = x.shape[0], weight.k, weight.n
    xr = torch.empty(m, k, dtype=torch.float32)
    if lib.qplug_gemv_4bit_input(x.data_ptr(), native.DTYPE_CODES[x.dtype], m, k,
                                 None if perm is None else perm.data_ptr(), xr.data_ptr()):
        raise RuntimeError("qplug_gemv_4bit_input failed")
    out = torch.empty(m, n, dtype=torch.float32)
    args = (xr.data_ptr(), m, k, *weight.weight_args(), out.data_ptr(), n)
    status = native.run_parallel(lib, "qplug_gemv_4bit", n, max(1, _GEMV_WEIGHTS_PER_THREAD // k), isa_code, *args,
                                 inline_first=True)
    if any(status):
        raise RuntimeError(f"qplug_gemv_4bit returned {status}")
    return out


#: Inputs per activation scale of :func:`gemv_int8_activations` (the C kernel's block).
INT8_ACTIVATION_BLOCK = 64


def int8_activations_refuse(weight: Lut4Weight) -> str | None:
    """Why :func:`gemv_int8_activations` cannot take ``weight``, or ``None``."""
    if weight.qabsmax is not None or not torch.equal(weight.code, torch.arange(16, dtype=torch.float32)):
        return "affine integer codes only (code book 0..15, plain float32 scales)"
    if weight.blocksize % INT8_ACTIVATION_BLOCK or weight.k % weight.blocksize:
        return (f"groups of a multiple of {INT8_ACTIVATION_BLOCK} inputs that divide the row "
                f"(group {weight.blocksize}, in_features {weight.k})")
    return None


def gemv_int8_activations(weight: Lut4Weight, x: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x^[:, perm] @ W.T`` in float32 for an affine ``weight`` (see :func:`int8_activations_refuse`) and a
    contiguous 2-D ``x``, where ``x^`` is ``x`` rounded to int8 per block of :data:`INT8_ACTIVATION_BLOCK`
    inputs (scale ``max |x| / 127``): the C W4A8 GEMV (integer products, float32 sums; an opt-in trade of
    accuracy for speed, see ``docs/performance.md``)."""
    name, why = native.isa()
    if name is None:
        raise RuntimeError(why)
    lib = native.CPU_KERNELS.get()
    m, k, n = x.shape[0], weight.k, weight.n
    blocks = k // INT8_ACTIVATION_BLOCK
    xr = torch.empty(m, k, dtype=torch.float32)
    xq = torch.empty(m, k, dtype=torch.int8)
    sx = torch.empty(m, blocks, dtype=torch.float32)
    xs = torch.empty(m, blocks, dtype=torch.float32)
    if (lib.qplug_gemv_4bit_input(x.data_ptr(), native.DTYPE_CODES[x.dtype], m, k,
                                  None if perm is None else perm.data_ptr(), xr.data_ptr())
            or lib.qplug_w4a8_input(xr.data_ptr(), m, k, xq.data_ptr(), sx.data_ptr(), xs.data_ptr())):
        raise RuntimeError("qplug_w4a8_input failed")
    out = torch.empty(m, n, dtype=torch.float32)
    zeros = None if weight.zeros is None else weight.zeros.data_ptr()
    status = native.run_parallel(lib, "qplug_gemv_w4a8", n, max(1, _GEMV_WEIGHTS_PER_THREAD // k), native.ISAS[name],
                                 xq.data_ptr(), sx.data_ptr(), xs.data_ptr(), m, k, weight.packed.data_ptr(),
                                 weight.blocksize, weight.absmax.data_ptr(), zeros, out.data_ptr(), n,
                                 inline_first=True)
    if any(status):
        raise RuntimeError(f"qplug_gemv_w4a8 returned {status}")
    return out


def decode_int8_activations(weight: Lut4Weight, x: torch.Tensor, perm: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None,
                            out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """:func:`gemv_int8_activations` plus the float32 ``bias`` and one rounding to ``out_dtype`` (default ``x``'s)
    in one C call, as :func:`decode` is to :func:`matmul`; ``None`` where :func:`decode` would return ``None``.
    ``weight`` must be one :func:`int8_activations_refuse` accepts."""
    return _one_call("qplug_linear_w4a8", weight, x, perm, bias, out_dtype)


def _blocked(weight: Lut4Weight, x: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.Tensor:
    dtype = matmul_dtype(x.dtype, compute_dtype)
    k = weight.k

    def fill(first: int, count: int, out: torch.Tensor) -> None:
        dequantize(weight, first * k, count * k, dtype, out=out)

    return blocked.matmul(x.to(dtype), weight.n, k, fill, dtype)


def matmul(weight: Lut4Weight, x: torch.Tensor, compute_dtype: torch.dtype | None = None,
           perm: torch.Tensor | None = None) -> torch.Tensor:
    """``x[:, perm] @ W.T`` (``x @ W.T`` without ``perm``) for a contiguous 2-D ``x`` ``[m, k]`` on the CPU, in
    float32 or the blocked path's matmul dtype (the caller casts to what it returns). ``perm`` (int64, ``[k]``,
    contiguous) is GPTQ act-order's input order; the GEMV gathers it while it converts ``x`` to float32."""
    name, _ = native.isa()
    if _takes_gemv(weight, x.shape[0], name):
        return _gemv(weight, x, native.ISAS[name], perm)
    return _blocked(weight, x if perm is None else x.index_select(1, perm), compute_dtype)
