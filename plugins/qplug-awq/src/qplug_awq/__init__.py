"""qplug's AWQ backend: AWQ checkpoints (GEMM and GEMV layouts) load, run and are made without autoawq.

Importing this package imports neither torch nor autoawq: :class:`AwqConfig` is torch-free; the
modules doing tensor work (:mod:`~qplug_awq.packing`, :mod:`~qplug_awq.linear`,
:mod:`~qplug_awq.algorithm`, :mod:`~qplug_awq.autoawq`) import torch.
"""

from qplug_awq.config import AwqConfig

__all__ = ["AwqConfig"]
__version__ = "0.1.0"
