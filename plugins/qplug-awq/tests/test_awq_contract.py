"""qplug's backend contract kit, for each layout AWQ stores, with and without a zero point.

AWQ's formats always carry ``qzeros``; symmetric (``zero_point=False``) weights are stored
with the constant zero point 8, so every combination is a valid checkpoint.
"""

from __future__ import annotations

import copy

import pytest
from awq_testlib import calibration as make_calibration
from qplug_awq.config import AwqConfig

import qplug
from qplug.testing import BackendContractTests, tiny_llama

_INVALID = [
    ({"quant_method": "awq", "bits": 5}, "bits"),
    ({"quant_method": "awq", "group_size": -2}, "group_size"),
    ({"quant_method": "awq", "version": "marlin"}, "version"),
    ({"quant_method": "awq", "backend": "bitblas"}, "backend"),
    ({"quant_method": "awq", "do_fuse": True}, "fuse_max_seq_len"),
]


class _AwqContract(BackendContractTests):
    version = "gemm"
    zero_point = True

    def make_config(self):
        return AwqConfig(version=self.version, zero_point=self.zero_point, group_size=64)

    @pytest.fixture
    def config(self):
        return self.make_config()

    @pytest.fixture(scope="class")
    @classmethod
    def quantized_once(cls):
        # the kit's default model (tiny_llama(seed=0)), quantized once per class: AWQ's search is
        # the slow part, and the tests only need equal, independent copies
        return qplug.quantize(tiny_llama(seed=0), cls.make_config(cls), calibration=make_calibration())

    @pytest.fixture
    def quantized(self, quantized_once):
        return copy.deepcopy(quantized_once)

    @pytest.fixture
    def invalid_configs(self):
        return _INVALID

    @pytest.fixture
    def calibration(self, model):
        return make_calibration()

    @pytest.fixture
    def tolerance(self):
        # The tiny test model has Gaussian random weights: 4-bit round-to-nearest alone gives a
        # relative logit error of 0.32 (g64, zero point; 0.38 symmetric at g128), and with no
        # activation outliers AWQ's scaling gains little over it. 0.45 passes every layout with
        # margin and still fails a wrong packing order or group mapping (errors >= 1).
        return 0.45


class TestGemmZeroPoint(_AwqContract):
    version, zero_point = "gemm", True


class TestGemmSymmetric(_AwqContract):
    version, zero_point = "gemm", False


class TestGemvZeroPoint(_AwqContract):
    version, zero_point = "gemv", True


class TestGemvSymmetric(_AwqContract):
    version, zero_point = "gemv", False
