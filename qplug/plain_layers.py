"""The plain form quantized layers convert through, and the records the conversion hooks exchange.

A layer of any weight-only integer format (GPTQ, AWQ, compressed-tensors, ...) reads into a
:class:`PlainLayer` (an affine :class:`qplug.int_kernels.IntWeight`, its bias, whether the format
declares one group per row) and is written back from one as a :class:`WrittenLayer`. Kept apart from
:mod:`qplug.conversion` (which drives a whole conversion) so the hook specifications can name these
types without importing the public API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from qplug.errors import ConversionError

if TYPE_CHECKING:
    import torch

    from qplug.int_kernels import IntWeight

__all__ = ["PlainLayer", "WrittenLayer", "exact_cast", "refuse"]


@attrs.frozen
class PlainLayer:
    """One quantized layer in the plain affine integer form every format converts through.

    :param weight: codes, scales and zero points (:class:`qplug.int_kernels.IntWeight`: ``q`` in run-time
        column order, ``perm`` the act-order permutation or ``None``).
    :param bias: the layer's bias as the checkpoint stores it, or ``None``.
    :param channelwise: the source format declares one group per row (GPTQ ``group_size=-1``,
        compressed-tensors' ``channel`` strategy), which the target's settings repeat.
    """

    weight: IntWeight
    bias: torch.Tensor | None = None
    channelwise: bool = False

    @property
    def symmetric(self) -> bool:
        """Whether every zero point is ``2**(bits-1)``, the one symmetric schemes imply without storing it."""
        return bool((self.weight.zero == 1 << (self.weight.bits - 1)).all())

    @property
    def act_order(self) -> bool:
        """Whether the groups are not contiguous runs of input columns (GPTQ ``desc_act``)."""
        return self.weight.perm is not None

    @property
    def group_size(self) -> int:
        """The group size a format declares: ``-1`` for one group per row."""
        return -1 if self.channelwise else self.weight.group_size

    def check_zeros_fit(self, name: str, to: str) -> None:
        """Refuse zero points outside ``[0, 2**bits)``, which a format storing them in ``bits``-wide fields
        would wrap around."""
        zero, top = self.weight.zero, (1 << self.weight.bits) - 1
        if zero.numel() and (int(zero.min()) < 0 or int(zero.max()) > top):
            raise refuse(name, to, f"its zero points span [{int(zero.min())}, {int(zero.max())}], and {to} stores "
                                   f"{self.weight.bits}-bit ones in [0, {top}]")

    def checkpoint_order(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(codes [out, in] in checkpoint column order, g_idx)``; ``g_idx`` (int32, each column's group)
        is ``None`` without act-order."""
        import torch

        w = self.weight
        if w.perm is None:
            return w.q, None
        q = torch.empty_like(w.q)
        q[:, w.perm] = w.q
        g_idx = torch.empty(w.perm.numel(), dtype=torch.int32, device=w.q.device)
        g_idx[w.perm] = (torch.arange(w.perm.numel(), device=w.q.device) // w.group_size).to(torch.int32)
        return q, g_idx


@attrs.frozen
class WrittenLayer:
    """What a target backend's ``write_int_layer`` gives back for one layer.

    :param tensors: the layer's checkpoint tensors by their name inside the layer (``"qweight"``), in
        the order to write them.
    :param settings: the config fields this layer needs in the target's ``quantization_config``
        (``{"bits": 4, "group_size": 128, "sym": False}``). Every layer must need the same ones; fields
        the caller set as options must agree.
    """

    tensors: dict[str, torch.Tensor]
    settings: dict[str, Any]


def refuse(name: str, to: str, why: str) -> ConversionError:
    """The error a ``write_int_layer`` implementation raises: ``cannot convert NAME to TO: WHY``."""
    return ConversionError(f"cannot convert {name} to {to}: {why}")


def exact_cast(tensor: torch.Tensor | None, dtype: torch.dtype, *, name: str, to: str,
               what: str) -> torch.Tensor | None:
    """``tensor`` in ``dtype``, refused (naming the layer and ``what``) when any value would change."""
    if tensor is None or tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    if not bool((cast.to(tensor.dtype) == tensor).all()):
        have, want = (str(d).removeprefix("torch.") for d in (tensor.dtype, dtype))
        raise refuse(name, to, f"its {have} {what} do not all fit {want} exactly ({to} stores {want}; converting "
                               "would change the weights)")
    return cast
