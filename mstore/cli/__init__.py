"""The `mstore` command line: parses, calls the library, prints (text, or --json).

The only layer that touches the terminal; everything below it reports through the
callbacks the CLI hands it.
"""

from .app import app, main

__all__ = ["app", "main"]
