"""Provenance commands: `sign` a commit, `verify` a lineage's signatures. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import JsonOpt, NameArg, store_of
from .output import echo, print_json, safe_text


def register(app: typer.Typer) -> None:
    """Add sign and verify to `app`."""
    app.command()(sign)
    app.command()(verify)


def sign(
    ctx: typer.Context,
    name: NameArg,
    key: Annotated[Path, typer.Option("--key", help="PEM private key (ECDSA P-256 or "
                                      "Ed25519).")],
    as_json: JsonOpt = False,
):
    """Sign a commit: a DSSE-enveloped in-toto statement naming every object, attached."""
    from ..store.signing import sign_commit

    res = sign_commit(store_of(ctx, must_exist=True), name, key)
    if as_json:
        return print_json(res.to_json())
    what = safe_text(res.name or res.commit[:12])
    if res.already:
        echo(f"{what} ({res.commit[:12]}) is already signed by key {res.keyid[:16]}")
        return
    echo(f"signed {what} ({res.commit[:12]}) with key {res.keyid[:16]} ({res.algorithm}); "
         f"signature {res.attachment[:12]}")


def verify(
    ctx: typer.Context,
    name: NameArg,
    keys: Annotated[Optional[list[Path]], typer.Option(
        "--key", help="Trust only signatures by this PEM public key (repeatable); "
        "without it, every valid signature counts and its key is shown.")] = None,
    as_json: JsonOpt = False,
):
    """Check every signature of a commit and its ancestors, re-hashing what they sign."""
    from ..errors import VerificationFailed
    from ..store.signing import fingerprint, load_public_key, verify_lineage

    trusted = {fingerprint(load_public_key(k)) for k in keys} if keys else None
    store = store_of(ctx, must_exist=True)
    report = verify_lineage(store, store.resolve(name).commit, trusted)
    if as_json:
        print_json(report.to_json())
        if not report.ok:
            raise typer.Exit(1)
        return
    for g in report.generations:
        echo(_generation_line(g))
    problem = report.first_problem()
    if problem is not None:
        raise VerificationFailed(problem)
    echo(f"ok: {len(report.generations)} generation(s) signed"
         + (" by trusted keys" if trusted is not None else ""))


def _generation_line(g) -> str:
    who = f" ({safe_text(', '.join(g.names))})" if g.names else ""
    head = f"{g.commit[:12]}{who}"
    valid = [s for s in g.signatures if s.valid]
    by = ", ".join(f"{s.keyid[:16]}{'' if s.trusted else ' [unknown key]'}" for s in valid)
    if g.status == "signed":
        absent = f", {g.objects_absent} not in this store" if g.objects_absent else ""
        return f"signed    {head}  by {by}; {g.objects_checked} objects re-hashed{absent}"
    if g.status == "unknown-key":
        keys = ", ".join(s.keyid[:16] for s in valid)
        return f"untrusted {head}  signed only by unknown key(s) {keys}"
    if g.status == "unsigned":
        return f"unsigned  {head}"
    return f"INVALID   {head}  {safe_text(g.problems[0])}"
