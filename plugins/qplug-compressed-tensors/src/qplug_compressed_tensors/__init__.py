"""qplug's compressed-tensors backend: weight-only int4/int8 checkpoints of llm-compressor's format load, run
and are made.

Import :mod:`qplug_compressed_tensors.config` for :class:`CompressedTensorsConfig` (torch-free); the modules
doing tensor work (:mod:`~qplug_compressed_tensors.linear`, :mod:`~qplug_compressed_tensors.quantize`,
:mod:`~qplug_compressed_tensors.targets`) import torch, and the compressed-tensors library is imported only
inside the hooks.
"""

from qplug_compressed_tensors.config import CompressedTensorsConfig

__all__ = ["CompressedTensorsConfig"]
__version__ = "0.1.0"
