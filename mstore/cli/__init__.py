"""The `mstore` command line: parses, calls the library, prints (text, or --json).

The only layer that touches the terminal; everything below it reports through the
`Reporter` the CLI hands it (output.TerminalReporter) and raises errors whose CLI wording
lives in output.CLI_WORDING.

The typer app and `main` live in `mstore.cli.app`; this package's own module stays empty so
that the executable's `run` can switch the collector off before anything heavy loads.
"""

import gc


def run() -> None:
    """The `mstore` executable (its console script and `python -m mstore`): `main`, leaving
    without the interpreter's teardown whether or not torch was loaded.

    The modules load with the cyclic collector off: all they allocate lives as long as the
    process (`main` freezes it, then turns the collector back on), and collecting it while
    it loads was 13 M of a re-import's 359 M instructions."""
    gc.disable()
    from .app import main

    main(fast_exit=True)
