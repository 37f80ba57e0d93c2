"""Every backend distribution here pins qplug to a range that holds the core's version.

The range stops before the next version that may change the hooks.
"""

from __future__ import annotations

import pytest
from helpers import EXAMPLE_PLUGIN, REPO
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

DISTRIBUTIONS = [REPO / "plugins" / name for name in ("qplug-bitsandbytes", "qplug-gptq", "qplug-awq")]
DISTRIBUTIONS.append(EXAMPLE_PLUGIN)


def _project(directory):
    return tomllib.loads((directory / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _next_incompatible(version: Version) -> Version:
    """0.x.y -> 0.(x+1).0 (before 1.0 a minor release may break plugins); x.y.z -> (x+1).0.0."""
    return Version(f"0.{version.minor + 1}.0") if version.major == 0 else Version(f"{version.major + 1}.0.0")


@pytest.mark.parametrize("directory", DISTRIBUTIONS, ids=lambda d: d.name)
def test_plugin_pins_a_compatible_qplug_range(directory):
    core = Version(_project(REPO)["version"])
    pins = [Requirement(r) for r in _project(directory)["dependencies"] if Requirement(r).name == "qplug"]
    assert len(pins) == 1, f"{directory.name} must depend on qplug once, with a version range"
    spec = pins[0].specifier
    assert spec.contains(core), f"{directory.name}: {pins[0]} excludes the core's version {core}"
    assert not spec.contains(_next_incompatible(core), prereleases=True), (
        f"{directory.name}: {pins[0]} admits qplug {_next_incompatible(core)}, which may change the hooks"
    )
