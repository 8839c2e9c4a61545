"""The `mstore` command line: the typer app, its global options, `main`.

Each command group lives in its own module (models, maintenance, run, remote) and is added
here by its `register(app)`; how anything is printed lives in `output`. Kept thin and
torch-free: only `generate`, `train`, `export` and `merge` import torch, inside their own
functions.
Errors become one `error: ...` line on stderr and a non-zero exit, in one place
(`MStoreGroup.invoke`), so CliRunner tests see exactly what a user sees.
Its annotations are evaluated at definition, as in cli/models.py: typer reads the global
options' on every run.
"""

import errno
import gc
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own click; its exceptions are the ones raised here
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer on the real click
    import click

from .. import env
from ..errors import MStoreError
from . import maintenance, models, packs, plot, provenance, quantized, remote, weights
from .output import echo, echo_line, error_message

SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for `git log | head -1`
ALIASES = {"ls": "list", "info": "show", "delete": "rm"}


class MStoreGroup(TyperGroup):
    """Turns every failure into one line on stderr; `--debug` (or MSTORE_DEBUG=1) re-raises.

    Usage errors (unknown option or command, missing argument, bad value) are one
    `error: ...` line too, exit 2; a reader that closes the pipe early (`| head`) ends the
    command quietly, as git does.

    Commands are built on first use, not all at start: typer turns each function's
    signature into click parameters, ~4 ms a command, and a command line runs one of 21.
    `self.commands` knows every name (suggestions for a typo, `--help`) and builds a
    command when it is read (`--help` and completion build them all)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands(DECLARED, app, built=self.commands)

    def list_commands(self, ctx):
        return list(self.commands)

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


class LazyCommands(MutableMapping):
    """name -> click command, for the commands declared on `declared` (a typer app that is
    never built as a whole): each is built from its typer declaration when first read."""

    def __init__(self, declared: typer.Typer, owner: typer.Typer, built=None):
        from typer.main import get_command_name

        self.owner = owner
        self.built: dict = dict(built or {})
        self.infos: dict = {c.name or get_command_name(c.callback.__name__): c
                            for c in declared.registered_commands}
        self.groups: dict = {g.name: g for g in declared.registered_groups}

    def __getitem__(self, name):
        if name not in self.built:
            self.built[name] = self._build(name)
        return self.built[name]

    def _build(self, name):
        from typer.main import get_command_from_info, get_group_from_info

        o = self.owner
        if name in self.infos:
            return get_command_from_info(self.infos[name],
                                         pretty_exceptions_short=o.pretty_exceptions_short,
                                         rich_markup_mode=o.rich_markup_mode)
        if name in self.groups:
            return get_group_from_info(self.groups[name],
                                       pretty_exceptions_short=o.pretty_exceptions_short,
                                       rich_markup_mode=o.rich_markup_mode,
                                       suggest_commands=o.suggest_commands)
        raise KeyError(name)

    def names(self) -> list[str]:
        """Commands, then groups, in declaration order (what `--help` lists)."""
        declared = [*self.infos, *self.groups]
        return declared + [n for n in self.built if n not in declared]

    def __iter__(self):
        return iter(self.names())

    def __len__(self):
        return len(self.names())

    def __contains__(self, name):
        return name in self.infos or name in self.groups or name in self.built

    def __setitem__(self, name, command):
        self.built[name] = command

    def __delitem__(self, name):
        self.built.pop(name, None)
        self.infos.pop(name, None)
        self.groups.pop(name, None)


def _register_commands(app: typer.Typer) -> None:
    """Every command group, in the order `mstore --help` lists them."""
    models.register(app)
    maintenance.register(app)
    packs.register(app)
    provenance.register(app)
    weights.register(app)
    plot.register(app)
    quantized.register(app)
    remote.register(app)


DECLARED = typer.Typer(add_completion=False)  # the commands' declarations (see LazyCommands)
_register_commands(DECLARED)


def main(fast_exit: bool = False) -> None:
    """The CLI on sys.argv. Called from Python it raises SystemExit as a typer app does
    (unless torch was loaded: see `_exit`); `fast_exit` is the executable's."""
    # what is loaded by now lives as long as the process: full collections (the one at exit,
    # and those 10,000 refs' rows set off) need not walk its ~15,000 objects again; the
    # executable loaded it with the collector off (mstore.cli.run)
    gc.freeze()
    gc.enable()
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
    _exit(code, always=fast_exit)


def _exit(code, always: bool = False) -> None:
    """Exit with `code`; once torch is loaded (or `always`), without the interpreter's
    teardown.

    Freeing torch's and transformers' modules and libtorch's C++ statics at exit costs
    0.5 s to 0.9 s on this machine (measured: `import torch` alone, 1.51 s with a normal
    exit, 1.02 s with os._exit); without torch, tearing down typer's and mstore's modules
    is still 13 M of a tiny import's 458 M instructions (8 M of `list`'s 320 M). It serves
    nothing: every file mstore writes is closed and synced before its command returns.
    atexit handlers still run and stdio is flushed; a live non-daemon thread (which a
    normal exit would wait for) gets the normal exit.
    """
    import threading

    if not (always or "torch" in sys.modules) or any(
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
