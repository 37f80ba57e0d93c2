"""``docs/architecture.md`` stays true: its room table and known upward imports are read from the page
and checked against the imports in ``qplug/`` (parsed, nothing is imported)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "architecture.md"
CORE = REPO / "qplug"
BACKEND_LIBRARIES = {"bitsandbytes", "auto_gptq", "awq", "gptqmodel", "optimum", "triton"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_module(dotted: str) -> bool:
    where = CORE.parent / dotted.replace(".", "/")
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, at module level)`` for every import in ``path``; ``TYPE_CHECKING`` blocks left out."""
    module = module_name(path)
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(child, module, path.name == "__init__.py")
                # `from qplug import api` imports the module qplug.api; `from qplug import __version__`
                # the package itself
                submodules = [f"{target}.{alias.name}" for alias in child.names if _is_module(f"{target}.{alias.name}")]
                found.extend((name, top) for name in submodules)
                if len(submodules) < len(child.names):
                    found.append((target, top))
            visit(child, top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return found


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(CORE.rglob("*.py")) if "__pycache__" not in p.parts}


def documented_layers() -> dict[str, int]:
    """``{room: layer}`` from the page's room table (``cli/`` stands for the package and its modules)."""
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("## Rooms", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        row = re.match(r"\|\s*(\d+)\s[^|]*\|([^|]*)\|", line)
        if row:
            for room in re.findall(r"`([^`]+)`", row[2]):
                layers[room] = int(row[1])
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    if module == "qplug":
        return layers.get("qplug")
    name = module.removeprefix("qplug.")
    head = name.split(".")[0]
    if name in layers:
        return layers[name]
    return layers.get(f"{head}/")


def known_upward() -> set[tuple[str, str]]:
    text = PAGE.read_text(encoding="utf-8")
    section = text.split("### Known upward imports", 1)[1].split("\n#", 1)[0]
    return {(f"qplug.{a}", f"qplug.{b}") for a, b in re.findall(r"`([\w.]+)` → `([\w.]+)`", section)}


def test_the_page_is_in_the_docs_toctree():
    assert re.search(r"^architecture$", (REPO / "docs" / "index.md").read_text(encoding="utf-8"), re.MULTILINE)


def test_every_module_has_a_room_on_the_page():
    layers = documented_layers()
    assert layers, "the room table was not found"
    missing = [m for m in core_modules() if layer_of(m, layers) is None]
    assert not missing, f"modules docs/architecture.md does not place on a layer: {missing}"
    stale = [room for room in layers if room != "qplug" and not room.endswith("/")
             and f"qplug.{room}" not in core_modules()]
    assert not stale, f"rooms on the page that do not exist: {stale}"


def test_imports_follow_the_layers():
    layers = documented_layers()
    allowed = known_upward()
    modules = core_modules()
    upward = []
    for module, path in modules.items():
        own = layer_of(module, layers)
        for target, _top in imports(path):
            if not (target == "qplug" or target.startswith("qplug.")) or target == module:
                continue
            if target not in modules:  # `from qplug import __version__`: a name, not a module
                continue
            theirs = layer_of(target, layers)
            if theirs is not None and own is not None and theirs > own and (module, target) not in allowed:
                upward.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    assert not upward, "imports against docs/architecture.md's layers:\n" + "\n".join(upward)


def test_known_upward_imports_are_inside_functions():
    modules = core_modules()
    for module, target in known_upward():
        assert module in modules and target in modules, (module, target)
        at_top = [top for name, top in imports(modules[module]) if name == target]
        assert not any(at_top), f"{module} imports {target} at module level; the page says inside functions"


@pytest.mark.parametrize("module", sorted(core_modules()))
def test_the_core_imports_no_backend_library(module):
    libraries = {name.split(".")[0] for name, _ in imports(core_modules()[module])} & BACKEND_LIBRARIES
    assert not libraries, f"{module} imports {sorted(libraries)}"


def _module_level_closure(start: str, modules: dict[str, Path]) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        module = stack.pop()
        if module in seen:
            continue
        seen.add(module)
        if module not in modules:
            continue
        for target, top in imports(modules[module]):
            if top:
                stack.append(target)
                # importing qplug.x.y runs qplug and qplug.x first
                parts = target.split(".")
                stack.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return seen


@pytest.mark.parametrize("start", ["qplug", "qplug.cli"])
def test_listing_and_configs_import_no_torch(start):
    closure = _module_level_closure(start, core_modules())
    heavy = sorted(m for m in closure if m.split(".")[0] in {"torch", "transformers", "safetensors", "numpy"}
                   | BACKEND_LIBRARIES)
    assert not heavy, f"import {start} imports, at module level, {heavy}"
