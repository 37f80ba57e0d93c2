"""The GPTQ algorithm (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers").

For one linear layer with weight ``W [out, in]`` and calibration inputs ``X``:

1. ``H = 2/n * X^T X`` accumulated over batches (:meth:`LayerGPTQ.add_batch`);
2. dead input channels (``H[i, i] == 0``) get ``H[i, i] = 1`` and a zero weight column;
3. optionally (act-order, ``desc_act``) columns are processed by decreasing ``H[i, i]``;
4. ``H += damp_percent * mean(diag(H)) * I``; ``U = chol(H^-1)`` (upper);
5. columns are quantized in blocks of ``blocksize``; each column's rounding error,
   scaled by ``1/U[i, i]``, is pushed onto the not-yet-quantized columns of the block
   (``U[i, i:]``), and a block's errors onto the rest of the matrix at once
   (lazy batch updates).  Group parameters (scale, zero) are taken when a group's
   first column is reached, from the columns as updated by the earlier blocks, or
   once up front from the original weight (``static_groups``).

The floating-point steps follow the reference implementation (the one AutoGPTQ
ships) step by step, so that on the same layer and calibration data both produce the
same integers; ``tests/test_against_autogptq.py`` checks that.

:func:`quantize_model` runs it over a model: inputs of the first decoder block are
captured, then each block is quantized in turn (:func:`quantize_block`) (its linear layers in sequential
groups when ``true_sequential``), and its outputs, computed with the already
quantized weights, become the next block's inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import attrs
import torch
from torch import nn

from qplug.blocks import BlockCall, capture_first_block, find_blocks
from qplug.memory import release_freed_memory
from qplug.progress import track


# --------------------------------------------------------------------------- grid
def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min/max grid of ``w [rows, cols]``: returns ``(scale, zero)`` of shape ``[rows]``.

    The range always includes 0; symmetric grids are centred on ``2**(bits-1)``.
    """
    maxq = 2**bits - 1
    zero_t = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        neg = xmin < 0
        xmin = torch.where(neg, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid (as float tensor holding integers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


@attrs.frozen
class GPTQSettings:
    """How :func:`quantize_model` and :func:`quantize_block` run GPTQ (the defaults are auto-gptq's).

    ``bits``, ``group_size``, ``sym``, ``desc_act`` and ``static_groups`` are each layer's grid and
    column order (:meth:`LayerGPTQ.quantize`), which ``per_module`` overrides may change for single
    modules; ``true_sequential`` and ``modules_in_block`` (groups of names relative to a block)
    choose which layers of a block are calibrated together.
    """

    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.1
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    true_sequential: bool = True
    modules_in_block: Sequence[Sequence[str]] | None = None

    def for_layer(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The keyword arguments of :meth:`LayerGPTQ.quantize` for one layer, with its ``overrides``."""
        kw = dict(bits=self.bits, group_size=self.group_size, damp_percent=self.damp_percent,
                  desc_act=self.desc_act, static_groups=self.static_groups, sym=self.sym)
        return {**kw, **{k: v for k, v in (overrides or {}).items() if k in kw}}


@dataclass
class QuantizedWeight:
    """Result for one layer, in the orientation of the checkpoint tensors."""

    intweight: torch.Tensor  # uint8 [in, out]: the transposed view of codes stored [out, in]
    zeros: torch.Tensor  # int32 [groups, out]
    scales: torch.Tensor  # float32 [groups, out]
    g_idx: torch.Tensor  # int32 [in]
    # [out, in], dequantized (computed with float32 scales) in the ``weight_dtype`` asked for; None
    # once :func:`quantize_block` has put it into its layer (the results then hold the codes alone)
    weight: torch.Tensor | None
    loss: float  # sum of the per-column losses / n_samples


# --------------------------------------------------------------------------- one layer
class LayerGPTQ:
    """Accumulates the Hessian of one linear layer and quantizes its weight."""

    def __init__(self, weight: torch.Tensor, name: str = "") -> None:
        if weight.dim() != 2:
            raise ValueError(f"{name or 'layer'}: GPTQ expects a 2-D weight, got shape {tuple(weight.shape)}")
        self.name = name
        self.weight = weight
        self.rows, self.columns = weight.shape
        self.H = torch.zeros((self.columns, self.columns), dtype=torch.float32, device=weight.device)
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, inp: torch.Tensor) -> None:
        """Add the inputs of one forward call (``[..., in]``; the leading dim counts samples)."""
        if inp.shape[-1] != self.columns:
            raise ValueError(f"{self.name}: calibration input has {inp.shape[-1]} features, expected {self.columns}")
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        n = inp.shape[0]
        x = inp.reshape(-1, self.columns).t()
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = math.sqrt(2 / self.nsamples) * x.float()
        self.H += x.matmul(x.t())

    @torch.no_grad()
    def quantize(
        self,
        *,
        bits: int = 4,
        group_size: int = 128,
        damp_percent: float = 0.1,
        desc_act: bool = False,
        static_groups: bool = False,
        sym: bool = True,
        blocksize: int = 128,
        weight_dtype: torch.dtype = torch.float32,
    ) -> QuantizedWeight:
        """GPTQ on the accumulated Hessian; the dequantized weight comes back in ``weight_dtype``.

        Memory: besides the float32 working copy of the weight, only what the result needs is
        kept whole (the codes as uint8, the dequantized weight already in ``weight_dtype``), and
        the Hessian, its Cholesky factor and the inverse each go as soon as the next is made (for a
        5632-wide input, 127 MB each): at most two of them are alive at once."""
        if self.nsamples == 0:
            raise RuntimeError(f"{self.name}: no calibration data reached this layer; cannot run GPTQ")
        maxq = 2**bits - 1
        W = self.weight.detach().to(torch.float32, copy=True)
        H = self.H
        self.H = None  # free early; a LayerGPTQ quantizes once
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        gs = group_size if group_size != -1 else self.columns

        static: list[tuple[torch.Tensor, torch.Tensor]] = []
        if static_groups and group_size != -1:
            for c in range(0, self.columns, gs):
                static.append(find_params(W[:, c : c + gs], bits, sym))

        perm = None
        if desc_act:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        damp = damp_percent * torch.mean(torch.diag(H))
        idx = torch.arange(self.columns, device=W.device)
        H[idx, idx] += damp
        try:
            L = torch.linalg.cholesky(H)
        except RuntimeError as exc:  # torch raises LinAlgError (a RuntimeError)
            raise RuntimeError(
                f"{self.name}: the damped Hessian is not positive definite; raise damp_percent "
                f"(now {damp_percent}) or use more calibration data"
            ) from exc
        del H  # each of H, L, H^-1 and its factor is dropped once the next is made
        Hinv = torch.cholesky_inverse(L)
        del L
        Hinv = torch.linalg.cholesky(Hinv, upper=True)

        # Only what the result keeps: the dequantized weight in the layer's dtype (the same bytes as
        # rounding a float32 matrix at the end), and the codes, integers in [0, maxq], as uint8.
        Q = torch.empty(W.shape, dtype=weight_dtype, device=W.device)
        Qint = torch.empty(W.shape, dtype=torch.uint8, device=W.device)
        loss = torch.zeros((), dtype=torch.float64, device=W.device)
        scales: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
        params: tuple[torch.Tensor, torch.Tensor] | None = None
        if group_size == -1:
            params = find_params(W, bits, sym)
            scales.append(params[0])
            zeros.append(params[1])

        for i1 in range(0, self.columns, blocksize):
            i2 = min(i1 + blocksize, self.columns)
            count = i2 - i1
            # The block transposed: each column one contiguous row, so the per-column steps below
            # run on contiguous memory and write their results in place, with no temporaries.
            W1 = W[:, i1:i2].t().contiguous()
            Q1 = torch.empty_like(W1)
            Qint1 = torch.empty_like(W1)
            Diff1 = torch.empty_like(W1)
            Err1 = torch.empty_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            diag = torch.diagonal(Hinv1)
            # Each column's grid. A group's parameters come from ``W`` as the earlier blocks left it
            # (the reference reads ``W``, not the block being updated), so all of this block's are
            # known before its first column is quantized.
            grid: list[tuple[torch.Tensor, torch.Tensor]] = []
            for col in range(i1, i2):
                if static:
                    orig = int(perm[col]) if perm is not None else col
                    params = static[orig // gs]
                elif group_size != -1 and col % gs == 0:
                    params = find_params(W[:, col : col + gs], bits, sym)
                    scales.append(params[0])
                    zeros.append(params[1])
                grid.append(params)
            for i in range(count):
                scale, zero = grid[i]
                w, qi, q, diff, err = W1[i], Qint1[i], Q1[i], Diff1[i], Err1[i]
                # quantize_column, step by step into qi: clamp(round(w / scale) + zero, 0, maxq)
                torch.div(w, scale, out=qi)
                qi.round_().add_(zero).clamp_(0, maxq)
                torch.sub(qi, zero, out=q)
                q.mul_(scale)  # scale * (qi - zero): the same product, operands swapped
                torch.sub(w, q, out=diff)
                torch.div(diff, diag[i], out=err)
                if i + 1 < count:
                    # the error onto the block's later columns; the column itself is done with
                    W1[i + 1 :].sub_(Hinv1[i, i + 1 :, None] * err)
            # the losses (w - q)**2 / d**2 at once; the same per-element steps as one column at a time
            loss += (Diff1**2 / (diag**2)[:, None]).sum(dtype=torch.float64)
            Q[:, i1:i2] = Q1.t()
            Qint[:, i1:i2] = Qint1.t()
            W[:, i2:] -= Err1.t().contiguous().matmul(Hinv[i1:i2, i2:])

        if static:
            scales = [s for s, _ in static]
            zeros = [z for _, z in static]
        if perm is not None and static:
            g_idx = (perm // gs).to(torch.int32)
        else:
            g_idx = torch.arange(self.columns, device=W.device, dtype=torch.int32) // gs
        if perm is not None:
            invperm = torch.argsort(perm)
            Q = Q[:, invperm]
            Qint = Qint[:, invperm]
            g_idx = g_idx[invperm]
        return QuantizedWeight(
            intweight=Qint.t(),
            zeros=torch.stack(zeros, dim=0).to(torch.int32),
            scales=torch.stack(scales, dim=0).float(),
            g_idx=g_idx.contiguous(),
            weight=Q,
            loss=float(loss / 2 / self.nsamples),
        )


# --------------------------------------------------------------------------- a model


def _sequential_groups(block: nn.Module, names: list[str], prefix: str, run) -> tuple[list[list[str]], bool]:
    """Split ``names`` (modules of one block) into the groups true-sequential GPTQ
    quantizes one after another: modules in first-call order, those fed the very same
    input tensor (q/k/v, gate/up) in one group.

    Also says whether each of them was called exactly once on the first sample (a dense block):
    then a pass that only collects a group's inputs may stop once the group's last layer has its
    input (:class:`_GroupFed`), as nothing after it can reach the group."""
    # (name, its input) in call order; holding the inputs keeps their memory from being
    # reused, so equal data pointers really mean the same tensor
    order: list[tuple[str, torch.Tensor]] = []
    calls = dict.fromkeys(names, 0)
    hooks = []
    for n in names:
        mod = block.get_submodule(n[len(prefix) + 1 :])

        def hook(_m, args, _n=n):
            calls[_n] += 1
            if not any(o[0] == _n for o in order):
                order.append((_n, args[0]))

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        run(limit=1)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last_ptr = None
    for n, inp in order:
        ptr = (inp.data_ptr(), tuple(inp.shape))
        if groups and ptr == last_ptr:
            groups[-1].append(n)
        else:
            groups.append([n])
        last_ptr = ptr
    seen = {n for g in groups for n in g}
    missing = [n for n in names if n not in seen]
    if missing:
        groups.append(missing)  # never called on the first sample; quantized last (and fail loudly if never fed)
    return groups, all(count == 1 for count in calls.values())


class _GroupFed(Exception):
    """Raised by a layer's pre-hook once every layer of the group being calibrated has its input for
    this call: the rest of the block's forward pass cannot change what the group sees."""


def _quantize_group(
    owner: nn.Module,
    prefix: str,
    names: list[str],
    run,
    settings: GPTQSettings,
    per_module: dict[str, dict[str, Any]] | None,
    *,
    stop_early: bool = False,
) -> dict[str, QuantizedWeight]:
    """GPTQ on ``names`` (full dotted names; ``owner`` is the module at ``prefix``, "" for the model):
    accumulate their Hessians over ``run()``, quantize, and give each layer its dequantized weight.

    With ``stop_early`` (each layer is called once per forward pass of ``owner``), every call stops
    with :class:`_GroupFed` as soon as the group's last layer has its input, and ``run`` catches it:
    the layers after the group are not computed for nothing."""
    cut = len(prefix) + 1 if prefix else 0
    layers = {n: owner.get_submodule(n[cut:]) for n in names}
    states = {n: LayerGPTQ(layers[n].weight.data, n) for n in names}
    fed: set[str] = set()

    def feed(_m, args, _n):
        states[_n].add_batch(args[0].data)
        fed.add(_n)
        if stop_early and len(fed) == len(names):
            raise _GroupFed

    hooks = [layers[n].register_forward_pre_hook(lambda m, args, _n=n: feed(m, args, _n)) for n in names]
    hooks.append(owner.register_forward_pre_hook(lambda *_: fed.clear()))  # a new call: no layer fed yet
    # The forward passes and each layer's step free many blocks of up to 32 MiB, which glibc keeps
    # resident (0.16 GiB of them before a TinyLlama-shaped down_proj); handed back before each
    # step, they do not add up to the peak, which these steps make.
    release_freed_memory()
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    results = {}
    for n in names:
        lin = layers[n]
        release_freed_memory()
        # a layer's result goes into the block as soon as it is made, in the layer's own dtype, so that
        # the results of a block's finished layers hold their uint8 codes alone (not a float copy)
        res = states.pop(n).quantize(**settings.for_layer((per_module or {}).get(n)), weight_dtype=lin.weight.dtype)
        lin.weight.data = res.weight
        res.weight = None
        results[n] = res
    return results


@torch.no_grad()
def quantize_block(
    block: nn.Module,
    prefix: str,
    module_names: Sequence[str],
    calls: list[BlockCall],
    settings: GPTQSettings,
    *,
    per_module: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, QuantizedWeight], list[BlockCall]]:
    """Run GPTQ on the modules ``module_names`` (full dotted names) of the decoder block ``block``
    (the model's module ``prefix``), given its inputs ``calls``; ``per_module`` overrides
    ``settings``' grid for single modules (see :class:`GPTQSettings`).

    The layers' weights are replaced by their dequantized values, and the block's outputs are
    computed with them: the next block calibrates on the quantized model's activations.

    :return: the per-module results, and ``calls`` with this block's outputs as hidden states.
    """
    names = list(module_names)
    wanted = set(names)

    def run_block(limit: int | None = None) -> list:
        outs = []
        for call in calls[:limit]:
            try:
                outs.append(call.run(block))
            except _GroupFed:  # a group's inputs were all that this call was for
                pass
        return outs

    results: dict[str, QuantizedWeight] = {}
    if names:
        dense = False
        if settings.modules_in_block:
            groups = [[f"{prefix}.{n}" for n in g if f"{prefix}.{n}" in wanted] for g in settings.modules_in_block]
            groups = [g for g in groups if g]
        elif settings.true_sequential:
            groups, dense = _sequential_groups(block, names, prefix, run_block)
        else:
            groups = [names]
        for g in groups:
            results.update(_quantize_group(block, prefix, g, run_block, settings, per_module, stop_early=dense))
    outs = run_block()
    return results, [call.with_hidden(out) for call, out in zip(calls, outs, strict=True)]


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    module_names: Sequence[str],
    calibration: list[dict[str, torch.Tensor]],
    settings: GPTQSettings,
    *,
    block_name: str | None = None,
    per_module: dict[str, dict[str, Any]] | None = None,
) -> dict[str, QuantizedWeight]:
    """Run GPTQ on ``module_names`` of ``model`` (weights are replaced by their
    dequantized values as it goes, so later layers see quantized inputs).  Returns
    the per-module results; the caller packs them into modules.  ``calibration`` is a list
    of model-input batches (:func:`qplug.calibration.padded_batches`).  ``per_module`` may
    override ``settings``' ``bits``/``group_size``/``sym``/``desc_act``/``static_groups`` per module.

    Each block goes through :func:`quantize_block`, the step the block-by-block path from disk
    (:func:`qplug.quantize_checkpoint`) runs too."""
    module_names = list(module_names)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    results: dict[str, QuantizedWeight] = {}

    def run_model(limit: int | None = None) -> None:
        for s in calibration[:limit]:
            model(**{k: v.to(device) for k, v in s.items()}, use_cache=False)

    found = find_blocks(model, module_names, block_name)
    if found is not None:
        prefix, blocks = found
        # 1. capture the inputs of the first block
        captured = capture_first_block(model, blocks[0], calibration, name=f"{prefix}.0")
        # 2. block by block
        for b, block in track(enumerate(blocks), "gptq", total=len(blocks), unit="blocks"):
            bprefix = f"{prefix}.{b}"
            names = [n for n in module_names if n.startswith(bprefix + ".")]
            done, captured = quantize_block(block, bprefix, names, captured, settings, per_module=per_module)
            results.update(done)
        rest = [n for n in module_names if not n.startswith(prefix + ".")]
    else:
        rest = module_names
    if rest:
        if found is not None:
            warnings.warn(
                f"GPTQ: quantizing {len(rest)} module(s) outside {found[0]} with a full forward pass: {rest[:5]}",
                stacklevel=2,
            )
        results.update(_quantize_group(model, "", rest, run_model, settings, per_module))
    missing = [n for n in module_names if n not in results]
    if missing:
        raise RuntimeError(f"GPTQ: these modules were selected but not quantized: {missing}")
    return results
