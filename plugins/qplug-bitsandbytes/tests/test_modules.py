"""The bitsandbytes modules against transformers' own bitsandbytes path (no qplug core needed)."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from bnb_testlib import (
    HF_4BIT,
    HF_ALL,
    HF_WIDE,
    empty_skeleton,
    linear_names,
    logits,
    make_tiny_llama,
    quantize_with_modules,
    state_dicts_equal,
)
from qplug_bitsandbytes import modules
from qplug_bitsandbytes.modules import QuantStateError
from safetensors.torch import load_file, save_file

params_wide = pytest.mark.parametrize("fmt", list(HF_WIDE), ids=list(HF_WIDE))
# Formats for the module-level versions of tests that test_plugin.py runs for every format
# through qplug's API (kept short: the suite shares two cores).
SAMPLE = ["nf4-dq-bf16", "int8"]
params_sample = pytest.mark.parametrize("fmt", SAMPLE)


def has_avx512bf16() -> bool:
    """Whether this bitsandbytes repacks 4-bit weights for an AVX512-BF16 CPU (0.50+ only)."""
    probe = getattr(bnb.functional, "has_avx512bf16", None)
    return bool(probe and probe())


def _is_packed(model) -> bool:
    return any(
        getattr(getattr(m, "weight", None), "quant_state", None) is not None
        and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
    )


@pytest.mark.usefixtures("bnb_kernel")
@params_sample
def test_same_state_and_logits_as_transformers(fmt, fresh_model, hf_quantized, input_ids):
    hf = hf_quantized(**HF_WIDE[fmt])
    ours = quantize_with_modules(fresh_model, HF_WIDE[fmt])

    assert state_dicts_equal(hf.state_dict(), ours.state_dict()) == []
    assert torch.equal(logits(ours, input_ids), logits(hf, input_ids))


@pytest.mark.usefixtures("bnb_kernel")
@params_wide
def test_export_after_forward_is_exact(fmt, fresh_model, input_ids):
    model = quantize_with_modules(fresh_model, HF_WIDE[fmt])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = logits(model, input_ids)
    if fmt in HF_4BIT and has_avx512bf16():
        # The CPU repack really happened, so this test exercises the trap it guards against.
        assert _is_packed(model)

    assert state_dicts_equal(before, model.state_dict()) == []
    # Exporting leaves the module as it was: same results, still repacked.
    assert torch.equal(logits(model, input_ids), first)
    # A copy of the repacked model exports the same canonical tensors.
    assert state_dicts_equal(before, copy.deepcopy(model).state_dict()) == []


def test_transformers_own_export_after_forward_is_corrupt_here(hf_quantized, input_ids):
    """The bitsandbytes bug this plugin works around, reproduced (skipped where it cannot occur)."""
    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    hf = hf_quantized(**HF_4BIT["nf4"])
    assert all(type(m) is not modules.Linear4bit for m in hf.modules())  # bitsandbytes' own class
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    logits(hf, input_ids)
    changed = state_dicts_equal(before, hf.state_dict())
    assert changed and all(key.endswith("weight.absmax") for key in changed)


@params_sample
def test_save_after_forward_then_load_gives_same_logits(fmt, fresh_model, input_ids, tmp_path):
    model = quantize_with_modules(fresh_model, HF_WIDE[fmt])
    expected = logits(model, input_ids)
    save_file(model.state_dict(), tmp_path / "model.safetensors")

    loaded = empty_skeleton(HF_WIDE[fmt])
    result = loaded.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True, strict=True)

    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(logits(loaded, input_ids), expected)


@pytest.mark.usefixtures("bnb_kernel")
@params_sample
def test_transformers_checkpoint_loads_into_empty_modules(fmt, hf_quantized, input_ids, tmp_path):
    hf = hf_quantized(**HF_WIDE[fmt])
    hf.save_pretrained(tmp_path)  # before any forward: transformers' export is right then
    expected = logits(hf, input_ids)

    model = empty_skeleton(HF_WIDE[fmt])
    assert all(model.get_submodule(n).weight.device.type == "meta" for n in linear_names(model))
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), assign=True, strict=True)

    assert torch.equal(logits(model, input_ids), expected)


@pytest.mark.usefixtures("bnb_kernel")
@params_sample
def test_checkpoint_written_here_loads_in_transformers(fmt, fresh_model, hf_quantized, input_ids, tmp_path):
    import transformers

    model = quantize_with_modules(fresh_model, HF_WIDE[fmt])
    expected = logits(model, input_ids)  # forward first: the case transformers gets wrong
    model.config.quantization_config = transformers.BitsAndBytesConfig(**HF_WIDE[fmt])
    model.save_pretrained(tmp_path)

    reloaded = hf_quantized(tmp_path)

    assert torch.equal(logits(reloaded, input_ids), expected)


@pytest.mark.parametrize("fmt", ["nf4-dq-bf16", "fp4"])
def test_dequantize_equals_bitsandbytes(fmt, fresh_model, hf_quantized, input_ids):
    hf = hf_quantized(**HF_4BIT[fmt])
    ours = quantize_with_modules(fresh_model, HF_4BIT[fmt])
    logits(ours, input_ids)  # repacked where the CPU allows: dequantization must not care
    for name in linear_names(ours):
        reference = hf.get_submodule(name).weight
        expected = bnb.functional.dequantize_4bit(reference.data, reference.quant_state)

        module = ours.get_submodule(name)
        linear = modules.dequantize_module(module)

        assert type(linear) is torch.nn.Linear
        assert linear.weight.dtype == torch.float32
        assert torch.equal(modules.dequantized_weight(module), expected)
        assert torch.equal(linear.weight, expected)


def test_dequantize_8bit_equals_bitsandbytes(fresh_model, input_ids):
    ours = quantize_with_modules(fresh_model, HF_ALL["int8"])
    reference = copy.deepcopy(ours)
    logits(ours, input_ids)  # moves CB/SCB into the matmul state
    for name in linear_names(ours):
        ref = reference.get_submodule(name).weight
        expected = bnb.functional.int8_vectorwise_dequant(ref.data, ref.SCB)
        assert torch.equal(modules.dequantize_module(ours.get_submodule(name)).weight, expected)


@pytest.mark.usefixtures("bnb_kernel")
def test_bias_is_kept_and_used():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=True)
    x = torch.randn(3, 128)
    # bitsandbytes' documented way: load float weights, quantize on .to(device)
    reference = bnb.nn.Linear4bit(
        128, 64, bias=True, quant_type="nf4", compute_dtype=torch.float32, compress_statistics=False
    )
    reference.load_state_dict(linear.state_dict())
    reference = reference.to("cpu")

    ours = modules.quantize_4bit(linear, quant_type="nf4")

    assert ours.bias is linear.bias
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
        approx, exact = modules.dequantize_module(ours)(x), linear(x)
        assert (approx - exact).norm() / exact.norm() < 0.15  # 4-bit error, not a wrong layout
    assert torch.equal(modules.dequantize_module(ours).bias, linear.bias)


def test_training_forward_after_inference_forward_has_gradients():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    fresh = modules.quantize_4bit(linear, quant_type="nf4").eval()
    used = copy.deepcopy(fresh)
    with torch.no_grad():
        used(torch.randn(2, 128))  # may repack for the CPU kernel
    x1 = torch.randn(2, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)

    used.train()(x1).square().sum().backward()
    fresh.train()(x2).square().sum().backward()

    assert x1.grad is not None
    assert torch.equal(x1.grad, x2.grad)


def test_moving_after_forward_restores_canonical_layout(fresh_model, input_ids):
    model = quantize_with_modules(fresh_model, HF_4BIT["nf4-dq-bf16"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, input_ids)

    model.to("cpu")

    assert not _is_packed(model)
    assert state_dicts_equal(before, model.state_dict()) == []
    assert torch.equal(logits(model, input_ids), expected)


@pytest.mark.parametrize("forward_first", [False, True], ids=["fresh", "after-forward"])
def test_int8_state_follows_the_weight_when_moved(fresh_model, input_ids, forward_first):
    """`.cuda()` swaps each weight's storage (via nn.Module._apply); bitsandbytes' int8 matmul reads
    CB/SCB, which must move with it (on the GPU a stale CPU CB failed the matmul). A copying
    `_apply` is that move on a CPU-only machine."""
    model = quantize_with_modules(fresh_model, HF_ALL["int8"])
    expected = logits(model, input_ids)
    if forward_first:
        logits(model, input_ids)  # bitsandbytes moves CB/SCB from the weight into module.state

    model._apply(torch.clone)

    for name in linear_names(model):
        module = model.get_submodule(name)
        held = [holder.CB for holder in (module.weight, module.state) if holder.CB is not None]
        assert len(held) == 1, name
        assert held[0].data_ptr() == module.weight.data_ptr(), name
    assert torch.equal(logits(model, input_ids), expected)


# --- errors -------------------------------------------------------------------------------

MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def nf4_dq_tensors():
    model = quantize_with_modules(make_tiny_llama(), HF_4BIT["nf4-dq-bf16"])
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def int8_tensors():
    model = quantize_with_modules(make_tiny_llama(), HF_ALL["int8"])
    return {k: v.clone() for k, v in model.state_dict().items()}


def _load(tensors, fmt):
    empty_skeleton(HF_WIDE[fmt]).load_state_dict(tensors, assign=True, strict=True)


@pytest.mark.parametrize(
    "tensor",
    ["weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
     "weight.quant_state.bitsandbytes__nf4"],
)
def test_missing_4bit_quant_state_tensor_names_module_and_tensor(nf4_dq_tensors, tensor):
    tensors = dict(nf4_dq_tensors)
    del tensors[f"{MODULE}.{tensor}"]
    with pytest.raises(QuantStateError) as info:
        _load(tensors, "nf4-dq-bf16")
    assert MODULE in str(info.value)
    assert tensor.replace("bitsandbytes__nf4", "bitsandbytes__") in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("weight.absmax", lambda t: t[:-1], "weight.absmax"),
        ("weight.nested_absmax", lambda t: torch.cat([t, t]), "weight.nested_absmax"),
        ("weight", lambda t: t[:-4], "'weight' holds"),
        ("weight.quant_map", lambda t: t[:8], "weight.quant_map"),
    ],
    ids=["absmax-count", "nested-absmax-count", "weight-bytes", "quant-map"],
)
def test_inconsistent_4bit_quant_state_names_module(nf4_dq_tensors, key, value, needle):
    tensors = dict(nf4_dq_tensors)
    tensors[f"{MODULE}.{key}"] = value(tensors[f"{MODULE}.{key}"])
    with pytest.raises(QuantStateError) as info:
        _load(tensors, "nf4-dq-bf16")
    assert MODULE in str(info.value) and needle in str(info.value)


def test_4bit_checkpoint_of_other_quant_type_is_rejected(nf4_dq_tensors):
    with pytest.raises(QuantStateError, match=r"q_proj.*'nf4'.*'fp4'"):
        _load(dict(nf4_dq_tensors), "fp4-dq")


def test_4bit_quant_state_of_other_layer_shape_is_rejected(nf4_dq_tensors):
    tensors = dict(nf4_dq_tensors)
    other = "model.layers.0.mlp.gate_proj"  # [256, 128] instead of q_proj's [128, 128]
    for suffix in ("weight", "weight.absmax", "weight.nested_absmax", "weight.quant_state.bitsandbytes__nf4"):
        tensors[f"{MODULE}.{suffix}"] = tensors[f"{other}.{suffix}"]
    with pytest.raises(QuantStateError, match=r"q_proj.*shape \[256, 128\]"):
        _load(tensors, "nf4-dq-bf16")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t.pop(f"{MODULE}.SCB"), "missing tensor 'SCB'"),
        (lambda t: t.update({f"{MODULE}.SCB": t[f"{MODULE}.SCB"][:3]}), "tensor 'SCB' has shape"),
        (lambda t: t.update({f"{MODULE}.weight_format": torch.tensor(1, dtype=torch.uint8)}), "weight_format"),
        (lambda t: t.update({f"{MODULE}.weight": t[f"{MODULE}.weight"].to(torch.int16)}), "expected torch.int8"),
    ],
    ids=["missing-scb", "scb-shape", "weight-format", "weight-dtype"],
)
def test_bad_8bit_tensors_name_module(int8_tensors, change, needle):
    tensors = dict(int8_tensors)
    change(tensors)
    with pytest.raises(QuantStateError) as info:
        _load(tensors, "int8")
    assert MODULE in str(info.value) and needle in str(info.value)


def test_missing_weight_is_reported_by_torch(nf4_dq_tensors):
    tensors = {k: v for k, v in nf4_dq_tensors.items() if not k.startswith(MODULE + ".")}
    with pytest.raises(RuntimeError, match=f"Missing key.*{MODULE}.weight"):
        _load(tensors, "nf4-dq-bf16")


def test_float_weights_load_into_empty_4bit_modules_by_quantizing(tiny_model, fresh_model, input_ids):
    expected = logits(quantize_with_modules(fresh_model, HF_4BIT["nf4"]), input_ids)
    model = empty_skeleton(HF_4BIT["nf4"])
    model.load_state_dict(tiny_model.state_dict(), assign=True, strict=True)
    assert torch.equal(logits(model, input_ids), expected)
