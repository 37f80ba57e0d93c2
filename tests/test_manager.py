"""The plugin manager: entry points, isolation, blocking, run-time registration, names."""

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
    return [qplug.Backend(name="good", config_class=GoodConfig, aliases=("fine",))]
"""


def _listing_code() -> str:
    return """
    import json, qplug
    pm = qplug.get_plugin_manager()
    print(json.dumps({"backends": pm.backend_names(),
                      "plugins": {p.name: [p.status, p.distribution, p.version, p.error] for p in pm.plugins()}}))
    """


def _listing(site, env=None):
    return json.loads(run_python(_listing_code(), site=site, env=env).stdout)


def test_broken_plugin_is_reported_and_others_keep_working(tmp_path):
    site = make_distribution(tmp_path / "site", "good-dist", "1.2", {"good_plugin": GOOD_PLUGIN},
                             {"good": "good_plugin"})
    make_distribution(site, "broken-dist", "0.3", {"broken_plugin": "raise RuntimeError('boom at import')"},
                      {"broken": "broken_plugin"})
    out = _listing(site)
    assert "good" in out["backends"]
    assert out["plugins"]["broken"][:3] == ["failed", "broken-dist", "0.3"]
    assert "boom at import" in out["plugins"]["broken"][3]
    proc = run_python("import qplug; qplug.get_config_class('nope')", site=site, check=False)
    assert "failed to load" in proc.stderr and "broken-dist 0.3" in proc.stderr


def test_blocked_plugin_is_never_imported(tmp_path):
    marker = tmp_path / "imported"
    site = make_distribution(tmp_path / "site", "spy-dist", "1.0",
                             {"spy_plugin": f"open({str(marker)!r}, 'w').write('x')\n" + GOOD_PLUGIN},
                             {"spy": "spy_plugin"})
    out = _listing(site, env={"QPLUG_DISABLED_PLUGINS": "other, SPY"})
    assert out["plugins"]["spy"][0] == "blocked"
    assert "good" not in out["backends"]
    assert not marker.exists()
    _listing(site)
    assert marker.exists()


def test_autoload_off_loads_no_entry_points(tmp_path):
    site = make_distribution(tmp_path / "site", "good-dist", "1.0", {"good_plugin": GOOD_PLUGIN},
                             {"good": "good_plugin"})
    out = _listing(site, env={"QPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert out == {"backends": [], "plugins": {}}


def test_two_distributions_claiming_one_name_fail_loudly(tmp_path):
    site = make_distribution(tmp_path / "site", "first-dist", "1.0", {"first_plugin": GOOD_PLUGIN},
                             {"first": "first_plugin"})
    make_distribution(site, "second-dist", "2.0", {"second_plugin": GOOD_PLUGIN}, {"second": "second_plugin"})
    proc = run_python("import qplug; qplug.get_config_class('FINE')", site=site, check=False)
    assert proc.returncode != 0
    assert "BackendConflictError" in proc.stderr
    assert "first-dist 1.0" in proc.stderr and "second-dist 2.0" in proc.stderr


def test_run_time_registration_and_unregistration():
    plugin = ToyPlugin()
    name = qplug.register_plugin(plugin)
    assert qplug.get_config_class("toy") is ToyConfig
    qplug.unregister_plugin(plugin)
    with pytest.raises(qplug.UnknownBackendError):
        qplug.get_config_class("toy")
    assert name


def test_run_time_conflict_is_refused_and_first_keeps_working():
    qplug.register_plugin(ToyPlugin(), name="first")
    with pytest.raises(qplug.BackendConflictError, match=r"'first'.*'second'"):
        qplug.register_plugin(ToyPlugin(), name="second")
    assert qplug.get_config_class("toy") is ToyConfig
    assert [p.name for p in qplug.get_plugin_manager().plugins()].count("second") == 0


def test_misspelled_hook_is_an_error():
    class Typo:
        @qplug.hookimpl
        def register_backends(self):
            return []

        @qplug.hookimpl
        def replace_module(self, config, model):
            return None

    with pytest.raises(qplug.PluginError, match=r"'replace_module'.*did you mean 'replace_modules'"):
        qplug.register_plugin(Typo(), name="typo")
    assert "typo" not in [p.name for p in qplug.get_plugin_manager().plugins()]


def test_bad_records_are_refused():
    class NotARecord:
        @qplug.hookimpl
        def register_backends(self):
            return ["toy"]

    with pytest.raises(qplug.PluginError, match=r"qplug\.Backend records"):
        qplug.register_plugin(NotARecord())
    with pytest.raises(qplug.PluginError, match="quant_method"):
        qplug.Backend(name="other", config_class=ToyConfig)
    with pytest.raises(qplug.PluginError, match="valid backend name"):
        qplug.Backend(name="bad name!", config_class=ToyConfig)
    with pytest.raises(qplug.PluginError, match="refuses must map what is refused to the reason"):
        qplug.Backend(name="toy", config_class=ToyConfig, refuses={"fp8 weights": ""})


def test_unavailable_backend_says_what_to_install():
    class NeedsMissing:
        @qplug.hookimpl
        def register_backends(self):
            return [qplug.Backend(name="toy", config_class=ToyConfig, requires=("qplug-no-such-package>=1",))]

    qplug.register_plugin(NeedsMissing())
    assert "toy" not in qplug.available_backends()
    assert qplug.get_config_class("toy") is ToyConfig  # configs still load
    with pytest.raises(qplug.BackendUnavailableError, match="pip install 'qplug-no-such-package>=1'") as info:
        qplug.quantize(object(), ToyConfig())
    assert isinstance(info.value, ImportError)


@pytest.mark.parametrize(("requirement", "name", "specifier"), [
    ("bitsandbytes>=0.48", "bitsandbytes", ">=0.48"),
    ("torch", "torch", ""),
    ("torch[cpu] >= 2.1, <3", "torch", ">= 2.1, <3"),
    ("auto-gptq==0.7.1", "auto-gptq", "==0.7.1"),
    ('foo>=1; python_version > "3"', "foo", ">=1"),  # beyond the simple form: packaging parses it
])
def test_requirements_split_as_packaging_splits_them(requirement, name, specifier):
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from qplug.backend import split_requirement

    got = split_requirement(requirement)
    assert got[0] == name == Requirement(requirement).name
    assert SpecifierSet(got[1]) == SpecifierSet(specifier) == Requirement(requirement).specifier


def test_requirement_versions_are_compared_as_packaging_compares_them():
    from importlib import metadata

    installed = metadata.version("pluggy")
    satisfied = [f"pluggy>={installed}", f"pluggy=={installed}", "pluggy", "pluggy<9999"]
    missing = [f"pluggy>{installed}", "pluggy<0.1", "qplug-no-such-package"]
    for requirement in satisfied + missing:
        record = qplug.Backend(name="toy", config_class=ToyConfig, requires=(requirement,))
        assert record.missing_requirements() == ([] if requirement in satisfied else [requirement]), requirement


def test_unknown_name_lists_and_suggests():
    qplug.register_plugin(ToyPlugin())
    with pytest.raises(qplug.UnknownBackendError, match="Did you mean 'toy'") as info:
        qplug.get_config_class("tyo")
    assert "toy" in info.value.available


def test_trace_variable_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("QPLUG_TRACE", "1")
    pm = PluginManager(autoload=False)
    pm.register(ToyPlugin())
    pm.hook.validate(config=ToyConfig(), model=None)
    err = capsys.readouterr().err
    assert "qplug trace: validate" in err
