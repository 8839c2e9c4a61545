"""What every CLI module shares: the store of the invocation, JSON output, common options."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document.")]


def store_of(ctx: typer.Context, must_exist: bool = False):
    """The store named by the global --store (else $MSTORE_HOME, else ./models).
    `must_exist`: for commands that only read it, a missing store is an error (StoreNotFound)."""
    from .store import Store

    store = Store(ctx.find_root().obj)
    if must_exist:
        store.require()
    return store


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))
