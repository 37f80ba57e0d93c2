"""``python -m qplug``: the same command as the ``qplug`` console script."""

import sys

from qplug.cli import main

if __name__ == "__main__":
    sys.exit(main())
