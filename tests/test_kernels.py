"""The core's kernel choice (qplug.kernels), through the example int8 backend on a tiny Llama."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import qplug
from qplug.kernels import Kernel
from qplug.testing import example_tokens, tiny_llama


@pytest.fixture
def quantized(int8_plugin):
    model = tiny_llama(seed=0)
    return qplug.quantize(model, int8_plugin.Int8WeightConfig())


def _kernels(model):
    return {info["kernel"] for info in qplug.kernel_report(model).values()}


def _logits(model):
    with torch.no_grad():
        return model(example_tokens(model)).logits


def test_each_layer_records_the_kernel_it_ran_and_why(quantized, caplog):
    report = qplug.kernel_report(quantized)
    assert report and all(info["kernel"] is None for info in report.values())  # nothing ran yet
    with caplog.at_level(logging.INFO, logger="qplug.kernels"):
        _logits(quantized)
    assert _kernels(quantized) == {"int8pack-cpu"}
    assert all(info["reason"] == "first choice" for info in qplug.kernel_report(quantized).values())
    assert len(caplog.records) == len(report)  # one line per layer, not per call
    _logits(quantized)
    assert len(caplog.records) == len(report)


def test_kernels_agree_with_the_dequantized_reference(quantized):
    fast = _logits(quantized)
    assert qplug.set_kernel(quantized, "dequant") == len(qplug.kernel_report(quantized))
    reference = _logits(quantized)
    assert _kernels(quantized) == {"dequant"}
    assert all(info["reason"] == "requested (set_kernel)" for info in qplug.kernel_report(quantized).values())
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)  # float32: accumulation order only
    qplug.set_kernel(quantized, None)
    _logits(quantized)
    assert _kernels(quantized) == {"int8pack-cpu"}


def test_environment_variable_chooses_a_kernel(quantized, monkeypatch):
    monkeypatch.setenv("QPLUG_KERNEL", "no-such-kernel, dequant")
    _logits(quantized)
    assert _kernels(quantized) == {"dequant"}
    assert {info["reason"] for info in qplug.kernel_report(quantized).values()} == {"requested (QPLUG_KERNEL)"}
    monkeypatch.delenv("QPLUG_KERNEL")
    _logits(quantized)  # the request is part of the layout's key: unsetting it chooses again
    assert _kernels(quantized) == {"int8pack-cpu"}


def test_a_request_that_cannot_be_met_says_why(quantized):
    with pytest.raises(qplug.KernelUnavailableError, match=r"no-such.*kernels here: \['dequant', 'int8pack-cpu'\]"):
        qplug.set_kernel(quantized, "no-such")
    name = next(iter(qplug.kernel_report(quantized)))
    qplug.set_kernel(quantized, "int8pack-cpu", names=[name])
    layer = quantized.get_submodule(name)
    with pytest.raises(qplug.KernelUnavailableError, match=r"int8pack-cpu.*CPU kernel, not for meta"):
        layer(torch.zeros(1, layer.in_features, device="meta"))
    with pytest.raises(KeyError, match="no quantized layer named"):
        qplug.set_kernel(quantized, "dequant", names=["model.nope"])


def test_automatic_choice_falls_back_and_names_the_refusal(quantized):
    name = next(iter(qplug.kernel_report(quantized)))
    layer = quantized.get_submodule(name).to("meta")
    layer(torch.zeros(2, layer.in_features, device="meta"))
    assert layer.kernel == "dequant"
    assert layer.kernel_reason == "not int8pack-cpu: torch's int8 matmul is a CPU kernel, not for meta"


def test_layouts_are_rebuilt_after_a_move_or_a_load_and_never_saved(quantized, tmp_path):
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    _logits(quantized)
    quantized.to(torch.float32)  # _apply: the layout belongs to the old tensors
    assert _kernels(quantized) == {None}
    out = _logits(quantized)
    after = quantized.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    qplug.save_quantized(quantized, tmp_path / "q")
    loaded = qplug.load_quantized(tmp_path / "q", model=tiny_llama(seed=1))
    assert _kernels(loaded) == {None}
    torch.testing.assert_close(_logits(loaded), out)


def test_prepare_kernels_chooses_without_running(quantized):
    chosen = qplug.prepare_kernels(quantized)
    assert set(chosen.values()) == {"int8pack-cpu"} and chosen.keys() == qplug.kernel_report(quantized).keys()
    assert _kernels(quantized) == {"int8pack-cpu"}


def test_input_gradients_flow_through_kernels_without_a_backward(quantized):
    name = next(iter(qplug.kernel_report(quantized)))
    layer = quantized.get_submodule(name)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.kernel == "int8pack-cpu"
    xr = x.detach().clone().requires_grad_()
    torch.nn.functional.linear(xr, layer.float_weight(torch.float32), layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)
    assert all(not t.requires_grad for t in layer.buffers())


def test_threads_running_one_model_build_each_layout_once(quantized, monkeypatch):
    builds = []
    layer_type = type(next(m for m in quantized.modules() if hasattr(m, "kernels")))
    kernel = layer_type.kernels[0]
    original = kernel.prepare

    def counting(layer, device, dtype):
        builds.append(id(layer))
        return original(layer, device, dtype)

    monkeypatch.setattr(layer_type, "kernels", (Kernel(
        kernel.name, refuses=kernel.refuses, prepare=counting, forward=kernel.forward), *layer_type.kernels[1:]))
    results = []
    threads = [threading.Thread(target=lambda: results.append(_logits(quantized))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(torch.equal(results[0], r) for r in results)
    assert sorted(builds) == sorted(set(builds)) and len(builds) == len(qplug.kernel_report(quantized))
