"""Reading qplug's switches from the environment, one way for every variable.

Booleans accept ``1``/``true``/``yes``/``on`` and ``0``/``false``/``no``/``off`` (any case,
surrounding blanks ignored); unset or empty means the default. Anything else is refused with
the variable's name rather than guessed at: a typo in a switch must not flip it silently.
"""

from __future__ import annotations

import os

from qplug.errors import QuantConfigError

__all__ = ["FALSE_WORDS", "TRUE_WORDS", "env_flag"]

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
