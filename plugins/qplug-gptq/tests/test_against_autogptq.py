"""qplug's GPTQ against auto-gptq 0.7.1 itself (the reference implementation).

Run where auto-gptq imports (``transformers<4.50``, ``peft<0.11``); skipped elsewhere.
auto-gptq needs two CPU shims (see ``autogptq_ref.py``): its ``quantize`` calls
``torch.cuda.synchronize()`` and moves layers to ``cuda:0``; both are pointed at the CPU
when no GPU exists. Its arithmetic is untouched.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from qplug_gptq import GPTQConfig, packing
from qplug_gptq.algorithm import LayerGPTQ
from qplug_gptq.linear import GPTQLinear
from torch import nn

import qplug
from qplug.testing import relative_error

pytestmark = pytest.mark.autogptq

# Shapes for the model-level proofs: group size 128 applies to the 256-wide down_proj.
MODEL_SHAPE = {"hidden_size": 128, "intermediate_size": 256}
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _cpu_shims(monkeypatch):
    if not torch.cuda.is_available():
        import auto_gptq.modeling._base as base

        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(base, "CUDA_0", base.CPU)


LAYER_CASES = [
    # bits, group_size, desc_act, static_groups, sym
    (4, 128, False, False, True),
    (4, 64, True, False, True),
    (8, -1, False, False, True),
    (4, 32, False, False, False),
    (3, 128, True, True, True),
    (2, 64, False, False, False),
    (4, 64, True, True, False),
    (8, 64, True, False, True),
]


@pytest.mark.parametrize("bits, group_size, desc_act, static_groups, sym", LAYER_CASES)
def test_same_layer_same_calibration_gives_the_same_packed_tensors(bits, group_size, desc_act, static_groups, sym):
    from auto_gptq.nn_modules.qlinear.qlinear_cuda import QuantLinear
    from auto_gptq.quantization import GPTQ

    g = torch.Generator().manual_seed(bits * 100 + group_size)
    inf, outf = 256, 128
    lin = nn.Linear(inf, outf).half()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(outf, inf, generator=g) / 16)
    w0 = lin.weight.detach().clone()
    xs = [(torch.randn(1, 32, inf, generator=g) * torch.rand(inf, generator=g) * 2).half() for _ in range(8)]

    ref = GPTQ(lin)
    ref.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    for x in xs:
        ref.add_batch(x, None)
    scale, zero, g_idx = ref.fasterquant(
        blocksize=128, percdamp=0.1, group_size=group_size, actorder=desc_act, static_groups=static_groups
    )
    packed = QuantLinear(bits, group_size, inf, outf, bias=True, weight_dtype=torch.float16)
    packed.pack(lin, scale, zero, g_idx)

    ours = LayerGPTQ(w0, "layer")
    for x in xs:
        ours.add_batch(x)
    res = ours.quantize(
        bits=bits, group_size=group_size, damp_percent=0.1, desc_act=desc_act, static_groups=static_groups, sym=sym
    )
    mine = GPTQLinear.from_integers(
        res.intweight, res.zeros, res.scales.half(), res.g_idx, bits=bits, group_size=group_size, bias=lin.bias, sym=sym
    )

    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        assert torch.equal(getattr(mine, name), getattr(packed, name)), name


@pytest.mark.parametrize("bits, desc_act", [(2, False), (3, True), (4, False), (4, True), (8, True)])
def test_autogptq_modules_and_ours_compute_the_same(bits, desc_act):
    from qplug_gptq import autogptq

    g = torch.Generator().manual_seed(bits)
    inf, outf, gs = 128, 64, 32
    q = torch.randint(0, 2**bits, (inf, outf), generator=g)
    z = torch.randint(1, 2**bits, (inf // gs, outf), generator=g)  # 1..max: auto-gptq's writer cannot store 0
    s = (torch.rand(inf // gs, outf, generator=g) * 0.02 + 0.005).half()
    g_idx = packing.default_g_idx(inf, gs)
    if desc_act:
        g_idx = g_idx[torch.randperm(inf, generator=g)]
    bias = torch.randn(outf, generator=g)
    # identity input, no bias: auto-gptq's output is its dequantized weight, exactly
    plain = GPTQLinear.from_integers(q, z, s, g_idx, bits=bits, group_size=gs, sym=False)
    eye = torch.eye(inf, dtype=torch.float16)
    assert torch.equal(
        autogptq.from_gptq_linear(plain, desc_act=desc_act)(eye), plain.dequantize_weight(torch.float16).t()
    )
    mine = GPTQLinear.from_integers(q, z, s, g_idx, bits=bits, group_size=gs, bias=bias, sym=False)
    theirs = autogptq.from_gptq_linear(mine, desc_act=desc_act)
    assert autogptq.is_autogptq_module(theirs)
    x = torch.randn(4, 7, inf, generator=g).half()
    # the same function: auto-gptq multiplies fp16 weights in fp16; qplug's CPU kernels use the exact weights
    # and float32 sums (qplug-int4-cpu, qplug-int8-cpu), so they differ by fp16 rounding (~1 ulp) only
    ours, ref = mine(x).float(), theirs(x).float()
    assert float((ours - ref).norm() / ref.norm()) < 2e-3, mine.kernel


def _run_fresh(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, cwd=HERE, timeout=300)


QPLUG_LOGITS = """
import sys, torch, qplug
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
ids = load_file({ids!r})["input_ids"]
model = qplug.load_quantized({ckpt!r})
with torch.no_grad():
    save_file({{"logits": model(ids).logits.float().contiguous()}}, {out!r})
"""

AUTOGPTQ_LOGITS = """
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
from autogptq_ref import autogptq_logits
ids = load_file({ids!r})["input_ids"]
save_file({{"logits": autogptq_logits({ckpt!r}, ids).contiguous()}}, {out!r})
"""

MODEL_CASES = {
    "4bit-g128": {"bits": 4, "group_size": 128, "desc_act": False, "sym": True},
    "4bit-actorder": {"bits": 4, "group_size": 64, "desc_act": True, "sym": True},
    "8bit": {"bits": 8, "group_size": 128, "desc_act": False, "sym": True},
    "4bit-asym": {"bits": 4, "group_size": 64, "desc_act": False, "sym": False},
}
# auto-gptq and qplug run the same float16 weights; the logits differ only by float16 rounding
# in matmuls (auto-gptq multiplies x @ W, we call F.linear) compounded over two layers.
# Measured below 2e-3; a wrong zero point or group gives > 5e-2.
MODEL_TOLERANCE = 5e-3


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_autogptq_checkpoint_loads_in_qplug_with_the_same_logits(case, tmp_path):
    from autogptq_ref import eval_ids, make_checkpoint
    from safetensors.torch import load_file, save_file

    ckpt = make_checkpoint(tmp_path / "ckpt", **MODEL_CASES[case], **{"shape": MODEL_SHAPE})
    ids_file = tmp_path / "ids.safetensors"
    save_file({"input_ids": eval_ids(128)}, str(ids_file))
    _run_fresh(AUTOGPTQ_LOGITS.format(ids=str(ids_file), ckpt=str(ckpt), out=str(tmp_path / "theirs.safetensors")))
    _run_fresh(QPLUG_LOGITS.format(ids=str(ids_file), ckpt=str(ckpt), out=str(tmp_path / "ours.safetensors")))
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["logits"]
    ours = load_file(str(tmp_path / "ours.safetensors"))["logits"]
    assert relative_error(ours, theirs) < MODEL_TOLERANCE


@pytest.mark.parametrize("case", ["4bit-actorder", "4bit-asym"])
def test_qplug_checkpoint_loads_in_autogptq_with_the_same_outputs(case, tmp_path):
    from autogptq_ref import calibration_ids, eval_ids, seeded_llama
    from safetensors.torch import load_file, save_file

    model = seeded_llama(seed=0, **MODEL_SHAPE)
    settings = MODEL_CASES[case]
    qplug.quantize(model, GPTQConfig(**settings, damp_percent=0.1), calibration=calibration_ids(128))
    qplug.save_quantized(model, tmp_path / "ckpt")  # with quantize_config.json, which auto-gptq loads through
    ids = eval_ids(128)
    with torch.no_grad():
        ours = model(ids).logits.float()
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    _run_fresh(
        AUTOGPTQ_LOGITS.format(
            ids=str(tmp_path / "ids.safetensors"), ckpt=str(tmp_path / "ckpt"), out=str(tmp_path / "theirs.safetensors")
        )
    )
    theirs = load_file(str(tmp_path / "theirs.safetensors"))["logits"]
    assert relative_error(ours, theirs) < MODEL_TOLERANCE


def test_whole_model_quantization_matches_autogptq(tmp_path):
    """Same model, same calibration, true-sequential over decoder blocks: same packed tensors."""
    from autogptq_ref import calibration_ids, make_checkpoint, seeded_llama
    from safetensors.torch import load_file

    settings = {"bits": 4, "group_size": 64, "desc_act": True, "sym": True}
    ckpt = make_checkpoint(tmp_path / "ref", **settings, shape=MODEL_SHAPE)
    theirs = {}
    for f in ckpt.glob("*.safetensors"):
        theirs.update(load_file(str(f)))
    model = seeded_llama(seed=0, **MODEL_SHAPE)
    qplug.quantize(model, GPTQConfig(**settings, damp_percent=0.1), calibration=calibration_ids(128))
    ours = model.state_dict()
    names = [k for k in theirs if k.endswith(("qweight", "qzeros", "scales", "g_idx"))]
    assert len(names) == 2 * 7 * 4
    same = [k for k in names if torch.equal(ours[k], theirs[k])]
    assert same == names, sorted(set(names) - set(same))[:8]


@pytest.mark.parametrize("name", ["llama-4bit-g32-actorder", "llama-3bit-g32-asym"])
def test_both_kernels_run_the_committed_fixture_alike(name, monkeypatch):
    """The same checkpoint through auto-gptq's modules and through ours (float16 activations)."""
    from conftest import FIXTURES
    from qplug_gptq import autogptq
    from safetensors.torch import load_file

    ids = load_file(str(FIXTURES / f"{name}.reference.safetensors"))["input_ids"]
    outputs = {}
    for kernel in ("torch", "auto-gptq"):
        monkeypatch.setenv("QPLUG_GPTQ_KERNEL", kernel)
        model = qplug.load_quantized(FIXTURES / name)
        layer = model.get_submodule("model.layers.0.mlp.down_proj")
        assert autogptq.is_autogptq_module(layer) == (kernel == "auto-gptq")
        with torch.no_grad():
            outputs[kernel] = model(ids).logits.float()
    assert relative_error(outputs["torch"], outputs["auto-gptq"]) < MODEL_TOLERANCE


def test_qplug_checkpoint_loads_in_transformers_v4(tmp_path):
    """transformers (<4.50) loads what qplug saved through its own GPTQ path (optimum + auto-gptq)."""
    import optimum  # noqa: F401  (transformers v4 loads GPTQ checkpoints through optimum; 1.24 pairs with 4.49)
    import transformers
    from autogptq_ref import calibration_ids, eval_ids, seeded_llama

    model = seeded_llama(seed=0, **MODEL_SHAPE)
    qplug.quantize(model, GPTQConfig(bits=4, group_size=64, desc_act=True), calibration=calibration_ids(128))
    qplug.save_quantized(model, tmp_path / "ckpt")
    ids = eval_ids(128)
    with torch.no_grad():
        ours = model(ids).logits.float()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "ckpt"), torch_dtype=torch.float16, device_map="cpu"
        )
        from qplug_gptq import autogptq

        assert autogptq.is_autogptq_module(hf.model.layers[0].mlp.up_proj)
        theirs = hf(ids).logits.float()
    assert relative_error(ours, theirs) < MODEL_TOLERANCE  # measured 1.3e-3
