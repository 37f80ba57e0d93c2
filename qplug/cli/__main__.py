"""``python -m qplug.cli``: the same command as ``qplug`` and ``python -m qplug``."""

import sys

from qplug.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
