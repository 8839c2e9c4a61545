"""The CLI's exit once torch is loaded: os._exit after atexit and a flush, never a lost byte."""

import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT, run_mstore


def run_exit(body: str) -> subprocess.CompletedProcess:
    code = "import atexit, sys, threading, time\nimport torch\nfrom mstore.cli.app import _exit\n" \
        + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)


def test_fast_exit_runs_atexit_and_flushes_buffered_output():
    res = run_exit("""
        atexit.register(lambda: print("atexit ran"))
        sys.stdout.write("x" * 100_000)  # more than a pipe buffer, still in Python's buffer
        _exit(3)
    """)
    assert res.returncode == 3
    assert res.stdout == "x" * 100_000 + "atexit ran\n"


def test_fast_exit_statuses_as_the_interpreter_gives_them():
    assert run_exit("_exit(None)").returncode == 0
    res = run_exit("_exit('bad thing')")
    assert (res.returncode, res.stderr) == (1, "bad thing\n")


def test_a_live_non_daemon_thread_gets_the_normal_exit():
    res = run_exit("""
        def late():
            time.sleep(0.5)
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
        _exit(0)
    """)
    assert (res.returncode, res.stdout) == (0, "thread finished\n")


@pytest.mark.slow
def test_generate_as_a_process_prints_its_whole_output(cli, model_dirs, store_path):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q")
    args = ["generate", "q", "--prompt", "hello", "--max-new-tokens", "12", "--temperature", "0"]
    in_process = cli(*args).stdout
    res = run_mstore(*args, store=store_path)
    assert (res.returncode, res.stdout, res.stderr) == (0, in_process, "")
    missing = run_mstore("generate", "nope", "--prompt", "x", store=store_path)
    assert missing.returncode == 1 and missing.stderr.startswith("error: unknown model 'nope'")
