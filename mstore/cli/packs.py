"""`mstore pack` and `mstore unpack`: how tensor objects are stored, never what they are."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

from ..units import fmt_bytes
from .options import JsonOpt, store_of
from .output import TerminalReporter, echo, print_json

NamesArg = Annotated[Optional[List[str]], typer.Argument(
    help="Model names, commit ids or unique prefixes (>= 7).", show_default=False)]
AllOpt = Annotated[bool, typer.Option("--all", help="Every model the store's refs hold.")]


def register(app: typer.Typer) -> None:
    """Add pack and unpack to `app`."""
    app.command()(pack)
    app.command()(unpack)


def pack(ctx: typer.Context, names: NamesArg = None, every: AllOpt = False,
         as_json: JsonOpt = False):
    """Store tensors as XOR deltas against the parent's (else alone), compressed."""
    from ..store.packing import pack as pack_objects

    store = store_of(ctx, must_exist=True)
    r = pack_objects(store, names or [], every, reporter=TerminalReporter(as_json))
    if as_json:
        return print_json(r.to_json())
    ratio = f" ({r.packed_bytes / r.loose_bytes:.2f}x)" if r.loose_bytes else ""
    echo(f"packed {r.packed} objects ({r.deltas} as deltas), {fmt_bytes(r.loose_bytes)} -> "
         f"{fmt_bytes(r.packed_bytes)}{ratio}; {r.already} already packed, "
         f"{r.kept_loose} kept loose (packed not smaller)")


def unpack(ctx: typer.Context, names: NamesArg = None,
           every: Annotated[bool, typer.Option("--all", help="Every packed object.")] = False,
           as_json: JsonOpt = False):
    """Store packed tensors loose again (mmapped on load)."""
    from ..store.packing import unpack as unpack_objects

    store = store_of(ctx, must_exist=True)
    r = unpack_objects(store, names or [], every, reporter=TerminalReporter(as_json))
    if as_json:
        return print_json(r.to_json())
    echo(f"unpacked {r.unpacked} objects ({fmt_bytes(r.unpacked_bytes)} loose)")
