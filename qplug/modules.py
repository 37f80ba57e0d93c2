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
import warnings
from collections.abc import Iterable, Iterator

import attrs
import torch
from torch import nn

__all__ = [
    "Selection",
    "SkipPatternWarning",
    "empty_weights",
    "get_submodule",
    "iter_linear",
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
    """Build modules whose parameters live on the meta device (no memory), buffers stay real.

    Buffers such as rotary-embedding frequencies are computed at construction and never saved,
    so they must stay materialised; parameters are what a checkpoint fills in.
    """
    original = nn.Module.register_parameter

    def register_on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            moved = param.to("meta")
            self._parameters[name] = type(param)(moved, requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Parameters and buffers still on the meta device (never filled by a checkpoint)."""
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    names += [n for n, b in model.named_buffers(remove_duplicate=False) if b.device.type == "meta"]
    return names


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
