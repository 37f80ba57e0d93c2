"""GPU checks (``-m cuda``; skipped only where no CUDA device exists).

They report, on stdout (run with ``-s``) and as junit properties, which kernel ran and its
latency against a float16 ``nn.Linear`` of the same shape.
"""

import time

import pytest
import torch
from qplug_gptq import GPTQConfig, autogptq, packing
from qplug_gptq.linear import GPTQLinear

import qplug
from qplug.testing import example_tokens, relative_error, tiny_llama

pytestmark = pytest.mark.cuda


def _latency_ms(fn, repeat=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / repeat


def test_quantize_and_run_a_model_on_cuda():
    model = tiny_llama(seed=0, dtype=torch.float16).cuda()
    ids = example_tokens(model).cuda()
    with torch.no_grad():
        expected = model(ids).logits.float()
    cal = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(5))
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64), calibration=cal)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.qweight.is_cuda
    with torch.no_grad():
        actual = model(ids).logits.float()
    assert relative_error(actual, expected) < 0.35  # the CPU contract bound, same model


@pytest.mark.parametrize("tokens", [1, 32])
def test_kernel_speed_against_float16(tokens, record_property):
    n, gs = 4096, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, n), generator=g)
    z = torch.full((n // gs, n), 8)
    s = (torch.rand(n // gs, n, generator=g) * 0.01).half()
    cpu = GPTQLinear.from_integers(q, z, s, packing.default_g_idx(n, gs), bits=4, group_size=gs)
    layer = GPTQLinear.from_integers(q, z, s, packing.default_g_idx(n, gs), bits=4, group_size=gs).cuda()
    dense = cpu.to_linear().half().cuda()
    x = torch.randn(tokens, n, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).cpu().float(), cpu(x.cpu().float()), rtol=2e-2, atol=2e-2)
        kernels = {f"qplug {layer.kernel}": layer}
        if autogptq.compiled_kernels_load():
            kernels["auto-gptq " + autogptq.quant_linear_class(4, gs, False).QUANT_TYPE] = autogptq.from_gptq_linear(
                layer, desc_act=False
            )
        fp16 = _latency_ms(lambda: dense(x))
        for name, module in kernels.items():
            ms = _latency_ms(lambda module=module: module(x))
            line = f"gptq cuda {n}x{n} tokens={tokens}: {name} {ms:.3f} ms vs fp16 {fp16:.3f} ms ({ms / fp16:.2f}x)"
            print(line)
            record_property(f"{name} tokens={tokens}", line)
