"""The model commands: init, import, list (ls), show (info), log, tag, rm (delete).

Torch-free: list, show, log, tag and rm read the store through mstore.store.report only.
No `from __future__ import annotations` here: typer reads a command's parameters ~8 times
per run, evaluating string annotations each time (inspect.signature(eval_str=True), then
get_type_hints), which was 13 M of a tiny import's 385 M instructions; evaluated once at
definition they cost less than that for the commands start-up matters most to.
"""

import sys
from typing import Annotated, Optional

import typer

from ..units import fmt_bytes, fmt_count
from .options import JsonOpt, NameArg, TensorsOpt, store_of
from .output import (
    TerminalReporter, echo, echo_line, license_text, print_json, print_table, render_graph,
    render_log, render_show, safe_text, shown_path,
)

RefArg = Annotated[str, typer.Argument(help="Ref to remove.")]


def register(app: typer.Typer) -> None:
    """Add the model commands (and their hidden aliases) to `app`."""
    app.command()(init)
    app.command("import")(import_)
    app.command("list")(list_)
    app.command("ls", hidden=True)(ls)
    app.command()(show)
    app.command("info", hidden=True)(info)
    app.command()(log)
    app.command()(tag)
    app.command()(rm)
    app.command("delete", hidden=True)(delete)


def init(ctx: typer.Context):
    """Create the store (harmless if it exists)."""
    store = store_of(ctx)
    created = store.init()
    where = safe_text(shown_path(store.root))
    echo(f"{'initialised' if created else 'already initialised'} store at {where}")


def import_(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Hub repo id, Hub URL or local folder.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Ref name.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision.")] = None,
    accept_license: Annotated[bool, typer.Option("--accept-license",
                                                 help="Acknowledge the model's license.")] = False,
    max_size: Annotated[Optional[str], typer.Option(
        "--max-size", help="Refuse models larger than this (e.g. 10GB).")] = None,
    quantize: Annotated[Optional[str], typer.Option(
        "--quantize", help="Quantize the linear layers while importing: int8 or int4.")] = None,
    group_size: Annotated[Optional[int], typer.Option(
        "--group-size", help="With --quantize int4: inputs per scale (default 128).")] = None,
    base: Annotated[Optional[str], typer.Option(
        "--base", help="A PEFT LoRA adapter's base model in the store (default: the one "
        "its base_model_name_or_path names).")] = None,
    as_json: JsonOpt = False,
):
    """Import a model from the Hugging Face Hub or a local folder (a PEFT LoRA adapter
    folder or repo becomes an adapter child of its base)."""
    from ..hub.importer import import_model
    from ..units import parse_size

    limit = None
    if max_size is not None:
        try:
            limit = parse_size(max_size)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--max-size")
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    confirm = (lambda q: typer.confirm(safe_text(q), default=False, err=True)) if interactive \
        else None
    result = import_model(
        store_of(ctx), source, name=name, revision=revision, accept_license=accept_license,
        max_size=limit, confirm=confirm, quantize=quantize, group_size=group_size,
        reporter=TerminalReporter(as_json), base=base,
    )
    if as_json:
        return print_json(result.to_json())
    if result.already:
        extra = (f"; added the name {safe_text(result.name)}" if result.name != result.held_by
                 else "; nothing added")
        echo(f"already imported: identical content is held by {safe_text(result.held_by)} "
             f"({result.commit[:12]}){extra}")
        return
    echo(f"imported {safe_text(result.name)}  commit {result.commit[:12]}")
    echo(f"  {fmt_count(result.parameters)} parameters, "
         f"{fmt_bytes(result.bytes_written)} written, "
         f"{fmt_bytes(result.bytes_present)} already present")


def _list(ctx: typer.Context, as_json: bool):
    from ..store.report import list_rows

    store = store_of(ctx, must_exist=True)
    refs, skipped = store.registry.load_with_skipped()
    rows = list_rows(store, refs)
    for key, reason in skipped:
        echo_line(f"warning: skipped registry entry {key!r}: {reason} (see `mstore fsck`)")
    if as_json:
        return print_json(rows)
    if not rows:
        echo("no models (try `mstore import`)")
        return
    table = [("NAME", "COMMIT", "ARCH", "PARAMS", "SIZE", "RUN MEM", "PARENT", "KIND",
              "LICENSE")]
    shown: dict[tuple, tuple] = {}  # the refs of one commit show the same columns: format once
    for r in rows:
        key = tuple(map(r.get, _LIST_COLUMNS_FROM))
        try:
            cells = shown[key]
        except KeyError:
            cells = shown[key] = _list_cells(r)
        except TypeError:  # an unhashable value in a hand-edited registry entry
            cells = _list_cells(r)
        table.append((r["model_name"], r["short_commit"], *cells))
    print_table(table)


_LIST_COLUMNS_FROM = ("architecture_type", "parameters", "size_bytes", "run_bytes",
                      "fine_tuned_from", "variant", "kind", "license", "license_note")


def _list_cells(r: dict) -> tuple[str, ...]:
    """The columns of a `list` row after NAME and COMMIT (from the keys _LIST_COLUMNS_FROM)."""
    run = r.get("run_bytes")
    return (r.get("architecture_type") or "-", fmt_count(r.get("parameters") or 0),
            fmt_bytes(r.get("size_bytes") or 0), "-" if run is None else fmt_bytes(run),
            r.get("fine_tuned_from") or "-", r.get("variant") or r.get("kind") or "-",
            license_text(r.get("license"), r.get("license_note") and "inherited, "
                         "not permissive"))


def list_(ctx: typer.Context, as_json: JsonOpt = False):
    """List models: name, commit, architecture, parameters, size, parent, license."""
    _list(ctx, as_json)


def ls(ctx: typer.Context, as_json: JsonOpt = False):
    """Alias of list."""
    _list(ctx, as_json)


def _show(ctx: typer.Context, name: str, as_json: bool, tensors: bool):
    from ..store.report import show as show_report

    doc = show_report(store_of(ctx, must_exist=True), name)
    if as_json:
        return print_json(doc)
    echo(render_show(doc, tensors))


def show(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False,
         tensors: TensorsOpt = False):
    """Show a model's manifest in full."""
    _show(ctx, name, as_json, tensors)


def info(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False,
         tensors: TensorsOpt = False):
    """Alias of show."""
    _show(ctx, name, as_json, tensors)


def log(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="Model (omit with --all).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every model's history.")] = False,
    graph: Annotated[bool, typer.Option("--graph", help="Draw the family tree.")] = False,
    as_json: JsonOpt = False,
):
    """A model's lineage, newest first, like `git log`."""
    from ..store import report

    store = store_of(ctx, must_exist=True)
    if all_ or name is None:
        if not all_:
            raise typer.BadParameter("name a model, or pass --all", param_hint="NAME")
        entries = report.all_commits_graph(store)
    else:
        entries = report.log_entries(store, store.resolve(name).commit)
    if as_json:
        return print_json(entries)
    echo(render_graph(entries) if graph else render_log(entries))


def tag(ctx: typer.Context, name: NameArg,
        new: Annotated[str, typer.Argument(help="New ref name.")]):
    """Add a second ref to the same commit (or name a commit no ref reaches)."""
    commit = store_of(ctx).tag(name, new)
    echo(f"tagged {safe_text(new)} -> {commit[:12]}")


def _rm(ctx: typer.Context, name: str):
    commit = store_of(ctx).remove(name)
    echo(f"removed {safe_text(name)} (was {commit[:12]}); its objects stay until `mstore gc`")


def rm(ctx: typer.Context, name: RefArg):
    """Remove a ref; objects stay until gc."""
    _rm(ctx, name)


def delete(ctx: typer.Context, name: RefArg):
    """Alias of rm."""
    _rm(ctx, name)
