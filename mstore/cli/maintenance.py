"""The store's upkeep: gc, fsck (with --lost-found), du, diff. Torch-free."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..units import fmt_bytes
from .options import JsonOpt, NameArg, store_of
from .output import (
    TerminalReporter, echo, error_message, print_json, print_table, safe_text, shown_path,
)


def register(app: typer.Typer) -> None:
    """Add gc, fsck, du and diff to `app`."""
    app.command()(gc)
    app.command()(fsck)
    app.command()(du)
    app.command()(diff)


def gc(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go.")] = False,
    grace: Annotated[str, typer.Option("--grace", help="Keep unreachable objects younger "
                                       "than this (e.g. 1h, 30m, 0).")] = "1h",
    explain: Annotated[bool, typer.Option("--explain", help="Say why each kept object is "
                                          "kept (a ref names it, an adapter's base, ...).")] = False,
    as_json: JsonOpt = False,
):
    """Delete objects no ref can reach."""
    from ..store.gc import collect
    from ..units import parse_duration

    try:
        seconds = parse_duration(grace)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--grace")
    p = collect(store_of(ctx, must_exist=True), grace=seconds, dry_run=dry_run,
                explain=explain)
    if as_json:
        return print_json(p.to_json(dry_run))
    if p.why is not None:
        for oid, why in sorted(p.why.items()):
            echo(f"keep {oid[:12]}  {safe_text(why)}")
    verb = "would delete" if dry_run else "deleted"
    if dry_run:
        for base, delta in sorted(p.kept_as_base.items()):
            echo(f"keep {base[:12]}: no ref names it; base of packed delta {delta[:12]}")
    bases = f" ({len(p.kept_as_base)} as delta bases)" if p.kept_as_base else ""
    echo(f"{verb} {len(p.delete)} objects and {len(p.tmp_delete)} tmp files, "
         f"{fmt_bytes(p.bytes_freed)}; kept {p.kept_reachable} reachable{bases}, "
         f"{p.kept_young} younger than {safe_text(grace)}")


def fsck(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    subset: Annotated[Optional[str], typer.Option(
        "--read-data-subset", help="Re-hash only slice n of t (e.g. 1/5).")] = None,
    lost_found: Annotated[bool, typer.Option("--lost-found", help=(
        "Name each dangling commit lost-found-<id>; rebuild a missing or damaged "
        "registry.json (a damaged one is kept as registry.json.corrupt-<time>)."))] = False,
    repair: Annotated[bool, typer.Option("--repair", help=(
        "Fetch a good copy of every missing or corrupt object (from --from REMOTE, the "
        "default remote, or the Hub revision it was imported from), verify it, put it; "
        "corrupt copies are moved to lost-found/objects/."))] = False,
    from_: Annotated[Optional[str], typer.Option(
        "--from", help="The remote to repair from (default: the default remote).")] = None,
):
    """Re-hash every object and check every ref; exit 1 on any problem."""
    from ..store.fsck import check, to_json

    part = None
    if subset:
        try:
            n, t = (int(x) for x in subset.split("/"))
            if not 1 <= n <= t:
                raise ValueError
            part = (n, t)
        except ValueError:
            raise typer.BadParameter("expected n/t with 1 <= n <= t", param_hint="--read-data-subset")
    store = store_of(ctx, must_exist=True)
    repaired = _repair(store, from_, as_json) if repair else None
    findings = check(store, part)
    for f in findings:
        if f.cause is not None:  # the CLI's own wording of the error (its hint)
            f.detail = error_message(f.cause)
    errors = [f for f in findings if f.error]
    recovery = None
    if lost_found:
        from ..store.lost_found import recover

        recovery = recover(store)
    if as_json:
        doc = to_json(findings)
        if recovery is not None:
            doc["lost_found"] = recovery.to_json()
        if repaired is not None:
            doc["repair"] = repaired.to_json()
        print_json(doc)
    else:
        if repaired is not None:
            _print_repair(repaired)
        for f in findings:
            echo(("error " if f.error else "info  ") + safe_text(f.line()))
        if recovery is not None:
            _print_recovery(recovery)
        echo(f"{len(errors)} problem(s)" if errors else "ok: no problems found")
    if errors:
        raise typer.Exit(1)


def _repair(store, remote: str | None, as_json: bool):
    """Repair from the named remote (else the default one, if any), then the Hub."""
    from ..errors import NoDefaultRemote
    from ..hub.repair import HubCopies
    from ..remote.config import resolve_remote
    from ..remote.repair import RemoteCopies
    from ..store.repair import repair

    sources = []
    try:
        sources.append(RemoteCopies(*resolve_remote(store, remote)))
    except NoDefaultRemote:
        if remote is not None:
            raise
    sources.append(HubCopies(store, TerminalReporter(as_json)))
    return repair(store, sources)


def _print_repair(res) -> None:
    if not res.repaired and not res.failed:
        echo("nothing to repair")
    for r in res.repaired:
        moved = f"; the damaged copy is in {safe_text(r.moved_to)}" if r.moved_to else ""
        echo(f"repaired {r.object[:12]} ({r.problem}) from {safe_text(r.source)}{moved}")
    for f in res.failed:
        echo(f"not repaired {f.object[:12]} ({f.problem}): {safe_text(f.reason)}")


def _print_recovery(rec) -> None:
    if rec.registry_moved_to:
        echo(f"moved the damaged registry.json to {safe_text(shown_path(rec.registry_moved_to))}")
    if rec.registry_created:
        echo("wrote a new registry.json")
    for name, commit in rec.named:
        echo(f"restored {safe_text(name)} -> {commit[:12]}")
    for commit, why in rec.skipped:
        echo(f"not restored {commit[:12]}: {safe_text(why)}")
    if not rec.named and not rec.registry_created:
        echo("nothing to restore: no dangling commits")


def du(ctx: typer.Context, as_json: JsonOpt = False):
    """Logical bytes (each commit a ref holds, once) against physical bytes on disk."""
    from ..store.report import du as du_report

    doc = du_report(store_of(ctx, must_exist=True))
    if as_json:
        return print_json(doc)
    table = [("NAME", "LOGICAL", "UNIQUE", "NEW VS PARENT", "STORED")]
    for m in doc["models"]:
        new = m.get("new_vs_parent_bytes")
        table.append((", ".join(m["names"]), fmt_bytes(m["logical_bytes"]),
                      fmt_bytes(m["unique_bytes"]),
                      "-" if new is None else fmt_bytes(new), fmt_bytes(m["stored_bytes"])))
    if len(table) > 1:
        print_table(table)
    ratio = doc["dedup_ratio"]
    echo(f"logical {fmt_bytes(doc['logical_bytes'])}, physical "
         f"{fmt_bytes(doc['physical_bytes'])} in {doc['objects']} objects"
         + (f", dedup ratio {ratio:.2f}x" if ratio else "")
         + (f" (loose {fmt_bytes(doc['loose_bytes'])}, {doc['packed_objects']} packed "
            f"{fmt_bytes(doc['packed_bytes'])})" if doc["packed_objects"] else ""))


def diff(ctx: typer.Context, a: NameArg, b: NameArg, as_json: JsonOpt = False):
    """Tensors added, removed, changed (relative L2) and shared between two models."""
    from ..store.report import diff as diff_report

    doc = diff_report(store_of(ctx, must_exist=True), a, b)
    if as_json:
        return print_json(doc)
    for n in doc["added"]:
        echo(f"+ {safe_text(n)}")
    for n in doc["removed"]:
        echo(f"- {safe_text(n)}")
    for c in doc["changed"]:
        rel = c["relative_l2"]
        by = "; ".join(f"{side} adds {note}" for side, note in (c.get("lora") or {}).items())
        echo(f"~ {safe_text(c['name'])}  " + (f"rel L2 {rel:.3g}" if rel is not None
                                             else safe_text(c.get("note", "")))
             + (f"  ({safe_text(by)})" if by else ""))
    for side, a in (doc.get("adapter") or {}).items():
        echo(f"{side} is a LoRA adapter (r={safe_text(a.get('r'))}, alpha "
             f"{safe_text(a.get('alpha'))}) on {safe_text(str(a['base'])[:12])}: "
             f"{len(a['tensors'])} tensors ({fmt_bytes(a['bytes'])}) on {len(a['modules'])} "
             f"modules, targets {safe_text(', '.join(a.get('target_modules') or []))}")
    echo(f"{len(doc['added'])} added, {len(doc['removed'])} removed, "
         f"{len(doc['changed'])} changed, {len(doc['shared'])} shared "
         f"({fmt_bytes(doc['shared_bytes'])})"
         + ("; config differs" if doc["config_changed"] else ""))
