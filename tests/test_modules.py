"""Module selection and swapping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qplug
from qplug.modules import build_empty, empty_weights, name_matches, output_head_names, select_modules, set_submodule
from qplug.testing import tiny_llama


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("lm_head", "lm_head", True),
        ("model.layers.0.mlp.gate_proj", "model.layers.0", True),
        ("model.layers.10.mlp", "model.layers.1", False),
        ("model.layers.3.mlp.gate", "mlp.gate", True),
        ("model.layers.3.mlp.gate_proj", "mlp.gate", False),
        ("model.layers.3.mlp.gate_proj", "gate", False),
        ("model.layers.3.self_attn.q_proj", r"re:.*\.(q|k)_proj", True),
        ("model.layers.3.self_attn.v_proj", r"re:.*\.(q|k)_proj", False),
        ("model.layers.3.self_attn.q_proj", "re:q_proj", False),  # full match only
    ],
)
def test_name_matches(name, pattern, expected):
    assert name_matches(name, pattern) is expected


def test_default_selection_is_every_linear_but_the_head():
    model = tiny_llama()
    selection = select_modules(model)
    assert output_head_names(model) == {"lm_head"}
    assert "lm_head" not in selection.names and selection.skipped == {"lm_head": "output head"}
    assert len(selection.names) == 14  # 7 projections x 2 layers


def test_a_plain_module_without_head_method():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert select_modules(model).names == ["0", "2"]
    set_submodule(model, "2", nn.Identity())
    assert isinstance(model[2], nn.Identity)


def test_build_empty_puts_parameters_on_meta_and_computes_buffers():
    import transformers

    from qplug.testing import tiny_llama_config

    with empty_weights():
        assert nn.Linear(2, 2).weight.device.type == "meta"
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # only inside the block
    model = build_empty(lambda: transformers.LlamaForCausalLM(tiny_llama_config()))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    reference = transformers.LlamaForCausalLM(tiny_llama_config())
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_a_buffer_that_cannot_be_recomputed_is_named():
    class Odd(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.register_buffer("table", torch.arange(n), persistent=False)

    with pytest.raises(qplug.QPlugError, match=r"buffer 'table' of Odd.*needs 'n'"):
        build_empty(lambda: Odd(3))
