"""Decoder blocks: finding a model's repeated blocks and capturing what its first block is called with.

Methods that calibrate block by block (GPTQ, AWQ) run the model once up to its first block,
keep that block's inputs, then feed each block the previous one's outputs. Nothing here knows an
architecture: the blocks are the ``nn.ModuleList`` holding most of the layers to quantize, and a
block's inputs are whatever the model passes it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from qplug.errors import IncompatibleModelError, QuantConfigError

__all__ = ["BlockCalibration", "BlockCall", "capture_first_block", "find_blocks", "first_output"]

# Keyword arguments of a captured block call that would make a replayed call read or grow a cache.
_CACHE_KWARGS = ("past_key_value", "past_key_values", "use_cache", "output_attentions")


def find_blocks(
    model: nn.Module, module_names: Iterable[str], block_name: str | None = None
) -> tuple[str, nn.ModuleList] | None:
    """The model's list of decoder blocks and its name, or ``None`` when it has none.

    :param module_names: the layers to quantize; the blocks are the non-empty, named
        ``nn.ModuleList`` holding most of them (the first such list on a tie).
    :param block_name: the list's name, when the config gives it (GPTQ's ``block_name_to_quantize``).
    :raises QuantConfigError: ``block_name`` names no module, or one that is not an ``nn.ModuleList``.
    """
    if block_name:
        try:
            blocks = model.get_submodule(block_name)
        except AttributeError as exc:
            raise QuantConfigError(
                field="block_name_to_quantize", value=block_name,
                accepted=f"the name of the model's list of blocks; {type(model).__name__} has no such module",
            ) from exc
        if not isinstance(blocks, nn.ModuleList):
            raise QuantConfigError(
                field="block_name_to_quantize", value=block_name,
                accepted=f"the name of an nn.ModuleList of blocks; it names a {type(blocks).__name__}",
            )
        return block_name, blocks
    names = list(module_names)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if name and isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(1 for n in names if n.startswith(name + "."))
            if count and (best is None or count > best[0]):
                best = (count, name, module)
    return None if best is None else (best[1], best[2])


@attrs.frozen
class BlockCall:
    """One captured call of a block: its hidden-states input and every other argument.

    :param hidden: the hidden states (the first positional argument, else ``hidden_states=``).
    :param args: the positional arguments after the hidden states.
    :param kwargs: the keyword arguments, without cache switches (``past_key_values``,
        ``use_cache``, ``output_attentions``), so replaying a call never touches a cache.
    :param keyword: the name the hidden states were passed under (``None``: positionally).
    """

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = attrs.field(factory=dict)
    keyword: str | None = None

    def run(self, block: nn.Module, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Call ``block`` as it was called, with ``hidden`` (default: the captured states); its first output."""
        x = self.hidden if hidden is None else hidden
        if self.keyword is None:
            return first_output(block(x, *self.args, **self.kwargs))
        return first_output(block(*self.args, **{self.keyword: x, **self.kwargs}))

    def with_hidden(self, hidden: torch.Tensor) -> BlockCall:
        """The same call with new hidden states (the previous block's output)."""
        return attrs.evolve(self, hidden=hidden)

    def to(self, device: torch.device | str) -> BlockCall:
        """The same call with every tensor in it (in tuples, lists and dicts too) on ``device``."""
        return BlockCall(_moved(self.hidden, device), _moved(self.args, device), _moved(self.kwargs, device),
                         self.keyword)


def _moved(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) in (tuple, list):
        return type(value)(_moved(item, device) for item in value)
    if type(value) is dict:
        return {key: _moved(item, device) for key, item in value.items()}
    return value


@attrs.frozen
class BlockCalibration:
    """How a backend calibrates one model block by block: what the ``calibrate_blocks`` hook returns.

    The core runs the model on ``batches`` up to the first block (:func:`capture_first_block`), then
    for each block in turn fills it with its floating-point weights and calls ``quantize_block``;
    what that returns is the next block's input. So a backend's whole-model path and the core's
    block-by-block path from disk (:func:`qplug.quantize_checkpoint` with ``calibration=``) run the
    same per-block code, and give the same checkpoint.

    :param blocks: the dotted name of the model's ``nn.ModuleList`` of decoder blocks.
    :param batches: the model inputs to run (dicts such as ``{"input_ids": ..., "attention_mask": ...}``),
        one captured call of the first block each.
    :param module_names: the modules the backend replaces, every one inside ``blocks``, in model order.
    :param quantize_block: called as ``quantize_block(name, block, calls)`` with the block's dotted name,
        the block (real weights, on the device it runs on; a submodule of the model, so
        ``model.get_submodule`` reaches it) and its inputs, one :class:`BlockCall` per batch. It replaces
        the block's selected modules by quantized ones, in place, and returns the calls of the next
        block: each call with the hidden states this block outputs, computed as the backend's
        whole-model path computes them (GPTQ: with the quantized weights; AWQ: with the float ones).
    """

    blocks: str
    batches: list[dict[str, torch.Tensor]] = attrs.field(converter=list)
    module_names: list[str] = attrs.field(converter=list)
    quantize_block: Callable[[str, nn.Module, list[BlockCall]], list[BlockCall]]


class _Reached(Exception):
    """Raised by the capturing hook to stop the forward at the first block."""


def first_output(output: Any) -> Any:
    """A block's hidden-states output: the first element of a tuple or list, else the output."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_first_block(
    model: nn.Module, block: nn.Module, batches: Sequence[dict[str, torch.Tensor]], *, name: str = "the first block",
    device: torch.device | str | None = None,
) -> list[BlockCall]:
    """Run ``model`` on each batch up to ``block`` and return how ``block`` was called, one per batch.

    Each batch is a dict of model inputs (``input_ids``, ``attention_mask``), moved to ``device``
    (default: the device of the model's first parameter); ``use_cache=False`` is passed when the
    model's forward takes it.

    :raises IncompatibleModelError: a batch never reached ``block`` (naming it as ``name``).
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    extra = {"use_cache": False} if _takes(model, "use_cache") else {}
    calls: list[BlockCall] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        if args:
            calls.append(BlockCall(args[0], tuple(args[1:]), kwargs))
        else:
            keyword = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs), None)
            if keyword is None:
                raise IncompatibleModelError(f"{name} ({type(block).__name__}) was called without any input")
            hidden = kwargs.pop(keyword)
            calls.append(BlockCall(hidden, (), kwargs, keyword))
        raise _Reached

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            before = len(calls)
            try:
                model(**{k: v.to(device) for k, v in batch.items()}, **extra)
            except _Reached:
                pass
            if len(calls) == before:
                raise IncompatibleModelError(
                    f"running {type(model).__name__} on calibration data never reached {name}"
                )
    finally:
        handle.remove()
    return calls


def _takes(module: nn.Module, argument: str) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return argument in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
