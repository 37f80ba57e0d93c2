"""AWQ's search: what it accepts, what it changes, and that it beats plain rounding where it should."""

from __future__ import annotations

import pytest
import torch
import transformers
from awq_testlib import calibration, logits, tokens
from qplug_awq.algorithm import (
    AwqSettings,
    calibration_tokens,
    find_blocks,
    scaling_groups,
    search_clip,
    search_scale,
)
from qplug_awq.config import AwqConfig
from qplug_awq.linear import AwqLinear
from qplug_awq.quant import pseudo_quantize
from torch import nn

import qplug
from qplug.modules import select_modules, set_submodule
from qplug.testing import relative_error, tiny_llama


def outlier_llama(seed: int = 0) -> nn.Module:
    """tiny_llama whose norms boost four hidden channels 20x: the activation outliers of real LLMs."""
    model = tiny_llama(seed=seed)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:4]] = 20.0
    return model


def rtn(model: nn.Module, group_size: int) -> nn.Module:
    for name in select_modules(model).names:
        set_submodule(model, name, AwqLinear.from_linear(model.get_submodule(name), group_size=group_size))
    return model


def test_awq_beats_round_to_nearest_on_activation_outliers():
    ids = tokens()
    expected = logits(outlier_llama(), ids)
    awq = qplug.quantize(outlier_llama(), AwqConfig(group_size=64), calibration=calibration())
    awq_error = relative_error(logits(awq, ids), expected)
    rtn_error = relative_error(logits(rtn(outlier_llama(), 64), ids), expected)
    # measured: AWQ 0.32, round-to-nearest 0.51; scaling protects the outlier channels' weights
    assert awq_error < 0.75 * rtn_error, (awq_error, rtn_error)


def test_scales_are_folded_into_the_norms_and_outputs_are_kept():
    model = outlier_llama()
    before = model.model.layers[0].input_layernorm.weight.clone()
    qplug.quantize(model, AwqConfig(group_size=64, apply_clip=False), calibration=calibration())
    after = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(before, after)  # 1/s went into the norm ...
    assert isinstance(model.model.layers[0].self_attn.q_proj, AwqLinear)  # ... s into q, k, v


def test_search_scale_finds_the_outlier_channels():
    torch.manual_seed(0)
    layer = nn.Linear(128, 64, bias=False)
    x = torch.randn(256, 128)
    x[:, :4] *= 30  # four outlier input channels
    settings = AwqSettings(group_size=64)
    original = layer.weight.detach().clone()
    scales = search_scale([layer], x, layer, settings)
    assert scales.shape == (128,)
    assert float(scales[:4].mean()) > 2 * float(scales[4:].mean())
    # the search leaves the weights as they were
    assert torch.equal(layer.weight, original)

    @torch.no_grad()
    def error(s: torch.Tensor) -> float:
        w = pseudo_quantize(layer.weight * s, 4, 64, True) / s
        return float((x @ w.t() - layer(x)).pow(2).mean())

    assert error(scales) <= error(torch.ones(128))  # the grid includes s = 1 (ratio 0): never worse


def test_search_clip_never_widens_the_range():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    bound = search_clip(w, torch.randn(512, 128), AwqSettings(group_size=64))
    assert bound.shape == (64, 2, 1)
    org = w.abs().reshape(64, 2, 64).amax(dim=-1, keepdim=True)
    assert bool((bound <= org).all()) and bool((bound >= 0.5 * org - 1e-6).all())


def test_scaling_groups_of_a_llama_block():
    model = tiny_llama(seed=0)
    block = model.model.layers[0]
    names = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    groups = scaling_groups(block, names)
    assert [(g.prev, g.layers) for g in groups] == [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        # v_proj -> o_proj is skipped: with grouped-query attention (2 kv heads) their shapes differ
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ]
    mha = tiny_llama(seed=0, num_key_value_heads=4).model.layers[0]
    assert ("self_attn.v_proj", ("self_attn.o_proj",)) in [(g.prev, g.layers) for g in scaling_groups(mha, names)]
    # a group with a skipped layer is not scaled (its layer stays float and must not change)
    assert all("self_attn.k_proj" not in g.layers for g in scaling_groups(block, names - {"self_attn.k_proj"}))


def test_skipped_layers_keep_their_exact_weights():
    model = tiny_llama(seed=0)
    original = model.model.layers[0].self_attn.k_proj.weight.clone()
    qplug.quantize(model, AwqConfig(group_size=64), calibration=calibration(), skip=["model.layers.0.self_attn.k_proj"])
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, original)
    assert isinstance(model.model.layers[0].self_attn.q_proj, AwqLinear)


def test_find_blocks():
    model = tiny_llama(seed=0)
    name, blocks = find_blocks(model, [n for n, _ in model.named_modules() if n.endswith("q_proj")])
    assert name == "model.layers" and blocks is model.model.layers
    with pytest.raises(ValueError, match="no list of blocks"):
        find_blocks(nn.Sequential(nn.Linear(8, 8)), ["0"])


@pytest.mark.parametrize(
    "data",
    [
        torch.arange(12).view(2, 6),
        [[1, 2, 3], [4, 5, 6]],
        [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])],
        {"input_ids": torch.tensor([[1, 2, 3]])},
        torch.tensor([1, 2, 3]),
    ],
)
def test_calibration_formats(data):
    ids = calibration_tokens(data)
    assert ids.dtype == torch.long and ids.dim() == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "awq calibrates on sample inputs"),
        (["some text"], "awq calibration texts need a tokenizer"),
        ([[], []], r"calibration\[0\]: \[\] given — expected a non-empty sample"),
        (torch.rand(2, 3), "token ids must be integers"),
    ],
)
def test_bad_calibration_is_explained(data, message):
    # the rules (and the error) every calibrating backend shares: qplug.calibration
    with pytest.raises(qplug.QuantConfigError, match=message):
        calibration_tokens(data)


def test_samples_of_different_lengths_become_equal_blocks():
    ids = calibration_tokens([list(range(300)), list(range(400)), list(range(500))])
    assert ids.shape == (2, 512)  # 1200 tokens: two blocks of 512, the last 176 dropped
    assert ids[0, :300].tolist() == list(range(300)) and ids[0, 300:].tolist() == list(range(212))
    assert calibration_tokens([[1, 2, 3], [4, 5]]).tolist() == [[1, 2, 3, 4, 5]]


def test_quantize_without_calibration_says_what_to_pass():
    with pytest.raises(ValueError, match="calibration"):
        qplug.quantize(tiny_llama(seed=0), AwqConfig(group_size=64))


def test_incompatible_layer_is_named():
    model = tiny_llama(seed=0, intermediate_size=200)  # 200 is not a multiple of 64
    with pytest.raises(qplug.IncompatibleModelError, match=r"mlp\.down_proj.*group_size=64"):
        qplug.quantize(model, AwqConfig(group_size=64), calibration=calibration())


def test_half_precision_model_quantizes():
    model = tiny_llama(seed=0, dtype=torch.bfloat16)
    expected = logits(tiny_llama(seed=0), tokens())
    qplug.quantize(model, AwqConfig(group_size=64), calibration=calibration())
    assert relative_error(logits(model, tokens()), expected) < 0.45  # same bound as the contract kit


def test_qwen2_block_with_biases_and_full_attention():
    config = transformers.Qwen2Config(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
    )

    def make() -> nn.Module:
        model = transformers.Qwen2ForCausalLM(config)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.ones_like(p) if name.endswith("norm.weight")
                        else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        return model.eval()

    expected = logits(make(), tokens())
    model = make()
    v_bias = model.model.layers[0].self_attn.v_proj.bias.detach().clone()
    groups = scaling_groups(model.model.layers[0], {n for n, m in model.model.layers[0].named_modules()
                                                   if isinstance(m, nn.Linear)})
    assert ("self_attn.v_proj", ("self_attn.o_proj",)) in [(g.prev, g.layers) for g in groups]
    qplug.quantize(model, AwqConfig(group_size=64), calibration=calibration())
    v_proj = model.model.layers[0].self_attn.v_proj
    assert isinstance(v_proj, AwqLinear) and v_proj.bias is not None
    assert not torch.allclose(v_proj.bias.float(), v_bias, atol=1e-3)  # o_proj's scales folded into v's bias
    assert relative_error(logits(model, tokens()), expected) < 0.45  # measured 0.31; see the contract tests
