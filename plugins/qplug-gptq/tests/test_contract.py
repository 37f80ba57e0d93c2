"""qplug's backend contract kit, for 4- and 8-bit GPTQ with and without act-order."""

import pytest
import torch
from qplug_gptq import GPTQConfig

from qplug.testing import BackendContractTests


class _GPTQContract(BackendContractTests):
    bits = 4
    desc_act = False

    @pytest.fixture
    def config(self):
        return GPTQConfig(bits=self.bits, group_size=64, desc_act=self.desc_act)

    @pytest.fixture
    def invalid_configs(self):
        return [
            ({"quant_method": "gptq", "bits": 5}, "bits"),
            ({"quant_method": "gptq", "group_size": 0}, "group_size"),
            ({"quant_method": "gptq", "damp_percent": 1.5}, "damp_percent"),
            ({"quant_method": "gptq", "desc_act": "yes"}, "desc_act"),
        ]

    @pytest.fixture
    def calibration(self, model):
        return torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(5))

    @pytest.fixture
    def tolerance(self):
        # The kit's tiny Llama has random weights of std 1/sqrt(fan_in) and no outlier structure,
        # the hardest case for 4 bits. Measured relative logit error (random calibration tokens):
        # round-to-nearest 0.32-0.34, GPTQ 0.27-0.30 at 4 bits; 0.022 vs 0.017-0.019 at 8 bits.
        # The bound leaves ~15% headroom over GPTQ and stays below what a broken grid would give.
        return 0.35 if self.bits == 4 else 0.05


class TestGPTQ4Bit(_GPTQContract):
    bits, desc_act = 4, False


class TestGPTQ4BitActOrder(_GPTQContract):
    bits, desc_act = 4, True


class TestGPTQ8Bit(_GPTQContract):
    bits, desc_act = 8, False


class TestGPTQ8BitActOrder(_GPTQContract):
    bits, desc_act = 8, True
