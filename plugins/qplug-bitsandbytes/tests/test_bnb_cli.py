"""`qplug quantize --method nf4` and the rest of the command, as a user runs them (issue 17): the contract
kit's :class:`qplug.testing.cli.CLITests`, which every first-party backend's suite runs."""

from qplug.testing.cli import CLITests


class TestBitsAndBytesAtTheTerminal(CLITests):
    method = "nf4"
    label = None
    progress_line = "qplug: quantizing to disk: 14/14 modules done"
