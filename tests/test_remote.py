"""Remotes: remote add/list/rm, push, pull, clone over a path, file:// and s3:// (moto).

Every backend runs the same round trip: an interrupted push that resumes without re-sending
what arrived, a second push that sends nothing, a pull into an empty store, fsck clean on
both sides, a corrupted remote object refused on pull, and two pushes racing on one ref.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from mstore.remote import sync as R
from mstore.remote import transports as T
from mstore.remote.config import local_path
from mstore.cli.app import app
from mstore.cli.remote import register
from mstore.store.fsck import check
from mstore.store.manifest import Manifest
from mstore.store.repo import Store
from tests.conftest import REPO_ROOT, Cli

register(app)  # idempotent: harmless once cli.py registers the commands itself
_REAL_UPLOAD_ONE = R._upload_one


# -- helpers -----------------------------------------------------------------------------
def fsck_clean(store: Store) -> None:
    errors = [f.line() for f in check(store) if f.error]
    assert not errors, errors


def make_child(store: Store, name: str, parent_name: str, seed: int = 1) -> str:
    """A fine-tune-shaped child of `parent_name` with one tensor changed (no torch)."""
    parent = store.resolve(parent_name).commit
    m = store.read_manifest(parent)
    tensors = dict(m.tensors)
    key = sorted(tensors)[0]
    t = tensors[key]
    n = 2 * t.numel  # BF16
    with store.objects.batch() as b:
        res = b.put_tensor_bytes(t.dtype, t.shape, bytes((i * 7 + seed) % 251 for i in range(n)))
    tensors[key] = type(t)(res.oid, t.dtype, t.shape)
    child = Manifest(architecture=m.architecture, model_id=m.model_id,
                     source={"type": "finetune"}, license=m.license, config=m.config,
                     files=m.files, tensors=tensors, parent=parent, message=f"child {seed}",
                     tied_weights=m.tied_weights, training={"steps": 1})
    commit = store.put_manifest(child)
    current = (store.refs()[name].commit if name in store.refs() else None)
    store.registry.set_ref(store.registry_entry(name, commit, child, parent_name),
                           expected=current)
    return commit


def count_uploads(monkeypatch, fail_after: int | None = None) -> list[str]:
    """Record every object the pusher sends; optionally fail after `fail_after` of them."""
    sent: list[str] = []
    lock = threading.Lock()
    real = _REAL_UPLOAD_ONE

    def upload_one(store, transport, oid):
        with lock:
            if fail_after is not None and len(sent) >= fail_after:
                raise ConnectionResetError("connection reset by peer (simulated)")
            sent.append(oid)
        real(store, transport, oid)

    monkeypatch.setattr(R, "_upload_one", upload_one)
    return sent


class Backend:
    """One kind of remote: its URL and how to read what it holds."""

    def __init__(self, kind: str, url: str, fs=None, root: str | None = None):
        self.kind, self.url, self.fs, self.root = kind, url, fs, root

    def store_copy(self, tmp_path: Path) -> Store:
        """The remote as a Store on disk (itself for a local remote, a download for S3)."""
        if self.fs is None:
            return Store(Path(local_path(self.url)))
        dest = tmp_path / f"s3-copy-{uuid.uuid4().hex[:6]}"
        self.fs.invalidate_cache()
        self.fs.get(self.root + "/", str(dest), recursive=True)
        return Store(dest)

    def object_key(self, oid: str) -> str:
        return f"{self.root}/objects/{oid[:2]}/{oid[2:]}"

    def corrupt(self, oid: str) -> None:
        if self.fs is None:
            path = Store(Path(local_path(self.url))).objects.path(oid)
            os.chmod(path, 0o644)
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
        else:
            data = bytearray(self.fs.cat_file(self.object_key(oid)))
            data[len(data) // 2] ^= 0x01
            self.fs.pipe_file(self.object_key(oid), bytes(data))


# -- S3 through moto's threaded server (as s3fs's own tests do) -----------------------------
@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    # botocore's standard variable: credentials and endpoint stay out of remotes.json
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def new_bucket(fs) -> str:
    bucket = f"mstore-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    return bucket


@pytest.fixture(params=["path", "file-url", "s3"])
def backend(request, tmp_path):
    if request.param == "s3":
        fs = request.getfixturevalue("s3_env")
        bucket = new_bucket(fs)
        return Backend("s3", f"s3://{bucket}/team/models", fs, f"{bucket}/team/models")
    path = tmp_path / "remote"
    return Backend(request.param, str(path) if request.param == "path" else f"file://{path}")


# -- the round trip, on every backend ----------------------------------------------------
def test_push_pull_roundtrip(backend, cli, store, model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(T, "SMALL_OBJECT", 4096)  # larger objects come through a temp file
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", backend.url)
    commit = store.resolve("m").commit
    total = len(store.read_manifest(commit).object_ids()) + 1  # + the manifest

    # Interrupted after 5 objects: the ref is not set, and a retry sends only the rest.
    sent = count_uploads(monkeypatch, fail_after=5)
    res = cli("push", "m", "origin", ok=False)
    assert res.exit_code == 1 and res.stderr.startswith("error: "), res.stderr
    assert "connection reset" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert sent and len(sent) == 5
    assert "m" not in (R.open_transport(backend.url).read_registry() or {})

    sent = count_uploads(monkeypatch)
    out = json.loads(cli("push", "m", "--json").stdout)  # default remote: the only one
    assert len(sent) == total - 5 and out["objects_sent"] == total - 5
    assert out["objects_present"] == 5 and out["ref_updated"] and out["commit"] == commit

    sent = count_uploads(monkeypatch)
    assert "everything up to date" in cli("push", "m").stdout
    assert sent == []

    remote_store = backend.store_copy(tmp_path)
    assert remote_store.resolve("m").commit == commit
    fsck_clean(remote_store)
    assert remote_store.refs()["m"] == store.refs()["m"]

    # Pull into an empty store.
    other = Cli(tmp_path / "other")
    other("remote", "add", "origin", backend.url)
    text = other("pull", "m").stdout
    assert f"pulled m <- origin: {commit[:12]}" in text
    mine = Store(tmp_path / "other")
    fsck_clean(mine)
    assert mine.refs()["m"] == store.refs()["m"]
    assert {o for o, _ in mine.objects.iter_objects()} == {o for o, _ in store.objects.iter_objects()}
    again = json.loads(other("pull", "m", "--json").stdout)
    assert again["objects_sent"] == 0 and not again["ref_updated"] and again["note"] == "up to date"

    # A corrupted remote object is refused, naming it; nothing is published locally.
    victim = max(store.read_manifest(commit).tensors.values(), key=lambda t: t.numel).object
    backend.corrupt(victim)
    third = Cli(tmp_path / "third")
    third("remote", "add", "origin", backend.url)
    res = third("pull", "m", ok=False)
    assert res.exit_code == 1
    assert res.stderr.startswith(f"error: object {victim} received from 'origin' is corrupt")
    fresh = Store(tmp_path / "third")
    assert not fresh.objects.exists(victim) and fresh.refs() == {}
    assert list(fresh.objects.iter_objects()) == []
    assert not any(fresh.objects.tmp_dir.iterdir())
    fsck_clean(fresh)


# -- two pushes racing on one ref ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["path", "s3", "s3-lock-object"])
def test_concurrent_pushes_one_wins(kind, cli, store, model_dirs, tmp_path, monkeypatch,
                                    request):
    if kind == "path":
        url = str(tmp_path / "remote")
        transport_cls = T.LocalTransport
    else:
        fs = request.getfixturevalue("s3_env")
        url = f"s3://{new_bucket(fs)}/models"
        if kind == "s3-lock-object":
            monkeypatch.setenv("MSTORE_REMOTE_CAS", "lock")
            transport_cls = T.Transport
        else:
            transport_cls = T.S3Transport
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    b_cli = Cli(tmp_path / "b")
    b_cli("import", model_dirs["qwen2-changed"], "--accept-license", "--name", "m")
    a, b = store, Store(tmp_path / "b")
    assert a.resolve("m").commit != b.resolve("m").commit
    for s in (a, b):
        R.add_remote(s, "origin", url)

    # Both finish uploading, then race for the ref at the same moment.
    barrier = threading.Barrier(2, timeout=30)
    real = transport_cls.update_registry

    def racing(self, change, warn):
        barrier.wait()
        return real(self, change, warn)

    monkeypatch.setattr(transport_cls, "update_registry", racing)
    results: dict[str, object] = {}

    def run(label, s):
        try:
            results[label] = R.push(s, "m", "origin")
        except Exception as e:  # noqa: BLE001
            results[label] = e

    threads = [threading.Thread(target=run, args=(lbl, s)) for lbl, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    monkeypatch.setattr(transport_cls, "update_registry", real)

    won = [k for k, v in results.items() if isinstance(v, R.TransferResult)]
    lost = [k for k, v in results.items() if not isinstance(v, R.TransferResult)]
    assert len(won) == 1 and len(lost) == 1, results
    err = results[lost[0]]
    winner, loser = (a, b) if won == ["a"] else (b, a)
    assert isinstance(err, R.RemoteRefMoved), repr(err)
    assert str(err) == (f"remote ref 'm' on 'origin' moved to {winner.resolve('m').commit[:12]} "
                        "since your last pull/push; pull first or use --force")
    remote_models = R.open_transport(url).read_registry()
    assert remote_models["m"]["commit"] == winner.resolve("m").commit
    # --force overrides it.
    forced = R.push(loser, "m", "origin", force=True)
    assert forced.forced and forced.previous == winner.resolve("m").commit
    assert R.open_transport(url).read_registry()["m"]["commit"] == loser.resolve("m").commit
    if kind != "path":
        assert not fs.exists(url.split("://")[-1] + "/" + T.REMOTE_LOCK)  # lock object gone


# -- history: fast-forwards, moved refs, divergence --------------------------------------
def test_fast_forward_and_moved_ref(cli, store, model_dirs, tmp_path):
    url = str(tmp_path / "remote")
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", url)
    cli("push", "m")
    base = store.resolve("m").commit

    bob = Cli(tmp_path / "bob")
    bob("clone", url, tmp_path / "bob2")  # clone makes a store with origin
    bob_store = Store(tmp_path / "bob2")
    assert R.list_remotes(bob_store) == {"origin": url}
    assert bob_store.resolve("m").commit == base
    fsck_clean(bob_store)

    # Alice fine-tunes and pushes: a fast-forward; the child's parent chain goes along.
    child = make_child(store, "m", "m")
    out = cli("push", "m").stdout
    assert f"pushed m -> origin: {child[:12]} (was {base[:12]})" in out
    # Bob pushes his (older) m: the remote ref moved since he last saw it.
    bob2 = Cli(tmp_path / "bob2")
    res = bob2("push", "m", ok=False)
    assert res.exit_code == 1
    assert res.stderr == (f"error: remote ref 'm' on 'origin' moved to {child[:12]} since your "
                          "last pull/push; pull first or use --force\n")
    # Bob pulls: a fast-forward; only the changed tensor and the manifest arrive.
    got = json.loads(bob2("pull", "m", "--json").stdout)
    assert got["ref_updated"] and got["previous"] == base and got["commit"] == child
    assert got["objects_sent"] == 2
    assert bob_store.resolve("m").commit == child
    assert bob_store.refs()["m"].fine_tuned_from == "m"
    fsck_clean(bob_store)

    # Bob's own child, pushed on top: a fast-forward again, accepted.
    bob_child = make_child(bob_store, "m", "m", seed=5)
    assert R.push(bob_store, "m").previous == child
    # Alice, still at `child`, makes another child: her push is refused, her pull diverges.
    make_child(store, "m", "m", seed=9)
    with pytest.raises(R.RemoteRefMoved):
        R.push(store, "m")
    with pytest.raises(R.NotFastForward):
        R.pull(store, "m")
    kept = R.pull(store, "m", as_name="m-bob")
    assert kept.ref_updated and store.resolve("m-bob").commit == bob_child
    fsck_clean(store)
    fsck_clean(Store(Path(url)))


def test_push_a_commit_needs_a_name(cli, store, model_dirs, tmp_path):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", tmp_path / "remote")
    commit = store.resolve("m").commit
    res = cli("push", commit[:10], ok=False)
    assert "is a commit, not a ref" in res.stderr
    cli("push", commit[:10], "--as", "snapshot")
    assert Store(tmp_path / "remote").resolve("snapshot").commit == commit
    res = cli("pull", "nope", ok=False)
    assert res.stderr.startswith("error: remote 'origin' has no model 'nope' (it has: snapshot)")


def test_clone_one_ref_and_resume(cli, store, model_dirs, tmp_path):
    url = f"file://{tmp_path / 'remote'}"
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "a")
    cli("import", model_dirs["qwen3"], "--accept-license", "--name", "b")
    cli("remote", "add", "origin", url)
    cli("push", "a")
    cli("push", "b")
    one = tmp_path / "one"
    out = cli("clone", url, one, "--ref", "b").stdout
    assert f"cloned {url} into {one}: 1 ref(s)" in out
    assert list(Store(one).refs()) == ["b"]
    fsck_clean(Store(one))
    # Cloning again into the same folder resumes (adds what is missing).
    doc = json.loads(cli("clone", url, one, "--json").stdout)
    assert [r["name"] for r in doc["refs"]] == ["a", "b"]
    assert sorted(Store(one).refs()) == ["a", "b"]
    fsck_clean(Store(one))
    # Into a folder that holds something else: refused.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    res = cli("clone", url, tmp_path / "busy", ok=False)
    assert "exists and is not empty" in res.stderr
    res = cli("clone", str(tmp_path / "nothing-here"), tmp_path / "new", ok=False)
    assert "is not an mstore store" in res.stderr and not (tmp_path / "new").exists()


# -- configuration -----------------------------------------------------------------------
def test_remote_config(cli, store, tmp_path):
    cli("remote", "add", "origin", "s3://bucket/models")
    cli("remote", "add", "backup", tmp_path / "b")
    cli("remote", "add", "local", "file://" + str(tmp_path / "c"))
    rows = json.loads(cli("remote", "list", "--json").stdout)
    assert rows == [{"name": "backup", "url": str(tmp_path / "b"), "refs": {}},
                    {"name": "local", "url": f"file://{tmp_path / 'c'}", "refs": {}},
                    {"name": "origin", "url": "s3://bucket/models", "refs": {}}]
    doc = json.loads((store.root / "remotes.json").read_text())
    assert doc == {"version": 1, "remotes": {r["name"]: r["url"] for r in rows}}
    assert "backup" in cli("remote", "list").stdout
    for args, msg in [
        (("add", "origin", "/x"), "remote 'origin' already exists"),
        (("add", "Bad/Name", "/x"), "bad remote name 'Bad/Name'"),
        (("add", "creds", "s3://AKIA:secret@bucket/x"), "credentials in the URL are never stored"),
        (("add", "odd", "nosuchproto://x"), "unknown protocol 'nosuchproto'"),
        (("add", "self", str(store.root)), "that is this store itself"),
        (("rm", "nope"), "unknown remote 'nope'"),
    ]:
        res = cli("remote", *args, ok=False)
        assert res.exit_code == 1 and msg in res.stderr, (args, res.stderr)
    assert "secret" not in (store.root / "remotes.json").read_text()
    # Two remotes, none named origin after rm: the remote must be named.
    cli("remote", "rm", "origin")
    res = cli("push", "x", ok=False)
    assert "several are configured (backup, local)" in res.stderr
    res = cli("push", "x", "nowhere", ok=False)
    assert "unknown remote 'nowhere'" in res.stderr


def test_remote_commands_do_not_import_torch(tmp_path, model_dirs, cli):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", tmp_path / "remote")
    code = (
        "import sys\n"
        "from mstore.cli.app import app\n"
        "from mstore.cli.remote import register\n"
        "register(app)\n"
        "for args in (['remote', 'list'], ['push', 'm'], ['pull', 'm']):\n"
        "    try:\n"
        "        app(['--store', sys.argv[1], *args], prog_name='mstore')\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(cli.store_path)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_interrupted_pull_resumes(cli, store, model_dirs, tmp_path, monkeypatch):
    url = str(tmp_path / "remote")
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", url)
    cli("push", "m")
    commit = store.resolve("m").commit
    total = len(store.read_manifest(commit).object_ids())
    other = Store(tmp_path / "other")
    R.add_remote(other, "origin", url)
    # Objects are published in synced batches of 5; the pull is cut after 12 arrived.
    monkeypatch.setattr(R, "BATCH_OBJECTS", 5)
    from mstore.store.objects import ObjectBatch

    real_put = ObjectBatch.put_file
    calls = []

    def put_file(self, path):
        if len(calls) == 12:
            raise KeyboardInterrupt
        calls.append(path)
        return real_put(self, path)

    monkeypatch.setattr(ObjectBatch, "put_file", put_file)
    with pytest.raises(KeyboardInterrupt):
        R.pull(other, "m")
    assert len(list(other.objects.iter_objects())) == 10 and other.refs() == {}
    assert not any(other.objects.tmp_dir.iterdir())
    monkeypatch.setattr(ObjectBatch, "put_file", real_put)
    fetched = []
    real_fetch = T.LocalTransport.fetch
    monkeypatch.setattr(T.LocalTransport, "fetch",
                        lambda self, oid, size, tmp, packed=False: (
                            fetched.append(oid), real_fetch(self, oid, size, tmp, packed))[1])
    res = R.pull(other, "m")
    assert len(fetched) == total - 10 and res.objects_sent == total - 10 + 1  # + manifest
    assert res.objects_present == 10 and other.resolve("m").commit == commit
    fsck_clean(other)


def test_lock_object_backend(cli, store, model_dirs, tmp_path, monkeypatch):
    """A backend without conditional writes (memory://): the registry.json.lock object."""
    import time

    url = f"memory://mstore-{uuid.uuid4().hex[:8]}/models"
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", url)
    t = R.open_transport(url)
    assert type(t) is T.Transport
    lock = f"{t.root}/{T.REMOTE_LOCK}"
    # A live lock: the push waits MSTORE_LOCK_TIMEOUT, then names the holder.
    monkeypatch.setenv("MSTORE_LOCK_TIMEOUT", "0.3")
    t.fs.pipe_file(lock, json.dumps({"token": "x", "host": "hostA", "pid": 42,
                                     "created": time.time()}).encode())
    res = cli("push", "m", ok=False)
    assert res.exit_code == 75
    assert res.stderr.startswith(f"error: remote registry {url} is locked by pid 42 on hostA")
    # A stale one (a pusher that died an hour ago) is broken, with a warning.
    t.fs.pipe_file(lock, json.dumps({"token": "x", "host": "hostA", "pid": 42,
                                     "created": time.time() - 3600}).encode())
    res = cli("push", "m")
    assert "warning: breaking a stale lock" in res.stderr and "pid 42 on hostA" in res.stderr
    assert not t.fs.exists(lock)
    assert t.read_registry()["m"]["commit"] == store.resolve("m").commit
    other = Store(tmp_path / "other")
    R.add_remote(other, "origin", url)
    assert R.pull(other, "m").commit == store.resolve("m").commit
    fsck_clean(other)
