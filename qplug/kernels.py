"""Run-time kernel choice for quantized layers: one mechanism every backend declares into.

A quantized layer keeps two things apart:

* its **checkpoint tensors**, exactly as the format stores them (what ``save_quantized`` writes,
  however many forwards and device moves came before), and
* a **run-time layout** for the kernel chosen for its device and input dtype, built once on
  first use after a load or a move, and dropped whenever the checkpoint tensors change (replaced,
  or modified in place: the layout is keyed on each tensor's storage and version counter).

A backend declares, per layer class, an ordered tuple of :class:`Kernel` records (first is
preferred). Each record says *why not* for a given layer, device and dtype (``refuses``), builds
its layout (``prepare``) and runs (``forward``). :class:`KernelLayer` walks the tuple, keeps the
first kernel that does not refuse, and records which one ran and why the others were passed over,
so ``qplug inspect``, :func:`kernel_report` and the one-line log (logger ``qplug.kernels``, level
INFO) can all say it.

Choosing by hand:

* from Python, :func:`set_kernel` (a whole model, or some of its layers);
* from the environment, ``QPLUG_KERNEL=name[,name...]``: each layer takes the first listed
  kernel its class declares, and chooses by itself when it declares none of them.

A requested kernel that refuses a layer raises :class:`~qplug.KernelUnavailableError` with its
reason: a request is never silently ignored. Kernels marked ``opt_in`` (one that keeps a
full-precision copy of the weight, say) run only when requested.

Memory: a kernel whose layout can give back some checkpoint tensors bit for bit (``restore``) lets
the layer drop them while the layout lives, so a 4-bit layer holds its codes once (in the kernel's
packing), not twice. They come back, rebuilt from the layout, wherever they are asked for: attribute
access, ``state_dict()`` (and so ``save_quantized``), a move or cast, a load, or a new layout.

Training: kernels have no backward of their own. When the input needs a gradient, the layer runs
the kernel forward inside an autograd function whose backward multiplies by the dequantized
weight (made for that call, then freed), so LoRA-style training on top gets correct input
gradients. The quantized weights themselves never get gradients.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from qplug import memory
from qplug.environment import env_text
from qplug.errors import KernelUnavailableError

__all__ = [
    "KERNEL_ENV_VAR",
    "Kernel",
    "KernelLayer",
    "kernel_report",
    "prepare_kernels",
    "requested_kernels",
    "set_kernel",
]

log = logging.getLogger("qplug.kernels")

#: Comma-separated kernel names to use wherever a layer declares one of them.
KERNEL_ENV_VAR = "QPLUG_KERNEL"


@attrs.frozen
class Kernel:
    """One way to run a quantized layer's forward.

    :param name: unique within a layer class, shown by ``qplug inspect`` (``"tinygemm-int4-cpu"``).
    :param refuses: ``(layer, device, dtype) -> str | None``: why this kernel cannot run the layer
        for inputs of ``dtype`` on ``device``, or ``None`` when it can.
    :param prepare: ``(layer, device, dtype) -> layout``: the run-time layout (any object), built
        once per (device, dtype) from the layer's checkpoint tensors, which it must not modify.
    :param forward: ``(layer, layout, x) -> y`` for a 2-D input ``x`` ``[tokens, in_features]`` of
        ``dtype``; returns ``[tokens, out_features]`` of ``dtype``, bias included.
    :param description: one line for listings.
    :param opt_in: chosen only when requested (:func:`set_kernel` or ``QPLUG_KERNEL``).
    :param passed_over: ``(layer, device, dtype) -> str | None``: why the automatic choice skips this kernel
        although it could run (a later one is faster there), or ``None``; a request still gets it.
    :param releases: ``layer -> names``: the checkpoint tensors (buffers) ``restore`` rebuilds for this
        layer; the layer drops them once the layout is built.
    :param restore: ``(layer, layout) -> {name: tensor}``: those tensors, bit for bit as loaded.
    :param rounds_inputs: what the kernel does to the input beyond float rounding (``"int8 activations per 64
        inputs"``), or ``None``: its result is then the dequantized weight times the input up to rounding in its
        compute dtype. Such a kernel must be ``opt_in``; tests of that exactness pass it over.
    """

    name: str
    refuses: Callable[[nn.Module, torch.device, torch.dtype], str | None]
    prepare: Callable[[nn.Module, torch.device, torch.dtype], Any]
    forward: Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]
    description: str = ""
    opt_in: bool = False
    passed_over: Callable[[nn.Module, torch.device, torch.dtype], str | None] | None = None
    releases: Callable[[nn.Module], tuple[str, ...]] = lambda layer: ()
    restore: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]] | None = None
    rounds_inputs: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.rounds_inputs is not None and not self.opt_in:
            raise ValueError(f"kernel {self.name!r} rounds its inputs ({self.rounds_inputs}): it must be opt_in")


def requested_kernels() -> tuple[str, ...]:
    """The kernel names ``QPLUG_KERNEL`` asks for, in order (empty when unset)."""
    return _parse_requested(env_text(KERNEL_ENV_VAR))


@functools.lru_cache(maxsize=8)  # read on every forward of every layer: parse each value once
def _parse_requested(value: str) -> tuple[str, ...]:
    return tuple(name.strip().lower() for name in value.split(",") if name.strip())


class _DequantizedBackward(torch.autograd.Function):
    """Kernel forward, input gradient through the dequantized weight (the kernels have no backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: KernelLayer, run: Callable[[torch.Tensor], torch.Tensor]):
        ctx.layer = layer
        return run(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.layer.float_weight(grad.dtype)  # [out, in], this call only
        return grad @ weight, None, None


class KernelLayer:
    """Mixin for quantized ``nn.Module`` classes that run through declared :class:`Kernel` records.

    A subclass sets :attr:`kernels`, implements :meth:`float_weight`, calls :meth:`run_kernel` from
    its ``forward`` and :meth:`reset_kernel` wherever its checkpoint tensors change (loading, and
    ``_apply`` is handled here).
    """

    #: The kernels this layer class can run on, most preferred first.
    kernels: ClassVar[tuple[Kernel, ...]] = ()
    #: A kernel name asked for from Python (:func:`set_kernel`); ``None``: choose automatically.
    kernel_request: str | None = None
    _kernel_state: tuple[tuple, Kernel, Any, str] | None = None  # (key, kernel, layout, reason)
    # reentrant: building a layout reads checkpoint tensors, which may have to be restored first
    _kernel_lock: ClassVar[threading.RLock] = threading.RLock()
    #: ``False`` for a layer whose tensors are brought in for each forward and dropped after it (accelerate's disk
    #: offload; :mod:`qplug.placement` sets it): its run-time layout is then dropped after each forward too, and
    #: never stands for checkpoint tensors, or the layer would hold its weight between forwards after all.
    keeps_layout: bool = True
    #: checkpoint tensors dropped while the current layout can rebuild them, and the buffer order to keep
    _released: tuple[str, ...] = ()
    _buffer_order: tuple[str, ...] = ()

    # -- to implement
    def float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized ``[out_features, in_features]`` weight in ``dtype`` (the reference)."""
        raise NotImplementedError(f"{type(self).__name__} must implement float_weight(dtype)")

    # -- what was chosen
    @property
    def kernel(self) -> str | None:
        """The name of the kernel the last forward ran on (``None`` before the first one)."""
        return None if self._kernel_state is None else self._kernel_state[1].name

    @property
    def kernel_reason(self) -> str:
        """Why that kernel: the request it follows, and every preferred kernel passed over with its reason."""
        return "" if self._kernel_state is None else self._kernel_state[3]

    def reset_kernel(self) -> None:
        """Drop the run-time layout (restoring any checkpoint tensor it stood for); the next forward
        chooses and builds again."""
        with self._kernel_lock:
            self._reattach()
            self._kernel_state = None

    # -- checkpoint tensors held by the layout
    def _restored(self) -> Mapping[str, torch.Tensor]:
        with self._kernel_lock, torch.no_grad():
            _, kernel, layout, _ = self._kernel_state  # type: ignore[misc]
            return kernel.restore(self, layout)  # type: ignore[misc]

    def _release(self, kernel: Kernel) -> None:
        if kernel.restore is None:
            return
        buffers = self._buffers  # type: ignore[attr-defined]
        names = tuple(n for n in kernel.releases(self) if buffers.get(n) is not None)  # type: ignore[arg-type]
        if names:
            self._buffer_order = tuple(buffers)
            for name in names:
                del buffers[name]
            self._released = names

    def _reattach(self) -> None:
        if not self._released:
            return
        restored = self._restored()
        buffers = self._buffers  # type: ignore[attr-defined]
        current = dict(buffers)
        buffers.clear()
        for name in (*self._buffer_order, *current):  # the order state_dict() had when loaded
            if name in self._released:
                buffers[name] = restored[name]
            elif name in current and name not in buffers:
                buffers[name] = current[name]
        self._released = ()

    def __getattr__(self, name: str):
        if name in self.__dict__.get("_released", ()):
            return self._restored()[name]
        return super().__getattr__(name)  # type: ignore[misc]

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get("_released", ()):
            self.reset_kernel()  # assigning a checkpoint tensor: it is the module's again
        super().__setattr__(name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        if not self._released:
            return
        restored = self._restored()
        mine = {name: destination.pop(prefix + name) for name in
                (*self._parameters, *self._buffer_order) if prefix + name in destination}  # type: ignore[attr-defined]
        mine |= {name: restored[name] for name in self._released}
        order = (*self._parameters, *self._buffer_order)  # type: ignore[attr-defined]
        for name in sorted(mine, key=lambda n: order.index(n) if n in order else len(order)):
            destination[prefix + name] = mine[name]

    def _load_from_state_dict(self, *args, **kwargs):
        self.reset_kernel()  # the loaded tensors replace whatever the layout stood for
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]

    def choose_kernel(self, device: torch.device, dtype: torch.dtype) -> tuple[Kernel, str]:
        """The kernel for inputs of ``dtype`` on ``device``, and why (see :attr:`kernel_reason`).

        :raises KernelUnavailableError: a requested kernel is unknown to this layer or refuses it.
        """
        names = {k.name for k in self.kernels}
        request = self.kernel_request
        source = "set_kernel"
        if request is None:
            request = next((name for name in requested_kernels() if name in names), None)
            source = KERNEL_ENV_VAR
        where = f"{type(self).__name__}({self.extra_repr()}) for {dtype} on {device}"  # type: ignore[attr-defined]
        if request is not None:
            kernel = next((k for k in self.kernels if k.name == request), None)
            if kernel is None:
                raise KernelUnavailableError(
                    f"{where}: kernel {request!r} (from {source}) is not one of this layer's kernels: {sorted(names)}"
                )
            why = kernel.refuses(self, device, dtype)  # type: ignore[arg-type]
            if why is not None:
                raise KernelUnavailableError(f"{where}: kernel {request!r} (from {source}) cannot run: {why}")
            return kernel, f"requested ({source})"
        passed = []
        for kernel in self.kernels:
            why = "opt-in only" if kernel.opt_in else kernel.refuses(self, device, dtype)  # type: ignore[arg-type]
            if why is None and kernel.passed_over is not None:
                why = kernel.passed_over(self, device, dtype)  # type: ignore[arg-type]
            if why is None:
                reason = "; ".join(f"not {name}: {w}" for name, w in passed) or "first choice"
                return kernel, reason
            passed.append((kernel.name, why))
        detail = "; ".join(f"{name}: {w}" for name, w in passed)
        raise KernelUnavailableError(f"{where}: no kernel can run it ({detail})")

    def _tensor_versions(self) -> tuple:
        # an in-place change (``layer.scales.mul_(2)``) or a reassigned tensor must rebuild the layout
        tensors = [t for t in (*self._buffers.values(), *self._parameters.values()) if t is not None]  # type: ignore[attr-defined]
        try:
            return tuple((t.data_ptr(), t._version) for t in tensors)
        except RuntimeError:  # inference tensors (made under torch.inference_mode, e.g. by accelerate's offload
            # hooks inside the forward) keep no version counter; their address alone stands for them
            return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors)

    def _kernel_key(self, device: torch.device, dtype: torch.dtype) -> tuple:
        return device, dtype, self.kernel_request, requested_kernels(), self._tensor_versions()

    def _kernel_for(self, device: torch.device, dtype: torch.dtype) -> tuple[Kernel, Any]:
        state = self._kernel_state
        if state is None or state[0] != self._kernel_key(device, dtype):
            with self._kernel_lock:  # two threads running one model build the layout once
                state = self._kernel_state
                if state is None or state[0] != self._kernel_key(device, dtype):
                    self._reattach()  # a new layout is built from the checkpoint tensors themselves
                    before = state
                    kernel, reason = self.choose_kernel(device, dtype)
                    with torch.no_grad():
                        layout = kernel.prepare(self, device, dtype)  # type: ignore[arg-type]
                    self._kernel_state = ((), kernel, layout, reason)
                    if self.keeps_layout:
                        self._release(kernel)
                    # the build's temporaries (unpacked codes, int32 copies for torch's packers) were several
                    # times the tensors it read: hand them back now (measured on the 1.1B GPTQ model: 1.10 GiB
                    # resident after the first forward, against 1.20 trimming every 16 MB and 1.68 never)
                    memory.release_freed_memory()
                    # keyed after the release: the dropped tensors are the layout's now
                    state = self._kernel_state = (self._kernel_key(device, dtype), kernel, layout, reason)
                    # an offloaded layer rebuilds in every forward (its state keyed () in between): logged once
                    if before is None or before[0] != () or before[1] is not kernel or before[3] != reason:
                        log.info("%s(%s): kernel %s for %s on %s (%s)", type(self).__name__,
                                 self.extra_repr(), kernel.name, dtype, device, reason)  # type: ignore[attr-defined]
        return state[1], state[2]

    def run_kernel(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ W.T + bias`` for ``x`` of any leading shape, on the chosen kernel, in ``dtype``
        (default: ``x``'s dtype).

        :raises RuntimeError: ``x`` is not floating point (as :class:`torch.nn.Linear` refuses it).
        """
        if not x.is_floating_point():  # a kernel would cast it, or compute garbage (nf4 gave zeros)
            raise RuntimeError(f"{type(self).__name__}({self.extra_repr()}): input of dtype {x.dtype}; "  # type: ignore[attr-defined]
                               "a quantized linear layer, like nn.Linear, takes floating-point input")
        dtype = dtype or x.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        kernel, layout = self._kernel_for(x.device, dtype)

        def run(inp: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return kernel.forward(self, layout, inp)  # type: ignore[arg-type]

        if not torch.is_grad_enabled():  # inference: no autograd to keep out (the common, per-token case)
            out = kernel.forward(self, layout, x2)  # type: ignore[arg-type]
        elif x2.requires_grad:
            out = _DequantizedBackward.apply(x2, self, run)
        else:
            out = run(x2)
        if not self.keeps_layout:  # the name and reason stay for reports; the key () matches no forward
            self._kernel_state = ((), kernel, None, self._kernel_state[3])  # type: ignore[index]
        return out.reshape(*lead, out.shape[-1])

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): the layout belongs to the old tensors
        self.reset_kernel()
        return super()._apply(fn, recurse)  # type: ignore[misc]


def _layers(model: nn.Module, names: Iterable[str] | None) -> list[tuple[str, KernelLayer]]:
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, KernelLayer)]
    if names is None:
        return found
    wanted = set(names)
    chosen = [(name, m) for name, m in found if name in wanted]
    missing = wanted - {name for name, _ in chosen}
    if missing:
        raise KeyError(f"no quantized layer named {sorted(missing)} in {type(model).__name__}")
    return chosen


def set_kernel(model: nn.Module, kernel: str | None, names: Iterable[str] | None = None) -> int:
    """Run ``model``'s quantized layers (or those in ``names``) on ``kernel``; ``None`` chooses again.

    Returns how many layers the request applies to: those whose class declares the kernel. A name
    no layer declares raises :class:`~qplug.KernelUnavailableError` listing those that exist.
    """
    layers = _layers(model, names)
    request = None if kernel is None else kernel.strip().lower()
    count = 0
    for _, layer in layers:
        if request is None or any(k.name == request for k in layer.kernels):
            layer.kernel_request = request
            layer.reset_kernel()
            count += 1
    if request is not None and not count:
        known = sorted({k.name for _, layer in layers for k in layer.kernels})
        raise KernelUnavailableError(f"no quantized layer of {type(model).__name__} has a kernel {kernel!r}; "
                                     f"kernels here: {known}")
    return count


def prepare_kernels(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, str]:
    """Choose every quantized layer's kernel and build its layout now, for inputs of ``dtype``.

    ``dtype`` defaults to the dtype of the model's first floating-point parameter or buffer. Each
    layer is prepared on the device its tensors live on. Returns ``{layer name: kernel name}``.
    """
    if dtype is None:
        dtype = next((t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
                     torch.get_default_dtype())
    chosen = {}
    for name, layer in _layers(model, None):
        device = next(t.device for t in (*layer.parameters(), *layer.buffers()))  # type: ignore[attr-defined]
        kernel, _ = layer._kernel_for(device, dtype)
        chosen[name] = kernel.name
    return chosen


def kernel_report(model: nn.Module) -> dict[str, Mapping[str, str | None]]:
    """``{layer name: {"kernel": name or None, "reason": why}}`` for every quantized layer.

    A layer that has not run since it was loaded or moved shows ``None``; call
    :func:`prepare_kernels` first to choose without running.
    """
    return {name: {"kernel": layer.kernel, "reason": layer.kernel_reason} for name, layer in _layers(model, None)}
