"""The remote layer's two contracts: one compare-and-swap per transport, and a reporter.

`Transport.set_ref_if_equals` behaves the same on every backend (a path, a lock-object
backend, S3's If-Match); push, pull and clone hand progress and warnings to the reporter
they are given and never print themselves.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

import mstore.remote
from mstore.cli.output import TerminalReporter
from mstore.remote import transports as T
from mstore.reporting import SILENT, Progress, Reporter
from mstore.store.repo import Store
from tests.test_remote import (  # noqa: F401 - s3_endpoint and s3_env are fixtures
    fsck_clean, new_bucket, s3_endpoint, s3_env,
)


class Recorder(Reporter):
    """Keeps what the library hands over."""

    progress_bars = True

    def __init__(self):
        self.warnings: list[str] = []
        self.bars: list[dict] = []

    def warning(self, text: str) -> None:
        self.warnings.append(text)

    def progress(self, total, desc, unit="B") -> Progress:
        bar = {"total": total, "desc": desc, "unit": unit, "done": 0, "closed": False}
        self.bars.append(bar)

        class Bar(Progress):
            def update(self, n: int = 1) -> None:
                bar["done"] += n

            def close(self) -> None:
                bar["closed"] = True

        return Bar()


def entry(name: str, commit: str) -> dict:
    return {"model_name": name, "commit": commit}


def registry_of(t: T.Transport) -> dict:
    return json.loads(t.read_registry_raw())["models"]


@pytest.fixture(params=["path", "memory", "s3"])
def transport(request, tmp_path) -> T.Transport:
    if request.param == "s3":
        url = f"s3://{new_bucket(request.getfixturevalue('s3_env'))}/models"
    elif request.param == "memory":
        url = f"memory://mstore-{uuid.uuid4().hex[:8]}/models"
    else:
        Store(tmp_path / "remote").init()
        url = str(tmp_path / "remote")
    return T.open_transport(url)


def test_set_ref_if_equals_on_every_backend(transport):
    a, b = "a" * 64, "b" * 64
    assert transport.ref("m") is None
    assert transport.set_ref_if_equals("m", None, entry("m", a))  # absent, as expected
    assert transport.ref("m") == a
    assert not transport.set_ref_if_equals("m", None, entry("m", b))  # not absent any more
    assert not transport.set_ref_if_equals("m", b, entry("m", b))  # holds a, not b
    assert transport.ref("m") == a
    assert transport.set_ref_if_equals("m", a, entry("m", b))
    assert transport.ref("m") == b
    assert transport.set_ref_if_equals("other", None, entry("other", a))
    assert transport.set_ref_if_equals("m", b, None)  # None: delete it
    assert transport.ref("m") is None and registry_of(transport) == {"other": entry("other", a)}
    assert transport.set_ref_if_equals("m", None, None)  # already absent: nothing to write


def test_set_ref_if_equals_keeps_entries_it_cannot_read(transport):
    a = "a" * 64
    transport.set_ref_if_equals("m", None, entry("m", a))
    doc = json.loads(transport.read_registry_raw())
    doc["models"]["../evil"] = {"model_name": "../evil", "commit": a}
    transport.fs.pipe_file(transport.registry_key, json.dumps(doc).encode())
    assert transport.set_ref_if_equals("n", None, entry("n", a))
    assert registry_of(transport)["../evil"] == {"model_name": "../evil", "commit": a}


def test_push_pull_clone_report_progress_and_print_nothing(cli, store, model_dirs, tmp_path,
                                                           capsys):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    url = str(tmp_path / "remote")
    mstore.remote.add_remote(store, "origin", url)
    capsys.readouterr()
    pushed_by = Recorder()
    pushed = mstore.remote.push(store, "m", reporter=pushed_by)
    [bar] = pushed_by.bars
    assert bar["desc"] == "push" and bar["unit"] == "B" and bar["closed"]
    assert 0 < bar["done"] == bar["total"] <= pushed.bytes_sent

    other = Store(tmp_path / "other")
    mstore.remote.add_remote(other, "origin", url)
    pulled_by = Recorder()
    pulled = mstore.remote.pull(other, "m", reporter=pulled_by)
    [bar] = pulled_by.bars
    assert bar["desc"] == "pull" and bar["closed"] and 0 < bar["done"] <= pulled.bytes_sent

    cloned_by = Recorder()
    mstore.remote.clone(url, tmp_path / "clone", reporter=cloned_by)
    assert [b["desc"] for b in cloned_by.bars] == ["pull"]
    assert pushed_by.warnings == pulled_by.warnings == cloned_by.warnings == []
    assert capsys.readouterr() == ("", "")
    fsck_clean(Store(tmp_path / "clone"))


def test_a_stale_lock_is_a_warning_to_the_reporter(cli, store, model_dirs, capsys):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    url = f"memory://mstore-{uuid.uuid4().hex[:8]}/models"
    mstore.remote.add_remote(store, "origin", url)
    t = T.open_transport(url)
    t.fs.pipe_file(f"{t.root}/{T.REMOTE_LOCK}",
                   json.dumps({"token": "x", "host": "hostA", "pid": 42,
                               "created": time.time() - 3600}).encode())
    capsys.readouterr()
    rec = Recorder()
    mstore.remote.push(store, "m", reporter=rec)
    [warning] = rec.warnings
    assert warning.startswith(f"breaking a stale lock on {url} (pid 42 on hostA, ")
    assert capsys.readouterr() == ("", "")
    assert t.ref("m") == store.resolve("m").commit


def test_silent_by_default_and_the_cli_reporter_off_a_terminal(capsys):
    import inspect

    for fn in (mstore.remote.push, mstore.remote.pull, mstore.remote.clone):
        assert inspect.signature(fn).parameters["reporter"].default is SILENT
    for as_json in (False, True):  # pytest's stderr is not a terminal
        rep = TerminalReporter(as_json)
        assert not rep.progress_bars and type(rep.progress(10, "push")) is Progress
    TerminalReporter(False).warning("careful\x1b[2J")
    assert capsys.readouterr().err == "warning: careful\\x1b[2J\n"


def test_the_remote_package_exports_what_the_cli_uses():
    for name in ("push", "pull", "clone", "add_remote", "remove_remote", "list_remotes",
                 "tracking_refs", "TransferResult", "CloneResult"):
        assert name in mstore.remote.__all__ and hasattr(mstore.remote, name)
    assert Path(mstore.remote.__file__).parent.name == "remote"
