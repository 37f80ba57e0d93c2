"""qplug-gptq: the GPTQ backend of qplug.

Loads and runs GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum, transformers) on any device with
PyTorch alone, quantizes models with calibration data, and uses auto-gptq's modules when it is
installed and asked for. Importing this package imports neither torch nor auto-gptq.
"""

from qplug_gptq.config import GPTQConfig

__all__ = ["GPTQConfig"]
__version__ = "0.1.0"
