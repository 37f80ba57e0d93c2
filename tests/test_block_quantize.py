"""Calibrating methods from disk, block by block (issue 15, item 3): the core's driver and its hook.

The backend here is a small calibrating method of the tests' own: each layer's int8 grid is chosen
from the activations its block sees, so a driver that fed a block the wrong inputs would write other
bytes than the whole-model path. GPTQ, AWQ and compressed-tensors GPTQ prove the same against their
real algorithms in their own tests (``test_*from_disk.py``).
"""

from __future__ import annotations

import os
from typing import ClassVar

import attrs
import pytest
import torch
from contract_toys import RtnLinear

import qplug
from qplug.blocks import BlockCalibration, capture_first_block, find_blocks
from qplug.calibration import padded_batches, token_samples
from qplug.config import QuantConfig
from qplug.disk_quantize import Progress
from qplug.modules import set_submodule
from qplug.testing import example_tokens, load_float_model, tiny_llama
from qplug.testing.block_path import Interrupted, assert_interrupted_run_resumes, progress_lines

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@attrs.define(kw_only=True)
class ActConfig(QuantConfig):
    """``{"quant_method": "toy-act"}``: int8 rows, each scaled by what the layer's inputs reach."""

    quant_method: ClassVar[str] = "toy-act"

    def needs_calibration(self) -> bool:
        return True


def quantize_block(model, module_names, name, block, calls):
    """The toy's one step: measure each layer's inputs on ``calls``, quantize, run the quantized block."""
    reach: dict[str, torch.Tensor] = {}
    mine = {n[len(name) + 1:]: n for n in module_names if n.startswith(name + ".")}

    def record(local):
        def hook(_module, args, _out):
            x = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).amax(dim=0)
            reach[local] = x if local not in reach else torch.maximum(reach[local], x)
        return hook

    handles = [block.get_submodule(local).register_forward_hook(record(local)) for local in mine]
    for call in calls:
        call.run(block)
    for handle in handles:
        handle.remove()
    for local in mine:
        linear = block.get_submodule(local)
        x = reach[local].to(linear.weight.device)
        scale = ((linear.weight.float().abs() * x).amax(dim=1, keepdim=True) / x.max()).clamp_min(1e-8) / 127
        set_submodule(block, local, RtnLinear.from_linear(linear, 8, scale))
    return [call.with_hidden(call.run(block)) for call in calls]


class ActPlugin:
    """A calibrating backend written the way the hook asks: one per-block step, two paths over it."""

    blocks_name: str | None = None  # what calibrate_blocks names as the blocks (None: the real list)
    extra_modules: tuple[str, ...] = ()
    copy_kwargs = False  # pass the next block copies of the keyword arguments (a rerun could not restore them)

    def __init__(self):
        self.calibrated: list[str] = []  # the blocks calibrate_blocks' step ran on, in order

    @qplug.hookimpl
    def register_backends(self):
        return [qplug.Backend(name="toy-act", config_class=ActConfig)]

    @qplug.backend_hookimpl(ActConfig)
    def replace_modules(self, config, model, module_names, calibration, prequantized):
        if prequantized:
            for name in module_names:
                linear = model.get_submodule(name)
                set_submodule(model, name, RtnLinear(linear.in_features, linear.out_features, linear.bias is not None))
            return list(module_names)
        prefix, blocks = find_blocks(model, module_names)
        calls = capture_first_block(model, blocks[0], self.batches(calibration))
        for index, block in enumerate(blocks):
            calls = quantize_block(model, module_names, f"{prefix}.{index}", block, calls)
        return list(module_names)

    @qplug.backend_hookimpl(ActConfig)
    def calibrate_blocks(self, config, model, module_names, calibration):
        prefix, _ = find_blocks(model, module_names)
        names = [*module_names, *self.extra_modules]

        def step(name, block, calls):
            self.calibrated.append(name)
            calls = quantize_block(model, names, name, block, calls)
            return [attrs.evolve(c, kwargs=dict(c.kwargs)) for c in calls] if self.copy_kwargs else calls

        return BlockCalibration(self.blocks_name or prefix, self.batches(calibration), names, step)

    @qplug.backend_hookimpl(ActConfig)
    def serialize(self, config, model):
        return config.to_dict()

    @staticmethod
    def batches(calibration):
        return padded_batches(token_samples(calibration), batch_size=2)


CONFIG = {"quant_method": "toy-act"}


@pytest.fixture
def act_plugin():
    plugin = ActPlugin()
    qplug.register_plugin(plugin)
    return plugin


def save_float(directory, **overrides):
    tiny_llama(seed=0, dtype=torch.bfloat16, num_hidden_layers=3, **overrides).save_pretrained(directory)
    return directory


def calibration():
    return example_tokens(tiny_llama(), batch=3, length=24, seed=4)


def whole_model_path(src, dst, config=CONFIG, **kwargs):
    model = load_float_model(src)
    qplug.quantize(model, config, calibration=calibration(), **kwargs)
    qplug.save_quantized(model, dst, max_shard_size="100KB")
    return model


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_block_path_writes_the_whole_model_paths_bytes(act_plugin, tmp_path, tied):
    src = save_float(tmp_path / "float", tie_word_embeddings=tied)
    model = whole_model_path(src, tmp_path / "whole")
    seen: list[Progress] = []
    qplug.quantize_checkpoint(src, tmp_path / "disk", CONFIG, calibration=calibration(), max_shard_size="100KB",
                              on_module=seen.append)
    assert files(tmp_path / "disk") == files(tmp_path / "whole")
    assert len(os.listdir(tmp_path / "disk")) > 2  # sharded, with an index
    names = [n for n, m in model.named_modules() if isinstance(m, RtnLinear)]
    assert [p.module for p in seen] == names and [p.done for p in seen] == list(range(1, len(names) + 1))
    assert {p.total for p in seen} == {len(names)} and seen[-1].bytes_written > 0
    loaded = qplug.load_quantized(tmp_path / "disk")
    tokens = example_tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_the_manager_knows_which_backends_calibrate_blocks(act_plugin, int8_plugin):
    manager = qplug.get_plugin_manager()
    assert manager.get_entry("toy-act").calibrates_blocks
    assert not manager.get_entry("int8-weight").calibrates_blocks


def test_a_failure_midway_leaves_the_destination_whole(act_plugin, tmp_path):
    src = save_float(tmp_path / "float")
    target = tmp_path / "q"
    qplug.quantize_checkpoint(src, target, CONFIG, calibration=calibration())
    before = files(target)

    def stop(progress):
        if progress.module.startswith("model.layers.1."):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qplug.quantize_checkpoint(src, target, CONFIG, calibration=calibration(), on_module=stop)
    assert files(target) == before
    # no staging left behind; the finished blocks are kept for a rerun, which removes them
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.resume", "float", "q"]
    qplug.quantize_checkpoint(src, target, CONFIG, calibration=calibration())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "q"]
    assert files(target) == before


def test_an_interrupted_run_resumes_without_calibrating_its_finished_blocks_again(act_plugin, tmp_path):
    src = save_float(tmp_path / "float")
    assert_interrupted_run_resumes(src, tmp_path, CONFIG, calibration=calibration(), after_blocks=2)
    blocks = [f"model.layers.{i}" for i in range(3)]
    # the uninterrupted run, the run stopped after two blocks, the rerun: the last block only
    assert act_plugin.calibrated == [*blocks, *blocks[:2], blocks[2]]


def test_a_backend_passing_on_more_than_hidden_states_is_not_resumed(act_plugin, tmp_path):
    from qplug.block_resume import resume_directory

    act_plugin.copy_kwargs = True
    src = save_float(tmp_path / "float")

    def stop(progress):
        if progress.module.startswith("model.layers.1."):
            raise Interrupted

    with pytest.raises(Interrupted), progress_lines() as lines:
        qplug.quantize_checkpoint(src, tmp_path / "q", CONFIG, calibration=calibration(), on_module=stop)
    assert any("model.layers.0: the backend passed on more than new hidden states" in line for line in lines), lines
    assert not any(resume_directory(tmp_path / "q").iterdir())
    with progress_lines() as lines:
        qplug.quantize_checkpoint(src, tmp_path / "q", CONFIG, calibration=calibration(), max_shard_size="100KB")
    assert not any(line.startswith("resuming") for line in lines)
    whole_model_path(src, tmp_path / "whole")
    assert files(tmp_path / "q") == files(tmp_path / "whole")


def test_refusals_name_the_problem(act_plugin, int8_plugin, tmp_path):
    src = save_float(tmp_path / "float")
    with pytest.raises(qplug.QuantConfigError, match="calibration"):
        qplug.quantize_checkpoint(src, tmp_path / "a", CONFIG)
    with pytest.raises(qplug.QPlugError, match="'int8-weight' cannot calibrate a checkpoint block by block"):
        qplug.quantize_checkpoint(src, tmp_path / "b", {"quant_method": "int8-weight"}, calibration=calibration())
    with pytest.raises(qplug.QPlugError, match="device= places calibration"):
        qplug.quantize_checkpoint(src, tmp_path / "c", {"quant_method": "int8-weight"}, device="cpu")
    with pytest.raises(qplug.PlacementError, match="'cuda:7' does not exist here"):
        qplug.quantize_checkpoint(src, tmp_path / "d", CONFIG, calibration=calibration(), device="cuda:7")
    with pytest.raises(qplug.PlacementError, match="'nowhere' is not a device"):
        qplug.quantize_checkpoint(src, tmp_path / "e", CONFIG, calibration=calibration(), device="nowhere")
    act_plugin.extra_modules = ("lm_head",)
    with pytest.raises(qplug.IncompatibleModelError, match=r"lie outside the blocks model\.layers \(lm_head\)"):
        qplug.quantize_checkpoint(src, tmp_path / "f", CONFIG, calibration=calibration())
    act_plugin.extra_modules, act_plugin.blocks_name = (), "model.norm"
    with pytest.raises(qplug.PluginError, match=r"'model\.norm' .* not a non-empty nn\.ModuleList"):
        qplug.quantize_checkpoint(src, tmp_path / "g", CONFIG, calibration=calibration())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]


def test_a_checkpoint_missing_a_block_tensor_is_refused_before_anything_is_written(act_plugin, tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_float(tmp_path / "float")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(qplug.CheckpointError, match=r"lacks tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"):
        qplug.quantize_checkpoint(src, tmp_path / "q", CONFIG, calibration=calibration())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_blocks_run_on_the_gpu_and_give_a_loadable_checkpoint(act_plugin, tmp_path):
    src = save_float(tmp_path / "float")
    qplug.quantize_checkpoint(src, tmp_path / "cpu", CONFIG, calibration=calibration())
    qplug.quantize_checkpoint(src, tmp_path / "gpu", CONFIG, calibration=calibration(), device="cuda")
    cpu, gpu = qplug.load_quantized(tmp_path / "cpu"), qplug.load_quantized(tmp_path / "gpu")
    tokens = example_tokens(cpu)
    with torch.no_grad():
        torch.testing.assert_close(gpu(tokens).logits, cpu(tokens).logits, rtol=0.05, atol=0.05)
