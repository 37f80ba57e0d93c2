"""Every hook is documented where it lives and in the reference, and has a test of its own."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from qplug import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"
TESTS = Path(__file__).resolve().parent
SPECS = [
    (name, fn) for name, fn in vars(hookspecs).items()
    if inspect.isfunction(fn) and hasattr(fn, "qplug_spec")
]


def test_all_ten_hooks_are_specified_and_named_in_order():
    assert sorted(name for name, _ in SPECS) == [
        "add_checkpoint_files", "calibrate_blocks", "dequantize", "quantize_module", "read_int_layer",
        "register_backends", "replace_modules", "serialize", "validate", "write_int_layer"]
    assert hookspecs.HOOK_NAMES == tuple(name for name, _ in SPECS)  # derived, in definition order


@pytest.mark.parametrize(("name", "spec"), SPECS, ids=[n for n, _ in SPECS])
def test_hookspec_docstring_is_complete(name, spec):
    doc = inspect.getdoc(spec) or ""
    assert doc.split("\n")[0].strip(), f"{name}: no summary line"
    for param in inspect.signature(spec).parameters:
        assert f":param {param}:" in doc, f"{name}: parameter {param!r} is undocumented"
    assert ":return:" in doc, f"{name}: the return value is undocumented"
    assert "Example::" in doc, f"{name}: no worked example"
    firstresult = spec.qplug_spec.get("firstresult", False)
    assert ("Stops at first non-None result" in doc) == firstresult, f"{name}: firstresult not stated"


@pytest.mark.parametrize(("name", "spec"), SPECS, ids=[n for n, _ in SPECS])
def test_hook_is_in_the_reference_and_tested(name, spec):
    reference = (DOCS / "reference.md").read_text()
    assert re.search(rf"qplug\.hookspecs\.{name}\b", reference), f"{name} missing from docs/reference.md"
    tests = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != "test_docs.py")
    assert re.search(rf"def {name}\(", tests), f"no test implements the {name!r} hook"
