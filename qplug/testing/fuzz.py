"""Hypothesis strategies that mutate real ``quantization_config`` dicts, and the checks every mutant passes.

Configs come from strangers' checkpoints, so whatever a config dict or file holds, reading it must
either give a config that writes standard JSON and reads back equal, or raise a
:class:`~qplug.QPlugError` subclass — never a raw ``TypeError``, ``RecursionError`` or a hang.
Backends test their own real configs with it (needs ``hypothesis``)::

    from hypothesis import given, settings
    from qplug.testing.fuzz import check_config_dict, mutated_configs

    @settings(max_examples=300, deadline=None)
    @given(mutated_configs([MY_CHECKPOINT_CONFIG, MyConfig().to_dict()]))
    def test_mutated_configs(data):
        check_config_dict(data)
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qplug

__all__ = ["HOSTILE_VALUES", "ConfigFuzzTests", "check_config_dict", "check_config_text", "json_values",
           "mutated_configs", "mutated_texts"]

#: How long one config may take to read, validate and write back, in seconds (generous: shared CI machines).
TIME_LIMIT = 5.0


def _deep(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = {"x": value} if i % 2 else [value]
    return value


#: Values that broke configs before: huge and non-finite numbers, bad and exponential patterns,
#: deep nesting, types that are almost right.
HOSTILE_VALUES: tuple[Any, ...] = (
    10**400, -(10**400), 10**100, 2**31, 2**63, -1, 0, -0.0, 1e308, math.inf, -math.inf, math.nan,
    True, False, None, "", " ", "abc", "x" * 5000, "re:(", "re:(.|.)*Z", "(.|.)*Z", "+:(a*)*b", "-:(", "[a-",
    [], {}, [[["lm_head"]]], ["re:("], ["re:(.|.)*Z"], ["lm_head", 5], "lm_head", {"bits": "abc"},
    {"+:(.|.)*Z": {"bits": 5}}, {"re:(": {}}, {".*": {"group_size": 0}}, {".*": {"bits": "abc"}}, {".*": 4},
    _deep(80), _deep(500),
)

_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=16) | st.sampled_from(HOSTILE_VALUES))
#: Any JSON-like value (and some that JSON cannot hold: NaN, infinities, huge integers).
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


def mutated_configs(seeds: Sequence[Mapping[str, Any]]) -> st.SearchStrategy[Any]:
    """Dicts made from ``seeds`` (real configs) by replacing, deleting, adding and retyping keys.

    Replacement values come from other seeds' keys, :data:`HOSTILE_VALUES` and random JSON, so
    mutants stay close enough to real configs to reach the validators behind the first checks.
    Now and then the whole value is not a dict at all.
    """
    seeds = [dict(s) for s in seeds]
    if not seeds:
        raise ValueError("mutated_configs needs at least one seed config")
    keys = sorted({k for s in seeds for k in s})
    seen_values = [v for s in seeds for v in s.values()]
    values = st.sampled_from(HOSTILE_VALUES) | json_values
    if seen_values:
        values = values | st.sampled_from(seen_values)

    @st.composite
    def mutant(draw: st.DrawFn) -> Any:
        if draw(st.integers(0, 49)) == 0:
            return draw(json_values)  # not a dict at all, sometimes
        data = copy.deepcopy(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 4))):
            action = draw(st.sampled_from(["replace", "replace", "delete", "add", "method"]))
            if action == "replace" and data:
                data[draw(st.sampled_from(sorted(data)))] = draw(values)
            elif action == "delete" and data:
                del data[draw(st.sampled_from(sorted(data)))]
            elif action == "add":
                data[draw(st.sampled_from(keys) | st.text(max_size=10))] = draw(values)
            elif action == "method":
                data["quant_method"] = draw(st.sampled_from([*{s.get("quant_method") for s in seeds}, None, 5,
                                                             ["gptq"], "", " BNB ", "nope"]))
        return data

    return mutant()


def mutated_texts(seeds: Sequence[Mapping[str, Any]]) -> st.SearchStrategy[str]:
    """JSON texts of :func:`mutated_configs`, bare or inside a ``config.json``, some of them cut or corrupted."""

    @st.composite
    def text(draw: st.DrawFn) -> str:
        data = draw(mutated_configs(seeds))
        if draw(st.booleans()):
            data = {"model_type": draw(st.sampled_from(["llama", ["llama"], 5, None])),
                    "architectures": draw(st.sampled_from([["LlamaForCausalLM"], 5, ["pipeline"], [["x"]], None])),
                    "quantization_config": data}
        out = json.dumps(data, default=str)
        if draw(st.integers(0, 3)) == 0 and out:
            at = draw(st.integers(0, len(out)))
            out = out[:at] + draw(st.sampled_from(["", "}", "[", '"', "\\", "NaN", "\x00", "{" * 5000]))
        return out

    return text()


def check_config_dict(data: Any) -> qplug.QuantConfig | None:
    """Read ``data`` with :func:`qplug.config_from_dict`: only qplug errors escape, in bounded time, and a
    config that loads writes standard JSON that reads back equal. Returns the config, or ``None``."""
    return _checked_read(lambda: qplug.config_from_dict(data), "the config")


def check_config_text(text: str, directory: Path) -> qplug.QuantConfig | None:
    """Write ``text`` as ``config.json`` in ``directory`` and read it with :func:`qplug.load_config`: as
    :func:`check_config_dict`, for files."""
    path = Path(directory) / "config.json"
    path.write_text(text, encoding="utf-8")
    return _checked_read(lambda: qplug.load_config(path), "the config file")


def _checked_read(read: Any, what: str) -> qplug.QuantConfig | None:
    started = time.perf_counter()
    try:
        config = read()
    except qplug.QPlugError:
        config = None
    if config is not None:
        _check_written(config)
    elapsed = time.perf_counter() - started
    assert elapsed < TIME_LIMIT, f"reading {what} took {elapsed:.1f} s"
    return config


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"a config was written with the non-standard JSON constant {name}")


def _check_written(config: qplug.QuantConfig) -> None:
    text = config.to_json_string()
    again = qplug.config_from_dict(json.loads(text, parse_constant=_refuse_constant))
    assert again == config, f"{type(config).__name__} does not read back what it writes: {text}"


class ConfigFuzzTests:
    """The fuzz as pytest tests a backend's suite inherits: subclass with ``seeds``, real configs of your
    backend (a checkpoint's, the library's, transformers'), and they are mutated as dicts and as files::

        class TestConfigFuzz(ConfigFuzzTests):
            seeds = [{"quant_method": "mine", "bits": 4}, ...]

    ``QPLUG_FUZZ_EXAMPLES`` sets how many examples each test draws (default 250; 5000 for a longer hunt).
    """

    seeds: Sequence[Mapping[str, Any]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.seeds:
            return
        fuzz = settings(max_examples=int(os.environ.get("QPLUG_FUZZ_EXAMPLES", "250")), deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])

        @fuzz
        @given(data=mutated_configs(list(cls.seeds)))
        def test_mutated_config_dicts(self, data: Any) -> None:
            check_config_dict(data)

        @fuzz
        @given(text=mutated_texts(list(cls.seeds)))
        def test_mutated_config_files(self, fuzz_scratch: Path, text: str) -> None:
            check_config_text(text, fuzz_scratch)

        cls.test_mutated_config_dicts = test_mutated_config_dicts  # type: ignore[attr-defined]
        cls.test_mutated_config_files = test_mutated_config_files  # type: ignore[attr-defined]

    @pytest.fixture(scope="class")
    @classmethod
    def fuzz_scratch(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return tmp_path_factory.mktemp("fuzz")

    def test_every_seed_is_a_real_config(self) -> None:
        assert self.seeds, "set `seeds` on your ConfigFuzzTests subclass"
        for seed in self.seeds:
            assert check_config_dict(seed) is not None, seed
