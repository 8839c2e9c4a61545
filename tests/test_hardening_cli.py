"""Hardening of the CLI's surface (issue 11, items 9, 18, 21): outside strings never reach the
terminal raw, usage errors are one line, a closed pipe ends quietly, --version, completion,
aliases in --help, and one JSON vocabulary with a `du` that counts each commit once."""

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from importlib.metadata import version
from pathlib import Path

import pytest

from mstore.cli.app import app
from mstore.cli.output import json_text, print_table, safe_lines, safe_text
from tests.conftest import REPO_ROOT, Cli, run_mstore, snapshot
from tests.hub_server import clean_environ

# Everything a hostile string may try: an OSC title, a bell, clear screen, a carriage return
# and a newline that forge a line, a tab, a C1 CSI, a bidi override and isolate, a BOM.
EVIL = "\x1b]0;pwned\x07\x1b[2J\r\nFAKE OUTPUT\t\x9b31m\u202egnp.exe\u2066\ufeff"
CARD_LICENSE = "mit\x1b[2J\nFAKE: ok\u202e\x85"


def raw_controls(text: str) -> list[str]:
    """Every control or format character in `text` except the line ends themselves."""
    return [hex(ord(c)) for c in text if c != "\n"
            and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs")]


def assert_clean(res, *, code: int | None = 0) -> None:
    if code is not None:
        assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    assert raw_controls(res.stdout) == [], res.stdout
    assert raw_controls(res.stderr) == [], res.stderr


def assert_one_error_line(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    assert_clean(res, code=code)
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    for n in needles:
        assert n in res.stderr, (n, res.stderr)


# -- item 9: the escape itself -------------------------------------------------------------
def test_a_table_escapes_controls_before_it_measures_and_takes_any_cell(capsys):
    """Widths are those of what is shown (the escaped text); numbers and None are cells too."""
    print_table([("NAME", "N", "NOTE"), ("a" + EVIL, 7, None), ("bb", 12345, "ok")])
    lines = capsys.readouterr().out.splitlines()
    assert not raw_controls("".join(lines)) and len(lines) == 3
    shown = safe_text("a" + EVIL)
    assert lines[1] == f"{shown}  {7:<5}  None" and lines[2] == f"{'bb':<{len(shown)}}  12345  ok"
    assert lines[0] == f"{'NAME':<{len(shown)}}  N      NOTE"


def test_safe_text_makes_every_control_visible_and_is_idempotent():
    s = safe_text(EVIL)
    assert raw_controls(s) == [] and "\n" not in s
    for form in ("\\x1b]0;pwned\\x07", "\\r\\n", "\\t", "\\x9b", "\\u202e", "\\u2066",
                 "\\ufeff"):
        assert form in s
    assert safe_text(s) == s
    assert safe_text("plain ascii, ünïcode ✓") == "plain ascii, ünïcode ✓"
    assert safe_text("a\udcff") == "a\\udcff"  # an undecodable file name byte
    assert safe_lines("one\x1b\ntwo\u2028") == "one\\x1b\ntwo\\u2028"


def test_json_text_is_exact_json_without_raw_controls():
    doc = {"license": CARD_LICENSE, EVIL: [EVIL, "\U000e0001tag"], "n": 1}
    text = json_text(doc)
    assert json.loads(text) == doc and raw_controls(text) == []


# -- item 9: every command, every outside string --------------------------------------------
def _hostile_model(src: Path, dest_parent: Path) -> Path:
    folder = dest_parent / f"tiny{EVIL}model"
    shutil.copytree(src, folder)
    yaml_license = json.dumps(CARD_LICENSE)  # a JSON string is a YAML double-quoted string
    (folder / "README.md").write_text(f"---\nlicense: {yaml_license}\n---\n# card\n")
    return folder


@pytest.mark.slow
def test_every_command_escapes_every_outside_string(tmp_path, model_dirs, monkeypatch):
    root = tmp_path / f"store{EVIL}"
    monkeypatch.setenv("MSTORE_HOME", str(root))
    cli = Cli(root)
    src = _hostile_model(model_dirs["qwen2"], tmp_path)

    res = cli("init")
    assert_clean(res)
    assert "\\x1b]0;pwned\\x07" in res.stdout and res.stdout.count("\n") == 1
    res = cli("import", src, "--name", "base", "--accept-license")
    assert_clean(res)
    assert "license: mit\\x1b[2J\\nFAKE" in res.stderr  # the card, said once, escaped
    assert_clean(cli("import", src, "--name", "base2", "--accept-license"))
    assert_clean(cli("import", src, "--accept-license", "--json"))

    for args in (["list"], ["ls"], ["show", "base"], ["info", "base", "--tensors"],
                 ["log", "base"], ["log", "--all"], ["log", "--all", "--graph"], ["du"]):
        res = cli(*args)
        assert_clean(res)
    show = cli("show", "base").stdout
    assert "license       mit\\x1b[2J\\nFAKE: ok\\u202e\\x85" in show
    assert "FAKE: ok" not in show.replace("\\nFAKE: ok", "")  # no forged line
    # --json stays exact: the data is the card's, byte for byte, and the text holds no raw control
    for args in (["list", "--json"], ["show", "base", "--json"], ["log", "base", "--json"]):
        res = cli(*args)
        assert_clean(res)
        doc = json.loads(res.stdout)
        first = doc[0] if isinstance(doc, list) else doc
        assert first["license"] == CARD_LICENSE
    assert json.loads(cli("show", "base", "--json").stdout)["model_id"] == src.name

    # train on a dataset whose folder and file name carry controls, from a config likewise
    data = tmp_path / f"data{EVIL}"
    data.mkdir()
    corpus = data / f"corpus{EVIL}.txt"
    corpus.write_text(("The quick brown fox jumps over the lazy dog. " * 6 + "\n") * 8)
    cfg = data / "train.yaml"
    cfg.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in dict(
        model_name="base", dataset=str(corpus), learning_rate=2e-3, batch_size=4,
        max_steps=4, seq_len=16, warmup_steps=1, eval_interval=4, seed=0,
        device="cpu").items()) + "\n")
    res = cli("train", "--config", cfg, "--name", "child")
    assert_clean(res)
    for args in (["log", "child"], ["log", "--all", "--graph"], ["show", "child"],
                 ["diff", "base", "child"], ["du"], ["fsck"], ["gc", "--dry-run"], ["gc"]):
        assert_clean(cli(*args))
    assert "on corpus\\x1b]0;pwned" in cli("log", "child").stdout
    assert_one_error_line(cli("train", "--config", cfg, "--set", f"lerning{EVIL}=1", ok=False),
                          1, "lerning\\x1b")
    assert_one_error_line(cli("train", "--config", tmp_path / f"no{EVIL}.yaml", ok=False), 1)

    res = cli("generate", "child", "--prompt", "the", "-n", "12", "--temperature", "0")
    assert res.exit_code == 0 and raw_controls(res.stderr) == []  # stdout: exact to a pipe
    out = tmp_path / f"export{EVIL}"
    res = cli("export", "child", out)
    assert_clean(res)
    assert "export\\x1b]0;pwned" in res.stdout

    assert_clean(cli("tag", "base", "t1"))
    assert_clean(cli("rm", "t1"))
    for args in (["tag", "base", f"t{EVIL}"], ["rm", f"gone{EVIL}"], ["show", f"x{EVIL}"],
                 ["diff", "base", f"y{EVIL}"], ["gc", "--grace", f"1{EVIL}"],
                 ["import", str(tmp_path / f"missing{EVIL}")], ["list", f"--fr{EVIL}ob"],
                 [f"frob{EVIL}"], ["generate", "base", "-n", f"x{EVIL}"],
                 ["remote", "add", f"bad{EVIL}", str(tmp_path)]):
        res = cli(*args, ok=False)
        assert res.exit_code in (1, 2), (args, res.stderr)
        assert_one_error_line(res, res.exit_code)

    # remotes: a URL with controls, its listing, push, pull, clone, rm
    remote_dir = tmp_path / f"remote{EVIL}"
    for args in (["remote", "add", "origin", remote_dir], ["remote", "list"],
                 ["remote", "list", "--json"], ["push", "base"], ["push", "child"],
                 ["pull", "base", "--as", "base4"], ["pull", "child"]):
        res = cli(*args)
        assert_clean(res)
    assert "remote\\x1b]0;pwned" in cli("remote", "list").stdout
    res = cli("clone", remote_dir, tmp_path / f"clone{EVIL}")
    assert_clean(res)
    assert "into " in res.stdout and "clone\\x1b]0;pwned" in res.stdout
    assert_clean(cli("remote", "rm", "origin"))

    # a registry entry written by hand with a hostile name: listed or refused, never raw
    reg = json.loads((root / "registry.json").read_text())
    reg["models"][f"evil{EVIL}"] = {**reg["models"]["base"], "model_name": f"evil{EVIL}"}
    (root / "registry.json").write_text(json.dumps(reg))
    for args in (["list"], ["fsck"], ["du"], ["log", "--all"], ["show", "base"]):
        assert_clean(cli(*args, ok=False), code=None)

    # and as a separate process, on a real (non-tty) stdout and stderr
    proc = run_mstore("show", "base", store=root)
    assert proc.returncode == 0 and raw_controls(proc.stdout + proc.stderr) == []
    proc = run_mstore("show", f"nope{EVIL}", store=root)
    assert proc.returncode == 1 and raw_controls(proc.stderr) == []
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


# -- item 18: usage errors, broken pipes, --version, completion, aliases -------------------
@pytest.mark.parametrize("args, needle", [
    (["list", "--frobnicate"], "no such option: --frobnicate"),
    (["frobnicate"], "no such command 'frobnicate'"),
    (["tag", "only-one"], "missing argument"),
    (["generate", "m", "--max-new-tokens", "lots"], "--max-new-tokens"),
    (["gc", "--grace", "soon"], "not a duration"),
    (["log"], "name a model, or pass --all"),
    (["remote", "add", "origin"], "missing argument"),
    (["fsck", "--read-data-subset", "9/2"], "n/t"),
    (["--store"], "--store"),
])
def test_usage_errors_are_one_line_exit_2_and_change_nothing(cli, store_path, model_dirs,
                                                             args, needle):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    before = snapshot(store_path)
    res = cli.runner.invoke(app,
                            args if args == ["--store"] else ["--store", str(store_path), *args])
    assert_one_error_line(res, 2, needle, "--help`)")
    assert res.stdout == "" and snapshot(store_path) == before


def test_usage_error_as_a_process_is_one_line(tmp_path):
    proc = run_mstore("show", "--no-such-flag", store=tmp_path / "s")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "error: no such option: --no-such-flag (see `mstore show --help`)\n"


def _many_refs(cli, store_path, model_dirs, n: int) -> None:
    """n refs to one commit, written as the registry stores them (tagging n times is slow)."""
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    reg_path = store_path / "registry.json"
    reg = json.loads(reg_path.read_text())
    entry = reg["models"]["m"]
    for i in range(n):
        reg["models"][f"m-{i:05d}"] = {**entry, "model_name": f"m-{i:05d}"}
    reg_path.write_text(json.dumps(reg))


@pytest.mark.parametrize("args, codes", [(["list"], (141,)), (["ls"], (141,)),
                                         # one big write: CPython drops the unread rest
                                         (["list", "--json"], (0, 141))])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(cli, store_path, model_dirs,
                                                                 args, codes):
    _many_refs(cli, store_path, model_dirs, 3000)  # far more than a pipe buffer
    env = clean_environ()
    proc = subprocess.Popen([sys.executable, "-m", "mstore", "--store", str(store_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT,
                            env=env)
    first = proc.stdout.readline()  # what `| head -1` does: one line, then close
    proc.stdout.close()
    err = proc.stderr.read()
    rc = proc.wait(timeout=60)
    assert first and rc in codes and err == b"", (rc, err)  # 141 = 128 + SIGPIPE, as git


def test_version_is_the_installed_one_and_imports_no_torch():
    code = ("import sys\nfrom mstore.cli.app import main\nsys.argv = ['mstore', '--version']\n"
            "try:\n    main()\nexcept SystemExit as e:\n"
            "    print('torch' in sys.modules, e.code, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert proc.stdout == f"mstore {version('mstore')}\n"
    assert proc.stderr.split() == ["False", "0"]


def test_the_executable_skips_teardown_but_runs_atexit_and_flushes(tmp_path):
    """`mstore` (`cli.run`) leaves with os._exit even without torch: what it printed and
    the atexit handlers (temp folders, logging) must still happen, with its exit status."""
    code = ("import atexit, gc, sys\nfrom mstore.cli import run\n"
            "atexit.register(lambda: print('atexit ran', file=sys.stderr))\n"
            "atexit.register(lambda: print('collector on', gc.isenabled(), file=sys.stderr))\n"
            f"sys.argv = ['mstore', '--store', {str(tmp_path)!r}, 'show', 'nope']\n"
            "try:\n    run()\nexcept SystemExit:\n    print('after run', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 1
    # the collector, off while the modules loaded, is back on for the command
    assert proc.stderr.splitlines()[-2:] == ["collector on True", "atexit ran"]
    assert "after run" not in proc.stderr
    assert proc.stderr.count("error:") == 1


def test_shell_completion_completes_commands_and_options(tmp_path):
    env = {**clean_environ(), "_MSTORE_COMPLETE": "complete_bash"}
    for words, cword, want in (("mstore li", "1", "list"), ("mstore show --te", "2", "--tensors"),
                               ("mstore remote a", "2", "add")):
        proc = subprocess.run([sys.executable, "-m", "mstore"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=60,
                              env={**env, "COMP_WORDS": words, "COMP_CWORD": cword})
        assert proc.returncode == 0 and want in proc.stdout.split(), (words, proc.stdout)
    # typer takes the shell from the process tree (shellingham), not from the word after
    # the flag: run it under a bash, as a user's terminal does (a detached test run has none)
    proc = subprocess.run(["bash", "-c", '"$@"; exit $?', "bash", sys.executable, "-m", "mstore",
                           "--store", str(tmp_path), "--show-completion"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                          env=clean_environ())
    assert proc.returncode == 0 and "_mstore_completion" in proc.stdout, proc.stderr


def test_help_shows_each_alias_beside_its_command(cli):
    out = cli("--help").stdout
    for row in ("list (ls)", "show (info)", "rm (delete)", "--version", "--install-completion",
                "--show-completion"):
        assert row in out
    for alias, cmd in (("ls", "list"), ("info", "show"), ("delete", "rm")):
        assert f"Alias of {cmd}" in cli(alias, "--help").stdout


# -- item 21: one JSON vocabulary; du counts each commit once -------------------------------
SHARED = {"name", "names", "commit", "parent", "architecture", "model_id", "license",
          "created_at"}


def test_json_outputs_share_one_vocabulary(cli, store_path, model_dirs, tmp_path):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "a")
    cli("tag", "a", "b")
    lst = json.loads(cli("list", "--json").stdout)
    show = json.loads(cli("show", "b", "--json").stdout)
    log = json.loads(cli("log", "a", "--json").stdout)
    row = {r["name"]: r for r in lst}["b"]
    # SPEC's registry fields stay, and the shared names sit beside them with the same values
    assert set(row) >= {"model_name", "architecture_type", "fine_tuned_from", "size_bytes",
                        "parameters"} | SHARED - {"names"}
    assert set(show) >= SHARED and set(log[0]) >= SHARED - {"name"}
    for key in SHARED - {"name", "names"}:
        assert row[key] == show[key] == log[0][key], key
    assert show["names"] == log[0]["names"] == ["a", "b"] and row["name"] == "b"
    assert row["architecture"] == row["architecture_type"] == show["architecture"]
    assert row["license"] is None and show["license"] is None  # unknown: null in JSON ...
    assert "license       unknown" in cli("show", "a").stdout  # ... "unknown" in text
    assert row["parent"] is None
    diff = json.loads(cli("diff", "a", "b", "--json").stdout)
    assert diff["a"]["name"] == "a" and diff["b"]["commit"] == row["commit"]


def test_du_counts_a_commit_once_however_many_names_it_has(cli, store_path, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "a")
    one = json.loads(cli("du", "--json").stdout)
    cli("tag", "a", "b")
    cli("tag", "a", "c")
    three = json.loads(cli("du", "--json").stdout)
    assert three["logical_bytes"] == one["logical_bytes"] == three["physical_bytes"]
    assert three["dedup_ratio"] == 1.0 and (three["refs"], three["commits"]) == (3, 1)
    [row] = three["models"]
    assert row["names"] == ["a", "b", "c"] and row["unique_bytes"] == row["logical_bytes"]
    text = cli("du").stdout
    assert "dedup ratio 1.00x" in text and "a, b, c" in text
    # a second commit sharing most objects: the ratio says so
    cli("import", model_dirs["qwen2-changed"], "--accept-license", "--name", "d")
    two = json.loads(cli("du", "--json").stdout)
    assert two["commits"] == 2 and two["dedup_ratio"] > 1.5


# -- item 22: docs and output show paths a reader can retype --------------------------------
def test_docs_show_no_paths_of_the_machine_they_were_made_on():
    import re

    machine = re.compile(r"(/tmp/|/work/|/root/|/home/|/Users/)")
    for doc in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        hits = [f"{doc.name}:{i}" for i, line in enumerate(doc.read_text().splitlines(), 1)
                if machine.search(line)]
        assert hits == [], hits


@pytest.mark.slow
def test_paths_under_the_working_folder_are_shown_relative(cli, tmp_path, model_dirs,
                                                           monkeypatch):
    from mstore.cli.output import shown_path

    work = tmp_path / "work"
    shutil.copytree(model_dirs["qwen2"], work / "tiny")
    monkeypatch.chdir(work)
    assert shown_path(work / "tiny") == "tiny" and shown_path("rel/x") == "rel/x"
    assert shown_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
    cli("import", "tiny", "--accept-license", "--name", "t")
    assert "local folder tiny\n" in cli("show", "t").stdout
    # the manifest keeps where it came from in full
    assert json.loads(cli("show", "t", "--json").stdout)["manifest"]["source"]["path"] == \
        os.path.realpath(work / "tiny")
    assert "to out: " in cli("export", "t", "out").stdout


@pytest.mark.slow
def test_generated_text_is_escaped_on_a_terminal_and_exact_to_a_pipe(cli, store_path, tmp_path,
                                                                    model_dirs):
    """A model's output can hold any control character: a terminal gets it escaped, a pipe
    or file gets exactly what the tokenizer decoded (test_generate_export checks that)."""
    import pty

    from tests.test_generate_export import PROMPT, lively

    cli("import", lively(model_dirs["qwen2"], tmp_path / "lively"), "--accept-license",
        "--name", "q")
    args = ["generate", "q", "--prompt", PROMPT, "-n", "24", "--temperature", "0"]
    piped = run_mstore(*args, store=store_path)
    assert piped.returncode == 0 and raw_controls(piped.stdout), "no control to escape"
    master, slave = pty.openpty()
    env = {**clean_environ(), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mstore", "--store", str(store_path), *args],
                            stdout=slave, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    shown = b"".join(chunks).decode().replace("\r\n", "\n")
    assert raw_controls(shown) == [], shown
    assert shown == safe_lines(piped.stdout)
