"""``GPTQLinear``: a linear layer holding GPTQ tensors in the exact checkpoint layout.

Buffers (names, shapes and dtypes as AutoGPTQ / transformers write them):

* ``qweight`` int32 ``[in_features * bits / 32, out_features]``
* ``qzeros``  int32 ``[n_groups, out_features * bits / 32]``
* ``scales``  ``[n_groups, out_features]`` (float16 in almost every checkpoint)
* ``g_idx``   int32 ``[in_features]``
* ``bias``    ``[out_features]`` or absent

These are what ``state_dict()`` returns, byte for byte, however many forwards and moves came
before. The forward runs on one of :attr:`GPTQLinear.kernels` (:mod:`qplug.int_kernels`), chosen per
device and input dtype by :mod:`qplug.kernels`: torch's int4 tinygemm (CUDA, CPU) for 4 bits, its
int8 weight-only matmul for 8 bits on the CPU, and a blocked dequantize-and-multiply for everything
else. Each builds its run-time layout once from the plain integer form (:meth:`GPTQLinear.int_weight`,
act-order folded into an input permutation). ``dequant-cached`` (opt-in: ``qplug.set_kernel(model,
"dequant-cached")``, or ``cache_weight = True`` on a module) keeps a full-precision copy instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qplug import int_kernels, native
from qplug.errors import CheckpointError, IncompatibleModelError
from qplug.kernels import KernelLayer
from qplug.plain_layers import PackedCodes

from . import packing


def _codes_out_in(qweight: torch.Tensor, bits: int, perm: torch.Tensor | None = None) -> torch.Tensor:
    """``qweight`` -> uint8 codes ``[out, in]`` (their columns in ``perm``'s order when given): for 4 and 8 bits
    straight from its bytes (a few times faster)."""
    rows, out_f = qweight.shape
    if bits in (4, 8) and qweight.is_contiguous() and qweight.device.type == "cpu":
        # the words transposed by tiles (8 bits: those bytes are the codes), 4 bits then each byte's nibbles in
        # C (in perm's order, in the same pass): 3x faster than torch's strided ops, and act-order's
        # index_select of single bytes was slower still
        words = native.transposed(qweight).reshape(-1).view(out_f, rows)  # plain strides, also for one row
        if bits == 8:
            codes = words.view(torch.uint8)
            return codes if perm is None else codes.index_select(1, perm)
        return native.unpacked_nibbles(words.view(torch.uint8), perm)
    if bits not in (4, 8) or not qweight.is_contiguous():
        q = packing.unpack_qweight(qweight, bits).to(torch.uint8).t()
    else:
        # little-endian words: byte k of word (r, o) holds input rows r*per + k*(8/bits) ... (low nibble first)
        b = qweight.view(torch.uint8).view(rows, out_f, 4).permute(1, 0, 2)  # [out, rows, 4]
        q = b.reshape(out_f, rows * 4) if bits == 8 else torch.stack((b & 15, b >> 4), dim=-1).reshape(out_f, rows * 8)
    return q if perm is None else q.index_select(1, perm)


def _qweight_from_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_codes_out_in`: uint8 codes ``[out, in]`` -> ``qweight`` int32 ``[in * bits / 32, out]``."""
    out_f, in_f = q.shape
    if bits == 8:
        b = q.reshape(out_f, in_f // 4, 4)
    elif bits == 4:
        b = q.reshape(out_f, in_f // 8, 4, 2)
        b = b[..., 0] | b[..., 1] << 4
    else:
        return packing.pack_qweight(q.t(), bits)
    return b.permute(1, 0, 2).contiguous().view(torch.int32).reshape(in_f * bits // 32, out_f)


def _pack_codes(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``[in, out]`` integers -> ``qweight``: bytes straight into words for 4 and 8 bits (several times faster
    than the general bit stream of :func:`packing.pack_qweight`, and the same bits)."""
    if bits not in (4, 8) or intweight.dtype.is_floating_point or not intweight.numel():
        return packing.pack_qweight(intweight, bits)
    if intweight.dtype != torch.uint8 or bits == 4:  # uint8 always holds 8-bit codes: no pass to check them
        low, high = torch.aminmax(intweight) if intweight.dtype != torch.uint8 else (0, intweight.max())
        if int(low) < 0 or int(high) >= 2**bits:  # a value out of range would overwrite its neighbours
            raise ValueError(f"values to pack at {bits} bits must lie in [0, {2**bits - 1}], "
                             f"got range [{int(low)}, {int(high)}]")
    return _qweight_from_codes(intweight.t().to(torch.uint8), bits)


class GPTQLinear(KernelLayer, nn.Module):
    """Linear layer with GPTQ-packed weights; see the module docstring."""

    kernels = int_kernels.KERNELS

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        bias: bool = True,
        checkpoint_format: str = "gptq",
        sym: bool = True,
        dtype: torch.dtype = torch.float16,
        weight_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        packing.check_bits(bits)
        if group_size != -1 and group_size <= 0:
            raise IncompatibleModelError(f"group_size={group_size!r}: must be -1 or a positive integer")
        if checkpoint_format not in packing.FORMATS:
            raise IncompatibleModelError(
                f"checkpoint_format={checkpoint_format!r}; accepted values: {list(packing.FORMATS)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.checkpoint_format = checkpoint_format
        self.sym = sym
        # dtype of the float layer this one stands for: what to_linear() gives back
        self.weight_dtype = weight_dtype or dtype
        gs = in_features if group_size == -1 else group_size
        n_groups = math.ceil(in_features / gs)
        rows = packing.packed_length(in_features, bits, f"in_features of {type(self).__name__}")
        cols = packing.packed_length(out_features, bits, f"out_features of {type(self).__name__}")
        self.register_buffer("qweight", torch.zeros((rows, out_features), dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros((n_groups, cols), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros((n_groups, out_features), dtype=dtype, device=device))
        self.register_buffer("g_idx", packing.default_g_idx(in_features, group_size, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_integers(
        cls,
        intweight: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        *,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        checkpoint_format: str = "gptq",
        sym: bool = True,
        dtype: torch.dtype = torch.float16,
        weight_dtype: torch.dtype | None = None,
    ) -> GPTQLinear:
        """Build from unpacked integers: ``intweight [in, out]``, ``zeros``/``scales`` ``[groups, out]``."""
        in_features, out_features = intweight.shape
        return cls._from_qweight(_pack_codes(intweight, bits), in_features, out_features, zeros, scales, g_idx,
                                 bits=bits, group_size=group_size, bias=bias, checkpoint_format=checkpoint_format,
                                 sym=sym, dtype=dtype, weight_dtype=weight_dtype)

    @classmethod
    def from_packed(
        cls,
        codes: PackedCodes,
        zeros: torch.Tensor | PackedCodes,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        *,
        group_size: int,
        bias: torch.Tensor | None = None,
        checkpoint_format: str = "gptq",
        sym: bool = True,
        dtype: torch.dtype = torch.float16,
        weight_dtype: torch.dtype | None = None,
        in_place: bool = False,
    ) -> GPTQLinear:
        """Build from packed codes (:class:`qplug.plain_layers.PackedCodes`, checkpoint column order):
        ``qweight`` is their words transposed, the same fields packed along ``in``, lowest bits first.
        ``zeros``: ``[groups, out]``, or packed as ``qzeros`` packs them (:class:`~qplug.plain_layers.PackedCodes`
        of ``[groups, out]``, the stored convention applied to their words by :func:`packing.pack_qzeros`).
        ``in_place``: transposed in the words' own memory (they are the caller's to overwrite)."""
        return cls._from_qweight(codes.transposed_words(in_place=in_place), codes.in_features, codes.out_features,
                                 zeros, scales, g_idx, bits=codes.bits, group_size=group_size, bias=bias,
                                 checkpoint_format=checkpoint_format, sym=sym, dtype=dtype, weight_dtype=weight_dtype)

    @classmethod
    def _from_qweight(cls, qweight: torch.Tensor, in_features: int, out_features: int, zeros: torch.Tensor,
                      scales: torch.Tensor, g_idx: torch.Tensor, *, bits: int, group_size: int,
                      bias: torch.Tensor | None, checkpoint_format: str, sym: bool, dtype: torch.dtype,
                      weight_dtype: torch.dtype | None) -> GPTQLinear:
        mod = cls(
            in_features,
            out_features,
            bits=bits,
            group_size=group_size,
            bias=bias is not None,
            checkpoint_format=checkpoint_format,
            sym=sym,
            dtype=dtype,
            weight_dtype=weight_dtype,
            device="meta",  # every buffer is assigned below: allocating and zeroing them first is wasted
        )
        if scales.shape != mod.scales.shape:
            raise ValueError(f"scales has shape {tuple(scales.shape)}, expected {tuple(mod.scales.shape)}")
        mod.qweight = qweight
        mod.qzeros = packing.pack_qzeros(zeros, bits, checkpoint_format)
        mod.scales = scales.to(dtype).contiguous()
        mod.g_idx = g_idx.to(torch.int32).contiguous()
        mod.check_g_idx()
        if bias is not None:
            mod.bias = bias.detach().to(dtype).clone()
        return mod

    # ------------------------------------------------------------------ loading
    def _expected(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        floats = (torch.float16, torch.bfloat16, torch.float32)
        exp = {
            "qweight": (tuple(self.qweight.shape), (torch.int32,)),
            "qzeros": (tuple(self.qzeros.shape), (torch.int32,)),
            "scales": (tuple(self.scales.shape), floats),
            "g_idx": ((self.in_features,), (torch.int32, torch.int64)),
        }
        if self.bias is not None:
            exp["bias"] = ((self.out_features,), floats)
        return exp

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        where = prefix.rstrip(".") or type(self).__name__
        for name, (shape, dtypes) in self._expected().items():
            t = state_dict.get(prefix + name)
            if t is None:
                continue
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"{where}: tensor {prefix + name} has shape {tuple(t.shape)}, expected {shape} "
                    f"for a {self.bits}-bit GPTQ layer with in_features={self.in_features}, "
                    f"out_features={self.out_features}, group_size={self.group_size}"
                )
            if t.dtype not in dtypes:
                raise CheckpointError(
                    f"{where}: tensor {prefix + name} has dtype {t.dtype}, expected one of {list(dtypes)}"
                )
        # Cheap content checks (qplug.checks): finite scales, and every g_idx entry a group of this layer.
        from qplug.checks import check_tensor

        check_tensor(prefix + "scales", state_dict.get(prefix + "scales"), finite=True)
        check_tensor(prefix + "g_idx", state_dict.get(prefix + "g_idx"), low=0, high=self.scales.shape[0])
        gkey = prefix + "g_idx"
        had_g_idx = gkey in state_dict
        n_missing = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not had_g_idx and gkey in missing_keys[n_missing:]:
            # Old checkpoints without act-order omit g_idx; it is implied by group_size.
            missing_keys.remove(gkey)
            self.g_idx = packing.default_g_idx(self.in_features, self.group_size, device=self.qweight.device)
        elif had_g_idx and self.g_idx.dtype != torch.int32:
            self.g_idx = self.g_idx.to(torch.int32)
        self.reset_kernel()
        if (prefix + "qzeros") in state_dict:
            self.check_zero_convention(where)
        if had_g_idx:
            self.check_g_idx(where)

    def check_g_idx(self, name: str = "") -> None:
        """Raise unless ``g_idx`` puts ``group_size`` input channels in each group (act-order permutes them)."""
        if self.g_idx.device.type == "meta":
            return
        try:
            int_kernels.plain_from_g_idx(self.g_idx, self.group_size)
        except ValueError as exc:
            raise CheckpointError(f"{name or 'GPTQ layer'}: {exc} (group_size={self.group_size})") from None

    def check_zero_convention(self, name: str = "") -> None:
        """Raise when the zero points contradict ``checkpoint_format`` in a detectable way.

        In a symmetric checkpoint every zero point is ``2**(bits-1)``: v1 stores
        ``2**(bits-1) - 1`` and v2 stores ``2**(bits-1)``.  If *all* stored values of a
        symmetric layer equal the other convention's value, the checkpoint is
        mislabelled and using it would yield garbage, so we refuse.
        """
        if not self.sym or self.qzeros.device.type == "meta" or self.qzeros.numel() == 0:
            return
        stored = packing.unpack(self.qzeros, self.bits, dim=1)
        mid = 2 ** (self.bits - 1)
        v1_value, v2_value = mid - 1, mid
        fmt = self.checkpoint_format
        wrong = v2_value if fmt == "gptq" else v1_value
        if bool((stored == wrong).all()):
            other = "gptq_v2" if fmt == "gptq" else "gptq"
            raise CheckpointError(
                f"{name or 'GPTQ layer'}: qzeros all store {wrong}, the symmetric zero point of "
                f"checkpoint_format={other!r}, but the config says checkpoint_format={fmt!r} "
                f"(which stores {v1_value if fmt == 'gptq' else v2_value}); fix checkpoint_format "
                f"in the quantization_config"
            )

    # ------------------------------------------------------------------ compute
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``[out_features, in_features]`` floating-point weight."""
        return packing.dequantize_weight(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.bits,
            self.checkpoint_format,
            dtype=dtype or self.scales.dtype,
        )

    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The reference weight (:meth:`dequantize_weight`), for :mod:`qplug.kernels`."""
        return self.dequantize_weight(dtype)

    def int_weight(self) -> int_kernels.IntWeight:
        """The plain integer form the kernels build their layouts from (new tensors, same device)."""
        scale, zero, group, perm = self.int_weight_parts()
        q = _codes_out_in(self.qweight, self.bits, perm).contiguous()  # [out, in] uint8, run-time column order
        return int_kernels.IntWeight(q, scale, zero, self.bits, group, perm)

    def int_weight_parts(self) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """:meth:`int_weight` but its codes: ``(scale [out, groups], zero [out, groups], columns per group, perm)``."""
        zero = packing.unpack_qzeros(self.qzeros, self.bits, self.checkpoint_format).t().to(torch.int16)
        perm = int_kernels.plain_from_g_idx(self.g_idx, self.group_size)
        group = self.in_features if self.group_size == -1 else self.group_size
        return self.scales.t(), zero.contiguous(), group, perm

    def packed_codes(self) -> PackedCodes | None:
        """The codes as :class:`qplug.plain_layers.PackedCodes` (``qweight`` transposed, no copy), or ``None`` at
        3 bits, whose fields straddle words."""
        return PackedCodes(self.qweight.t(), self.bits) if self.bits in PackedCodes.BITS else None

    #: ``qweight`` holds nothing but the codes: a kernel that keeps them in its own packing drops it
    code_tensors = ("qweight",)

    def checkpoint_from_codes(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """``qweight`` from uint8 codes ``[out, in]``, bit for bit (the inverse of :meth:`int_weight`'s reading)."""
        return {"qweight": _qweight_from_codes(q, self.bits)}

    # the old per-layer switch, kept for compatibility: on means the opt-in dequant-cached kernel
    cache_weight = int_kernels.CACHE_WEIGHT_SWITCH

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise IncompatibleModelError(
                f"input has {x.shape[-1]} features, this GPTQLinear expects {self.in_features}"
            )
        return self.run_kernel(x)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight, in the dtype of the layer it replaced."""
        dtype = self.weight_dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype)
        lin.weight = nn.Parameter(self.dequantize_weight(dtype), requires_grad=False)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, format={self.checkpoint_format}"
        )
