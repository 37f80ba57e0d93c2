"""qplug's AWQ backend: AWQ checkpoints (GEMM and GEMV layouts) load, run and are made without autoawq.

Import :mod:`qplug_awq.config` for :class:`AwqConfig` (torch-free); the modules doing tensor
work (:mod:`~qplug_awq.packing`, :mod:`~qplug_awq.linear`, :mod:`~qplug_awq.algorithm`,
:mod:`~qplug_awq.autoawq`) import torch.
"""

__version__ = "0.1.0"
