"""The `mstore` command line: parses arguments, calls the library, prints the result.

Kept thin and torch-free: only `generate`, `train` and `export` import torch, inside their
own functions. Errors become one `error: ...` line on stderr and a non-zero exit, in one
place (`MStoreGroup.invoke`), so CliRunner tests see exactly what a user sees.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own click; its exceptions are the ones raised here
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer on the real click
    import click

from .common import JsonOpt, echo, echo_line, print_json, safe_text, store_of
from .remote import register as _register_remotes
from .. import env
from ..errors import MStoreError
from .render import shown_path
from .termtext import safe_lines
from ..units import fmt_bytes, fmt_count

DEBUG_ENV = "MSTORE_DEBUG"
SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for `git log | head -1`
ALIASES = {"ls": "list", "info": "show", "delete": "rm"}


class MStoreGroup(TyperGroup):
    """Turns every failure into one line on stderr; `--debug` (or MSTORE_DEBUG=1) re-raises.

    Usage errors (unknown option or command, missing argument, bad value) are one
    `error: ...` line too, exit 2; a reader that closes the pipe early (`| head`) ends the
    command quietly, as git does."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - the one place errors become messages
            if _is_broken_pipe(e):
                _silence_stdout()
                raise typer.Exit(SIGPIPE_STATUS)
            if env.debug() or _is_cli_framework_error(e):
                raise  # usage errors, --help, typer.Exit: `main` below prints those
            echo_line(f"error: {error_message(e)}")
            raise typer.Exit(getattr(e, "exit_code", 1) if isinstance(e, MStoreError) else 1)
        except KeyboardInterrupt:
            echo_line("error: interrupted")
            raise typer.Exit(130)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except click.exceptions.ClickException as e:
            echo_line(f"error: {usage_message(e, prog_name or 'mstore')}")
            sys.exit(e.exit_code)
        except typer.Abort:
            echo_line("error: aborted")
            sys.exit(1)
        except SystemExit:  # click pacified stdout after EPIPE while printing help
            if isinstance(sys.stdout, click.utils.PacifyFlushWrapper):
                sys.exit(SIGPIPE_STATUS)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)

    def format_commands(self, ctx, formatter):
        """The command table, with each alias next to its command: `list (ls)`."""
        aliases: dict[str, list[str]] = {}
        for alias, target in ALIASES.items():
            aliases.setdefault(target, []).append(alias)
        shown = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                label = f"{name} ({', '.join(aliases[name])})" if name in aliases else name
                shown.append((label, cmd))
        if shown:
            limit = formatter.width - 6 - max(len(label) for label, _ in shown)
            rows = [(label, cmd.get_short_help_str(limit)) for label, cmd in shown]
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _is_cli_framework_error(e: BaseException) -> bool:
    return isinstance(e, (typer.Exit, typer.Abort)) or \
        type(e).__module__.split(".")[0] in ("typer", "click")


def _is_broken_pipe(e: BaseException) -> bool:
    return isinstance(e, BrokenPipeError) or (isinstance(e, OSError) and e.errno == errno.EPIPE)


def _silence_stdout() -> None:
    """The reader is gone: point stdout at /dev/null so the final flush cannot fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # not a real file (CliRunner): nothing to do
        pass


def error_message(e: BaseException) -> str:
    if isinstance(e, MStoreError):
        return str(e)
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)"


def usage_message(e: click.exceptions.ClickException, prog: str = "mstore") -> str:
    """click's message as one line, with where to look for help on the same line."""
    msg = e.format_message().strip().rstrip(".")
    if msg[:1].isupper() and msg[1:2].islower():
        msg = msg[0].lower() + msg[1:]
    if isinstance(e, click.exceptions.UsageError):
        ctx = getattr(e, "ctx", None)
        msg += f" (see `{ctx.command_path if ctx is not None else prog} --help`)"
    return msg


def _version() -> str:
    """The installed distribution's version (without importing anything heavy)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("mstore")
    except PackageNotFoundError:
        from .. import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        echo(f"mstore {_version()}")
        raise typer.Exit()


app = typer.Typer(
    cls=MStoreGroup, no_args_is_help=True, add_completion=True,
    help="A Git-style, content-addressed store for model weights.",
    pretty_exceptions_enable=False, rich_markup_mode=None,
)


@app.callback()
def _global(
    ctx: typer.Context,
    store: Annotated[Optional[Path], typer.Option(
        "--store", help="Store folder (default: $MSTORE_HOME, else ./models).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="Print mstore's version and exit.")] = False,
):
    if debug:
        env.set_debug()
    ctx.obj = store


NameArg = Annotated[str, typer.Argument(help="Model name, commit id or unique prefix (>= 7).")]


# -- init / import ---------------------------------------------------------------------
@app.command()
def init(ctx: typer.Context):
    """Create the store (harmless if it exists)."""
    store = store_of(ctx)
    created = store.init()
    where = safe_text(shown_path(store.root))
    echo(f"{'initialised' if created else 'already initialised'} store at {where}")


@app.command("import")
def import_(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Hub repo id, Hub URL or local folder.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Ref name.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision.")] = None,
    accept_license: Annotated[bool, typer.Option("--accept-license",
                                                 help="Acknowledge the model's license.")] = False,
    max_size: Annotated[Optional[str], typer.Option(
        "--max-size", help="Refuse models larger than this (e.g. 10GB).")] = None,
    as_json: JsonOpt = False,
):
    """Import a model from the Hugging Face Hub or a local folder."""
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
        max_size=limit, confirm=confirm, echo=echo_line,
        quiet=as_json or not sys.stderr.isatty(),
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


# -- read commands ---------------------------------------------------------------------
def _list(ctx: typer.Context, as_json: bool):
    from ..store.report import list_rows

    store = store_of(ctx, must_exist=True)
    rows = list_rows(store)
    for key, reason in store.registry.invalid_entries():
        echo_line(f"warning: skipped registry entry {key!r}: {reason} (see `mstore fsck`)")
    if as_json:
        return print_json(rows)
    if not rows:
        echo("no models (try `mstore import`)")
        return
    table = [("NAME", "COMMIT", "ARCH", "PARAMS", "SIZE", "PARENT", "LICENSE")]
    for r in rows:
        table.append((r["model_name"], r["short_commit"], r.get("architecture_type") or "-",
                      fmt_count(r.get("parameters") or 0), fmt_bytes(r.get("size_bytes") or 0),
                      r.get("fine_tuned_from") or "-", r.get("license") or "unknown"))
    _print_table(table)


def _print_table(rows: list[tuple]) -> None:
    """Aligned columns; every cell escaped first, so widths are those of what is shown."""
    rows = [tuple(safe_text(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False):
    """List models: name, commit, architecture, parameters, size, parent, license."""
    _list(ctx, as_json)


@app.command("ls", hidden=True)
def ls(ctx: typer.Context, as_json: JsonOpt = False):
    """Alias of list."""
    _list(ctx, as_json)


def _show(ctx: typer.Context, name: str, as_json: bool, tensors: bool):
    from ..store.report import show

    doc = show(store_of(ctx, must_exist=True), name)
    if as_json:
        return print_json(doc)
    from .render import render_show

    echo(render_show(doc, tensors))


TensorsOpt = Annotated[bool, typer.Option("--tensors", help="List every tensor.")]


@app.command()
def show(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False,
         tensors: TensorsOpt = False):
    """Show a model's manifest in full."""
    _show(ctx, name, as_json, tensors)


@app.command("info", hidden=True)
def info(ctx: typer.Context, name: NameArg, as_json: JsonOpt = False,
         tensors: TensorsOpt = False):
    """Alias of show."""
    _show(ctx, name, as_json, tensors)


@app.command()
def log(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="Model (omit with --all).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every model's history.")] = False,
    graph: Annotated[bool, typer.Option("--graph", help="Draw the family tree.")] = False,
    as_json: JsonOpt = False,
):
    """A model's lineage, newest first, like `git log`."""
    from ..store import report
    from .render import render_graph, render_log

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


@app.command()
def tag(ctx: typer.Context, name: NameArg,
        new: Annotated[str, typer.Argument(help="New ref name.")]):
    """Add a second ref to the same commit (or name a commit no ref reaches)."""
    commit = store_of(ctx).tag(name, new)
    echo(f"tagged {safe_text(new)} -> {commit[:12]}")


def _rm(ctx: typer.Context, name: str):
    commit = store_of(ctx).remove(name)
    echo(f"removed {safe_text(name)} (was {commit[:12]}); its objects stay until `mstore gc`")


@app.command()
def rm(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Ref to remove.")]):
    """Remove a ref; objects stay until gc."""
    _rm(ctx, name)


@app.command("delete", hidden=True)
def delete(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Ref to remove.")]):
    """Alias of rm."""
    _rm(ctx, name)


@app.command()
def gc(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go.")] = False,
    grace: Annotated[str, typer.Option("--grace", help="Keep unreachable objects younger "
                                       "than this (e.g. 1h, 30m, 0).")] = "1h",
    as_json: JsonOpt = False,
):
    """Delete objects no ref can reach."""
    from ..store.gc import collect
    from ..units import parse_duration

    try:
        seconds = parse_duration(grace)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--grace")
    p = collect(store_of(ctx, must_exist=True), grace=seconds, dry_run=dry_run)
    if as_json:
        return print_json(p.to_json(dry_run))
    verb = "would delete" if dry_run else "deleted"
    echo(f"{verb} {len(p.delete)} objects and {len(p.tmp_delete)} tmp files, "
         f"{fmt_bytes(p.bytes_freed)}; kept {p.kept_reachable} reachable, "
         f"{p.kept_young} younger than {safe_text(grace)}")


@app.command()
def fsck(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    subset: Annotated[Optional[str], typer.Option(
        "--read-data-subset", help="Re-hash only slice n of t (e.g. 1/5).")] = None,
    lost_found: Annotated[bool, typer.Option("--lost-found", help=(
        "Name each dangling commit lost-found-<id>; rebuild a missing or damaged "
        "registry.json (a damaged one is kept as registry.json.corrupt-<time>)."))] = False,
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
    findings = check(store, part)
    errors = [f for f in findings if f.error]
    recovery = None
    if lost_found:
        from ..store.lost_found import recover

        recovery = recover(store)
    if as_json:
        doc = to_json(findings)
        if recovery is not None:
            doc["lost_found"] = recovery.to_json()
        print_json(doc)
    else:
        for f in findings:
            echo(("error " if f.error else "info  ") + safe_text(f.line()))
        if recovery is not None:
            _print_recovery(recovery)
        echo(f"{len(errors)} problem(s)" if errors else "ok: no problems found")
    if errors:
        raise typer.Exit(1)


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


@app.command()
def du(ctx: typer.Context, as_json: JsonOpt = False):
    """Logical bytes (each commit a ref holds, once) against physical bytes on disk."""
    from ..store.report import du as du_report

    doc = du_report(store_of(ctx, must_exist=True))
    if as_json:
        return print_json(doc)
    table = [("NAME", "LOGICAL", "UNIQUE", "NEW VS PARENT")]
    for m in doc["models"]:
        new = m.get("new_vs_parent_bytes")
        table.append((", ".join(m["names"]), fmt_bytes(m["logical_bytes"]),
                      fmt_bytes(m["unique_bytes"]),
                      "-" if new is None else fmt_bytes(new)))
    if len(table) > 1:
        _print_table(table)
    ratio = doc["dedup_ratio"]
    echo(f"logical {fmt_bytes(doc['logical_bytes'])}, physical "
         f"{fmt_bytes(doc['physical_bytes'])} in {doc['objects']} objects"
         + (f", dedup ratio {ratio:.2f}x" if ratio else ""))


@app.command()
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
        echo(f"~ {safe_text(c['name'])}  " + (f"rel L2 {rel:.3g}" if rel is not None
                                             else safe_text(c.get("note", ""))))
    echo(f"{len(doc['added'])} added, {len(doc['removed'])} removed, "
         f"{len(doc['changed'])} changed, {len(doc['shared'])} shared "
         f"({fmt_bytes(doc['shared_bytes'])})"
         + ("; config differs" if doc["config_changed"] else ""))


# -- commands that load weights (the only ones that import torch) ----------------------
@app.command()
def generate(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="Model (else the config's model_name).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    config: Annotated[Optional[Path], typer.Option("--config", help="Training config whose "
                                                   "model_name to use.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=0)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t",
                                               help="0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option("--top-k")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Reproducible sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every object loaded.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or "
                                                 "float16 (default: the model's own).")] = None,
):
    """Generate text with a model, streamed to stdout."""
    if name is None:
        if config is None:
            raise typer.BadParameter("name a model or pass --config", param_hint="NAME")
        from ..training.config import config_model_name

        name = config_model_name(config)
        if not name:
            raise typer.BadParameter(f"{config} has model_name: null; name a model",
                                     param_hint="NAME")
    from ..runtime.generate import GenerateOptions, generate_text

    opts = GenerateOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, chat=chat, verify=verify, device=device,
                           dtype=dtype)
    generate_text(store_of(ctx, must_exist=True), name, prompt, opts, on_text=_stream_text)
    sys.stdout.write("\n")


def _stream_text(text: str) -> None:
    """Generated text as it comes. To a terminal its newlines stay and any other control is
    shown escaped (a model's output must not drive the terminal); to a pipe or a file it is
    exact, as the tokenizer decoded it."""
    sys.stdout.write(safe_lines(text) if sys.stdout.isatty() else text)
    sys.stdout.flush()


@app.command()
def export(ctx: typer.Context, name: NameArg,
           dest: Annotated[Path, typer.Argument(help="New folder to write.")],
           as_json: JsonOpt = False):
    """Write a Hugging Face-format folder (config, safetensors, tokenizer, metadata.json)."""
    from ..hub.export import export_model

    doc = export_model(store_of(ctx, must_exist=True), name, dest)
    if as_json:
        return print_json(doc)
    what, where = safe_text(doc["name"] or doc["commit"][:12]), safe_text(shown_path(doc["dir"]))
    echo(f"exported {what} to {where}: "
         + ", ".join(safe_text(f) for f in doc["files"]))


@app.command()
def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c",
                                                   help="Training config (YAML).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the new model.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a config key: --set learning_rate=1e-4 (repeatable).")] = None,
    commit_on_interrupt: Annotated[bool, typer.Option(
        "--commit-on-interrupt", help="On Ctrl-C, commit the model as it is.")] = False,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, help="Processes on this node (launches torchrun).")] = 1,
    recovery_dir: Annotated[Optional[Path], typer.Option(
        "--recovery-dir", help="Where a model whose commit fails is kept (default: "
        "./mstore-train-recovery-<time>, else the temp folder).")] = None,
    resume_commit: Annotated[Optional[Path], typer.Option(
        "--resume-commit", help="Commit the model kept in this recovery folder "
        "instead of training.")] = None,
    as_json: JsonOpt = False,
):
    """Fine-tune a model (or train the custom transformer from scratch) and commit it."""
    if resume_commit is not None:
        if config is not None or overrides:
            raise typer.BadParameter("--resume-commit commits a trained model: give no "
                                     "--config or --set", param_hint="--resume-commit")
        return _resume_commit(ctx, resume_commit, name, as_json)
    if config is None:
        raise typer.BadParameter("give --config FILE (or --resume-commit DIR)",
                                 param_hint="--config")
    from ..training.config import load_config

    cfg = load_config(config, overrides or [], name)
    if nproc > 1 and not env.under_torchrun():
        from ..runtime.distributed import launch

        argv = ["--store", str(store_of(ctx).root), "train", "--config", str(config)]
        for item in overrides or []:
            argv += ["--set", item]
        argv += (["--name", name] if name else []) + (["--json"] if as_json else [])
        argv += ["--commit-on-interrupt"] if commit_on_interrupt else []
        argv += ["--recovery-dir", str(recovery_dir)] if recovery_dir else []
        raise typer.Exit(launch(nproc, argv))
    from ..training.loop import train as run_training

    result = run_training(store_of(ctx), cfg, commit_on_interrupt=commit_on_interrupt,
                          log=echo_line,
                          progress=None if not as_json else False, recovery_dir=recovery_dir)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    if as_json:
        return print_json(result.to_json())
    ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    echo(f"committed {safe_text(result.name)}  commit {result.commit[:12]}"
         + (f"  (parent {result.parent[:12]})" if result.parent else ""))
    echo(f"  {result.steps} steps, loss {result.train_loss:.4f}{ev}; "
         f"{fmt_bytes(result.bytes_written)} written, "
         f"{fmt_bytes(result.bytes_reused)} shared with existing objects"
         + (" [interrupted]" if result.interrupted else ""))


def _resume_commit(ctx: typer.Context, folder: Path, name: Optional[str], as_json: bool):
    from ..training.recovery import commit

    result = commit(store_of(ctx), folder, name)
    if as_json:
        return print_json({**result.__dict__, "recovered_from": str(folder)})
    echo(f"committed {safe_text(result.name)}  commit {result.commit[:12]} from "
         f"{safe_text(shown_path(folder))}; {fmt_bytes(result.bytes_written)} written "
         "(the folder can now be deleted)")


_register_remotes(app)


def main() -> None:
    code = None
    try:
        app(prog_name="mstore")
    except SystemExit as e:
        code = e.code
    try:  # what is still buffered: a reader gone by now ends us as quietly as mid-command
        sys.stdout.flush()
    except OSError as e:
        _silence_stdout()
        code = SIGPIPE_STATUS if _is_broken_pipe(e) else code or 120
    _exit(code)


def _exit(code) -> None:
    """Exit with `code`; once torch is loaded, without the interpreter's teardown.

    Freeing torch's and transformers' modules and libtorch's C++ statics at exit costs
    0.5 s to 0.9 s on this machine (measured: `import torch` alone, 1.51 s with a normal
    exit, 1.02 s with os._exit) and serves nothing: every file mstore writes is closed and
    synced before its command returns. atexit handlers still run and stdio is flushed; a
    live non-daemon thread (which a normal exit would wait for) gets the normal exit.
    """
    import threading

    if "torch" not in sys.modules or any(
            t.is_alive() and not t.daemon and t is not threading.main_thread()
            for t in threading.enumerate()):
        raise SystemExit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        status = 1
    import atexit

    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError) as e:  # a closed pipe: quiet, as mid-command
        status = SIGPIPE_STATUS if _is_broken_pipe(e) else status or 120
    os._exit(status)
