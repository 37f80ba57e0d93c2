"""Proof against autoawq 0.2.9 itself (marked ``autoawq``: skipped only where ``awq`` cannot be imported).

* autoawq quantizes and saves a tiny seeded Llama (GEMM, group 64 and 128, zero point); qplug
  loads each in a fresh process, and its logits match autoawq's own modules on the same tokens;
* the reverse: what qplug quantizes and saves runs in autoawq's modules with the same logits;
* qplug's AWQ search agrees with autoawq's on the same block and calibration tokens;
* autoawq's ``WQLinear_*`` modules as qplug's kernels: used where they work, refused with the reason
  where they do not.

autoawq cannot load a checkpoint on a CPU with its own ``from_quantized`` (it forces IPEX there);
``scripts/make_fixture.py:autoawq_model`` builds the model with autoawq's module-replacement routine
and its ``WQLinear`` modules instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from awq_testlib import calibration, logits, make_fixture_module, tokens
from qplug_awq.autoawq import KernelUnavailableError, probe
from qplug_awq.config import AwqConfig
from qplug_awq.linear import AwqLinear
from qplug_awq.packing import unpack_gemm
from qplug_awq.quant import quantize_weight
from safetensors.torch import load_file
from torch import nn

import qplug
from qplug.testing import relative_error, tiny_llama

pytestmark = pytest.mark.autoawq

# float16 models on both sides; autoawq multiplies in float16, qplug accumulates in float32:
# see test_awq_fixture.FP16_TOLERANCE for the derivation (measured ~2e-3).
FP16_TOLERANCE = 1e-2


def _wq_modules():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq.modules.linear import WQLinear_GEMM, WQLinear_GEMV
    return WQLinear_GEMM, WQLinear_GEMV


@pytest.fixture(scope="module")
def fixture_lib():
    return make_fixture_module()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("float") / "tiny-llama-fp16"
    tiny_llama(seed=0, dtype=torch.float16).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[64, 128], ids=["g64", "g128"])
def autoawq_checkpoint(request, float_dir, fixture_lib, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("autoawq") / f"g{request.param}"
    fixture_lib.autoawq_quantize(float_dir, out, request.param, calib=calibration())
    return out


# ---------------------------------------------------------------------------------------------
# packing and kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_packing_is_bit_identical_to_autoawq(group_size, version):
    WQLinear_GEMM, WQLinear_GEMV = _wq_modules()
    torch.manual_seed(0)
    linear = nn.Linear(256, 128).half()
    ours = AwqLinear.from_linear(linear, group_size=group_size, version=version)
    _, izeros, scales = quantize_weight(linear.weight.detach(), 4, group_size, True)
    # autoawq packs the pseudo-quantized weight with the scales and zeros of its quantizer
    fake = nn.Linear(256, 128).half()
    with torch.no_grad():
        fake.weight.copy_(ours.dequantize(torch.float16))
        fake.bias.copy_(linear.bias)
    if version == "gemm":
        theirs = WQLinear_GEMM.from_linear(fake, 4, group_size, scales=scales.t().contiguous(),
                                           zeros=izeros.t().contiguous().half())
    else:
        theirs = WQLinear_GEMV.from_linear(fake, 4, group_size, scales=scales, zeros=izeros.half())
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


def test_autoawq_gemm_module_works_on_cpu_and_agrees_but_is_not_a_cpu_kernel():
    from qplug_awq.autoawq import AUTOAWQ

    assert probe(AwqLinear, "gemm", "cpu") is None  # no triton here: WQLinear_GEMM dequantizes and multiplies
    torch.manual_seed(0)
    layer = AwqLinear.from_linear(nn.Linear(256, 128), group_size=64)
    x = torch.randn(2, 3, 256, dtype=torch.float16)
    with torch.no_grad():
        external = AUTOAWQ.forward(layer, AUTOAWQ.prepare(layer, x.device, x.dtype), x.reshape(6, 256))
    # autoawq: float16 matmul of 256 terms (relative error ~1e-3); qplug: float16 weight, float32 sums
    torch.testing.assert_close(external.float(), layer(x).reshape(6, 128).float(), rtol=1e-2, atol=1e-2)
    assert "CUDA kernels" in AUTOAWQ.refuses(layer, x.device, x.dtype)


def test_autoawq_gemv_module_is_refused_with_the_reason_on_cpu():
    reason = probe(AwqLinear, "gemv", "cpu")
    assert reason is not None and "GEMV" in reason  # its forward needs autoawq's CUDA extension
    layer = AwqLinear.from_linear(nn.Linear(256, 128), group_size=64, version="gemv", kernel="autoawq")
    with pytest.raises(KernelUnavailableError, match="CUDA kernels"):
        layer(torch.randn(1, 256))
    layer.kernel_request = None
    assert layer(torch.randn(1, 256)).shape == (1, 128)  # chosen automatically: qplug's own kernels


# ---------------------------------------------------------------------------------------------
# autoawq -> qplug
# ---------------------------------------------------------------------------------------------

_LOAD_IN_FRESH_PROCESS = """
import sys, torch, qplug
from safetensors.torch import save_file
model = qplug.load_quantized(sys.argv[1])
assert 'awq' not in sys.modules, 'loading imported autoawq'
ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    save_file({'logits': model(ids).logits.float().contiguous()}, sys.argv[2])
"""


def test_autoawq_checkpoint_loads_in_a_fresh_qplug_process(autoawq_checkpoint, fixture_lib, tmp_path):
    out = tmp_path / "qplug-logits.safetensors"
    subprocess.run([sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, str(autoawq_checkpoint), str(out)],
                   check=True, capture_output=True, text=True)
    ours = load_file(str(out))["logits"]
    theirs = fixture_lib.autoawq_logits(autoawq_checkpoint, tokens())
    error = relative_error(ours, theirs)
    assert error < FP16_TOLERANCE, error


# ---------------------------------------------------------------------------------------------
# qplug -> autoawq
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [64, 128])
def test_qplug_checkpoint_runs_in_autoawq_modules(group_size, fixture_lib, tmp_path):
    model = qplug.quantize(tiny_llama(seed=0, dtype=torch.float16), AwqConfig(group_size=group_size),
                           calibration=calibration())
    ours = logits(model, tokens())
    qplug.save_quantized(model, tmp_path / "ckpt")
    theirs_model = fixture_lib.autoawq_model(tmp_path / "ckpt")
    WQLinear_GEMM, _ = _wq_modules()
    assert isinstance(theirs_model.model.layers[0].self_attn.q_proj, WQLinear_GEMM)
    error = relative_error(logits(theirs_model, tokens()), ours)
    assert error < FP16_TOLERANCE, error
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["version"]) == (4, group_size, "gemm")


# ---------------------------------------------------------------------------------------------
# the search itself
# ---------------------------------------------------------------------------------------------

_FIX_AUTOAWQ_CPU_ALIASING = """
# autoawq 0.2.9 saves the module's weights before each scale candidate as
# {k: v.cpu() for k, v in module.state_dict().items()}; on a CPU .cpu() returns the same tensor,
# so the in-place `fc.weight.mul_(scales)` of the search also changes the saved copy, and every
# candidate (and the final weights) inherit the previous candidates' scales. On a GPU .cpu()
# copies and the bug does not occur. The reference run therefore saves real copies.
"""


def _autoawq_with_copied_state(fixture_lib):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from awq.quantize import quantizer

    original = quantizer.AwqQuantizer._compute_best_scale

    def compute_best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        state_dict = module2inspect.state_dict
        module2inspect.state_dict = lambda *a, **k: {n: t.clone() for n, t in state_dict(*a, **k).items()}
        try:
            return original(self, x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict

    return original, compute_best_scale


def test_search_agrees_with_autoawq_on_the_same_block(fixture_lib, tmp_path):
    __doc__ = _FIX_AUTOAWQ_CPU_ALIASING  # noqa: F841  (why the reference run is patched)
    from awq.quantize import quantizer

    float_dir = tmp_path / "float"
    tiny_llama(seed=0, dtype=torch.float16, num_hidden_layers=1).save_pretrained(float_dir)
    original, fixed = _autoawq_with_copied_state(fixture_lib)
    quantizer.AwqQuantizer._compute_best_scale = fixed
    try:
        fixture_lib.autoawq_quantize(float_dir, tmp_path / "autoawq", 64, calib=calibration())
    finally:
        quantizer.AwqQuantizer._compute_best_scale = original
    theirs = load_file(str(tmp_path / "autoawq" / "model.safetensors"))

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float16)
    qplug.quantize(model, AwqConfig(group_size=64), calibration=calibration())
    ours = model.state_dict()
    # the folded scales: identical norms means the same ratio won every grid search
    for norm in ("input_layernorm", "post_attention_layernorm"):
        key = f"model.layers.0.{norm}.weight"
        assert torch.equal(ours[key], theirs[key]), key
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        prefix = next(k for k in theirs if k.endswith(f"{name}.qweight"))[: -len(".qweight")]
        a = unpack_gemm(ours[prefix + ".qweight"], ours[prefix + ".qzeros"], ours[prefix + ".scales"])
        b = unpack_gemm(theirs[prefix + ".qweight"], theirs[prefix + ".qzeros"], theirs[prefix + ".scales"])
        # clipping sums the same products in another order (a batched matmul instead of autoawq's
        # elementwise product + sum), which can flip a near-tie between two shrink factors of one
        # group: measured 99.8-100% of the integers identical. 99% fails any real divergence.
        same = float((a[0] == b[0]).float().mean())
        assert same > 0.99, (prefix, same)
