"""The markers plugin authors put on their hook implementations."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import pluggy

from qplug.hookspecs import PROJECT

__all__ = ["backend_hookimpl", "hookimpl"]

F = TypeVar("F", bound=Callable[..., Any])

#: Marks a function as the implementation of the qplug hook of the same name. Accepts pluggy's
#: options (``wrapper=True``, ``tryfirst=True``, ...).
hookimpl = pluggy.HookimplMarker(PROJECT)


def backend_hookimpl(config_class: type, **options: Any) -> Callable[[F], F]:
    """Mark a backend's implementation of a per-config hook; it answers only for ``config_class``.

    For any other config the implementation returns ``None`` without running, which is how a
    ``firstresult`` hook passes the call on to the backend that owns the config. This is the one
    ownership check every backend needs; no backend writes it by hand.

    :param config_class: the :class:`~qplug.QuantConfig` subclass the backend owns.
    :param options: passed on to :data:`hookimpl` (e.g. ``tryfirst=True``).

    Example::

        @qplug.backend_hookimpl(Int8Config)
        def serialize(config, model):
            return config.to_dict()
    """

    def decorate(func: F) -> F:
        params = list(inspect.signature(func).parameters)
        if "config" not in params:
            raise TypeError(f"{func.__qualname__}: a backend hook implementation takes a 'config' argument")
        index = params.index("config")

        @functools.wraps(func)  # pluggy reads the argument names through __wrapped__
        def answer_if_owned(*args: Any, **kwargs: Any) -> Any:
            config = kwargs["config"] if "config" in kwargs else args[index]
            if not isinstance(config, config_class):
                return None
            return func(*args, **kwargs)

        # The core reads the owner to tell which backend a hook serves (quantize_module: streaming).
        answer_if_owned.qplug_config_class = config_class  # type: ignore[attr-defined]
        return hookimpl(**options)(answer_if_owned)  # type: ignore[return-value]

    return decorate
