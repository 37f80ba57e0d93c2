"""AWQ, activation-aware weight quantization (Lin et al., 2023), in plain PyTorch.

For each decoder block in turn:

1. run the block on the calibration activations and record the input of every
   selected linear layer (the block's output becomes the next block's input,
   computed with the block still in full precision, as autoawq does);
2. for each *scaling group* (linear layers that read the same input, and the op
   that produces it: a norm or another linear), grid-search an input-channel scale
   ``s = mean|x|**r / mean|w|**(1-r)`` (r in 0, 1/20, ..., 19/20) minimising the
   error of the group's output with weights ``Q(W * s) / s``; fold ``1/s`` into
   the producing op and ``s`` into the weights;
3. optionally clip each weight group's range (q/k projections excepted) to the
   shrink factor minimising the error of ``X @ Q(W)``;
4. round-to-nearest quantise and pack each selected linear into an
   :class:`~qplug_awq.linear.AwqLinear`.

The arithmetic follows autoawq 0.2.9's ``AwqQuantizer`` step for step (same
grids, normalisations, sample sizes and dtypes), so on the same model and
calibration tokens both produce the same checkpoint up to floating-point ties;
the tests check this where autoawq is installed.

Scaling groups are known for Llama-style blocks (``input_layernorm``,
``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
``mlp.{gate,up,down}_proj``: Llama, Mistral, Qwen2/3, ...). Layers of other
blocks are clipped and quantised without scale search, with a warning.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from qplug.blocks import BlockCall, capture_first_block, first_output
from qplug.blocks import find_blocks as find_block_list
from qplug.calibration import token_blocks, token_samples
from qplug.errors import IncompatibleModelError
from qplug.progress import track

from .linear import AwqLinear
from .quant import pseudo_quantize

__all__ = [
    "AwqSettings", "BlockQuantizer", "ScalingGroup", "calibration_tokens", "find_blocks", "quantize_model",
    "scaling_groups",
]

logger = logging.getLogger("qplug.awq")

#: longest calibration block cut from samples of different lengths (autoawq's max_calib_seq_len)
_MAX_BLOCK = 512
#: linear layers whose range is never clipped: their outputs meet in the q·k product
_NO_CLIP = ("q_", "k_", "query", "key", "Wqkv")


@attrs.frozen
class AwqSettings:
    """What the search needs to know (from :class:`~qplug_awq.config.AwqConfig` and the call)."""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"
    duo_scaling: bool = True
    apply_clip: bool = True
    n_grid: int = 20
    max_shrink: float = 0.5
    clip_sample_tokens: int = 512


@attrs.frozen
class ScalingGroup:
    """Linear layers sharing one input, the op producing that input, and the module to inspect.

    :param prev: name (inside the block) of the norm or linear whose output feeds ``layers``.
    :param layers: names of the linear layers scaled together.
    :param inspect: name of the module whose output measures the error ("" = the single layer).
    :param block_kwargs: whether ``inspect`` takes the block's extra arguments (attention does).
    """

    prev: str
    layers: tuple[str, ...]
    inspect: str = ""
    block_kwargs: bool = False


# ---------------------------------------------------------------------------------------------
# calibration data and blocks
# ---------------------------------------------------------------------------------------------


def calibration_tokens(calibration: Any) -> torch.Tensor:
    """Calibration data as one LongTensor ``[samples, seq]``: the samples of
    :func:`qplug.calibration.token_samples` (the rules every backend shares), stacked when of one
    length, else joined and cut into blocks of ``min(512, total)`` tokens as autoawq does with its
    ``max_calib_seq_len``.
    """
    return token_blocks(token_samples(calibration, method="awq"), max_block=_MAX_BLOCK)


def find_blocks(model: nn.Module, module_names: Iterable[str]) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of repeated blocks holding most of ``module_names``, with its name."""
    found = find_block_list(model, module_names)
    if found is None:
        raise IncompatibleModelError(
            f"AWQ: {type(model).__name__} has no list of blocks (nn.ModuleList) holding the layers to quantize"
        )
    return found


def scaling_groups(block: nn.Module, selected: set[str]) -> list[ScalingGroup]:
    """The scaling groups of a Llama-style block whose layers are all ``selected`` (names inside the block)."""

    def has(*names: str) -> bool:
        return all(_get(block, n) is not None for n in names)

    groups: list[ScalingGroup] = []
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    if has("input_layernorm", *qkv):
        groups.append(ScalingGroup("input_layernorm", qkv, "self_attn", block_kwargs=True))
    if has("self_attn.v_proj", "self_attn.o_proj"):
        v, o = _get(block, "self_attn.v_proj"), _get(block, "self_attn.o_proj")
        # with grouped-query attention v's outputs do not map one to one onto o's inputs
        if v.weight.shape == o.weight.shape:
            groups.append(ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",)))
    gate_up = ("mlp.gate_proj", "mlp.up_proj")
    if has("post_attention_layernorm", *gate_up):
        groups.append(ScalingGroup("post_attention_layernorm", gate_up, "mlp"))
    if has("mlp.up_proj", "mlp.down_proj"):
        groups.append(ScalingGroup("mlp.up_proj", ("mlp.down_proj",)))
    return [g for g in groups if all(layer in selected for layer in g.layers)]


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _accepted_kwargs(module: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(module.forward).parameters
    return {k: v for k, v in kwargs.items() if k in params}


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).float().pow(2).sum().item()) / a.numel()


@torch.no_grad()
def search_scale(
    layers: Sequence[nn.Linear],
    x: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    settings: AwqSettings,
) -> torch.Tensor:
    """Grid-search the input-channel scale of ``layers`` (which all read ``x``)."""
    g = settings.group_size
    weight = torch.cat([layer.weight for layer in layers], dim=0)
    grouped = weight.abs().view(-1, weight.shape[1] if g in (-1, 0) else g)
    w_mean = (grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)).view(weight.shape).mean(0)
    x_mean = (x.abs().reshape(-1, x.shape[-1]).float().sum(0) / (x.numel() // x.shape[-1])).to(x.dtype)

    reference = _clip_finite(forward(x))
    originals = [layer.weight.data.clone() for layer in layers]
    best_error, best_scales = float("inf"), None
    for step in range(settings.n_grid):
        ratio = step / settings.n_grid
        if settings.duo_scaling:
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales[torch.isinf(scales) | torch.isnan(scales)] = 1
        row = scales.view(1, -1)
        for layer, original in zip(layers, originals, strict=True):
            layer.weight.data = pseudo_quantize(original * row, settings.bits, g, settings.zero_point) / row
        error = _mse(reference, _clip_finite(forward(x)))
        if error < best_error:
            best_error, best_scales = error, scales.clone()
    for layer, original in zip(layers, originals, strict=True):
        layer.weight.data = original
    if best_scales is None:
        raise FloatingPointError("AWQ: every candidate scale gave a non-finite error (NaN/inf activations?)")
    return best_scales


def _clip_finite(t: torch.Tensor) -> torch.Tensor:
    info = torch.finfo(t.dtype)
    return t.clip(info.min, info.max)


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, settings: AwqSettings) -> torch.Tensor:
    """Per (output channel, group) clipping bound of ``weight`` minimising the error of ``x @ Q(W)^T``."""
    out_features, in_features = weight.shape
    g = in_features if settings.group_size in (-1, 0) else settings.group_size
    feats = x.reshape(-1, in_features)
    feats = feats[:: max(1, feats.shape[0] // settings.clip_sample_tokens)]
    feats = feats.reshape(feats.shape[0], -1, g).transpose(0, 1)  # groups, tokens, g
    w_all = weight.reshape(out_features, 1, -1, g)  # out, 1, groups, g

    def group_out(w: torch.Tensor) -> torch.Tensor:
        # sum_i x[t, G, i] * w[o, G, i] as one batched matmul per group (autoawq sums an
        # [out, tokens, groups, g] product instead: same numbers up to summation order)
        return torch.bmm(feats, w.squeeze(1).permute(1, 2, 0)).permute(2, 1, 0)  # out, tokens, groups
    batch = 256 if out_features % 256 == 0 else 64
    if out_features % batch:
        batch = out_features
    bounds = []
    for start in range(0, out_features, batch):
        w = w_all[start : start + batch]
        org_max = w.abs().amax(dim=-1, keepdim=True)  # out, 1, groups, 1
        best_max = org_max.clone()
        min_err = torch.ones_like(org_max) * 1e9
        org_out = group_out(w)
        for step in range(int(settings.max_shrink * settings.n_grid)):
            max_val = org_max * (1 - step / settings.n_grid)
            clipped = torch.clamp(w, -max_val, max_val)
            q = pseudo_quantize(clipped.reshape(-1, g), settings.bits, g, settings.zero_point).reshape(w.shape)
            err = (group_out(q) - org_out).pow(2).mean(dim=1).view(min_err.shape)
            better = err < min_err
            min_err[better] = err[better]
            best_max[better] = max_val[better]
        bounds.append(best_max)
    return torch.cat(bounds, dim=0).squeeze(1)  # out, groups, 1


@torch.no_grad()
def _apply_scale(block: nn.Module, group: ScalingGroup, scales: torch.Tensor, feats: dict[str, torch.Tensor]) -> None:
    prev = block.get_submodule(group.prev)
    layers = [block.get_submodule(n) for n in group.layers]
    s = scales.to(layers[0].weight.device)
    if isinstance(prev, nn.Linear):
        prev.weight[-s.numel() :].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    elif getattr(prev, "weight", None) is not None and "norm" in type(prev).__name__.lower():
        if "gemma" in type(prev).__name__.lower():  # Gemma's norms multiply by (1 + weight)
            prev.weight.add_(1).div_(s.to(prev.weight.dtype)).sub_(1)
        else:
            prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        # The model is not one AWQ knows how to rescale: the error users catch for that, naming the module.
        raise IncompatibleModelError(f"AWQ: cannot fold scales into {group.prev} ({type(prev).__name__})")
    for layer in layers:
        layer.weight.mul_(s.view(1, -1).to(layer.weight.dtype))
    for name in group.layers:
        if name in feats:
            feats[name].div_(s.view(1, -1).to(feats[name].dtype))


# ---------------------------------------------------------------------------------------------
# the whole model
# ---------------------------------------------------------------------------------------------


class BlockQuantizer:
    """AWQ for one decoder block at a time: ``quantizer(name, block, calls)`` (see :func:`quantize_model`).

    Its call signature is :class:`qplug.blocks.BlockCalibration`'s ``quantize_block``: the whole-model
    path and the block-by-block path from disk run this same step.

    :param module_names: every module to quantize (full dotted names); each block takes its own.
    """

    def __init__(self, module_names: Sequence[str], settings: AwqSettings) -> None:
        self.module_names = list(module_names)
        self.settings = settings
        self.replaced: list[str] = []
        self._warned = False

    @torch.no_grad()
    def __call__(self, name: str, block: nn.Module, calls: list[BlockCall]) -> list[BlockCall]:
        """Quantize the selected linears of ``block`` (the model's module ``name``) in place; returns
        ``calls`` with the block's outputs, computed before quantization (as autoawq does)."""
        (call,) = calls  # AWQ runs every sample as one batch
        settings = self.settings
        block_prefix = f"{name}."
        local = [n[len(block_prefix) :] for n in self.module_names if n.startswith(block_prefix)]
        linears = {n: block.get_submodule(n) for n in local}
        x, block_kwargs = call.hidden, call.kwargs

        # 1. inputs of each selected linear; the float block's output feeds the next block
        feats: dict[str, list[torch.Tensor]] = {n: [] for n in local}
        handles = [
            linears[n].register_forward_hook(lambda m, args, out, n=n, feats=feats: feats[n].append(args[0].detach()))
            for n in local
        ]
        try:
            next_x = call.run(block, x)
        finally:
            for h in handles:
                h.remove()
        inputs = {n: torch.cat(v, dim=0) for n, v in feats.items() if v}

        # 2. scale search, group by group
        groups = scaling_groups(block, set(local))
        if local and not groups and not self._warned:
            warnings.warn(
                f"AWQ: no scaling rule for {type(block).__name__}; its layers are clipped and "
                "quantized without activation-aware scaling",
                stacklevel=3,
            )
            self._warned = True
        for group in groups:
            layers = [linears[n] for n in group.layers]
            if group.inspect:
                target = block.get_submodule(group.inspect)
                kwargs = _accepted_kwargs(target, block_kwargs) if group.block_kwargs else {}

                def forward(inp: torch.Tensor, target=target, kwargs=kwargs) -> torch.Tensor:
                    return first_output(target(inp, **kwargs))
            else:
                forward = layers[0]
            scales = search_scale(layers, inputs[group.layers[0]], forward, settings)
            _apply_scale(block, group, scales, inputs)

        # 3. clipping
        if settings.apply_clip:
            for n in local:
                if any(tag in n for tag in _NO_CLIP):
                    continue
                weight = linears[n].weight
                bound = search_clip(weight, inputs[n], settings).to(weight.dtype)
                shape = weight.shape
                clipped = weight.data.reshape(*bound.shape[:2], -1)
                weight.data = torch.clamp(clipped, -bound, bound).reshape(shape)

        # 4. quantize and pack
        from qplug.modules import set_submodule

        for n in local:
            q = AwqLinear.from_linear(
                linears[n], bits=settings.bits, group_size=settings.group_size,
                zero_point=settings.zero_point, version=settings.version,
            )
            set_submodule(block, n, q)
            self.replaced.append(block_prefix + n)
        return [call.with_hidden(next_x)]


@torch.no_grad()
def quantize_model(
    model: nn.Module, module_names: Sequence[str], calibration: Any, settings: AwqSettings
) -> list[str]:
    """Run AWQ on ``model`` in place: every linear of ``module_names`` becomes an ``AwqLinear``.

    Each block goes through a :class:`BlockQuantizer`. Layers outside the repeated blocks (rare:
    the output head is never selected) are quantised round-to-nearest.

    :return: the names replaced, in model order.
    """
    from qplug.modules import set_submodule

    tokens = calibration_tokens(calibration)
    selected = list(module_names)
    blocks_name, blocks = find_blocks(model, selected)
    prefix = f"{blocks_name}." if blocks_name else ""
    # all samples in one batch, so the block sees them as one [samples, seq, hidden] tensor
    calls = capture_first_block(model, blocks[0], [{"input_ids": tokens}], name=f"{prefix}0")
    quantizer = BlockQuantizer(selected, settings)
    for index in track(range(len(blocks)), "awq", unit="blocks"):
        calls = quantizer(f"{prefix}{index}", blocks[index], calls)
    replaced = list(quantizer.replaced)

    outside = [n for n in selected if n not in set(replaced)]
    for name in outside:
        linear = model.get_submodule(name)
        set_submodule(model, name, AwqLinear.from_linear(
            linear, bits=settings.bits, group_size=settings.group_size,
            zero_point=settings.zero_point, version=settings.version,
        ))
        replaced.append(name)
    order = {n: i for i, n in enumerate(selected)}
    return sorted(replaced, key=order.__getitem__)
