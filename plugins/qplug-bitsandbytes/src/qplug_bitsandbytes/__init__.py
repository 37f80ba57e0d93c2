"""qplug's bitsandbytes backend: 4-bit NF4/FP4 and 8-bit LLM.int8 with bitsandbytes' own kernels.

Importing this package imports neither torch nor bitsandbytes; the modules live in
:mod:`qplug_bitsandbytes.modules`, imported on first use by the hooks in
:mod:`qplug_bitsandbytes.plugin` (the ``qplug`` entry point).
"""

from qplug_bitsandbytes.config import BitsAndBytesConfig

__all__ = ["BitsAndBytesConfig"]
