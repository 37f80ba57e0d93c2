"""Reading qplug's switches from the environment, one way for every variable.

Booleans accept ``1``/``true``/``yes``/``on`` and ``0``/``false``/``no``/``off`` (any case,
surrounding blanks ignored); unset or empty means the default. Anything else is refused with
the variable's name rather than guessed at: a typo in a switch must not flip it silently.
"""

from __future__ import annotations

import functools
import os

from qplug.errors import QuantConfigError

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "env_flag", "env_text"]

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def env_flag(name: str, default: bool = False) -> bool:
    """The boolean environment variable ``name``; ``default`` when it is unset or empty.

    :raises QuantConfigError: the value is none of the accepted words (naming the variable).
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise QuantConfigError(
        field=name,
        value=raw,
        accepted="environment switches take 1/true/yes/on or 0/false/no/off (or are left unset)",
    )


# CPython keeps the process environment as a dict of bytes on POSIX; ``os.environ.get`` encodes the key and
# decodes the value on every call (about 1 us). The kernel switches are read on every forward of every layer,
# 150-odd times a decoded token, so they look the bytes up directly. ``os.environ[...] = ...`` (and pytest's
# ``monkeypatch.setenv``) update that dict, so a change is seen on the next read, as with ``os.environ.get``.
_POSIX_ENVIRON = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env_text(name: str) -> str:
    """The environment variable ``name`` as text, ``""`` when unset: ``os.environ.get(name, "")``, cheaper."""
    if not isinstance(_POSIX_ENVIRON, dict):
        return os.environ.get(name, "")
    return _decoded(_POSIX_ENVIRON.get(_encoded(name)))


@functools.lru_cache(maxsize=32)
def _encoded(name: str) -> bytes:
    return os.fsencode(name)


@functools.lru_cache(maxsize=64)
def _decoded(raw: bytes | None) -> str:
    return "" if raw is None else os.fsdecode(raw)
