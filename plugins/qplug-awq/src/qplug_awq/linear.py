"""``AwqLinear``: an ``nn.Module`` holding AWQ checkpoint tensors in their exact layout.

Its buffers carry the names, shapes and dtypes that autoawq's ``WQLinear_GEMM`` /
``WQLinear_GEMV`` (and transformers) save, so ``state_dict()`` is an AWQ checkpoint
and an AWQ checkpoint loads into it. Its forward needs nothing but torch: it
dequantises the packed weights (vectorised shifts and masks) and multiplies.

On the CPU the forward never materialises the float weight: it turns a few groups
of packed nibbles at a time into floats (a cache-sized chunk), multiplies them by
the input in a batched matmul, and applies scales and zero points to the small
per-group partial products. Elsewhere (CUDA without autoawq's kernels) it
dequantises and calls the device's matmul. ``cache_weight=True`` (per module, or
:func:`set_weight_cache` for a model) keeps the dequantised weight instead: fastest,
at the cost of a full-precision copy; the cache is dropped whenever the buffers
change (``load_state_dict``, ``.to()``, ``.half()``...).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .packing import (
    AWQ_ORDER,
    PackingError,
    dequantize_unpacked,
    gemv_zeros_width,
    pack_gemm,
    pack_gemv,
    unpack_gemm,
    unpack_gemv,
)
from .quant import quantize_weight

__all__ = ["VERSIONS", "AwqLinear", "set_weight_cache"]

#: dequantised elements per chunk in the fused CPU forward (2 MiB of float32: stays in cache)
_CHUNK_ELEMENTS = 1 << 19


def _split_nibbles(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] -> uint8 [..., 2n]: low nibble, then high nibble, of each byte (little-endian words)."""
    return torch.stack((b & 15, b >> 4), dim=-1).flatten(-2)


@functools.cache
def _gemm_nibble_columns(out_features: int, device: torch.device) -> torch.Tensor:
    """Output column held by each nibble position of a GEMM row (AWQ's interleaved order)."""
    base = torch.arange(0, out_features, 8).repeat_interleave(8)
    return (base + torch.tensor(AWQ_ORDER).repeat(out_features // 8)).to(device)


@functools.cache
def _gemm_output_index(out_features: int, device: torch.device) -> torch.Tensor:
    """Index that puts nibble-ordered outputs back in column order."""
    cols = _gemm_nibble_columns(out_features, device)
    index = torch.empty_like(cols)
    index[cols] = torch.arange(out_features, device=device)
    return index

#: layouts AwqLinear stores (the GEMV_fast, exllama and ipex layouts are repacks made at load time by their kernels)
VERSIONS = ("gemm", "gemv")


class AwqLinear(nn.Module):
    """A linear layer with 4-bit AWQ weights.

    :param in_features: input size (a multiple of ``group_size`` and of 8).
    :param out_features: output size (a multiple of 8).
    :param bits: weight bits; AWQ layouts define 4 only.
    :param group_size: input channels per quantisation group; ``-1`` for one group per row.
    :param version: ``"gemm"`` or ``"gemv"``, the checkpoint layout.
    :param bias: whether the layer has a bias (stored as float16, like autoawq).
    :param cache_weight: keep the dequantised weight between calls (fastest, full-precision memory).
    :param kernel: ``"auto"``, ``"autoawq"`` or ``"torch"`` (see :mod:`qplug_awq.autoawq`);
        ``None`` follows ``QPLUG_AWQ_KERNEL``.
    :param device: where to allocate the (zero) buffers; ``"meta"`` for a skeleton that
        ``load_state_dict(..., assign=True)`` fills.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        group_size: int = 128,
        version: str = "gemm",
        bias: bool = True,
        device: torch.device | str | None = None,
        cache_weight: bool = False,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        version = str(version).lower()
        if version not in VERSIONS:
            raise ValueError(f"version={version!r}: AwqLinear stores one of {list(VERSIONS)}")
        if bits != 4:
            raise ValueError(f"bits={bits!r}: AWQ layouts are defined for 4-bit weights only")
        group_size = in_features if group_size in (-1, 0) else group_size
        if group_size <= 0 or in_features % group_size:
            raise ValueError(f"group_size={group_size} must divide in_features={in_features}")
        per_word = 32 // bits
        if out_features % per_word or in_features % per_word:
            raise ValueError(
                f"in_features={in_features} and out_features={out_features} must be multiples of {per_word}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.version = version
        self.cache_weight = cache_weight
        #: "auto", "autoawq" or "torch" (see qplug_awq.autoawq); None: QPLUG_AWQ_KERNEL's choice
        self.kernel = kernel
        self._cached: torch.Tensor | None = None
        self._params: tuple | None = None
        self._external: tuple | None = None
        groups = in_features // group_size
        for name, shape, dtype in self._layout(groups):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        else:
            self.bias = None

    # ------------------------------------------------------------------ layout
    def _layout(self, groups: int) -> list[tuple[str, tuple[int, int], torch.dtype]]:
        per_word = 32 // self.bits
        if self.version == "gemm":
            return [
                ("qweight", (self.in_features, self.out_features // per_word), torch.int32),
                ("qzeros", (groups, self.out_features // per_word), torch.int32),
                ("scales", (groups, self.out_features), torch.float16),
            ]
        width = gemv_zeros_width(self.in_features, self.group_size, self.bits)
        return [
            ("qweight", (self.out_features, self.in_features // per_word), torch.int32),
            ("qzeros", (self.out_features, width), torch.int32),
            ("scales", (self.out_features, width * per_word), torch.float16),
        ]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        groups = self.in_features // self.group_size
        for name, shape, dtype in self._layout(groups):
            key = prefix + name
            if key in state_dict:
                t = state_dict[key]
                if tuple(t.shape) != shape:
                    raise PackingError(
                        f"{key}: shape {tuple(t.shape)} does not match the AWQ {self.version.upper()} layout "
                        f"{shape} for in_features={self.in_features}, out_features={self.out_features}, "
                        f"group_size={self.group_size}"
                    )
                if dtype == torch.int32 and t.dtype != torch.int32:
                    raise PackingError(f"{key}: packed tensors must be int32, got {t.dtype}")
        self._cached = self._params = self._external = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):
        self._cached = self._params = self._external = None
        return super()._apply(fn, recurse)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_unpacked(
        cls,
        iweight: torch.Tensor,
        izeros: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        group_size: int,
        bits: int = 4,
        version: str = "gemm",
    ) -> AwqLinear:
        """Build a layer from unpacked ``iweight [out, in]``, ``izeros``/``scales [out, groups]``."""
        out_features, in_features = iweight.shape
        layer = cls(
            in_features, out_features, bits=bits, group_size=group_size, version=version,
            bias=bias is not None, device="meta",
        )
        pack = pack_gemm if layer.version == "gemm" else pack_gemv
        qweight, qzeros, qscales = pack(iweight, izeros, scales, bits)
        layer.qweight, layer.qzeros, layer.scales = qweight, qzeros, qscales
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        bits: int = 4,
        group_size: int = 128,
        zero_point: bool = True,
        version: str = "gemm",
        kernel: str | None = None,
    ) -> AwqLinear:
        """Round-to-nearest quantise an ``nn.Linear`` (its weight as it is: AWQ scaling happens before)."""
        # autoawq quantises in float16: the stored fp16 scales are then exactly the ones the integers were made with
        w = linear.weight.detach().to(torch.float16)
        iweight, izeros, scales = quantize_weight(w, bits, group_size, zero_point)
        layer = cls.from_unpacked(
            iweight, izeros, scales, linear.bias, group_size=group_size, bits=bits, version=version
        )
        layer.kernel = kernel
        return layer.to(linear.weight.device)

    # ------------------------------------------------------------- dequantise
    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(iweight [out, in], izeros [out, groups], scales [out, groups])``."""
        if self.version == "gemm":
            return unpack_gemm(self.qweight, self.qzeros, self.scales, self.bits)
        return unpack_gemv(self.qweight, self.qzeros, self.scales, self.group_size, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` in ``dtype``: ``(q - z) * s`` as autoawq computes it."""
        return dequantize_unpacked(*self.unpack(), dtype=dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantised weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta", dtype=dtype)
        linear.weight = nn.Parameter(self.dequantize(dtype).contiguous(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.to(dtype).clone(), requires_grad=False)
        return linear

    # ----------------------------------------------------------------- forward
    def _group_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``scales`` and ``zeros * scales`` as ``[groups, out]`` in ``dtype``, columns in the packed order."""
        key = ("params", dtype, self.qweight.device)
        if self._params is not None and self._params[0] == key:
            return self._params[1], self._params[2]
        _, izeros, scales = self.unpack()  # [out, groups], column order = output order
        s = scales.t().to(dtype)
        zs = izeros.t().to(dtype) * s
        if self.version == "gemm":
            # put output columns in the order the nibbles come out of the packed bytes
            perm = _gemm_nibble_columns(self.out_features, self.qweight.device)
            s, zs = s[:, perm].contiguous(), zs[:, perm].contiguous()
        self._params = (key, s, zs)
        return s, zs

    def _forward_fused(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x @ W^T`` without materialising W: per chunk of groups, integer nibbles -> float, batched matmul.

        out = sum_g (x_g @ q_g) * s_g  -  sum_g (sum_i x_gi) * (z_g * s_g)
        """
        groups, g, out_f = self.in_features // self.group_size, self.group_size, self.out_features
        s, zs = self._group_params(dtype)
        xs = x.reshape(-1, groups, g).to(dtype).transpose(0, 1).contiguous()  # [groups, n, g]
        out = -(xs.sum(-1).t() @ zs)  # [n, out]
        chunk = max(1, _CHUNK_ELEMENTS // (g * out_f))
        if self.version == "gemm":
            nibbles = self.qweight.view(torch.uint8).view(groups, g, out_f // 2)
            if chunk == 1:  # one group per step: matmul, then scale-and-accumulate in one op
                for c in range(groups):
                    q = _split_nibbles(nibbles[c]).to(dtype)  # [g, out]
                    out.addcmul_(xs[c] @ q, s[c])
            else:
                for c in range(0, groups, chunk):
                    q = _split_nibbles(nibbles[c : c + chunk]).to(dtype).view(-1, g, out_f)
                    out += (torch.bmm(xs[c : c + chunk], q) * s[c : c + chunk].unsqueeze(1)).sum(0)
            out = out[:, _gemm_output_index(out_f, out.device)]
        else:
            # rows are output channels here: accumulate out^T [out, n] so each chunk stays contiguous
            nibbles = self.qweight.view(torch.uint8).view(out_f, groups, g // 2)
            xs_t = xs.transpose(1, 2)  # [groups, g, n]
            out_t = out.t().contiguous()
            for c in range(0, groups, chunk):
                q = _split_nibbles(nibbles[:, c : c + chunk]).to(dtype).view(out_f, -1, g).transpose(0, 1)
                part = torch.bmm(q.contiguous(), xs_t[c : c + chunk])  # [k, out, n]
                out_t += (part * s[c : c + chunk].unsqueeze(-1)).sum(0)
            out = out_t.t()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "torch":
            external = self._external
            if external is None or external[0] != x.device:
                from .autoawq import external_forward

                external = self._external = (x.device, external_forward(self, x.device))
            if external[1] is not None:
                return external[1](x).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        in_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.cache_weight or x.device.type != "cpu":
            # dequantise once per call (or once, cached) and let the device's matmul do the rest
            w = self._cached
            if w is None or w.dtype != in_dtype or w.device != self.qweight.device:
                w = self.dequantize(in_dtype)
                if self.cache_weight:
                    self._cached = w
            out = F.linear(x2.to(in_dtype), w)
        else:
            # half-precision sums of many terms lose digits on CPU: accumulate in float32 there
            compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
            out = self._forward_fused(x2, compute).to(in_dtype)
        if self.bias is not None:
            out = out + self.bias.to(in_dtype)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, version={self.version}"
        )


def set_weight_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the dequantised-weight cache on or off for every ``AwqLinear`` in ``model``; return how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, AwqLinear):
            module.cache_weight = enabled
            if not enabled:
                module._cached = None
            count += 1
    return count
