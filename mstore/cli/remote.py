"""CLI commands for remotes: `remote add|list|rm`, `push`, `pull`, `clone`.

Thin, like the rest of the CLI: each command calls `mstore.remote` and prints the result;
errors are MStoreError subclasses that the app's MStoreGroup turns into one `error:` line.
`register(app)` adds the commands to the main app (once; calling it again does nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import JsonOpt, store_of
from .output import TerminalReporter, echo, print_json, safe_text, shown_path
from ..reporting import Reporter
from ..units import fmt_bytes

RemoteArg = Annotated[Optional[str], typer.Argument(
    help="Remote name (default: the only one, or 'origin').")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", "-f", help="Overwrite the ref even if it moved or diverged.")]


def _warn_skipped(reporter: Reporter, remote: str, skipped: list[dict[str, str]]) -> None:
    """One line per invalid entry of a remote's registry (the library only returns them)."""
    for s in skipped:
        reporter.warning(f"remote {remote!r} has an invalid entry {s['name']!r} "
                         f"({s['reason']}); ignored")


def register(app: typer.Typer) -> None:
    """Add `remote`, `push`, `pull` and `clone` to `app` (idempotent)."""
    if getattr(app, "_mstore_remotes_registered", False):
        return
    app._mstore_remotes_registered = True  # type: ignore[attr-defined]

    remote_app = typer.Typer(no_args_is_help=True, add_completion=False,
                             rich_markup_mode=None,
                             help="Manage remotes: other stores to push to and pull from.")

    @remote_app.command("add")
    def remote_add(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="Remote name, e.g. origin.")],
        url: Annotated[str, typer.Argument(help="A path, file://, s3://bucket/prefix, gs://, "
                                           "hf://, ... (any fsspec URL).")],
    ):
        """Add a remote (only its name and URL are stored; never credentials)."""
        from ..remote import add_remote

        stored = add_remote(store_of(ctx), name, url)
        echo(f"added remote {safe_text(name)} -> {safe_text(shown_path(stored))}")

    @remote_app.command("list")
    def remote_list(ctx: typer.Context, as_json: JsonOpt = False):
        """List remotes and what this store last saw of their refs."""
        from ..remote import list_remotes, tracking_refs

        store = store_of(ctx)
        remotes = list_remotes(store) if store.root.is_dir() else {}
        tracked = tracking_refs(store) if remotes else {}
        if as_json:
            return print_json([{"name": n, "url": u, "refs": tracked.get(n, {})}
                          for n, u in remotes.items()])
        if not remotes:
            echo("no remotes (add one with `mstore remote add origin URL`)")
            return
        shown = {safe_text(n): safe_text(shown_path(u)) for n, u in remotes.items()}
        width = max(len(n) for n in shown)
        for n, u in shown.items():
            echo(f"{n.ljust(width)}  {u}")

    @remote_app.command("rm")
    def remote_rm(ctx: typer.Context,
                  name: Annotated[str, typer.Argument(help="Remote to remove.")]):
        """Remove a remote (nothing on the remote itself is touched)."""
        from ..remote import remove_remote

        url = remove_remote(store_of(ctx), name)
        echo(f"removed remote {safe_text(name)} ({safe_text(shown_path(url))})")

    app.add_typer(remote_app, name="remote")

    @app.command()
    def push(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="Model name (or commit, with --as).")],
        remote: RemoteArg = None,
        as_name: Annotated[Optional[str], typer.Option(
            "--as", help="Name of the ref on the remote (default: the same).")] = None,
        force: ForceOpt = False,
        as_json: JsonOpt = False,
    ):
        """Send a model (objects, manifest chain, then the ref) to a remote."""
        from ..remote import push as do_push

        reporter = TerminalReporter(as_json)
        r = do_push(store_of(ctx), name, remote, as_name=as_name, force=force,
                    reporter=reporter)
        _warn_skipped(reporter, r.remote, r.skipped)
        if as_json:
            return print_json(r.to_json())
        if not r.ref_updated and r.objects_sent == 0:
            echo(f"{safe_text(r.remote)} already has {safe_text(r.name)} at {r.commit[:12]}; "
                 "everything up to date")
            return
        was = f" (was {r.previous[:12]})" if r.previous and r.previous != r.commit else ""
        echo(f"pushed {safe_text(r.name)} -> {safe_text(r.remote)}: {r.commit[:12]}{was}"
             + ("  [forced]" if r.forced else ""))
        echo(f"  {r.objects_sent} objects sent ({fmt_bytes(r.bytes_sent)}), "
             f"{r.objects_present} already there")

    @app.command()
    def pull(
        ctx: typer.Context,
        name: Annotated[str, typer.Argument(help="Model name on the remote.")],
        remote: RemoteArg = None,
        as_name: Annotated[Optional[str], typer.Option(
            "--as", help="Name of the local ref (default: the same).")] = None,
        force: ForceOpt = False,
        require_signature: Annotated[Optional[Path], typer.Option(
            "--require-signature", help="Refuse the model unless its commit is signed by "
            "this PEM public key (checked before anything is written).")] = None,
        as_json: JsonOpt = False,
    ):
        """Fetch a model from a remote, verifying every object, and set the local ref."""
        from ..remote import pull as do_pull

        keyid = None
        if require_signature is not None:
            from ..store.signing import fingerprint, load_public_key

            keyid = fingerprint(load_public_key(require_signature))
        reporter = TerminalReporter(as_json)
        r = do_pull(store_of(ctx), name, remote, as_name=as_name, force=force,
                    require_signature=keyid, reporter=reporter)
        _warn_skipped(reporter, r.remote, r.skipped)
        if as_json:
            return print_json(r.to_json())
        _print_pull(r)

    @app.command()
    def clone(
        url: Annotated[str, typer.Argument(help="The remote: a path or any fsspec URL.")],
        dest: Annotated[Path, typer.Argument(help="New store folder.")],
        ref: Annotated[Optional[str], typer.Option(
            "--ref", help="Clone only this model (default: every ref).")] = None,
        as_json: JsonOpt = False,
    ):
        """Make a new local store from a remote, recorded as `origin`."""
        from ..remote import clone as do_clone

        reporter = TerminalReporter(as_json)
        res = do_clone(url, dest, ref, reporter=reporter)
        _warn_skipped(reporter, "origin", res.skipped)
        if as_json:
            return print_json(res.to_json())
        for r in res.refs:
            _print_pull(r)
        doc = res.to_json()
        echo(f"cloned {safe_text(shown_path(res.url))} into {safe_text(shown_path(res.dir))}: "
             f"{len(res.refs)} ref(s), {doc['objects_received']} objects "
             f"({fmt_bytes(doc['bytes_received'])})")


def _print_pull(r) -> None:
    if r.note:
        echo(f"{safe_text(r.name)}: {safe_text(r.note)} ({r.commit[:12]})"
             + (f"; {r.objects_sent} objects received" if r.objects_sent else ""))
        return
    was = f" (was {r.previous[:12]})" if r.previous else ""
    echo(f"pulled {safe_text(r.name)} <- {safe_text(r.remote)}: {r.commit[:12]}{was}"
         + ("  [forced]" if r.forced else ""))
    echo(f"  {r.objects_sent} objects received ({fmt_bytes(r.bytes_sent)}), "
         f"{r.objects_present} already present")
