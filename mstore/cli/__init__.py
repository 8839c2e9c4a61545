"""The `mstore` command line: parses, calls the library, prints (text, or --json).

The only layer that touches the terminal; everything below it reports through the
`Reporter` the CLI hands it (output.TerminalReporter) and raises errors whose CLI wording
lives in output.CLI_WORDING.
"""

from .app import app, main, run

__all__ = ["app", "main", "run"]
