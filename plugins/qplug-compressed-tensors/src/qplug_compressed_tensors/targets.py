"""Which config group applies to which module, as compressed-tensors decides it.

A target (or an ``ignore`` entry) matches a module when it is

* the module's exact dotted name (``"model.layers.0.mlp.down_proj"``),
* ``"re:<pattern>"`` and the pattern matches a *prefix* of the name (Python's ``re.match``, which
  compressed-tensors uses), or
* the name of a class in the module's MRO (``"Linear"`` matches every ``nn.Linear``).

Where several groups match one module, the most specific wins: an exact name before a pattern before a
class name, then the group written first. Patterns are compiled by :mod:`qplug.patterns` (checked when the
config is built), so matching stays linear in the name's length whatever a stranger's config holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from qplug.patterns import compile_pattern

from .config import Scheme

__all__ = ["assign_schemes", "match_rank", "matches_any"]


def match_rank(name: str, module: nn.Module, target: str) -> int | None:
    """0 for an exact name, 1 for a pattern, 2 for a class name; ``None`` when ``target`` does not match."""
    if target.startswith("re:"):
        return 1 if compile_pattern(target[3:]).match(name) else None
    if target == name:
        return 0
    if any(cls.__name__ == target for cls in type(module).__mro__ if issubclass(cls, nn.Module)):
        return 2
    return None


def matches_any(name: str, module: nn.Module, targets: Iterable[str]) -> bool:
    return any(match_rank(name, module, t) is not None for t in targets)


def assign_schemes(model: nn.Module, names: Sequence[str], schemes: Sequence[Scheme],
                   ignore: Iterable[str] = ()) -> dict[str, Scheme]:
    """``{module name: its scheme}`` for those of ``names`` some group targets and ``ignore`` does not name."""
    ignore = list(ignore)
    out: dict[str, Scheme] = {}
    for name in names:
        module = model.get_submodule(name)
        if matches_any(name, module, ignore):
            continue
        best: tuple[int, int, Scheme] | None = None
        for order, scheme in enumerate(schemes):
            ranks = [r for r in (match_rank(name, module, t) for t in scheme.targets) if r is not None]
            if ranks and (best is None or (min(ranks), order) < best[:2]):
                best = (min(ranks), order, scheme)
        if best is not None:
            out[name] = best[2]
    return out
