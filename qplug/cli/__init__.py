"""The ``qplug`` command: list backends, check configs, quantize, convert and inspect models, run the demo.

One module per command (:mod:`~qplug.cli.backends`, :mod:`~qplug.cli.config`,
:mod:`~qplug.cli.quantize`, :mod:`~qplug.cli.convert`, :mod:`~qplug.cli.inspect`,
:mod:`~qplug.cli.demo`), each holding its arguments, help and handler; :mod:`~qplug.cli.app`
builds the parser from them and runs :func:`main`. :mod:`~qplug.cli.methods` turns
``--method``/``--config``/``--set`` into a config and :mod:`~qplug.cli.output` is how the command
talks (errors, tables, JSON).

Importing this package imports neither torch nor any backend library, so ``qplug backends`` and
the ``config`` commands answer at once; ``quantize``, ``convert``, ``inspect`` and ``demo`` import torch when
they run. Every backend is reached through the plugin registry (names, aliases and the presets
each backend declares), never by a name written here.

Errors are one line on stderr (``qplug: error: ...``) and a non-zero exit code; ``--debug`` shows
the traceback instead.
"""

from qplug.cli.app import build_parser, main
from qplug.cli.methods import parse_set, resolve_method
from qplug.cli.output import CLIError
from qplug.cli.quantize import load_calibration

__all__ = ["CLIError", "build_parser", "load_calibration", "main", "parse_set", "resolve_method"]
