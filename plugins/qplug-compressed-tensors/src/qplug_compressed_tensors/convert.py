"""Convert a checkpoint between GPTQ, AWQ (GEMM) and compressed-tensors ``pack-quantized`` without re-quantizing.

Every layer of the three formats holds the same affine integer weight, ``w = (q - zero) * scale``
(:class:`qplug.int_kernels.IntWeight`): conversion reads each layer's plain form and writes the same codes,
scales and zero points in the target's packing, so the dequantized weights are identical, bit for bit.
Where the target cannot hold them exactly it refuses, naming the layer and the reason:

* AWQ stores 4-bit weights only, ``float16`` scales, and no activation order;
* compressed-tensors runs 4- and 8-bit weights here and (since 0.20) has no activation order either, and its
  symmetric schemes store no zero point (so zero points must all be ``2**(bits-1)`` to convert to one);
* GPTQ's act-order ``g_idx`` carries over to GPTQ only.

The model is loaded with :func:`qplug.load_quantized` (its skeleton from ``config.json`` via transformers),
converted layer by layer, and written atomically like :func:`qplug.save_quantized`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

import qplug
from qplug.errors import QPlugError

__all__ = ["TARGETS", "ConversionError", "convert"]

#: what :func:`convert` writes, by backend name (aliases accepted)
TARGETS = ("awq", "compressed-tensors", "gptq")


class ConversionError(QPlugError, ValueError):
    """A checkpoint cannot be written in the requested format without changing its weights."""


def _plain(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, torch.Tensor | None]:
    """``(codes [out, in] in checkpoint column order, scale [out, groups], zero [out, groups], bits, group, g_idx)``."""
    w = layer.int_weight()
    q = w.q
    g_idx = None
    if w.perm is not None:  # back to checkpoint column order; the groups each column belongs to
        q = torch.empty_like(w.q)
        q[:, w.perm] = w.q
        g_idx = torch.empty(w.perm.numel(), dtype=torch.int32)
        g_idx[w.perm] = (torch.arange(w.perm.numel()) // w.group_size).to(torch.int32)
    return q, w.scale, w.zero.to(torch.int16), w.bits, w.group_size, g_idx


def _declared_group(layer: nn.Module) -> int:
    """The group size the source format declares (``-1``: one group per row), which the settings of the
    converted checkpoint repeat: a layer of 128 inputs in groups of 128 is written as groups of 128."""
    return int(getattr(layer, "group_size", -1))


def _refuse(name: str, to: str, why: str) -> ConversionError:
    return ConversionError(f"cannot convert {name} to {to}: {why}")


def _to_compressed_tensors(name: str, layer: nn.Module):
    from qplug_compressed_tensors.linear import CompressedTensorsLinear

    q, scale, zero, bits, group, g_idx = _plain(layer)
    if bits not in (4, 8):
        raise _refuse(name, "compressed-tensors", f"{bits}-bit weights (4 and 8 carry over)")
    if g_idx is not None:
        raise _refuse(name, "compressed-tensors", "its act-order g_idx (compressed-tensors 0.20 removed activation "
                                                  "order 'group', so transformers and vLLM could not load it)")
    symmetric = bool((zero == 1 << (bits - 1)).all())
    strategy = "channel" if _declared_group(layer) == -1 else "group"
    new = CompressedTensorsLinear.from_integers(
        q, scale.contiguous(), None if symmetric else zero, bits=bits, strategy=strategy,
        group_size=group if strategy == "group" else None, bias=layer.bias,
    )
    key = (bits, symmetric, strategy, group if strategy == "group" else None)
    return new, key


def _to_gptq(name: str, layer: nn.Module):
    from qplug_gptq.linear import GPTQLinear

    q, scale, zero, bits, group, g_idx = _plain(layer)
    if g_idx is None:
        g_idx = torch.arange(layer.in_features, dtype=torch.int32) // group
    symmetric = bool((zero == 1 << (bits - 1)).all())
    group_size = _declared_group(layer)
    new = GPTQLinear.from_integers(
        q.t().to(torch.int32), zero.t().to(torch.int32), scale.t(), g_idx, bits=bits, group_size=group_size,
        bias=layer.bias, sym=symmetric, dtype=scale.dtype,
    )
    desc_act = not torch.equal(g_idx, torch.arange(layer.in_features, dtype=torch.int32) // group)
    return new, (bits, symmetric, group_size, desc_act)


def _to_awq(name: str, layer: nn.Module):
    from qplug_awq.linear import AwqLinear

    q, scale, zero, bits, group, g_idx = _plain(layer)
    if bits != 4:
        raise _refuse(name, "awq", f"{bits}-bit weights (AWQ's layouts hold 4-bit ones)")
    if g_idx is not None:
        raise _refuse(name, "awq", "its act-order g_idx (AWQ has no activation order)")
    if not torch.equal(scale.to(torch.float16).to(scale.dtype), scale):
        raise _refuse(name, "awq", f"its {scale.dtype} scales do not all fit float16 exactly (AWQ stores float16)")
    group_size = _declared_group(layer)
    new = AwqLinear.from_unpacked(q, zero, scale, layer.bias, group_size=group, bits=4, version="gemm")
    return new, (4, group_size)


def _target_config(to: str, keys: set, source: qplug.QuantConfig):
    if len(keys) != 1:
        raise ConversionError(f"cannot convert to {to}: the layers have {len(keys)} different settings {sorted(keys)}, "
                              "and qplug writes one per converted checkpoint")
    (key,) = keys
    if to == "compressed-tensors":
        from qplug_compressed_tensors.config import CompressedTensorsConfig, scheme_dict

        bits, symmetric, strategy, group = key
        return CompressedTensorsConfig(
            config_groups={"group_0": scheme_dict(bits, symmetric=symmetric, strategy=strategy, group_size=group)},
            ignore=list(source.skip_patterns()) or ["lm_head"],
        )
    if to == "gptq":
        from qplug_gptq.config import GPTQConfig

        bits, symmetric, group_size, desc_act = key
        return GPTQConfig(bits=bits, group_size=group_size, sym=symmetric, desc_act=desc_act,
                          modules_to_not_convert=list(source.skip_patterns()) or None)
    from qplug_awq.config import AwqConfig

    _, group_size = key
    return AwqConfig(bits=4, group_size=group_size, zero_point=True, version="gemm",
                     modules_to_not_convert=list(source.skip_patterns()) or None)


_BUILDERS = {"compressed-tensors": _to_compressed_tensors, "gptq": _to_gptq, "awq": _to_awq}


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], to: str) -> Path:
    """Write the quantized checkpoint in ``src`` to ``dst`` in the format ``to``, the same integers repacked.

    :param to: ``"compressed-tensors"`` (``pack-quantized``), ``"gptq"`` (v1) or ``"awq"`` (GEMM); aliases work.
    :raises ConversionError: naming the layer and why its weights cannot be held exactly by ``to``.
    :raises BackendUnavailableError: the target's backend (qplug-gptq, qplug-awq) is not installed.
    """
    to = qplug.get_plugin_manager().get_backend(to).name
    if to not in _BUILDERS:
        raise ConversionError(f"cannot convert to {to!r}: qplug converts between {', '.join(TARGETS)}")
    qplug.get_plugin_manager().get_backend(to).ensure_available()
    model = qplug.load_quantized(src)
    source = qplug.quantized_config(model)
    from qplug.modules import set_submodule

    layers = [(n, m) for n, m in model.named_modules() if callable(getattr(m, "int_weight", None))]
    if not layers:
        raise ConversionError(f"{src}: no layer of {source.quant_method!r} exposes its integer weights to convert")
    keys = set()
    for name, layer in layers:
        with torch.no_grad():
            new, key = _BUILDERS[to](name, layer)
        set_submodule(model, name, new)
        keys.add(key)
    config = _target_config(to, keys, source)
    return _write(model, config, dst)


def _write(model: nn.Module, config: qplug.QuantConfig, dst: str | os.PathLike[str]) -> Path:
    """What :func:`qplug.save_quantized` writes, for ``model`` holding ``config``'s layers."""
    from qplug.checkpoint import state_tensors, write_checkpoint

    serialized = qplug.get_plugin_manager().hook.serialize(config=config, model=model)
    model_config: dict[str, Any] = model.config.to_dict()
    model_config["quantization_config"] = serialized
    tensors, tied = state_tensors(model)
    return write_checkpoint(dst, tensors, model_config, tied=tied, metadata={"qplug.version": qplug.__version__})
