"""Where a loaded model's modules live: a ``device_map`` resolved, checked and applied through accelerate.

:func:`qplug.load_quantized` takes ``device_map`` (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
``"sequential"``, one device such as ``"cuda:0"``, or a dict of module name -> device, where a device
may be ``"disk"``), ``max_memory`` and ``offload_folder``, as transformers' ``from_pretrained`` does,
and with the same engine: accelerate sizes the modules (of the *quantized* skeleton, so the plan
counts the bytes that will really be loaded), keeps the model's ``_no_split_modules`` whole, and
its hooks move the inputs between devices and read disk-offloaded tensors back at each forward.

qplug's part: a device that does not exist, a map that misses a module, or ``"disk"`` without
``offload_folder`` is an error naming it, before any tensor is read; each checkpoint tensor goes from
the file to its device (disk-offloaded ones into ``offload_folder``, never into the model); and a
quantized layer whose state lives outside its tensors can refuse the disk by saying why in its class
attribute ``qplug_disk_offload_refusal`` (bitsandbytes' layers do: their ``quant_state``).

Needs ``accelerate`` for anything but a single device.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qplug.errors import BackendUnavailableError, PlacementError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["STRATEGIES", "Placement", "plan"]

#: The ``device_map`` strings accelerate computes a map for.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DISK = "disk"


class Placement:
    """A checked device map: module name prefix -> ``"cpu"``, ``"disk"`` or a torch device string."""

    def __init__(self, device_map: dict[str, str], offload_folder: Path | None) -> None:
        self.device_map = device_map
        self.offload_folder = offload_folder
        # longest prefixes first, so "model.layers.1" wins over "model"
        self._prefixes = sorted(device_map, key=len, reverse=True)
        self.offload_index: dict[str, dict[str, Any]] = {}

    @property
    def single_device(self) -> str | None:
        devices = set(self.device_map.values())
        return next(iter(devices)) if len(devices) == 1 and DISK not in devices else None

    @property
    def disk_modules(self) -> list[str]:
        return [name for name, device in self.device_map.items() if device == DISK]

    def device_of(self, tensor_name: str) -> str:
        for prefix in self._prefixes:
            if prefix == "" or tensor_name == prefix or tensor_name.startswith(prefix + "."):
                return self.device_map[prefix]
        raise PlacementError(f"device_map places no module holding {tensor_name!r}")

    def read_placed(self, weights: Any) -> dict[str, torch.Tensor]:
        """Every tensor of ``weights`` (a :class:`qplug.checkpoint.CheckpointWeights`), each read and placed
        before the next is read, so that memory holds only what stays in it (plus one tensor): disk ones are
        written to ``offload_folder`` and replaced by meta tensors of their dtype and shape (accelerate's
        hooks read them back at each forward and cast to the dtype the module holds, which must be the
        checkpoint's, not the skeleton's); the others go to their device."""
        from qplug import progress

        names = weights.names()
        tensors = {name: self._placed(name, weights.get(name))
                   for name in progress.track(names, f"reading {weights.directory}", total=len(names), unit="tensors")}
        self._write_index()
        return tensors

    def place_module(self, model: nn.Module, name: str) -> None:
        """Send the freshly quantized module ``name`` of ``model`` where the map puts it, now: quantizing while
        loading then never holds more than the map keeps in memory.

        :raises PlacementError: the map sends it to disk and its class refuses the disk (named, with why).
        """
        module = model.get_submodule(name)
        device = self.device_of(f"{name}.")
        if device == "cpu":
            return
        if device != DISK:
            module.to(device)
            return
        _check_offloadable(model, {name: DISK})
        for tensor_name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            owner_name, _, leaf = tensor_name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            placed = self._placed(f"{name}.{tensor_name}", tensor.detach())
            if leaf in owner._parameters:
                owner._parameters[leaf] = type(owner._parameters[leaf])(placed, requires_grad=False)
            else:
                owner._buffers[leaf] = placed

    def place_rest(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (those of the modules not quantized) each placed, and the offload index written."""
        placed = {name: self._placed(name, tensor) for name, tensor in tensors.items()}
        self._write_index()
        return placed

    def _write_index(self) -> None:
        if self.offload_index:
            from accelerate.utils import save_offload_index

            save_offload_index(self.offload_index, str(self.offload_folder))

    def _placed(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        import torch

        device = self.device_of(name)
        if device == DISK:
            from accelerate.utils import offload_weight

            from qplug import memory

            offload_weight(tensor, name, str(self.offload_folder), index=self.offload_index)
            # freed blocks stay with the allocator unless handed back: the peak would grow by every tensor offloaded
            memory.note_freed(tensor.nbytes)
            return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        return tensor if device == "cpu" else tensor.to(device)

    def dispatch(self, model: nn.Module) -> nn.Module:
        """Attach accelerate's hooks where the model spans devices (one device: nothing to attach)."""
        single = self.single_device
        if single is not None:
            return model.to(single) if single != "cpu" else model
        from accelerate import dispatch_model

        from qplug.kernels import KernelLayer

        for prefix in self.disk_modules:  # their tensors come and go with each forward: so must the kernels' layouts
            for module in (model.get_submodule(prefix) if prefix else model).modules():
                if isinstance(module, KernelLayer):
                    module.keeps_layout = False
        main = next((d for d in self.device_map.values() if d not in ("cpu", DISK)), "cpu")
        # offload_buffers: quantized layers keep their codes and scales in buffers (GPTQ's qweight, ...),
        # which accelerate would otherwise keep resident -- and cannot, as they were never loaded.
        return dispatch_model(model, self.device_map, main_device=main,
                              offload_dir=None if self.offload_folder is None else str(self.offload_folder),
                              offload_index=self.offload_index or None, offload_buffers=True)


def plan(model: nn.Module, device_map: Any, *, max_memory: Mapping[Any, Any] | None = None,
         offload_folder: str | os.PathLike[str] | None = None) -> Placement:
    """Resolve and check ``device_map`` for ``model`` (a meta-device skeleton, quantized modules in place).

    :raises PlacementError: an unknown device or strategy, a module the map misses, ``"disk"`` without
        ``offload_folder``, or a layer that cannot be offloaded to disk (named, with the reason).
    :raises BackendUnavailableError: accelerate is needed and not installed.
    """
    import torch

    if isinstance(device_map, str) and device_map in STRATEGIES:
        resolved = _infer(model, device_map, max_memory)
    elif isinstance(device_map, (str, int, torch.device)):
        resolved = {"": device_map}
    elif isinstance(device_map, Mapping):
        resolved = dict(device_map)
    else:
        raise PlacementError(f"device_map={device_map!r}: give one of {', '.join(STRATEGIES)}, a device such as "
                             "'cuda:0', or a dict of module name -> device")
    resolved = {name: _device_name(device, name) for name, device in resolved.items()}
    _check_covers(model, resolved)
    folder = None
    if DISK in resolved.values():
        if offload_folder is None:
            disk = [n or "the whole model" for n, d in resolved.items() if d == DISK]
            raise PlacementError(f"device_map offloads {', '.join(disk[:3])}{' ...' if len(disk) > 3 else ''} to "
                                 "disk: pass offload_folder=...")
        folder = Path(offload_folder)
        folder.mkdir(parents=True, exist_ok=True)
        _check_offloadable(model, resolved)
    if len(set(resolved.values())) > 1:
        _require_accelerate()
    return Placement(resolved, folder)


def _device_name(device: Any, module: str) -> str:
    import torch

    where = f"device_map[{module!r}]" if module else "device_map"
    if device == DISK:
        return DISK
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PlacementError(f"{where}: {device!r} is not a device (cpu, cuda:N, disk, ...)") from exc
    if parsed.type == "cpu":
        return "cpu"
    backend = getattr(torch, parsed.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    index = parsed.index or 0
    if not available or index >= count:
        have = f"{count} {parsed.type} device(s)" if available else f"no {parsed.type} device"
        raise PlacementError(f"{where}: {device!r} does not exist here ({have})")
    return f"{parsed.type}:{index}"


def _infer(model: nn.Module, strategy: str, max_memory: Mapping[Any, Any] | None) -> dict[str, Any]:
    _require_accelerate()
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = dict(max_memory) if max_memory is not None else None
    if strategy != "sequential":
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split,
                                     low_zero=strategy == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)


def _check_covers(model: nn.Module, device_map: dict[str, str]) -> None:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    prefixes = sorted(device_map, key=len, reverse=True)
    missed = [n for n in names if not any(p == "" or n == p or n.startswith(p + ".") for p in prefixes)]
    if missed:
        raise PlacementError(f"device_map places no device for {len(missed)} tensor(s), e.g. {', '.join(missed[:3])}")
    known = {name for name, _ in model.named_modules()} | set(names)
    unknown = [p for p in device_map if p and p not in known]
    if unknown:
        raise PlacementError(f"device_map names modules the model does not have: {', '.join(unknown[:5])}")


def offloaded_tensor(model: nn.Module, name: str) -> torch.Tensor | None:
    """The state-dict tensor ``name`` as accelerate's offload holds it (the offload folder or CPU memory, read
    through the hook of the module that owns it), or ``None`` where no hook holds it."""
    module_name, _, tensor_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        return None
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights is None:
        return None
    try:
        return weights[tensor_name]
    except KeyError:
        return None


def _check_offloadable(model: nn.Module, device_map: dict[str, str]) -> None:
    for prefix, device in device_map.items():
        if device != DISK:
            continue
        root = model.get_submodule(prefix) if prefix else model
        for name, module in root.named_modules():
            why = getattr(type(module), "qplug_disk_offload_refusal", None)
            if why:
                full = ".".join(p for p in (prefix, name) if p)
                raise PlacementError(f"{full} ({type(module).__name__}) cannot be offloaded to disk: {why}; "
                                     "map it to cpu or a GPU")


def _require_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError("a device_map across devices (or disk) needs accelerate: pip install accelerate",
                                      install="pip install accelerate") from exc


def offloaded_module_names(placement: Placement | None) -> Iterable[str]:
    """Module prefixes whose tensors stay on the meta device (read back by accelerate at each forward)."""
    return () if placement is None else placement.disk_modules
