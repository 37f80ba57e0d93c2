"""A third-party backend, installed as a real distribution, works end to end in a fresh process."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import EXAMPLE_PLUGIN, run_python


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE_PLUGIN)],
        check=True, capture_output=True, text=True,
    )
    return target


def test_installed_backend_is_discovered_selected_applied_saved_loaded(installed_example, tmp_path):
    out = run_python(
        f"""
        import sys, torch, qplug
        from torch import nn
        from qplug.testing import tiny_llama, example_tokens
        entry = qplug.get_plugin_manager().get_entry("INT8W")
        assert entry.plugin.distribution == "qplug-int8" and entry.plugin.version == "1.0.0", entry
        assert entry.plugin.status == "loaded"
        model = tiny_llama()
        tokens = example_tokens(model)
        qplug.quantize(model, qplug.config_from_dict({{"quant_method": "int8w"}}))
        expected = model(tokens).logits
        qplug.save_quantized(model, {str(tmp_path / "ckpt")!r})
        loaded = qplug.load_quantized({str(tmp_path / "ckpt")!r})
        assert torch.equal(loaded(tokens).logits, expected)
        qplug.dequantize(loaded)
        assert all(type(m) is nn.Linear for n, m in loaded.named_modules() if n.endswith("_proj"))
        print("OK", qplug.available_backends())
        """,
        site=installed_example,
    )
    assert "OK" in out.stdout and "int8-weight" in out.stdout


def test_installed_backend_passes_the_contract_kit(installed_example, tmp_path):
    test_file = tmp_path / "test_int8_contract.py"
    test_file.write_text(
        "import pytest\n"
        "from qplug.testing import BackendContractTests\n"
        "from qplug_int8.plugin import Int8WeightConfig\n\n"
        "class TestInt8(BackendContractTests):\n"
        "    @pytest.fixture\n"
        "    def config(self):\n"
        "        return Int8WeightConfig()\n\n"
        "    @pytest.fixture\n"
        "    def invalid_configs(self):\n"
        "        return [({'quant_method': 'int8-weight', 'bits': 4}, 'bits'),\n"
        "                ({'quant_method': 'int8-weight', 'compute_dtype': 'int3'}, 'compute_dtype')]\n"
    )
    proc = run_python(
        f"import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(test_file)!r}]))",
        site=installed_example, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_kit_names_the_fixture_a_backend_forgot(tmp_path):
    test_file = tmp_path / "test_forgot.py"
    test_file.write_text(
        "from qplug.testing import BackendContractTests\n\n"
        "class TestForgot(BackendContractTests):\n"
        "    pass\n"
    )
    proc = run_python(
        f"import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'round_trips_through_dict',"
        f" {str(test_file)!r}]))",
        check=False,
    )
    assert proc.returncode == 1
    assert "must override the 'config' fixture" in proc.stdout
