"""Plugins from strangers: no silent replacement, no escape at import, readable errors (issue 13, items 12-14)."""

from __future__ import annotations

import json

import pytest
from helpers import ToyConfig, ToyPlugin, make_distribution, run_python

import qplug
from qplug.manager import PluginManager

GOOD_PLUGIN = """
import attrs, qplug
from typing import ClassVar
from qplug.config import QuantConfig

@attrs.define(kw_only=True)
class GoodConfig(QuantConfig):
    quant_method: ClassVar[str] = "good"

@qplug.hookimpl
def register_backends():
    return [qplug.Backend(name="good", config_class=GoodConfig)]
"""

OTHER_PLUGIN = GOOD_PLUGIN.replace('"good"', '"other"').replace("GoodConfig", "OtherConfig")

LISTING = """
import json, qplug
pm = qplug.get_plugin_manager()
print(json.dumps({
    "available": qplug.available_backends(),
    "plugins": sorted([p.name, p.status, p.distribution, p.error] for p in pm.plugins()),
}))
"""


def listing(site, env=None):
    return json.loads(run_python(LISTING, site=site, env=env).stdout)


# -- item 12: an entry point named like an existing one never silently replaces it -------------------


def test_a_second_distribution_with_the_same_entry_point_name_is_a_reported_conflict(tmp_path):
    # "impostor-dist" comes first on the path and declares `good = impostor`, as the real one does.
    site = make_distribution(tmp_path / "site", "impostor-dist", "6.6", {"impostor": GOOD_PLUGIN},
                             {"good": "impostor"})
    make_distribution(site, "good-dist", "1.0", {"good_plugin": GOOD_PLUGIN}, {"good": "good_plugin"})
    out = listing(site)
    assert ["good", "loaded", "good-dist", None] in out["plugins"]
    assert ["good", "loaded", "impostor-dist", None] in out["plugins"]
    assert "good" not in out["available"]  # neither wins
    proc = run_python("import qplug; qplug.get_config_class('good')", site=site, check=False)
    assert "BackendConflictError" in proc.stderr
    assert "impostor-dist 6.6" in proc.stderr and "good-dist 1.0" in proc.stderr
    # Blocking the impostor by its distribution name settles it.
    out = listing(site, env={"QPLUG_DISABLED_PLUGINS": "impostor_dist"})
    assert "good" in out["available"]


def test_the_same_distribution_seen_twice_loads_once(tmp_path):
    first = make_distribution(tmp_path / "a", "good-dist", "1.0", {"good_plugin": GOOD_PLUGIN}, {"good": "good_plugin"})
    second = make_distribution(tmp_path / "b", "good-dist", "1.0", {}, {"good": "good_plugin"})
    code = f"import sys; sys.path[:0] = [{str(first)!r}, {str(second)!r}]\n" + LISTING
    out = json.loads(run_python(code).stdout)
    assert out["plugins"].count(["good", "loaded", "good-dist", None]) == 1
    assert "good" in out["available"]


# -- item 13: SystemExit / KeyboardInterrupt at import are isolated -----------------------------------


@pytest.mark.parametrize("raising", ["import sys; sys.exit(3)", "raise KeyboardInterrupt", "raise SystemExit('bye')"])
def test_a_plugin_that_exits_at_import_is_reported_and_the_others_load(tmp_path, raising):
    site = make_distribution(tmp_path / "site", "aaa-exits", "0.1", {"aaa_exits": raising}, {"aaa": "aaa_exits"})
    make_distribution(site, "good-dist", "1.0", {"good_plugin": GOOD_PLUGIN}, {"good": "good_plugin"})
    make_distribution(site, "other-dist", "1.0", {"other_plugin": OTHER_PLUGIN}, {"other": "other_plugin"})
    code = LISTING + "print(qplug.get_config_class('other').__name__, qplug.available_backends())\n"
    proc = run_python(code, site=site)
    out = json.loads(proc.stdout.splitlines()[0])
    failed = [p for p in out["plugins"] if p[0] == "aaa"]
    assert failed and failed[0][1:3] == ["failed", "aaa-exits"]
    assert failed[0][3].startswith(("SystemExit", "KeyboardInterrupt"))
    assert {"good", "other"} <= set(out["available"])
    assert proc.stdout.splitlines()[1].startswith("OtherConfig")


def test_qplug_backends_survives_a_plugin_that_exits(tmp_path):
    site = make_distribution(tmp_path / "site", "exits-dist", "0.1", {"exits": "import sys; sys.exit(0)"},
                             {"exits": "exits"})
    make_distribution(site, "good-dist", "1.0", {"good_plugin": GOOD_PLUGIN}, {"good": "good_plugin"})
    proc = run_python("import sys; from qplug.cli import main; sys.exit(main(['backends', '--json']))", site=site,
                      check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert any(r["name"] == "good" for r in rows)
    assert any("SystemExit" in str(r.get("status")) for r in rows)


# -- item 14: registration errors are PluginErrors naming the plugin ---------------------------------


class Returns:
    def __init__(self, value):
        self.value = value

    @qplug.hookimpl
    def register_backends(self):
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, "must return a list of qplug.Backend records, got 5"),
        ("toy", "must return a list of qplug.Backend records, got 'toy'"),
        ({"toy": ToyConfig}, "must return a list"),
        ([None], "must return qplug.Backend records, got None"),
        (RuntimeError("registry down"), "register_backends raised RuntimeError: registry down"),
        (TypeError("bad"), "register_backends raised TypeError: bad"),
        (SystemExit(2), "register_backends raised SystemExit"),
    ],
)
def test_register_backends_junk_or_raising_is_a_plugin_error_naming_the_plugin(value, message):
    with pytest.raises(qplug.PluginError, match=r"test_plugin_isolation\.Returns") as info:
        qplug.register_plugin(Returns(value))
    assert message in str(info.value)
    assert "test_plugin_isolation.Returns" not in [p.name for p in qplug.get_plugin_manager().plugins()]
    qplug.register_plugin(ToyPlugin())  # the manager is still usable
    assert qplug.get_config_class("toy") is ToyConfig


def test_register_backends_generator_failing_half_way_is_a_plugin_error():
    def records():
        yield qplug.Backend(name="toy", config_class=ToyConfig)
        raise ValueError("half-way")

    with pytest.raises(qplug.PluginError, match="raised ValueError: half-way"):
        qplug.register_plugin(Returns(records()), name="gen")
    with pytest.raises(qplug.UnknownBackendError):
        qplug.get_config_class("toy")


def test_two_backends_of_one_name_inside_one_plugin_are_refused():
    twice = [qplug.Backend(name="toy", config_class=ToyConfig),
             qplug.Backend(name="toy", config_class=ToyConfig, aliases=("t",))]
    with pytest.raises(qplug.PluginError, match="declares the backend name 'toy' twice"):
        qplug.register_plugin(Returns(twice), name="twice")
    alias_clash = [qplug.Backend(name="toy", config_class=ToyConfig, aliases=("t", "t"))]
    with pytest.raises(qplug.PluginError, match="'t' twice"):
        qplug.register_plugin(Returns(alias_clash), name="alias-clash")
    assert not [p for p in qplug.get_plugin_manager().plugins() if p.name in {"twice", "alias-clash"}]


def test_run_time_plugins_are_named_readably():
    name = qplug.register_plugin(ToyPlugin())
    assert name == "helpers.ToyPlugin"
    import helpers

    class Other:
        @qplug.hookimpl
        def register_backends(self):
            return []

    assert qplug.register_plugin(Other()) == f"{__name__}.{Other.__qualname__}"
    assert qplug.register_plugin(Other()) == f"{__name__}.{Other.__qualname__}#2"
    with pytest.raises(qplug.BackendConflictError) as info:
        qplug.register_plugin(ToyPlugin())
    assert "'helpers.ToyPlugin#2'" in str(info.value) and "'helpers.ToyPlugin'" in str(info.value)
    assert not any(ch.isdigit() and len(ch) > 8 for ch in str(info.value).split())  # no id() numbers
    assert helpers  # the module plugin, too, is named by its module
    pm = PluginManager(autoload=False)
    module_plugin = type(helpers)("my_backend_module")
    module_plugin.register_backends = qplug.hookimpl(lambda: [])
    assert pm.register(module_plugin) == "my_backend_module"


@pytest.mark.parametrize(("given", "blocked"), [("qplug_gptq", "qplug-gptq"), ("QPlug.GPTQ", "qplug-gptq"),
                                                ("qplug--gptq", "qplug-gptq"), ("Good_Plugin", "good-plugin")])
def test_blocked_names_are_compared_the_pep_503_way(given, blocked):
    from qplug.manager import pep503_name

    assert pep503_name(given) == blocked


def test_underscore_spelling_blocks_the_distribution_and_the_entry_point(tmp_path):
    marker = tmp_path / "imported"
    spy = f"open({str(marker)!r}, 'w').write('x')\n" + GOOD_PLUGIN
    site = make_distribution(tmp_path / "site", "spy-dist", "1.0", {"spy_plugin": spy}, {"spy.plugin": "spy_plugin"})
    for env in ("spy_dist", "SPY.DIST", "spy_plugin", "Spy-Plugin"):
        out = listing(site, env={"QPLUG_DISABLED_PLUGINS": env})
        assert ["spy.plugin", "blocked", "spy-dist", None] in out["plugins"], env
        assert not marker.exists(), env
