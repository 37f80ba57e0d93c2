"""The error types qplug raises and users catch.

Every message names what is at fault (the field, the tensor, the module or the plugin) and,
where there is a closed set, what would have been accepted.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendConflictError",
    "BackendUnavailableError",
    "CheckpointError",
    "ConfigFileError",
    "ConversionError",
    "IncompatibleModelError",
    "KernelUnavailableError",
    "PlacementError",
    "PluginError",
    "QPlugError",
    "QuantConfigError",
    "UnknownBackendError",
]


class QPlugError(Exception):
    """Base class of every error qplug raises on purpose."""


class QuantConfigError(QPlugError, ValueError, TypeError):
    """A quantization config is invalid.

    A subclass of both :class:`ValueError` and :class:`TypeError`: code written against
    Hugging Face's config classes (which raise either) keeps catching it.

    :param message: the full message, or ``None`` to build one from the parts below.
    :param field: the offending field (``"bits"``; ``"<config>"`` for the config as a whole).
    :param value: the value given.
    :param accepted: a human-readable description of what is accepted.
    :param config: the config class name, for the message.
    :param choices: the accepted values, when they are a fixed list (the ``qplug`` command spells
        them as JSON).
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        field: str | None = None,
        value: Any = None,
        accepted: str | None = None,
        config: str | None = None,
        choices: tuple[Any, ...] | None = None,
    ) -> None:
        self.field = field
        self.choices = choices
        self.value = value
        self.accepted = accepted
        self.config = config
        if message is None:
            where = f"{config}.{field}" if config and field else (field or config or "config")
            message = f"{where}: {_short_repr(value)} given"
            if accepted:
                message += f" — {accepted}"
        super().__init__(message)

    def problem(self) -> str:
        """The message in the ``field: value given — what is accepted`` form the CLI prints."""
        return str(self)


class ConfigFileError(QuantConfigError):
    """A config file cannot be read or parsed (missing, not JSON, no quantization_config)."""


class UnknownBackendError(QPlugError, LookupError):
    """No backend is registered under a name, or none could be inferred for a config dict."""

    def __init__(self, message: str, *, name: str | None = None, available: list[str] | None = None):
        self.name = name
        self.available = list(available or [])
        super().__init__(message)

    def __str__(self) -> str:  # LookupError would quote the message like a KeyError does not, keep it plain
        return self.args[0]


class BackendUnavailableError(QPlugError, ImportError):
    """A backend is registered but a package it needs is missing or too old."""

    def __init__(self, message: str, *, backend: str | None = None, install: str | None = None):
        super().__init__(message)
        self.backend = backend
        self.install = install


class BackendConflictError(QPlugError, RuntimeError):
    """Two plugins claim the same backend name or alias."""


class PluginError(QPlugError, RuntimeError):
    """A plugin is malformed: a misspelled hook, a bad registration record, a hook that failed."""


class IncompatibleModelError(QPlugError, ValueError):
    """A model cannot be quantized with a config (shapes, module kinds, dtypes)."""


class CheckpointError(QPlugError, ValueError):
    """A checkpoint does not match the model: a missing, unexpected or mis-shaped tensor."""


class ConversionError(QPlugError, ValueError):
    """A checkpoint cannot be written in another format without changing its weights; names the layer and why."""


class KernelUnavailableError(QPlugError, RuntimeError):
    """A kernel asked for (``qplug.set_kernel``, ``QPLUG_KERNEL``) cannot run a layer; says why."""


class PlacementError(QPlugError, ValueError):
    """A ``device_map`` cannot be applied: an unknown device, a module it misses, disk without a folder."""


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
