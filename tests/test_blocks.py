"""qplug.blocks and the dequantize dtype rule: what calibrating backends (GPTQ, AWQ) share about models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qplug
from qplug.blocks import capture_first_block, find_blocks
from qplug.modules import dequantized_dtype, iter_linear
from qplug.testing import example_tokens, tiny_llama


def _linear_names(model):
    return [name for name, _ in iter_linear(model)]


def test_the_blocks_are_the_list_holding_most_layers():
    model = tiny_llama(seed=0)
    name, blocks = find_blocks(model, _linear_names(model))
    assert name == "model.layers" and blocks is model.model.layers
    # the config may name it; a wrong name is the config's fault, named as such
    assert find_blocks(model, [], "model.layers") == ("model.layers", model.model.layers)
    with pytest.raises(qplug.QuantConfigError, match=r"^block_name_to_quantize: 'model.blocks' given — .*no such"):
        find_blocks(model, [], "model.blocks")
    with pytest.raises(qplug.QuantConfigError, match=r"block_name_to_quantize: 'model.norm' given — .*LlamaRMSNorm"):
        find_blocks(model, [], "model.norm")


def test_no_blocks_is_none_and_no_architecture_list_is_needed():
    assert find_blocks(nn.Sequential(nn.Linear(8, 8)), ["0"]) is None

    class Tower(nn.Module):  # an architecture nobody listed: two lists, the one holding more layers wins
        def __init__(self):
            super().__init__()
            self.adapters = nn.ModuleList([nn.Linear(4, 4)])
            self.stages = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3)])

    tower = Tower()
    assert find_blocks(tower, _linear_names(tower)) == ("stages", tower.stages)


def test_captured_calls_replay_the_model_exactly():
    model = tiny_llama(seed=0)
    ids = example_tokens(model, batch=2, length=12)
    batches = [{"input_ids": ids[:1]}, {"input_ids": ids[1:], "attention_mask": torch.ones_like(ids[1:])}]
    calls = capture_first_block(model, model.model.layers[0], batches)
    assert len(calls) == 2 and calls[0].hidden.shape == (1, 12, model.config.hidden_size)
    assert not {"use_cache", "past_key_values", "past_key_value"} & set(calls[0].kwargs)
    # block by block, each fed the previous one's output, gives the model's own logits
    for index, batch in enumerate(batches):
        call = calls[index]
        hidden = call.hidden
        for block in model.model.layers:
            hidden = call.with_hidden(hidden).run(block)
        with torch.no_grad():
            expected = model(**batch).logits
            got = model.lm_head(model.model.norm(hidden))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


class _KeywordModel(nn.Module):
    """Calls its block with keywords only, as some architectures do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([_KeywordBlock(), _KeywordBlock()])

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(hidden_states=x, scale=2.0)[0]
        return x


class _KeywordBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, *, hidden_states, scale):
        return (self.proj(hidden_states) * scale,)


def test_keyword_calls_and_models_without_use_cache():
    torch.manual_seed(0)
    model = _KeywordModel()
    ids = torch.tensor([[1, 2, 3]])
    (call,) = capture_first_block(model, model.layers[0], [{"input_ids": ids}])
    assert call.keyword == "hidden_states" and call.kwargs == {"scale": 2.0}
    hidden = call.hidden
    for layer in model.layers:
        hidden = call.run(layer, hidden)
    torch.testing.assert_close(hidden, model(ids))


def test_a_block_never_reached_is_named():
    model = tiny_llama(seed=0)
    stray = nn.Linear(4, 4)
    with pytest.raises(qplug.IncompatibleModelError, match=r"never reached model\.stray"):
        capture_first_block(model, stray, [{"input_ids": example_tokens(model)}], name="model.stray")


def test_dequantized_dtype_is_the_dtype_most_weights_have():
    model = tiny_llama(seed=0)
    assert dequantized_dtype(model) == torch.float32
    # a skeleton whose linears stayed float32 under float16 tensors: the majority decides
    model.to(torch.float16)
    model.model.layers[0].mlp.to(torch.float32)
    assert dequantized_dtype(model) == torch.float16
    assert dequantized_dtype(nn.Module()) == torch.float32
    assert dequantized_dtype(nn.Module(), default=torch.bfloat16) == torch.bfloat16
    with torch.device("meta"):
        unloaded = nn.Linear(4, 4, dtype=torch.float16)
    assert dequantized_dtype(unloaded) == torch.float32  # meta tensors have no say
