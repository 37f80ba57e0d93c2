from __future__ import annotations

import sys

import pytest
from helpers import EXAMPLE_PLUGIN

import qplug
from qplug.manager import reset_plugin_manager


@pytest.fixture(autouse=True)
def fresh_plugin_manager():
    """Every test sees a freshly discovered plugin table; run-time registrations do not leak."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def int8_plugin():
    """The example third-party backend, imported from the docs (registered by entry point when installed)."""
    src = str(EXAMPLE_PLUGIN / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    from qplug_int8 import plugin

    if "int8-weight" not in qplug.get_plugin_manager().backend_names():
        qplug.register_plugin(plugin)
    return plugin


