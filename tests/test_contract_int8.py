"""The example backend passes the contract kit in-process too (the kit's own regression test)."""

from __future__ import annotations

import pytest

from qplug.testing import BackendContractTests


class TestExampleInt8Backend(BackendContractTests):
    @pytest.fixture(autouse=True)
    def _plugin(self, int8_plugin):
        return int8_plugin

    @pytest.fixture
    def config(self, int8_plugin):
        return int8_plugin.Int8WeightConfig()

    @pytest.fixture
    def invalid_configs(self):
        return [
            ({"quant_method": "int8-weight", "bits": 4}, "bits"),
            ({"quant_method": "int8-weight", "compute_dtype": "int3"}, "compute_dtype"),
            ({"quant_method": "int8-weight", "modules_to_not_convert": "lm_head"}, "modules_to_not_convert"),
        ]

    @pytest.fixture
    def tolerance(self):
        return 0.05  # per-channel int8 keeps logits within a few percent on the tiny model
