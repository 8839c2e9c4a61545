"""Loss curves drawn: a PNG or SVG with matplotlib (headless Agg, imported here only), or
text for a terminal with plotext.

Made to be read at 100%: 1200x700 px by default, axis labels with units, one colour per
generation (train loss solid, eval loss dashed with markers, eval notes as diamonds),
dotted lines where one generation hands over to the next, the legend outside the data.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ..errors import PlotError
from .curves import Curve

DEFAULT_SIZE = (1200, 700)
FORMATS = (".png", ".svg")
DPI = 100
CSS_PX_PER_INCH = 96  # an SVG of W px is W * 72/96 pt wide
_SIZE = re.compile(r"(\d{2,5})x(\d{2,5})")


def parse_size(text: str) -> tuple[int, int]:
    """`1200x700` -> (1200, 700); each side 100 to 10000 pixels."""
    match = _SIZE.fullmatch(text.strip().lower())
    if not match or not all(100 <= int(v) <= 10000 for v in match.groups()):
        raise PlotError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, each 100 to 10000 "
                        "(e.g. 1200x700)")
    return int(match[1]), int(match[2])


def _title(curves: list[Curve]) -> str:
    return "Training loss by generation" if len(curves) > 1 else f"Training loss: {curves[0].label}"


def write_figure(curves: list[Curve], path: Path, size: tuple[int, int] = DEFAULT_SIZE) -> Path:
    """Draw the curves into `path` (.png or .svg); written beside it, then renamed."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PlotError(f"{path.name}: the picture must be a .png or .svg file")
    if not path.parent.is_dir():
        raise PlotError(f"{path.parent} is not a folder; choose where the picture goes")
    per_inch = CSS_PX_PER_INCH if suffix == ".svg" else DPI  # an SVG is sized in points
    fig = figure(curves, (size[0] / per_inch, size[1] / per_inch))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=suffix[1:], dpi=DPI)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def figure(curves: list[Curve], inches: tuple[float, float], terminal: bool = False):
    """The matplotlib Figure of the curves (headless: no pyplot, the Agg canvas). For a
    terminal: no generation boundaries (plotext would stretch them over the whole axis)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=inches, dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab10"].colors
    for i, c in enumerate(curves):
        colour = colours[i % len(colours)]
        if c.train:
            xs, ys = zip(*c.train)
            ax.plot(xs, ys, color=colour, linewidth=1.8, label=f"{c.label} train")
        if c.eval:
            xs, ys = zip(*c.eval)
            ax.plot(xs, ys, color=colour, linewidth=1.4, linestyle="--", marker="o",
                    markersize=5, label=f"{c.label} eval")
        for step, loss, dataset in c.notes:
            ax.scatter([step], [loss], color=colour, marker="D", s=60, zorder=3,
                       edgecolors="black", linewidths=0.6)
            ax.annotate(dataset, (step, loss), textcoords="offset points", xytext=(6, 6),
                        fontsize=9)
        if c.start > 0 and not terminal:
            ax.axvline(c.start, color="0.6", linestyle=":", linewidth=1)
    if any(c.notes for c in curves):
        ax.scatter([], [], color="0.4", marker="D", s=60, edgecolors="black",
                   linewidths=0.6, label="eval notes")
    if terminal:  # plotext sets both labels on one line: short ones
        ax.set_xlabel("cumulative training step")
        ax.set_ylabel("loss")
    else:
        ax.set_xlabel("cumulative training step (each generation after its parent)",
                      fontsize=12)
        ax.set_ylabel("loss (cross-entropy, nats per token)", fontsize=12)
    ax.set_title(_title(curves), fontsize=14)
    ax.tick_params(labelsize=11)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_xlim(left=0)
    ax.legend(fontsize=10, loc="upper right", frameon=True)
    return fig


def terminal_plot(curves: list[Curve], width: int, height: int, colour: bool = True) -> str:
    """The same figure as text for a terminal: plotext (6.x) redraws the matplotlib Figure
    with its own signals. Returned, not printed."""
    import plotext

    plotext.matplotlib(figure(curves, (width / 10, height / 5), terminal=True))
    plotext.figure._set_size(width, height)  # plotext 6 has no public setter for one figure
    return plotext.figure.build().string(colorless=not colour)
