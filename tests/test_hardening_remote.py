"""Hardening of remotes (issue 11, items 4, 5 and the remote half of 12).

4: a pull never moves an existing local ref that is not this store's copy of the ref pulled
   (refused before anything is written); a push refused for a moved remote ref sends nothing.
5: push, pull and clone carry exactly gc's keep set (`reachability.closure`): gc deletes
   nothing afterwards and a second pull receives nothing.
12: invalid entries in a remote's registry.json are reported, skipped, never fatal and never
   used as paths; a push leaves them as they are.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from mstore.remote import sync as R
from mstore.store.gc import reachable
from mstore.store.repo import Store
from tests.conftest import Cli, snapshot
from tests.test_remote import (  # noqa: F401 - s3_endpoint and s3_env are fixtures
    count_uploads, fsck_clean, make_child, new_bucket, s3_endpoint, s3_env,
)


def objects_of(store: Store) -> set[str]:
    return {oid for oid, _st in store.objects.iter_objects()}


def keep_set(store: Store) -> set[str]:
    return reachable(store).keep()


def gc_deletes_nothing(cli: Cli) -> None:
    doc = json.loads(cli("gc", "--grace", "0", "--json").stdout)
    assert doc["objects_deleted"] == 0 and doc["deleted"] == [], doc


@pytest.fixture
def family(cli, store, model_dirs):
    """`base` (tiny qwen2) and `child`, a fine-tune of it with one tensor changed."""
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    base = store.resolve("base").commit
    child = make_child(store, "child", "base", seed=3)
    return base, child


# -- item 5: transfer exactly what gc keeps ----------------------------------------------
def test_push_child_sends_gc_keep_set_only(cli, store, family, tmp_path, monkeypatch):
    base, child = family
    url = str(tmp_path / "remote")
    cli("remote", "add", "origin", url)
    sent = count_uploads(monkeypatch)
    out = json.loads(cli("push", "child", "--json").stdout)
    remote = Store(Path(url))
    keep = keep_set(remote)
    assert set(sent) == keep and len(sent) == len(keep) == out["objects_sent"]
    # History (the parent's manifest) goes along, the parent's own weights do not.
    assert base in sent and child in sent
    only_base = store.read_manifest(base).object_ids() - store.read_manifest(child).object_ids()
    assert only_base and not (only_base & set(sent))
    assert objects_of(remote) == keep
    gc_deletes_nothing(Cli(Path(url)))
    fsck_clean(remote)

    # Clone the child only: gc there deletes nothing, a second pull receives nothing.
    dest = tmp_path / "clone"
    doc = json.loads(cli("clone", url, dest, "--json").stdout)
    assert doc["objects_received"] == len(keep)
    mine = Cli(dest)
    gc_deletes_nothing(mine)
    assert objects_of(Store(dest)) == keep
    text = mine("pull", "child").stdout
    assert text == f"child: up to date ({child[:12]})\n"
    again = json.loads(mine("pull", "child", "--json").stdout)
    assert again["objects_sent"] == 0 and again["note"] == "up to date"

    # Then the base is pushed too: only what the base's own manifest adds travels, both ways.
    sent = count_uploads(monkeypatch)
    cli("push", "base")
    assert set(sent) == only_base
    got = json.loads(mine("pull", "base", "--json").stdout)
    assert got["ref_updated"] and got["objects_sent"] == len(only_base)
    gc_deletes_nothing(mine)
    gc_deletes_nothing(Cli(Path(url)))
    fsck_clean(Store(dest))


def test_pull_into_empty_store_agrees_with_gc(cli, store, family, tmp_path):
    """The same on a pull (not a clone) from an object-store-like backend (memory://)."""
    _base, child = family
    url = f"memory://mstore-{uuid.uuid4().hex[:8]}/models"
    cli("remote", "add", "origin", url)
    cli("push", "child")
    other = Cli(tmp_path / "other")
    other("remote", "add", "origin", url)
    first = json.loads(other("pull", "child", "--json").stdout)
    mine = Store(tmp_path / "other")
    assert objects_of(mine) == keep_set(mine)
    assert first["objects_sent"] == len(keep_set(mine))
    gc_deletes_nothing(other)
    again = json.loads(other("pull", "child", "--json").stdout)
    assert again["objects_sent"] == 0 and again["note"] == "up to date"
    fsck_clean(mine)


# -- item 4: a pull never silently moves a local ref --------------------------------------
def clone_into(url: str, dest: Path, ref: str) -> Cli:
    R.clone(url, dest, ref)
    return Cli(dest)


@pytest.fixture
def remote_family(cli, family, tmp_path):
    url = str(tmp_path / "remote")
    cli("remote", "add", "origin", url)
    cli("push", "base")
    cli("push", "child")
    return url, family


def test_pull_as_existing_ref_refused_even_fast_forward(remote_family, tmp_path):
    url, (base, child) = remote_family
    b = clone_into(url, tmp_path / "b", "base")
    bob = Store(tmp_path / "b")
    before = snapshot(bob.root)
    res = b("pull", "child", "--as", "base", ok=False)
    assert res.exit_code == 1
    assert res.stderr == (f"error: local ref 'base' already points at {base[:12]}; pulling "
                          f"'child' from 'origin' would move it to {child[:12]}; pull with "
                          "--as NEW_NAME to keep both, or --force to move it\n")
    assert snapshot(bob.root) == before  # nothing fetched, nothing changed
    # --as a free name is fine; --force moves it and says so.
    b("pull", "child", "--as", "base-ft")
    out = b("pull", "child", "--as", "base", "--force").stdout
    assert out.startswith(f"pulled base <- origin: {child[:12]} (was {base[:12]})  [forced]")
    assert bob.resolve("base").commit == child
    fsck_clean(bob)


def test_pull_same_name_moves_only_a_tracked_ref(remote_family, store, tmp_path):
    """A local ref of the same name that this store never got from that remote ref (here a
    tag) is not moved by a fast-forward; one it did get (a clone) is."""
    url, (base, child) = remote_family
    b = clone_into(url, tmp_path / "b", "base")
    bob = Store(tmp_path / "b")
    b("tag", "base", "child")  # local 'child' at the base commit: not origin's 'child'
    before = snapshot(bob.root)
    res = b("pull", "child", ok=False)
    assert res.exit_code == 1
    assert res.stderr.startswith("error: local ref 'child' already points at "
                                 f"{base[:12]}; pulling 'child' from 'origin' would move it")
    assert snapshot(bob.root) == before
    # The tracked ref: origin's base moves on (a fast-forward) and bob's pull follows it.
    c = clone_into(url, tmp_path / "c", "base")
    new = make_child(store, "base", "base", seed=11)
    R.push(store, "base")
    got = json.loads(c("pull", "base", "--json").stdout)
    assert got["ref_updated"] and not got["forced"] and got["commit"] == new


def test_diverged_pull_refused_before_fetching(remote_family, tmp_path):
    url, (base, child) = remote_family
    b = clone_into(url, tmp_path / "b", "base")
    bob = Store(tmp_path / "b")
    mine = make_child(bob, "base", "base", seed=7)  # bob's own fine-tune, not pushed
    before = snapshot(bob.root)
    res = b("pull", "child", "--as", "base", ok=False)
    assert res.exit_code == 1
    assert res.stderr == (f"error: local 'base' ({mine[:12]}) and 'origin''s ({child[:12]}) "
                          "have diverged; pull with --as NEW_NAME to keep both, or --force "
                          "to replace the local ref\n")
    assert snapshot(bob.root) == before  # the child's objects were not fetched first


def test_pull_behind_fetches_nothing(remote_family, tmp_path):
    """A local ref ahead of the remote's: no ref moves, and no weights gc would drop come."""
    url, (base, child) = remote_family
    b = clone_into(url, tmp_path / "b", "child")
    bob = Store(tmp_path / "b")
    objects = objects_of(bob)
    out = b("pull", "base", "--as", "child").stdout
    assert out == f"child: local child is ahead of origin's base ({base[:12]})\n"
    assert objects_of(bob) == objects and bob.resolve("child").commit == child
    gc_deletes_nothing(b)


def test_refused_push_sends_nothing(cli, store, model_dirs, tmp_path, monkeypatch):
    url = str(tmp_path / "remote")
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", url)
    cli("push", "m")
    other = Cli(tmp_path / "other")
    other("import", model_dirs["qwen3"], "--accept-license", "--name", "m")
    other("remote", "add", "origin", url)
    before = snapshot(Path(url))
    sent = count_uploads(monkeypatch)
    res = other("push", "m", ok=False)
    assert res.exit_code == 1
    assert res.stderr == (f"error: remote ref 'm' on 'origin' moved to "
                          f"{store.resolve('m').commit[:12]} since your last pull/push; "
                          "pull first or use --force\n")
    assert sent == [] and snapshot(Path(url)) == before


# -- item 12: invalid entries in a remote's registry --------------------------------------
HOSTILE = {
    "../../evil": "not a valid model name",
    "UPPER": "not a valid model name",
    "a/b": "not a valid model name",
    "\x1b[2Jx": "not a valid model name",
    "renamed": "its model_name differs from its key",
    "notdict": "entry is not an object",
    "nocommit": "commit is not a 64-hex object id",
}


def poison(models: dict, good: str) -> dict:
    entry = models[good]
    out = dict(models)
    for name in ("../../evil", "UPPER", "a/b", "\x1b[2Jx"):
        out[name] = {**entry, "model_name": name}
    out["renamed"] = {**entry, "model_name": "other"}
    out["notdict"] = ["x"]
    out["nocommit"] = {**entry, "model_name": "nocommit", "commit": "../../../etc/passwd"}
    return out


def warning_lines(remote: str) -> list[str]:
    return sorted(f"warning: remote {remote!r} has an invalid entry {n!r} ({why}); ignored"
                  for n, why in HOSTILE.items())


@pytest.fixture
def hostile_remote(cli, store, model_dirs, tmp_path):
    url = str(tmp_path / "deep" / "remote")
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", url)
    cli("push", "m")
    reg = Path(url) / "registry.json"
    doc = json.loads(reg.read_text())
    doc["models"] = poison(doc["models"], "m")
    reg.write_text(json.dumps(doc))
    return url


def test_clone_skips_invalid_remote_entries(hostile_remote, store, tmp_path):
    dest = tmp_path / "deep" / "clone"
    res = Cli(tmp_path / "elsewhere")("clone", hostile_remote, dest)
    assert sorted(res.stderr.splitlines()) == warning_lines("origin")
    assert res.stdout.splitlines()[-1].startswith(f"cloned {hostile_remote} into {dest}: 1 ref(s)")
    mine = Store(dest)
    assert list(mine.refs()) == ["m"] and mine.resolve("m").commit == store.resolve("m").commit
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["clone", "remote"]
    assert not (tmp_path / "evil").exists()
    fsck_clean(mine)
    # The library returns them and prints nothing.
    again = R.clone(hostile_remote, tmp_path / "lib")
    assert sorted((s["name"], s["reason"]) for s in again.skipped) == sorted(HOSTILE.items())
    assert [r.name for r in again.refs] == ["m"]


def test_pull_and_clone_ref_of_invalid_entry(hostile_remote, tmp_path):
    other = Cli(tmp_path / "other")
    other("remote", "add", "origin", hostile_remote)
    res = other("pull", "m")
    assert sorted(res.stderr.splitlines()) == warning_lines("origin")
    assert res.stdout.startswith("pulled m <- origin: ")
    doc = json.loads(other("pull", "m", "--json").stdout)
    assert sorted(s["name"] for s in doc["skipped"]) == sorted(HOSTILE)
    before = snapshot(tmp_path / "other")
    res = other("pull", "renamed", ok=False)
    assert res.exit_code == 1
    assert res.stderr.splitlines()[-1] == ("error: remote 'origin' has an invalid entry "
                                           "'renamed' (its model_name differs from its key); it was "
                                           "not used")
    assert snapshot(tmp_path / "other") == before
    res = other("pull", "../../evil", ok=False)
    assert res.exit_code == 1 and res.stderr.startswith("error: bad model name '../../evil'")
    res = other("clone", hostile_remote, tmp_path / "c", "--ref", "nocommit", ok=False)
    assert res.exit_code == 1 and res.stderr == (
        f"error: remote {hostile_remote!r} has an invalid entry 'nocommit' (commit is not a "
        "64-hex object id); it was not used\n")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["path", "memory", "s3"])
def test_push_keeps_invalid_entries_as_they_are(kind, cli, store, model_dirs, tmp_path,
                                                request):
    """Each way of swapping the remote registry: the store's lock, a lock object, If-Match."""
    if kind == "s3":
        url = f"s3://{new_bucket(request.getfixturevalue('s3_env'))}/models"
    elif kind == "memory":
        url = f"memory://mstore-{uuid.uuid4().hex[:8]}/models"
    else:
        url = str(tmp_path / "remote")
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "m")
    cli("remote", "add", "origin", url)
    cli("push", "m")
    t = R.open_transport(url)
    doc = json.loads(t.read_registry_raw())
    doc["models"] = poison(doc["models"], "m")
    if kind == "path":
        Path(url, "registry.json").write_text(json.dumps(doc))
    else:
        t.fs.pipe_file(t.registry_key, json.dumps(doc).encode())
    make_child(store, "m", "m", seed=2)
    res = cli("push", "m")
    assert sorted(res.stderr.splitlines()) == warning_lines("origin")
    after = json.loads(t.read_registry_raw())["models"]
    assert after["m"]["commit"] == store.resolve("m").commit
    assert {k: v for k, v in after.items() if k != "m"} == {
        k: v for k, v in doc["models"].items() if k != "m"}
