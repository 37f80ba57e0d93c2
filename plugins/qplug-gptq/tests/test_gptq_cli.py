"""`qplug quantize --method gptq-4bit` and the rest of the command, as a user runs them (issue 17): the contract
kit's :class:`qplug.testing.cli.CLITests`, which every first-party backend's suite runs."""

from qplug.testing.cli import CalibratingCLITests


class TestGPTQAtTheTerminal(CalibratingCLITests):
    method = "gptq-4bit"
    label = "gptq (preset gptq-4bit)"
    progress_line = "qplug: calibrating to disk: 2/2 blocks done"
