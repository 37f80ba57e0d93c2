"""On an NVIDIA GPU (marked ``cuda``: skipped only when none is present).

Reports which kernel ran (autoawq's ``WQLinear_GEMM`` where its CUDA/Triton kernels work,
else qplug's PyTorch path) and its speed against a float16 ``nn.Linear``.
"""

from __future__ import annotations

import time

import pytest
import torch
from awq_testlib import FIXTURE, logits
from qplug_awq.autoawq import probe
from qplug_awq.linear import AwqLinear
from torch import nn

from qplug.testing import relative_error

pytestmark = pytest.mark.cuda


def _ms(fn, repeat=20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_cuda_forward_matches_cpu(version):
    torch.manual_seed(0)
    cpu = AwqLinear.from_linear(nn.Linear(1024, 512), group_size=128, version=version)
    x = torch.randn(4, 1024, dtype=torch.float16)
    expected = cpu(x.float())
    gpu = AwqLinear.from_linear(nn.Linear(1024, 512), group_size=128, version=version)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    out = gpu(x.cuda()).float().cpu()
    kernel = gpu.kernel
    print(f"\n{version}: kernel={kernel} ({probe(AwqLinear, version, 'cuda:0') or 'autoawq works'})")
    # float16 activations and matmul on the GPU: ~1e-3 relative
    assert relative_error(out, expected) < 1e-2


def test_cuda_speed_against_fp16():
    torch.manual_seed(0)
    linear = nn.Linear(4096, 4096, bias=False)
    layer = AwqLinear.from_linear(linear, group_size=128).cuda()
    dense = linear.half().cuda()
    for tokens in (1, 16, 512):
        x = torch.randn(tokens, 4096, dtype=torch.float16, device="cuda")
        with torch.no_grad():
            t_fp16, t_awq = _ms(lambda x=x: dense(x)), _ms(lambda x=x: layer(x))
        kernel = layer.kernel
        print(f"\ntokens={tokens}: fp16 {t_fp16:.3f} ms, awq ({kernel}) {t_awq:.3f} ms, ratio {t_awq / t_fp16:.2f}")
        assert torch.isfinite(layer(x)).all()


def test_fixture_runs_on_cuda():
    from safetensors.torch import load_file

    import qplug

    reference = load_file(str(FIXTURE / "reference.safetensors"))
    model = qplug.load_quantized(FIXTURE).cuda()
    error = relative_error(logits(model, reference["tokens"].cuda()).cpu(), reference["logits"])
    assert error < 1e-2, error
