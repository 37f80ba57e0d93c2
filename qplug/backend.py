"""The :class:`Backend` record a plugin returns from its ``register_backends`` hook.

A record says what a backend is called, which config class it owns and which packages it needs,
so the core can list a backend — and say why it is unavailable — without importing its library.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import attrs

from qplug.config import QuantConfig
from qplug.errors import BackendUnavailableError, PluginError

__all__ = ["Backend", "normalize_name"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


def normalize_name(name: str) -> str:
    """Backend names and aliases compare stripped and case-insensitively."""
    return name.strip().lower() if isinstance(name, str) else name


def _check_name(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise PluginError(
            f"Backend.{attribute.name}: {value!r} is not a valid backend name "
            "(lower-case letters, digits, '-', '_' or '.', starting with a letter or digit)"
        )


def _check_aliases(inst: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for alias in value:
        _check_name(inst, attribute, alias)


def _check_config_class(inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not (isinstance(value, type) and issubclass(value, QuantConfig)):
        raise PluginError(f"Backend {inst.name!r}: config_class must be a qplug.QuantConfig subclass, got {value!r}")
    if value.quant_method != inst.name:
        raise PluginError(
            f"Backend {inst.name!r}: its config class {value.__name__} declares quant_method "
            f"{value.quant_method!r}; the two must agree"
        )


def _check_presets(inst: Any, attribute: attrs.Attribute, value: Mapping[str, Any]) -> None:
    for preset, settings in value.items():
        if not isinstance(preset, str) or not isinstance(settings, Mapping):
            raise PluginError(f"Backend {inst.name!r}: preset {preset!r} must map a name to a dict of config fields")


def _check_refuses(inst: Any, attribute: attrs.Attribute, value: Mapping[str, str]) -> None:
    for what, why in value.items():
        if not isinstance(what, str) or not isinstance(why, str) or not what or not why:
            raise PluginError(f"Backend {inst.name!r}: refuses must map what is refused to the reason, both "
                              f"non-empty strings (got {what!r}: {why!r})")


def _normalize_aliases(values: Any) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    return tuple(normalize_name(v) for v in values)


@attrs.frozen
class Backend:
    """One quantization backend, as a plugin declares it.

    :param name: the canonical name, equal to the config class's ``quant_method``.
    :param config_class: the :class:`~qplug.QuantConfig` subclass this backend owns.
    :param aliases: other names that select it (``"bnb"``); case-insensitive.
    :param requires: requirement strings (``"bitsandbytes>=0.48"``) that must be installed for the
        backend to work. Checked from package metadata, without importing anything.
    :param optional: requirement strings of packages the backend uses when present (faster kernels,
        a reference implementation), shown by ``qplug backends``.
    :param description: one line for listings.
    :param presets: named settings for common cases, ``{"nf4": {"load_in_4bit": True, ...}}``;
        the CLI's ``--method`` accepts them.
    :param devices: the device types it runs on.
    :param refuses: what checkpoints of its format may hold that it does not run, each with the reason
        (``{"FP8 weights": "the kernels run integer weights"}``): listed by ``qplug backends`` so that a user
        sees it before loading one; the ``validate`` hook still refuses each case by name.
    :param streams: whether a floating-point checkpoint can be quantized while it is loaded, one
        layer at a time (``qplug.load_quantized(..., quantization_config=...)``). Leave it unset:
        the manager sets it to whether the plugin implements the
        :func:`~qplug.hookspecs.quantize_module` hook for this backend's config class. ``False``
        turns streaming off. ``True`` without that hook is the contract of plugins written before
        the hook existed (``replace_modules`` called with one module name at a time); it keeps
        working, but new backends implement ``quantize_module``.
    """

    name: str = attrs.field(converter=normalize_name, validator=_check_name)
    config_class: type[QuantConfig] = attrs.field(validator=_check_config_class)
    aliases: tuple[str, ...] = attrs.field(default=(), converter=_normalize_aliases, validator=_check_aliases)
    requires: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    optional: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    description: str = ""
    presets: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict, validator=_check_presets)
    devices: tuple[str, ...] = attrs.field(default=("cpu",), converter=tuple)
    streams: bool | None = None
    refuses: Mapping[str, str] = attrs.field(factory=dict, validator=_check_refuses)

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name followed by the aliases."""
        return (self.name, *self.aliases)

    def missing_requirements(self) -> list[str]:
        """The requirements of :attr:`requires` that are not installed (or installed too old)."""
        return [req for req in self.requires if not _satisfied(req)]

    def library_versions(self) -> dict[str, str | None]:
        """Installed version of every package in :attr:`requires` and :attr:`optional` (``None``: absent)."""
        return {_dist_name(req): _installed_version(_dist_name(req)) for req in (*self.requires, *self.optional)}

    def ensure_available(self) -> None:
        """:raises BackendUnavailableError: naming the missing packages and the pip command."""
        missing = self.missing_requirements()
        if missing:
            quoted = " ".join(f"'{m}'" for m in missing)
            raise BackendUnavailableError(
                f"backend {self.name!r} needs {', '.join(missing)}, which is not installed "
                f"(or too old): pip install {quoted}",
                backend=self.name,
                install=f"pip install {quoted}",
            )


# The form a backend's ``requires`` takes: a distribution name, optional extras, optional version
# specifiers ("bitsandbytes>=0.48", "torch[cpu]>=2.1,<3"). Splitting it here spares listing backends
# the import of packaging's full PEP 508 parser (a large part of `qplug backends`' start-up); any
# other form (markers, URLs) still goes to packaging.
_SIMPLE_REQUIREMENT = re.compile(
    r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[[^\]]*\])?\s*([<>=!~][^;@]*)?$"
)


def split_requirement(requirement: str) -> tuple[str, str]:
    """``"bitsandbytes>=0.48"`` → ``("bitsandbytes", ">=0.48")``: the distribution and its version specifiers."""
    match = _SIMPLE_REQUIREMENT.fullmatch(requirement)
    if match:
        return match.group(1), (match.group(2) or "").strip()
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    return req.name, str(req.specifier)


def _dist_name(requirement: str) -> str:
    return split_requirement(requirement)[0]


@functools.cache  # parsing METADATA is the slow part of `qplug backends`
def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _satisfied(requirement: str) -> bool:
    name, specifier = split_requirement(requirement)
    version = _installed_version(name)
    if version is None:
        return False
    if not specifier:
        return True
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(specifier).contains(version, prereleases=True)
