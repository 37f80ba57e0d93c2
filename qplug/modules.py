"""Walking a model: which modules to quantize, and swapping one module for another.

Module-name patterns (skip lists, targets) match whole dotted components:

* ``"lm_head"`` matches ``lm_head`` and, as a component, ``model.lm_head``;
* ``"model.layers.0"`` matches that module and everything under it (a prefix at a dot boundary);
* ``"mlp.gate"`` matches ``model.layers.3.mlp.gate`` but never ``...mlp.gate_proj``;
* ``"re:<regex>"`` matches names the regular expression matches in full. The expression is
  compiled by :mod:`qplug.patterns` (Python's syntax without backreferences or lookaround) and
  matched in time linear in the name's length, whatever the pattern: configs come from strangers.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator

import attrs
import torch
from torch import nn

__all__ = [
    "Selection",
    "SkipPatternWarning",
    "build_empty",
    "dequantized_dtype",
    "empty_weights",
    "get_submodule",
    "iter_linear",
    "materialize_buffers",
    "name_matches",
    "output_head_names",
    "select_modules",
    "set_submodule",
]


class SkipPatternWarning(UserWarning):
    """A skip pattern matched no module of the model (a typo, or a config written for another model)."""


def name_matches(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches ``pattern`` (see the module docstring).

    :raises QuantConfigError: ``pattern`` is a ``"re:"`` pattern that does not compile.
    """
    if pattern.startswith("re:"):
        from qplug.config import check_pattern
        from qplug.patterns import compile_pattern

        check_pattern(pattern, field="skip")
        return compile_pattern(pattern[3:]).fullmatch(name)
    pattern = pattern.strip(".")
    return bool(pattern) and f".{pattern}." in f".{name}."


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """The module at dotted ``name`` (``""`` is the model itself)."""
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name``, replacing what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, module)


def iter_linear(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` (subclasses included) with its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield name, module


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the logits or share the input embedding's weight.

    These stay in floating point by default: quantizing the head costs accuracy for little
    memory, and a head tied to the embeddings cannot be quantized without untying it.
    """
    heads: set[str] = set()
    head = _call_or_none(model, "get_output_embeddings")
    embeddings = _call_or_none(model, "get_input_embeddings")
    embedding_weight = getattr(embeddings, "weight", None)
    for name, module in model.named_modules():
        if module is head and name:
            heads.add(name)
        elif embedding_weight is not None and getattr(module, "weight", None) is embedding_weight and name:
            if module is not embeddings:
                heads.add(name)
    if not heads and isinstance(getattr(model, "lm_head", None), nn.Module):
        heads.add("lm_head")
    return heads


def _call_or_none(model: nn.Module, method: str) -> nn.Module | None:
    fn = getattr(model, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


@attrs.frozen
class Selection:
    """The outcome of :func:`select_modules`.

    :param names: the modules to quantize, in model order.
    :param skipped: every other ``nn.Linear``, with the reason it stays in floating point.
    :param unmatched_patterns: skip patterns that matched no module at all.
    """

    names: list[str]
    skipped: dict[str, str]
    unmatched_patterns: list[str]


def select_modules(
    model: nn.Module,
    skip: Iterable[str] = (),
    *,
    module_types: tuple[type[nn.Module], ...] = (nn.Linear,),
    warn_unmatched: bool = True,
) -> Selection:
    """Choose the modules to quantize: every ``module_types`` module except the output head and ``skip``.

    ``skip`` adds to the defaults; it never replaces them, so the head stays in floating point
    even when a config names other modules to skip. A single string is one pattern.
    """
    patterns = list(dict.fromkeys([skip] if isinstance(skip, str) else skip))
    all_names = [name for name, _ in model.named_modules() if name]
    unmatched = [p for p in patterns if not any(name_matches(n, p) for n in all_names)]
    heads = output_head_names(model)
    names: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, module_types):
            continue
        if name in heads:
            skipped[name] = "output head"
            continue
        hit = next((p for p in patterns if name_matches(name, p)), None)
        if hit is not None:
            skipped[name] = f"skip pattern {hit!r}"
            continue
        names.append(name)
    if unmatched and warn_unmatched:
        warnings.warn(
            f"skip pattern(s) {', '.join(repr(p) for p in unmatched)} match no module of "
            f"{type(model).__name__}",
            SkipPatternWarning,
            stacklevel=3,
        )
    return Selection(names=names, skipped=skipped, unmatched_patterns=unmatched)


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Create every new tensor of this thread on the meta device (no memory) inside the block.

    This is torch's own device context (``with torch.device("meta")``): a per-thread mode, so other
    threads keep building real modules meanwhile, and nothing global is patched. Buffers land on the
    meta device too; :func:`build_empty` also gives them real values.
    """
    with torch.device("meta"):
        yield


def build_empty(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its parameters on the meta device (no memory) and its buffers real.

    Buffers such as rotary-embedding frequencies are computed at construction and never saved, so
    they must hold real values; parameters are what a checkpoint fills in. The model is built under
    :func:`empty_weights`, then :func:`materialize_buffers` recomputes its buffers on the CPU.

    :raises QPlugError: a buffer cannot be recomputed (see :func:`materialize_buffers`).
    """
    with empty_weights():
        model = build()
    materialize_buffers(model)
    return model


def materialize_buffers(model: nn.Module) -> None:
    """Give every buffer (and plain tensor attribute) still on the meta device its value, on the CPU.

    Each module holding one is built again on the CPU from its own attributes (a module's
    constructor arguments are, by convention, attributes of the same name: ``config`` for
    transformers' rotary embeddings), and the values are taken from that copy.

    :raises QPlugError: naming the buffer, when its module cannot be built that way.
    """
    from qplug.errors import QPlugError

    for name, module in model.named_modules():
        metas = [k for k, b in module._buffers.items() if b is not None and b.device.type == "meta"]
        loose = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor) and v.device.type == "meta"]
        if not metas and not loose:
            continue
        fresh, why = _rebuild_on_cpu(module)
        for key in [*metas, *loose]:
            value = getattr(fresh, key, None) if fresh is not None else None
            current = getattr(module, key)
            if not isinstance(value, torch.Tensor) or value.shape != current.shape or value.dtype != current.dtype:
                what = f"{name}.{key}" if name else key
                raise QPlugError(
                    f"cannot compute buffer {what!r} of {type(module).__name__} outside the meta device "
                    f"({why or 'its rebuilt copy differs'}); build the model yourself and pass model=..."
                )
            if key in metas:
                module._buffers[key] = value
            else:
                setattr(module, key, value)


def _rebuild_on_cpu(module: nn.Module) -> tuple[nn.Module | None, str | None]:
    """A new instance of ``module``'s class built on the CPU from its attributes, or ``(None, why)``."""
    cls = type(module)
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None, f"{cls.__name__}.__init__ has no signature"
    kwargs = {}
    for param in list(signature.parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.name != "device" and hasattr(module, param.name):
            kwargs[param.name] = getattr(module, param.name)
        elif param.default is param.empty:
            return None, f"{cls.__name__}.__init__ needs {param.name!r}, which the module does not keep"
    try:
        with torch.device("cpu"):
            return cls(**kwargs), None
    except Exception as exc:  # any failure of third-party code means: cannot rebuild this way
        return None, f"{cls.__name__}(...) failed: {exc}"


def dequantized_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a backend's ``dequantize`` gives the ``nn.Linear`` layers it rebuilds.

    The floating-point dtype holding most of the model's loaded parameters (by element count),
    which is the dtype its activations have. Counting, rather than taking the first parameter,
    matters for a skeleton built from a config.json without a dtype: its linears are float32
    while the tensors loaded over it (embeddings, norms) are float16, and the rebuilt layers
    must match the latter. Quantized layers hold integer tensors, so they do not vote.
    ``default`` when the model has no loaded floating-point parameter.
    """
    counts: dict[torch.dtype, int] = {}
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.device.type != "meta":
            counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return max(counts, key=counts.__getitem__) if counts else default


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Parameters and buffers still on the meta device (never filled by a checkpoint)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    names += [n for n, b in model.named_buffers(remove_duplicate=False) if b.device.type == "meta"]
    return names


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
