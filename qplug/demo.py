"""``qplug demo``: every installed backend on one tiny seeded Llama, compared in one table.

Nothing is downloaded. The model is :func:`qplug.testing.tiny_llama` (two layers, random weights
drawn from a fixed seed), so every machine measures the same thing. For each backend the demo
takes its first preset (every preset with ``all_presets=True``), quantizes a copy of the float
model, and measures:

* **bits/param** — bytes held by the quantized layers (weights, scales, zero points, bias) × 8,
  divided by the number of parameters those layers had in floating point;
* **size** — all tensors of the model (quantized layers plus what stays in floating point);
* **logit error** — max and mean ``|logits − float logits|`` on seeded token ids;
* **forward** — median time of one forward pass over those tokens;
* **round trip** — :func:`qplug.save_quantized`, :func:`qplug.load_quantized` from disk (the model
  rebuilt from ``config.json``), and the reloaded model gives the same logits.

Every backend gets the same short calibration set (seeded token ids, as ``calibration=``); backends
that do not calibrate ignore it. A backend that fails is reported with its error and the demo goes
on. The helpers that measure a model live in :mod:`qplug.measure`, shared with ``qplug quantize``.

This module imports torch; the CLI imports it only when a command needs it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from torch import nn

import qplug
from qplug.manager import get_plugin_manager
from qplug.measure import LinearSnapshot, linear_snapshot, model_tensor_bytes

__all__ = [
    "DemoReport",
    "DemoResult",
    "LinearSnapshot",
    "linear_snapshot",
    "model_tensor_bytes",
    "one_line",
    "run_demo",
    "write_plot",
]

#: Shapes of the demo's inputs: tokens the logits are compared on, and the calibration set.
EVAL_SHAPE = (2, 32)
CALIBRATION_SHAPE = (8, 64)
FORWARD_REPEATS = 5


# --------------------------------------------------------------------------------------------
# Measuring (the model helpers are qplug.measure's, re-exported here as before)
# --------------------------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    """An exception as one line: ``Type: message`` (the type is left out for qplug's own errors)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, qplug.QPlugError):
        return text
    return f"{type(exc).__name__}: {text}"


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def _timed_forward(model: nn.Module, tokens: torch.Tensor,
                   repeats: int = FORWARD_REPEATS) -> tuple[torch.Tensor, float]:
    """The logits, and the median time of one forward pass in milliseconds."""
    times = []
    logits = None
    for _ in range(repeats):
        start = time.perf_counter()
        logits = _logits(model, tokens)
        times.append(time.perf_counter() - start)
    assert logits is not None
    return logits, 1000 * statistics.median(times)


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------

Status = Literal["ok", "failed", "unavailable", "reference"]


@attrs.define
class DemoResult:
    """One row of the demo table: a backend with one preset (or the float reference)."""

    backend: str
    preset: str
    status: Status
    bits_per_param: float | None = None
    size_bytes: int | None = None
    max_logit_error: float | None = None
    mean_logit_error: float | None = None
    forward_ms: float | None = None
    round_trip: bool | None = None
    modules_quantized: int | None = None
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class DemoReport:
    """Everything the demo measured."""

    model: str
    parameters: int
    eval_tokens: tuple[int, int]
    calibration_tokens: tuple[int, int]
    float_logit_scale: float
    results: list[DemoResult]
    seconds: float = 0.0

    @property
    def failed(self) -> list[DemoResult]:
        """Runs that failed, counting a save → load round trip that did not reproduce the logits."""
        return [r for r in self.results if r.status == "failed" or r.round_trip is False]

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence what backends print while they run: warnings, log records below ERROR, progress bars, prints."""
    if not enabled:
        yield
        return
    previous_level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous_level)


def _presets(backend: qplug.Backend, all_presets: bool) -> list[tuple[str, Mapping[str, Any]]]:
    presets = list(backend.presets.items()) or [("(defaults)", {})]
    return presets if all_presets else presets[:1]


def run_demo(
    *,
    all_presets: bool = False,
    seed: int = 0,
    on_start: Callable[[str, str], None] | None = None,
    on_result: Callable[[DemoResult], None] | None = None,
    show_warnings: bool = False,
) -> DemoReport:
    """Run every registered backend on the tiny Llama and return what was measured.

    :param all_presets: run every preset of every backend, not only the first.
    :param seed: the seed of the model's weights and of the token ids.
    :param on_start: called with ``(backend, preset)`` before each run (progress display).
    :param on_result: called with each :class:`DemoResult` as it is ready.
    :param show_warnings: let backends' warnings, log messages and progress bars through (by
        default they are silenced while a backend runs, so the table stays readable).
    """
    from qplug.testing.models import example_tokens, tiny_llama

    started = time.perf_counter()
    torch.manual_seed(seed)
    reference = tiny_llama(seed)
    tokens = example_tokens(reference, batch=EVAL_SHAPE[0], length=EVAL_SHAPE[1], seed=seed + 1)
    calibration = example_tokens(reference, batch=CALIBRATION_SHAPE[0], length=CALIBRATION_SHAPE[1], seed=seed + 2)
    ref_logits, ref_ms = _timed_forward(reference, tokens)
    snap = linear_snapshot(reference)
    ref_dtype = str(next(reference.parameters()).dtype).removeprefix("torch.")
    results = [
        DemoResult(
            backend=ref_dtype, preset="(reference)", status="reference",
            bits_per_param=snap.bits_per_param(reference, snap.refs), size_bytes=model_tensor_bytes(reference),
            max_logit_error=0.0, mean_logit_error=0.0, forward_ms=ref_ms,
        )
    ]
    if on_result:
        on_result(results[0])

    def record(result: DemoResult) -> None:
        results.append(result)
        if on_result:
            on_result(result)

    manager = get_plugin_manager()
    for plugin in manager.plugins():
        if plugin.status == "failed":
            record(DemoResult(backend=plugin.name, preset="-", status="failed",
                              note=f"plugin {plugin.provider} failed to load: {plugin.error}"))
    for entry in manager.backend_entries():
        backend = entry.backend
        for preset, settings in _presets(backend, all_presets):
            if on_start:
                on_start(backend.name, preset)
            missing = backend.missing_requirements()
            if missing:
                record(DemoResult(backend=backend.name, preset=preset, status="unavailable",
                                  note="needs " + ", ".join(missing)))
                continue
            begun = time.perf_counter()
            with _quiet(not show_warnings):
                try:
                    result = _run_one(backend, preset, settings, reference, tokens, calibration, ref_logits)
                except Exception as exc:  # one backend failing must not stop the demo
                    result = DemoResult(backend=backend.name, preset=preset, status="failed", note=one_line(exc))
            result.seconds = time.perf_counter() - begun
            record(result)
    params = sum(p.numel() for p in reference.parameters())
    cfg = reference.config
    return DemoReport(
        model=(f"{type(reference).__name__}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
               f"vocab {cfg.vocab_size}, seed {seed}"),
        parameters=params,
        eval_tokens=EVAL_SHAPE,
        calibration_tokens=CALIBRATION_SHAPE,
        float_logit_scale=float(ref_logits.abs().mean()),
        results=results,
        seconds=time.perf_counter() - started,
    )


def _run_one(
    backend: qplug.Backend,
    preset: str,
    settings: Mapping[str, Any],
    reference: nn.Module,
    tokens: torch.Tensor,
    calibration: torch.Tensor,
    ref_logits: torch.Tensor,
) -> DemoResult:
    config = backend.config_class.from_dict(dict(settings))
    model = copy.deepcopy(reference)
    snap = linear_snapshot(model)
    qplug.quantize(model, config, calibration=calibration)
    names = snap.replaced(model)
    logits, forward_ms = _timed_forward(model, tokens)
    diff = (logits - ref_logits).abs()
    result = DemoResult(
        backend=backend.name, preset=preset, status="ok",
        bits_per_param=snap.bits_per_param(model, names), size_bytes=model_tensor_bytes(model),
        max_logit_error=float(diff.max()), mean_logit_error=float(diff.mean()), forward_ms=forward_ms,
        modules_quantized=len(names),
    )
    if not torch.isfinite(logits).all():
        result.status = "failed"
        result.note = "the quantized model produces non-finite logits"
        return result
    with tempfile.TemporaryDirectory(prefix="qplug-demo-") as tmp:
        try:
            qplug.save_quantized(model, Path(tmp) / "checkpoint")
            loaded = qplug.load_quantized(Path(tmp) / "checkpoint")
            reloaded = _logits(loaded, tokens)
        except Exception as exc:
            result.round_trip = False
            result.note = "round trip: " + one_line(exc)
            return result
    gap = float((reloaded - logits).abs().max())
    tolerance = 1e-4 * max(1.0, float(logits.abs().max()))
    result.round_trip = gap <= tolerance
    if not result.round_trip:
        result.note = f"reloaded logits differ by up to {gap:.3g}"
    return result


def write_plot(report: DemoReport, path: str | Path) -> Path:
    """Draw bits/param and logit error per backend/preset as a PNG (needs matplotlib).

    :raises BackendUnavailableError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise qplug.BackendUnavailableError(
            "--plot needs matplotlib, which is not installed: pip install 'qplug[plot]'",
            install="pip install 'qplug[plot]'",
        ) from exc
    rows = [r for r in report.results if r.status in {"ok", "reference"}]
    labels = [f"{r.backend}\n{r.preset}" for r in rows]
    fig, (ax_bits, ax_err) = plt.subplots(1, 2, figsize=(10, 1.2 + 0.6 * len(rows)), constrained_layout=True)
    positions = list(range(len(rows)))
    ax_bits.barh(positions, [r.bits_per_param or 0 for r in rows], color="tab:blue")
    ax_bits.set_yticks(positions, labels)
    ax_bits.invert_yaxis()
    ax_bits.set_xlabel("bits per parameter (quantized layers)")
    ax_err.barh(positions, [r.mean_logit_error or 0 for r in rows], color="tab:orange", label="mean")
    ax_err.scatter([r.max_logit_error or 0 for r in rows], positions, color="black", marker="|", s=200, label="max")
    ax_err.set_yticks(positions, [""] * len(rows))
    ax_err.invert_yaxis()
    ax_err.set_xlabel("|logit − float logit|")
    ax_err.legend(loc="lower right")
    fig.suptitle(f"qplug demo — {report.model}")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
