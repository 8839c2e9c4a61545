"""`mstore plot`: training and eval loss of model lineages, as a picture or in the terminal.

matplotlib and plotext are imported inside the command, so no other command loads them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import store_of
from .output import echo, safe_text, shown_path


def register(app: typer.Typer) -> None:
    app.command()(plot)


def plot(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="Models whose lineages to draw.")],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write a picture: FILE.png or FILE.svg.")] = None,
    size: Annotated[str, typer.Option("--size", help="Picture size in pixels, WxH.")]
    = "1200x700",
):
    """Plot the training and eval loss of each model's lineage on one step axis."""
    from ..plots.curves import lineage_curves
    from ..plots.render import parse_size, terminal_plot, write_figure

    pixels = parse_size(size)
    if output is None and not sys.stdout.isatty():
        raise typer.BadParameter("stdout is not a terminal: give -o FILE.png or FILE.svg",
                                 param_hint="--output")
    curves = lineage_curves(store_of(ctx, must_exist=True), names)
    if output is None:
        for c in curves:  # plotext's own colour codes go out as they are, names escaped
            c.label = safe_text(c.label)
        cols, rows = shutil.get_terminal_size((100, 30))
        sys.stdout.write(terminal_plot(curves, cols, max(rows - 2, 12)) + "\n")
        return
    written = write_figure(curves, output, pixels)
    echo(f"wrote {safe_text(shown_path(written))}: {len(curves)} generation"
         f"{'s' if len(curves) != 1 else ''} of {safe_text(', '.join(names))}")
