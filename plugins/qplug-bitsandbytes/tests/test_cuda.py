"""The backend on an NVIDIA GPU (bitsandbytes' CUDA kernels). Skipped only when no GPU is present."""

from __future__ import annotations

import bitsandbytes as bnb
import peft
import pytest
import torch
import transformers
from bnb_testlib import HF_ALL, linear_names, state_dicts_equal
from qplug_bitsandbytes import BitsAndBytesConfig, modules

import qplug
from qplug.testing import relative_error

pytestmark = pytest.mark.cuda

params_all = pytest.mark.parametrize("fmt", list(HF_ALL), ids=list(HF_ALL))


def qplug_config(hf_kwargs: dict) -> BitsAndBytesConfig:
    return qplug.config_from_dict(transformers.BitsAndBytesConfig(**hf_kwargs).to_dict())


def cuda_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids.cuda()).logits.float().cpu()


def hf_on_cuda(path, **kwargs):
    extra = {"quantization_config": transformers.BitsAndBytesConfig(**kwargs)} if kwargs else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map={"": 0}, **extra
    ).eval()


@params_all
def test_quantize_on_cuda_matches_transformers(fmt, fresh_model, float_checkpoint, input_ids):
    hf = hf_on_cuda(float_checkpoint, **HF_ALL[fmt])
    model = qplug.quantize(fresh_model.cuda(), qplug_config(HF_ALL[fmt]))

    for name in linear_names(hf):
        assert model.get_submodule(name).weight.device.type == "cuda"
    assert state_dicts_equal(
        {k: v.cpu() for k, v in hf.state_dict().items()}, {k: v.cpu() for k, v in model.state_dict().items()}
    ) == []
    assert torch.equal(cuda_logits(model, input_ids), cuda_logits(hf, input_ids))


@params_all
def test_cuda_checkpoints_both_ways(fmt, fresh_model, float_checkpoint, input_ids, tmp_path):
    model = qplug.quantize(fresh_model.cuda(), qplug_config(HF_ALL[fmt]))
    expected = cuda_logits(model, input_ids)
    qplug.save_quantized(model, tmp_path / "qplug")
    assert torch.equal(cuda_logits(hf_on_cuda(tmp_path / "qplug"), input_ids), expected)

    hf = hf_on_cuda(float_checkpoint, **HF_ALL[fmt])
    hf.save_pretrained(tmp_path / "hf")
    loaded = qplug.load_quantized(tmp_path / "hf").cuda()
    assert torch.equal(cuda_logits(loaded, input_ids), cuda_logits(hf, input_ids))


def test_cpu_model_after_forward_moves_to_cuda_intact(fresh_model, input_ids, tmp_path):
    """bitsandbytes' CPU repack (AVX512-BF16) must not travel to the GPU with the weights."""
    model = qplug.quantize(fresh_model, qplug_config(HF_ALL["nf4-dq-bf16"]))
    with torch.no_grad():
        model(input_ids)  # may repack for the CPU kernel
    qplug.save_quantized(model, tmp_path)

    moved = cuda_logits(model.cuda(), input_ids)
    reference = cuda_logits(qplug.load_quantized(tmp_path).cuda(), input_ids)

    assert torch.equal(moved, reference)


def test_dequantize_on_cuda_equals_bitsandbytes(fresh_model):
    model = qplug.quantize(fresh_model.cuda(), BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    name = "model.layers.0.mlp.up_proj"
    module = model.get_submodule(name)
    expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    qplug.dequantize(model)
    assert torch.equal(model.get_submodule(name).weight, expected)


def test_nf4_4096_matmul_is_close_to_bf16():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    nf4 = modules.quantize_4bit(linear, quant_type="nf4", compute_dtype=torch.bfloat16, double_quant=True).eval()
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert relative_error(nf4(x), linear(x)) < 0.15
        deq = torch.nn.functional.linear(x, modules.dequantized_weight(nf4).to(torch.bfloat16))
        assert relative_error(nf4(x), deq) < 0.01


def test_qlora_step_on_cuda(fresh_model, input_ids):
    model = qplug.quantize(fresh_model.cuda(), qplug_config(HF_ALL["nf4-dq-bf16"]))
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = input_ids.cuda()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = set(state_dicts_equal(before, model.state_dict()))
    assert changed and changed <= trainable
