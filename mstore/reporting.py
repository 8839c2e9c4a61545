"""How the library tells its caller what is happening, without touching the terminal.

The library never prints, never asks `isatty`, never flips a library's global progress
switch: each long operation takes a `Reporter` and hands it messages, warnings and progress.
The CLI decides what a terminal, a pipe or `--json` gets (mstore.cli.output); the default
reporter is silent, so the Python API is quiet unless its caller asks otherwise.
"""

from __future__ import annotations

from typing import Any


class Progress:
    """One progress bar: `update(n)` as work is done, `close()` at the end (or `with`)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Reporter:
    """Silent: what a library caller gets unless it passes its own."""

    #: whether progress bars are wanted at all (the CLI: a terminal on stderr, no --json)
    progress_bars: bool = False

    def message(self, text: str) -> None:
        """A line of what is happening (the CLI prints it to stderr)."""

    def warning(self, text: str) -> None:
        """Something the user should know that does not stop the work."""

    def progress(self, total: int | None, desc: str, unit: str = "B") -> Progress:
        """A bar over `total` units (bytes by default; None when unknown)."""
        return Progress()

    def tqdm_class(self) -> type:
        """A tqdm class for libraries that take one (huggingface_hub's `tqdm_class=`):
        a disabled one unless this reporter shows progress bars."""
        from tqdm.auto import tqdm

        if self.progress_bars:
            return tqdm

        class _Silent(tqdm):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        return _Silent


SILENT = Reporter()
