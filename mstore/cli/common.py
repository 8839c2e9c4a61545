"""What every CLI module shares: the store of the invocation, output, common options.

Output goes through `echo` (text) and `print_json` (--json), never print(): `echo` is the
last pass that keeps an outside string from driving the terminal (see mstore.termtext);
values from outside are also wrapped in `safe_text` where a line is built, so that a newline
inside a value cannot forge a line.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .termtext import json_text, safe_lines, safe_text

__all__ = ["JsonOpt", "echo", "echo_line", "print_json", "safe_text", "store_of"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def store_of(ctx: typer.Context, must_exist: bool = False):
    """The store named by the global --store (else $MSTORE_HOME, else ./models).
    `must_exist`: for commands that only read it, a missing store is an error (StoreNotFound)."""
    from ..store.repo import Store

    store = Store(ctx.find_root().obj)
    if must_exist:
        store.require()
    return store


def echo(text: str = "", err: bool = False) -> None:
    """Print output lines (newlines in `text` are line ends; every other control is escaped)."""
    typer.echo(safe_lines(text), err=err)


def echo_line(text: str, err: bool = True) -> None:
    """Print a message the library hands over (progress, warnings): one line, all escaped.
    The `echo=`/`log=`/`warn=` callbacks the CLI passes to the library are this."""
    typer.echo(safe_text(text), err=err)


def print_json(obj: Any) -> None:
    typer.echo(json_text(obj))
