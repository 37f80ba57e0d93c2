"""An example third-party qplug backend: int8 weight-only, one scale per output channel."""
