"""qplug's backend contract kit, for each bitsandbytes format."""

from __future__ import annotations

import pytest
import torch
from qplug_bitsandbytes import BitsAndBytesConfig

import qplug
from qplug.testing import BackendContractTests, relative_error, tiny_llama

# The 4-and-8-bit conflict is named after the flag a config does not already have set, so
# the kit's evolve() check (which applies only the named field) really creates the conflict.
CONFLICT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": True}
BNB = {"quant_method": "bitsandbytes"}
INVALID = [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "bnb_4bit_quant_type"),
    ({"quant_method": "bnb", "load_in_4bit": True, "bnb_4bit_compute_dtype": "float8"}, "bnb_4bit_compute_dtype"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": "6"}, "llm_int8_threshold"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": "yes"}, "load_in_8bit"),
    ({**BNB, "load_in_4bit": True, "bnb_4bit_quant_storage": "int4"}, "bnb_4bit_quant_storage"),
    ({**BNB, "load_in_4bit": True, "llm_int8_skip_modules": "lm_head"}, "llm_int8_skip_modules"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "_load_in_4bit": False}, "_load_in_4bit"),
]


class _BnbContract(BackendContractTests):
    @pytest.fixture
    def weight_bits(self, config):
        return 4 if config.load_in_4bit else 8

    @pytest.fixture
    def invalid_configs(self, config):
        flag = "load_in_4bit" if config.load_in_8bit else "load_in_8bit"
        return [(CONFLICT, flag), *INVALID]


class _FourBit(_BnbContract):
    # 4 bits per weight on qplug.testing.tiny_llama (weights of std 1/sqrt(fan_in), so errors
    # compound through the layers) measure 0.31 (NF4) and 0.39 (FP4) relative logit error, the
    # same as transformers' own bitsandbytes path on the same weights (test_plugin.py proves the
    # logits identical). The kit's default 0.25 is an 8-bit-sized bound.
    @pytest.fixture
    def tolerance(self, config):
        return 0.35 if config.bnb_4bit_quant_type == "nf4" else 0.45


class TestNF4(_FourBit):
    @pytest.fixture
    def config(self):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")


class TestFP4(_FourBit):
    @pytest.fixture
    def config(self):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")


class TestNF4DoubleQuant(_FourBit):
    @pytest.fixture
    def config(self):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype="bfloat16",
        )


class TestInt8(_BnbContract):
    @pytest.fixture
    def config(self):
        return BitsAndBytesConfig(load_in_8bit=True)

    def test_dequantize_gives_plain_linear_modules(self, quantized, tokens, capabilities):
        """The kit's version, for both int8 kernels.

        qplug's CPU kernel (``qplug-int8-cpu``) multiplies the float inputs by the int8 weights and
        their scales, which is the dequantized model's arithmetic: the logits agree up to float32
        accumulation order. bitsandbytes' own forward also quantizes the *activations* (to int8,
        outliers above ``llm_int8_threshold`` kept in float16), which the dequantized float model
        does not, so the two differ by 2.3 % here (the kit allows 2 % for weight-only methods) --
        while the dequantized model is *closer* to the float model, which this version asserts.
        """
        reference = tiny_llama(seed=0)  # the same float weights the `quantized` fixture started from
        with torch.no_grad():
            float_logits = reference(tokens).logits
            ours = quantized(tokens).logits
            ran = {entry["kernel"] for entry in qplug.kernel_report(quantized).values()}
            qplug.set_kernel(quantized, "bitsandbytes")
            before = quantized(tokens).logits
        qplug.dequantize(quantized)
        assert qplug.quantized_config(quantized) is None
        linear_kinds = {type(m) for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linear_kinds == {torch.nn.Linear}
        with torch.no_grad():
            after = quantized(tokens).logits
        if ran == {"qplug-int8-cpu"}:
            assert relative_error(after, ours) < 1e-5
        assert relative_error(after, before) < 0.05
        assert relative_error(after, float_logits) <= relative_error(before, float_logits)
