"""The reporting contract (issue 12, item 3): the library never touches the terminal and its
error messages name no CLI flag; the CLI's reporter and error table decide what a user sees.
"""

import ast
import re
import sys

import pytest

from mstore import errors as E
from mstore.cli.output import CLI_WORDING, TerminalReporter, error_message
from mstore.reporting import SILENT, Progress
from mstore.units import fmt_bytes
from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "mstore"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
# Library messages that still name a flag, and why they stay:
KEPT = {
    # tests/test_remote.py asserts str(RemoteRefMoved) with its "--force" hint
    ("errors.py", "RemoteRefMoved"),
    # load_config's overrides are the CLI's `--set key=value` strings; tests/test_train.py
    # asserts load_config's "--set max_steps: expected an integer"
    ("training/config.py", "*"),
}


def library_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "cli")


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def _messages(path):
    """(scope, text) for every string a `raise` builds, and, in errors.py, every string an
    error's __init__ builds (its message)."""
    tree = ast.parse(path.read_text())
    out = []
    for top in tree.body:
        scope = top.name if isinstance(top, ast.ClassDef) else "*"
        for node in ast.walk(top):
            if isinstance(node, ast.Raise) and node.exc is not None:
                out += [(scope, s) for s in _strings(node.exc)]
            if path.name == "errors.py" and isinstance(node, ast.FunctionDef) \
                    and node.name == "__init__":
                out += [(scope, s) for stmt in node.body for s in _strings(stmt)]
    return out


def test_library_error_messages_name_no_cli_flag():
    found = []
    for path in library_files():
        rel = path.relative_to(PACKAGE).as_posix()
        for scope, text in _messages(path):
            if FLAG.search(text) and (rel, scope) not in KEPT and (rel, "*") not in KEPT:
                found.append(f"{rel} {scope}: {text!r}")
    assert not found, "\n".join(found)


def test_the_library_never_touches_the_terminal():
    """No isatty, no print, no global progress-bar switch outside the CLI."""
    found = []
    for path in library_files():
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else \
                node.id if isinstance(node, ast.Name) else None
            if name in ("isatty", "disable_progress_bars", "disable_progress_bar",
                        "_tqdm_active"):
                found.append(f"{rel}:{node.lineno} {name}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                found.append(f"{rel}:{node.lineno} print")
    assert not found, found


# -- the CLI's wording: exactly the messages users have always seen ----------------------
WORDED = [
    (E.AdapterBaseMissing("Org/Base", "/a"),
     "cannot import the LoRA adapter /a: its base model 'Org/Base' is not in the store: "
     "import it first (`mstore import Org/Base`)",
     "cannot import the LoRA adapter /a: its base model 'Org/Base' is not in the store: "
     "import it first (`mstore import Org/Base`), or name a base in the store with --base REF"),
    (E.AdapterBaseAmbiguous("Org/Base", ["a", "b"]),
     "several models in the store are 'Org/Base' (a, b); name the adapter's base",
     "several models in the store are 'Org/Base' (a, b); name the adapter's base with "
     "--base REF"),
    (E.QuantizedExport("m", "int8"),
     "m is quantized (int8): transformers cannot load that layout as a quantized checkpoint "
     "(its quanto support loads no saved weights), so nothing was exported",
     "m is quantized (int8): transformers cannot load that layout as a quantized checkpoint "
     "(its quanto support loads no saved weights), so nothing was exported; `export "
     "--dequantize` writes full-precision weights"),
    (E.NothingToPack("unpack"), "nothing to unpack: name one or more models, or all of them",
     "nothing to unpack: name one or more models, or pass --all"),
    (E.StoreNotFound("/s"), "no store at /s",
     "no store at /s (run `mstore init` or set --store / MSTORE_HOME)"),
    (E.RegistryCorrupt("/r", "bad JSON"),
     "registry /r is damaged (bad JSON); it was not modified",
     "registry /r is damaged (bad JSON); it was not modified. Restore it, or run "
     "`mstore fsck --lost-found` to set it aside and name the commits that remain"),
    (E.RegistryMissing("/r"),
     "registry /r is missing but the store holds objects: the store is damaged and nothing "
     "was changed",
     "registry /r is missing but the store holds objects: the store is damaged and nothing "
     "was changed; `mstore fsck` lists its commits and `mstore fsck --lost-found` names them "
     "again"),
    (E.LicenseNotAccepted("mit"),
     "license 'mit' not accepted (accept_license=True accepts it); nothing was written",
     "license 'mit' not accepted: pass --accept-license (or answer yes at a terminal "
     "prompt); nothing was written"),
    (E.SizeLimitExceeded("org/m", 4096, 1024),
     f"org/m is larger than max_size: needs {fmt_bytes(4096)}, limit is {fmt_bytes(1024)}",
     f"org/m is larger than --max-size: needs {fmt_bytes(4096)}, limit is {fmt_bytes(1024)}"),
    (E.InvalidSetting("top_p", "in (0, 1]"), "top_p must be in (0, 1]",
     "--top-p must be in (0, 1]"),
    (E.InvalidSetting("temperature", ">= 0"), "temperature must be >= 0",
     "--temperature must be >= 0"),
    (E.TrainingInterrupted(3), "interrupted at step 3; nothing committed",
     "interrupted at step 3; nothing committed (--commit-on-interrupt keeps the partial model)"),
    (E.CommitFailed("disk full", "/k"),
     "commit failed (disk full); nothing was committed. The trained model is saved in /k",
     "commit failed (disk full); nothing was committed. The trained model is saved in /k: "
     "once the store has room, commit it with `mstore train --resume-commit /k`"),
    (E.CommitFailed("disk full", None, "no room"),
     "commit failed (disk full), and the trained model could not be saved either (no room); "
     "nothing was committed",
     "commit failed (disk full), and the trained model could not be saved either (no room); "
     "nothing was committed"),
    (E.WorkersFailed(1), "the training processes failed (torchrun exited 1)",
     "the training processes failed (torchrun exited 1); rerun with --debug to see their "
     "output"),
    (E.NotFastForward("base", "a" * 64, "b" * 64, "origin"),
     f"local 'base' ({'a' * 12}) and 'origin''s ({'b' * 12}) have diverged",
     f"local 'base' ({'a' * 12}) and 'origin''s ({'b' * 12}) have diverged; pull with --as "
     "NEW_NAME to keep both, or --force to replace the local ref"),
    (E.LocalRefWouldMove("base", "a" * 64, "origin", "child", "b" * 64),
     f"local ref 'base' already points at {'a' * 12}; pulling 'child' from 'origin' would "
     f"move it to {'b' * 12}",
     f"local ref 'base' already points at {'a' * 12}; pulling 'child' from 'origin' would "
     f"move it to {'b' * 12}; pull with --as NEW_NAME to keep both, or --force to move it"),
    (E.CommitNeedsRefName("abcdef1"),
     "'abcdef1' is a commit, not a ref: name the remote ref (as_name)",
     "'abcdef1' is a commit, not a ref: name the remote ref with --as NAME"),
]


@pytest.mark.parametrize("err,library,cli", WORDED, ids=lambda x: type(x).__name__
                         if isinstance(x, Exception) else "")
def test_the_cli_error_table_restores_each_hint(err, library, cli):
    assert str(err) == library and not FLAG.search(library)
    assert error_message(err) == cli


def test_every_worded_error_is_covered_here():
    assert set(CLI_WORDING) <= {type(err) for err, _, _ in WORDED}


def test_errors_without_a_cli_wording_are_shown_as_they_are():
    err = E.UnknownModel("x")
    assert error_message(err) == str(err)
    assert error_message(ValueError("boom")) == \
        "unexpected ValueError: boom (rerun with --debug for the traceback)"


# -- reporters ---------------------------------------------------------------------------
def test_the_silent_reporter_reports_nothing(capsys):
    SILENT.message("hello")
    SILENT.warning("careful")
    with SILENT.progress(10, "x") as bar:
        bar.update(5)
        bar.set_postfix_str("loss=1")
    bar = SILENT.tqdm_class()(total=3)
    bar.update(3)
    bar.close()
    assert bar.disable
    assert capsys.readouterr() == ("", "")


def test_the_terminal_reporter_writes_escaped_lines_to_stderr(capsys):
    rep = TerminalReporter()
    assert not rep.progress_bars  # pytest's stderr is no terminal
    rep.message("plain \x1b[2J line")
    rep.warning("mind\nthis")
    assert isinstance(rep.progress(10, "x"), Progress)
    out, err = capsys.readouterr()
    assert out == "" and err == "plain \\x1b[2J line\nwarning: mind\\nthis\n"


@pytest.mark.parametrize("as_json,bars", [(False, True), (True, False)])
def test_the_terminal_reporter_shows_bars_only_on_a_terminal_without_json(
        monkeypatch, as_json, bars):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    rep = TerminalReporter(as_json)
    assert rep.progress_bars is bars
    bar = rep.progress(10, "converting")
    assert (type(bar) is not Progress) is bars
    bar.close()
    assert bool(getattr(rep.tqdm_class()(total=1, file=sys.stderr), "disable")) is not bars


def test_the_transformers_loading_bar_is_hidden_for_one_call_and_restored():
    from transformers import core_model_loading
    from transformers.utils import logging as tf_logging

    from mstore.adapters.transformers_loading import _quiet_loading_bar

    def mine(factory, args, kwargs):
        return factory(*args, **kwargs)

    previous = tf_logging.set_tqdm_hook(mine)
    try:
        with _quiet_loading_bar():
            bar = core_model_loading.tqdm([1, 2], desc="Loading weights")
            assert isinstance(bar, tf_logging.EmptyTqdm) and list(bar) == [1, 2]
        assert tf_logging.set_tqdm_hook(mine) is mine  # the caller's hook is back
    finally:
        tf_logging.set_tqdm_hook(previous)
