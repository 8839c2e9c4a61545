"""What the command groups share from the command line: option and argument aliases, and
the store the global --store names."""

from __future__ import annotations

from typing import Annotated

import typer

__all__ = ["JsonOpt", "NameArg", "TensorsOpt", "store_of"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]
NameArg = Annotated[str, typer.Argument(help="Model name, commit id or unique prefix (>= 7).")]
TensorsOpt = Annotated[bool, typer.Option("--tensors", help="List every tensor.")]


def store_of(ctx: typer.Context, must_exist: bool = False):
    """The store named by the global --store (else $MSTORE_HOME, else ./models).
    `must_exist`: for commands that only read it, a missing store is an error (StoreNotFound)."""
    from ..store.repo import Store

    store = Store(ctx.find_root().obj)
    if must_exist:
        store.require()
    return store
