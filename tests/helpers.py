"""Helpers shared by the core's tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar

import attrs

import qplug
from qplug.config import (
    QuantConfig,
    dtype_name,
    instance_of,
    list_of,
    mapping,
    number_in,
    one_of,
    optional,
    to_float,
    to_list,
    to_lower,
)

REPO = Path(__file__).resolve().parents[1]
#: The example third-party backend of the docs.
EXAMPLE_PLUGIN = REPO / "docs" / "examples" / "qplug-int8"


def make_distribution(site: Path, dist: str, version: str, modules: dict[str, str], entry_points: dict[str, str]):
    """Install a minimal real distribution (dist-info + modules) into ``site``, as pip would."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "[qplug]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    return site


def run_python(code: str, *, site: Path | None = None, env: dict[str, str] | None = None, check=True,
               timeout: float = 300):
    """Run ``code`` in a fresh interpreter (optionally with ``site`` on the path); returns the process."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("QPLUG_")}
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@attrs.define(kw_only=True)
class ToyConfig(QuantConfig):
    """A config with one field of every kind the validators cover."""

    quant_method: ClassVar[str] = "toy"
    skip_field: ClassVar[str | None] = "skip_modules"

    bits: int = attrs.field(default=4, validator=[instance_of(int), one_of((2, 4, 8))])
    damp: float = attrs.field(default=0.1, converter=to_float, validator=number_in(0, 1, low_open=True, high_open=True))
    kind: str = attrs.field(default="nf4", converter=to_lower, validator=one_of(("nf4", "fp4")))
    compute_dtype: str = attrs.field(default="float32", converter=dtype_name, validator=one_of(("float32", "bfloat16")))
    skip_modules: list[str] | None = attrs.field(default=None, converter=to_list, validator=optional(list_of(str)))
    options: dict | None = attrs.field(default=None, validator=optional(mapping))

    def check(self) -> None:
        if self.bits == 2 and self.kind == "fp4":
            raise qplug.QuantConfigError(field="kind", value=self.kind, accepted="fp4 needs bits >= 4",
                                         config=type(self).__name__)

    @classmethod
    def normalize_dict(cls, data):
        if "toy_bit" in data:  # a foreign spelling of "bits"
            data = dict(data)
            data.setdefault("bits", data.pop("toy_bit"))
        return data

    @classmethod
    def recognizes(cls, data):
        return "toy_bit" in data or "kind" in data


class ToyPlugin:
    @qplug.hookimpl
    def register_backends(self):
        return [qplug.Backend(name="toy", config_class=ToyConfig, aliases=("TOY-Alias",))]


