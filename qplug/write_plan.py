"""What disk-to-disk quantization writes, in which order, and how a written module is freed.

Shared by :mod:`qplug.disk_quantize` (data-free methods, one layer at a time) and
:mod:`qplug.block_quantize` (calibrating methods, one decoder block at a time): both walk a
meta-device skeleton's state dict in order (:class:`WritePlan`), fill one unit from SRC, quantize
it, hand its tensors to the writer and put it back on the meta device (:func:`to_meta`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from qplug.errors import CheckpointError, QPlugError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from qplug.checkpoint import CheckpointWeights

__all__ = ["RELEASE_EVERY_BYTES", "Progress", "WritePlan", "refuse_shared", "to_meta"]


# Freed memory is handed back after every ~64 MB dropped. glibc does not reuse all of it for the next
# layers, so resident memory climbs by about one float layer per layer between trims: 256 MB batches
# (quantize-on-load's) made the peak of a 1024-wide Llama grow with depth (0.10 GiB above the floor at
# 8 layers, 0.18 at 48); 64 MB batches kept it flat layer after layer at no measurable cost in time
# (16 layers: 5.0-5.5 s either way).
RELEASE_EVERY_BYTES = 64 * 2**20


class Progress(NamedTuple):
    """What :func:`qplug.quantize_checkpoint` reports after each quantized module is on disk."""

    module: str  #: the module just written
    done: int  #: modules quantized so far
    total: int  #: modules to quantize
    bytes_written: int  #: tensor bytes written to DST so far


class WritePlan:
    """The skeleton's state dict as units to write in order: one module to quantize, or one tensor to copy.

    ``tied`` maps each name the model shares with an earlier one (``lm_head.weight`` tied to
    ``model.embed_tokens.weight``) to that name, as :func:`qplug.checkpoint.state_tensors` does.
    Every check against SRC runs here, before anything is written.

    :param names: the units to quantize: ``nn.Linear`` modules, or with ``blocks=True`` whole
        blocks (:mod:`qplug.block_quantize`), each of whose tensors SRC must hold.
    """

    def __init__(self, model: nn.Module, names: list[str], source: CheckpointWeights, *, blocks: bool = False) -> None:
        from torch import nn

        selected = set(names)

        def owner_of(key: str) -> str:
            if blocks:
                return next((name for name in names if key.startswith(name + ".")), "")
            return key.rpartition(".")[0]

        self.units: list[tuple[str | None, list[str]]] = []  # (module to quantize or None, its keys)
        self.tied: dict[str, str] = {}
        self.reads: dict[str, str] = {}  # key to copy -> the SRC tensor holding it
        first: dict[int, str] = {}
        groups: dict[int, list[str]] = {}
        state = model.state_dict(keep_vars=True)
        for key, value in state.items():
            groups.setdefault(id(value), []).append(key)
        for key, value in state.items():
            owner = owner_of(key)
            shared = groups[id(value)]
            if owner in selected:
                if len(shared) > 1:
                    others = ", ".join(k for k in shared if k != key)
                    raise QPlugError(f"{owner}: its tensor {key!r} is shared with {others}; a shared tensor "
                                     "cannot be quantized layer by layer (skip the module)")
                if blocks and key not in source:
                    raise CheckpointError(f"checkpoint lacks tensor {key!r}")
                if self.units and self.units[-1][0] == owner:
                    self.units[-1][1].append(key)
                else:
                    self.units.append((owner, [key]))
                continue
            if value.numel() and id(value) in first:
                self.tied[key] = first[id(value)]
                continue
            if value.numel():
                first[id(value)] = key
            held = next((k for k in [key, *shared] if k in source), None)
            if held is None:
                raise CheckpointError(f"checkpoint lacks tensors the model needs: {key}")
            self.reads[key] = held
            self.units.append((None, [key]))
        for name in () if blocks else names:
            if not isinstance(model.get_submodule(name), nn.Linear):
                raise QPlugError(f"{name} is {type(model.get_submodule(name)).__name__}, not nn.Linear; "
                                 "cannot quantize it layer by layer")
            if f"{name}.weight" not in source:
                raise CheckpointError(f"checkpoint lacks tensor {name + '.weight'!r}")
        unexpected = [n for n in source.names() if n not in state]
        if unexpected:
            raise CheckpointError(f"checkpoint has tensors the model does not: {', '.join(unexpected)}")
        self.modules = len(names)


def refuse_shared(owner: str, tensors: dict[str, torch.Tensor]) -> None:
    """A quantized module whose tensors share memory would be saved with ties: refuse rather than differ."""
    seen: dict[tuple, str] = {}
    for name, value in tensors.items():
        if not value.numel():
            continue
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
               tuple(value.stride()), value.dtype)
        if key in seen:
            raise QPlugError(f"{owner}: the backend's module stores {name!r} and {seen[key]!r} in one tensor; "
                             "save it with qplug.load_quantized and qplug.save_quantized instead")
        seen[key] = name


def to_meta(module: nn.Module) -> None:
    """Replace every tensor ``module`` holds by a meta tensor of its shape and dtype, freeing its memory.

    Parameters and buffers, and tensors the module keeps in its other attributes, directly or inside
    objects of its own (bitsandbytes' ``quant_state``, ``MatmulLtState``): those hold most of a
    quantized layer's bytes. The module keeps its class and every other attribute, so the backend's
    ``serialize`` still sees what was quantized; it is never run again.
    """
    from torch import nn

    seen: set[int] = set()
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(_meta(param), requires_grad=False)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None:
                sub._buffers[name] = _meta(buffer)
        state = vars(sub)
        for name, value in list(state.items()):
            if name not in ("_parameters", "_buffers", "_modules"):
                state[name] = _strip(value, seen, depth=3)


def _strip(value: Any, seen: set[int], depth: int) -> Any:
    """``value`` with the tensors in it (in plain containers and objects' attributes) made meta."""
    import torch
    from torch import nn

    if isinstance(value, torch.Tensor):
        return nn.Parameter(_meta(value), requires_grad=False) if isinstance(value, nn.Parameter) else _meta(value)
    if depth == 0 or id(value) in seen or isinstance(value, (nn.Module, type)) or callable(value):
        return value
    seen.add(id(value))
    if type(value) in (list, tuple):
        return type(value)(_strip(item, seen, depth - 1) for item in value)
    if type(value) is dict:
        for key in list(value):
            value[key] = _strip(value[key], seen, depth - 1)
        return value
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict) and type(value).__module__ not in ("builtins", "torch"):
        for key in list(attributes):
            attributes[key] = _strip(attributes[key], seen, depth - 1)
    return value


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    """A plain meta tensor like ``tensor`` (never a subclass that could keep state alive)."""
    import torch

    return torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")
