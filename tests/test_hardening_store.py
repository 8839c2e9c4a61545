"""Issue 11, items 1, 11, 12 (local) and 14: a damaged or missing registry, dangling commits
and lost-found, commit-like names, invalid registry entries, stores that do not exist."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mstore.cli.app import app
from mstore.errors import RegistryCorrupt
from mstore.store.manifest import Manifest
from mstore.store.registry import parse_registry, parse_registry_entries
from mstore.store.repo import Store
from tests.conftest import snapshot

DAMAGES = {
    "missing": None,
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty-object": lambda raw: b"{}",
    "zero-bytes": lambda raw: b"",
    "no-version": lambda raw: b'{"models": {}}',
}


@pytest.fixture
def two_models(cli, store, model_dirs):
    """q2 (qwen2), its fine-tune-shaped child q2-child, and q3 (qwen3)."""
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q2")
    cli("import", model_dirs["qwen3"], "--accept-license", "--name", "q3")
    parent = store.resolve("q2").commit
    m = store.read_manifest(parent)
    child = Manifest(architecture=m.architecture, model_id=m.model_id,
                     source={"type": "finetune"}, license=m.license, config=m.config,
                     files=m.files, tensors=m.tensors, parent=parent,
                     message="child of q2\nsecond line", tied_weights=m.tied_weights)
    commit = store.put_manifest(child)
    store.registry.set_ref(store.registry_entry("q2-child", commit, child, "q2"), expected=None)
    return store


def _damage(store: Store, how: str) -> None:
    path = store.registry.path
    if DAMAGES[how] is None:
        path.unlink()
    else:
        path.write_bytes(DAMAGES[how](path.read_bytes()))


def _backdate(store: Store) -> int:
    n = 0
    for oid, _st in store.objects.iter_objects():
        os.utime(store.objects.path(oid), (1_000_000, 1_000_000))
        n += 1
    return n


def _one_error_line(res) -> str:
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    return res.stderr.strip()


# -- item 1: a store whose registry is lost or damaged -----------------------------------
@pytest.mark.parametrize("how", sorted(DAMAGES))
def test_gc_deletes_nothing_when_the_registry_is_lost_or_damaged(cli, two_models, how):
    store = two_models
    n = _backdate(store)
    _damage(store, how)
    before = snapshot(store.root)
    for args in (["gc", "--grace", "0"], ["gc", "--dry-run", "--grace", "0"],
                 ["gc", "--grace", "0", "--json"]):
        res = cli(*args, ok=False)
        assert res.exit_code == 1 and res.stdout == ""
        line = _one_error_line(res)
        assert "damaged" in line and "mstore fsck --lost-found" in line
        assert snapshot(store.root) == before
    assert sum(1 for _ in store.objects.iter_objects()) == n


@pytest.mark.parametrize("how", ["missing", "empty-object"])
def test_writers_refuse_a_damaged_store_and_leave_it_byte_identical(cli, two_models, model_dirs,
                                                                    tmp_path, how):
    store = two_models
    _damage(store, how)
    (store.root / ".lock").unlink()  # even the lock file must not be made by a refusal
    before = snapshot(store.root)
    for args in (["tag", "q2", "q2-again"], ["rm", "q2"], ["init"],
                 ["import", model_dirs["qwen2-changed"], "--accept-license", "--name", "new"],
                 ["import", model_dirs["qwen2-changed"], "--accept-license"],
                 ["remote", "add", "origin", str(tmp_path / "remote")],
                 ["gc"]):
        res = cli(*args, ok=False)
        assert res.exit_code == 1, args
        # import describes its source on stderr first (item 2 moves its checks earlier)
        line = res.stderr.splitlines()[-1] if args[0] == "import" else _one_error_line(res)
        assert line.startswith("error: ") and "damaged" in line and "--lost-found" in line, line
        assert snapshot(store.root) == before, args


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_pull_and_push_refuse_a_damaged_store(cli, two_models, tmp_path, how):
    store = two_models
    cli("remote", "add", "origin", str(tmp_path / "remote"))
    cli("push", "q2")
    _damage(store, how)
    before = snapshot(store.root)
    for args in (["pull", "q2"], ["pull", "q2", "--as", "q2-copy"], ["push", "q3"]):
        res = cli(*args, ok=False)
        assert res.exit_code == 1 and "damaged" in _one_error_line(res), args
        assert snapshot(store.root) == before


def test_tag_of_a_dangling_child_records_its_parents_name(cli, two_models):
    child = two_models.resolve("q2-child").commit
    cli("rm", "q2-child")
    cli("tag", child[:8], "child-back")
    assert two_models.refs()["child-back"].fine_tuned_from == "q2"


def test_registry_missing_message_is_exact(cli, two_models):
    _damage(two_models, "missing")
    res = cli("tag", "q2", "other", ok=False)
    assert res.stderr == (
        f"error: registry {two_models.registry.path} is missing but the store holds objects: "
        "the store is damaged and nothing was changed; `mstore fsck` lists its commits and "
        "`mstore fsck --lost-found` names them again\n")


@pytest.mark.parametrize("how", ["missing", "truncated"])
def test_read_commands_say_the_store_is_damaged_not_empty(cli, two_models, how):
    store = two_models
    commit = store.resolve("q2").commit
    _damage(store, how)
    before = snapshot(store.root)
    for args in (["list"], ["ls", "--json"], ["show", "q2"], ["show", commit[:10]],
                 ["log", "q2"], ["log", "--all"], ["du"], ["diff", "q2", "q3"]):
        res = cli(*args, ok=False)
        assert res.exit_code == 1, args
        assert "damaged" in _one_error_line(res) and "no models" not in res.stdout
    assert snapshot(store.root) == before


@pytest.mark.slow
def test_train_refuses_a_store_whose_registry_is_missing(cli, two_models, tmp_path):
    store = two_models
    _damage(store, "missing")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world " * 200)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_name: null\ndataset: {corpus}\nmax_steps: 1\nbatch_size: 2\n"
                   "seq_len: 8\nn_layers: 1\nd_model: 16\nn_heads: 2\ndevice: cpu\n")
    before = snapshot(store.root)
    res = cli("train", "--config", cfg, ok=False)
    assert res.exit_code == 1 and "damaged" in _one_error_line(res)
    assert snapshot(store.root) == before


def test_fsck_lists_dangling_tips_with_id_date_and_message(cli, two_models):
    store = two_models
    child, q3 = store.resolve("q2-child").commit, store.resolve("q3").commit
    q2 = store.resolve("q2").commit
    _damage(store, "missing")
    before = snapshot(store.root)
    res = cli("fsck", ok=False)
    assert res.exit_code == 1
    lines = res.stdout.splitlines()
    assert any(line.startswith("error bad-registry:") and "missing" in line for line in lines)
    dangling = [line for line in lines if "dangling-commit" in line]
    assert len(dangling) == 2  # q2 comes back as q2-child's history, not as a tip
    child_line = next(line for line in dangling if child[:12] in line)
    created = store.read_manifest(child).created_at
    assert child_line == f"info  dangling-commit: {child[:12]} {created} child of q2"
    assert not any(q2[:12] in line for line in dangling)
    doc = json.loads(cli("fsck", "--json", ok=False).stdout)
    assert not doc["ok"] and {d["commit"] for d in doc["dangling"]} == {child, q3}
    d = next(d for d in doc["dangling"] if d["commit"] == child)
    assert d["message"] == "child of q2\nsecond line" and d["created_at"] == created
    assert d["short_commit"] == child[:12] and d["weights_present"] is True
    assert snapshot(store.root) == before


def test_fsck_of_a_healthy_store_lists_a_removed_model_as_dangling_and_stays_ok(cli, two_models):
    q3 = two_models.resolve("q3").commit
    cli("rm", "q3")
    res = cli("fsck")
    assert f"info  dangling-commit: {q3[:12]}" in res.stdout
    assert res.stdout.splitlines()[-1] == "ok: no problems found"


@pytest.mark.parametrize("how", ["missing", "truncated", "empty-object"])
def test_lost_found_round_trip_restores_usable_models(cli, two_models, how):
    store = two_models
    child, q3 = store.resolve("q2-child").commit, store.resolve("q3").commit
    q2 = store.resolve("q2").commit
    damaged = None if how == "missing" else store.registry.path
    _damage(store, how)
    old_bytes = damaged.read_bytes() if damaged else None
    res = cli("fsck", "--lost-found", ok=False)
    assert res.exit_code == 1  # the damage it found is still reported
    assert f"restored lost-found-{child[:12]} -> {child[:12]}" in res.stdout
    assert f"restored lost-found-{q3[:12]} -> {q3[:12]}" in res.stdout
    aside = sorted(store.root.glob("registry.json.corrupt-*"))
    if damaged:
        assert len(aside) == 1 and aside[0].read_bytes() == old_bytes
        assert f"moved the damaged registry.json to {aside[0]}" in res.stdout
    else:
        assert aside == []
    rows = json.loads(cli("list", "--json").stdout)
    assert {r["model_name"]: r["commit"] for r in rows} == {
        f"lost-found-{child[:12]}": child, f"lost-found-{q3[:12]}": q3}
    assert cli("fsck").stdout.splitlines()[-1] == "ok: no problems found"
    log = json.loads(cli("log", f"lost-found-{child[:12]}", "--json").stdout)
    assert [e["commit"] for e in log] == [child, q2]
    shown = json.loads(cli("show", f"lost-found-{q3[:12]}", "--json").stdout)
    assert shown["commit"] == q3 and shown["weights_present"]
    assert cli("tag", f"lost-found-{q3[:12]}", "q3").exit_code == 0
    res = cli("fsck", "--lost-found")
    assert "nothing to restore: no dangling commits" in res.stdout


def test_lost_found_json_and_an_incomplete_commit_is_not_named(cli, two_models):
    store = two_models
    q3 = store.resolve("q3").commit
    cli("rm", "q3")
    m = store.read_manifest(q3)
    victim = sorted(m.object_ids() - store.read_manifest(store.resolve("q2").commit).object_ids())[0]
    os.unlink(store.objects.path(victim))
    doc = json.loads(cli("fsck", "--lost-found", "--json").stdout)
    assert doc["lost_found"] == {"registry_created": False, "registry_moved_to": None,
                                 "named": [], "skipped": [
                                     {"commit": q3, "reason": "some of its objects are missing"}]}
    assert "q3" not in {r["model_name"] for r in json.loads(cli("list", "--json").stdout)}


def test_tag_names_a_dangling_commit_by_full_id_or_prefix(cli, two_models):
    store = two_models
    q3 = store.resolve("q3").commit
    cli("rm", "q3")
    assert cli("tag", q3[:9], "back").stdout.strip() == f"tagged back -> {q3[:12]}"
    cli("rm", "back")
    cli("tag", q3, "back-again")
    assert store.resolve("back-again").commit == q3
    assert cli("show", q3[:7], "--json").exit_code == 0
    tensor = next(iter(store.read_manifest(q3).tensors.values())).object
    before = snapshot(store.root)
    res = cli("tag", tensor, "nope", ok=False)
    assert _one_error_line(res) == f"error: object {tensor[:12]} is not a commit (it is not a manifest)"
    assert snapshot(store.root) == before


def test_gc_dry_run_writes_nothing_not_even_a_lock_file(cli, two_models):
    store = two_models
    cli("rm", "q3")
    _backdate(store)
    for name in (".lock", "registry.lock"):
        (store.root / name).unlink(missing_ok=True)
    before = snapshot(store.root)
    res = cli("gc", "--dry-run", "--grace", "0")
    assert res.stdout.startswith("would delete ") and snapshot(store.root) == before


def test_a_valid_empty_registry_is_an_empty_store(cli, store, model_dirs):
    cli("init")
    assert cli("list").stdout.strip() == "no models (try `mstore import`)"
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q2")
    cli("rm", "q2")
    store.registry.path.write_text('{"version": 1, "models": {}}')
    _backdate(store)
    res = cli("gc", "--grace", "0")  # a readable, empty registry: everything may go
    assert res.stdout.startswith("deleted ") and not store.objects.holds_any()


# -- item 11: names that read as commit prefixes -----------------------------------------
@pytest.mark.parametrize("name", ["deadbeef1", "1234567", "00a6df3c", "abcdefabcdefabcdef"])
def test_commit_like_names_are_refused(cli, two_models, model_dirs, name):
    before = snapshot(two_models.root)
    msg = (f"error: bad model name {name!r}: 7 or more hex digits (0-9 a-f) read as a commit "
           "id prefix; put a character outside 0-9 a-f in it (e.g. a '-v1' suffix)")
    assert _one_error_line(cli("tag", "q2", name, ok=False)) == msg
    assert _one_error_line(cli("import", model_dirs["qwen2-changed"], "--accept-license",
                               "--name", name, ok=False)) == msg
    assert snapshot(two_models.root) == before


def test_names_near_the_hex_rule_are_fine(cli, two_models):
    for name in ("abcdef", "deadbeef-1", "cafe12g", "v1234567"):
        cli("tag", "q2", name)


def test_default_name_from_a_hex_folder_is_not_commit_like(cli, store, model_dirs, tmp_path):
    folder = tmp_path / "0123456789abcdef0123"
    shutil.copytree(model_dirs["qwen2"], folder)
    cli("import", folder, "--accept-license")
    assert [r["model_name"] for r in json.loads(cli("list", "--json").stdout)] == [
        "model-0123456789abcdef0123"]


# -- item 12 (local): invalid registry entries --------------------------------------------
def _add_invalid_entries(store: Store) -> dict:
    doc = json.loads(store.registry.path.read_text())
    good = doc["models"]["q3"]
    bad = {
        "../evil": {**good, "model_name": "../evil"},
        "UPPER": {**good, "model_name": "UPPER"},
        "feedface99": {**good, "model_name": "feedface99"},
        "other-name": {**good, "model_name": "someone-else"},
        "not-a-dict": ["x"],
        "bad-commit": {**good, "model_name": "bad-commit", "commit": "c"},
        "esc\x1b[2Jape": {**good, "model_name": "esc\x1b[2Jape"},
    }
    doc["models"].update(bad)
    store.registry.path.write_text(json.dumps(doc))
    return bad


def test_invalid_entries_are_skipped_reported_and_kept(cli, two_models):
    store = two_models
    bad = _add_invalid_entries(store)
    before = snapshot(store.root)
    res = cli("list")
    assert [line.split()[0] for line in res.stdout.splitlines()[1:]] == ["q2", "q2-child", "q3"]
    warnings = res.stderr.splitlines()
    assert len(warnings) == len(bad)
    assert "warning: skipped registry entry '../evil': not a valid model name (see `mstore fsck`)" \
        in warnings
    assert "warning: skipped registry entry 'feedface99': name looks like a commit id prefix " \
        "(see `mstore fsck`)" in warnings
    assert "\x1b" not in res.stderr and "'esc\\x1b[2Jape'" in res.stderr
    assert snapshot(store.root) == before
    res = cli("fsck", "--json", ok=False)
    errors = [e for e in json.loads(res.stdout)["errors"] if e["problem"] == "bad-registry-entry"]
    assert len(errors) == len(bad)
    # a writer rewrites registry.json and keeps every invalid entry as it was
    cli("tag", "q2", "q2-tag")
    models = json.loads(store.registry.path.read_text())["models"]
    assert {k: models[k] for k in bad} == bad and "q2-tag" in models
    assert not (store.root / "evil").exists() and not (store.root.parent / "evil").exists()


def test_a_name_held_by_an_invalid_entry_is_not_overwritten(cli, two_models):
    store = two_models
    _add_invalid_entries(store)
    before = snapshot(store.root)
    res = cli("tag", "q2", "other-name", ok=False)
    assert _one_error_line(res) == (
        "error: registry.json holds an invalid entry under 'other-name' (its model_name "
        "differs from its key); fix or remove it by hand first; nothing was written")
    assert snapshot(store.root) == before


def test_gc_keeps_what_an_invalid_entry_names(cli, two_models):
    store = two_models
    q3 = store.resolve("q3").commit
    _add_invalid_entries(store)  # UPPER, ../evil, ... point at q3's commit
    cli("rm", "q3")
    _backdate(store)
    cli("gc", "--grace", "0")
    assert all(store.objects.exists(o) for o in store.read_manifest(q3).object_ids())


def test_parse_registry_entries_splits_valid_from_invalid():
    c = "a" * 64
    raw = json.dumps({"version": 1, "models": {
        "ok": {"model_name": "ok", "commit": c}, "../x": {"model_name": "../x", "commit": c},
        "n": 3}}).encode()
    valid, invalid = parse_registry_entries(raw, "r.json")
    assert list(valid) == ["ok"] and parse_registry(raw, "r.json") == valid
    assert invalid == [("../x", "not a valid model name"), ("n", "entry is not an object")]
    for whole in (b"{}", b"[]", b'{"version": 99, "models": {}}', b"\xff"):
        with pytest.raises(RegistryCorrupt):
            parse_registry_entries(whole, "r.json")


# -- item 14: a store that does not exist --------------------------------------------------
READS = [["list"], ["ls", "--json"], ["show", "q2"], ["log", "q2"], ["log", "--all"], ["fsck"],
         ["fsck", "--json"], ["fsck", "--lost-found"], ["du"], ["diff", "a", "b"], ["gc"],
         ["gc", "--dry-run"], ["tag", "a", "b"], ["rm", "a"]]


@pytest.mark.parametrize("exists_as", ["nothing", "empty-folder"])
def test_commands_on_a_store_that_does_not_exist_say_so(cli, store_path, exists_as, tmp_path):
    if exists_as == "empty-folder":
        store_path.mkdir()
    before = snapshot(tmp_path)
    for args in READS + [["export", "a", str(tmp_path / "out")]]:
        res = cli(*args, ok=False)
        assert res.exit_code == 1, args
        assert _one_error_line(res) == (f"error: no store at {store_path} (run `mstore init` "
                                        "or set --store / MSTORE_HOME)"), args
        assert snapshot(tmp_path) == before, args


@pytest.mark.slow
def test_generate_on_a_missing_store_says_so(cli, store_path):
    res = cli("generate", "q2", "-p", "hi", ok=False)
    assert res.exit_code == 1 and "no store at" in _one_error_line(res)
    assert not store_path.exists()


def test_writers_that_create_a_store_still_do(cli, store_path, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q2")
    assert (store_path / "registry.json").is_file()
    other = store_path.parent / "second"
    res = cli.runner.invoke(app, ["--store", str(other), "init"])
    assert res.exit_code == 0 and (other / "registry.json").is_file()
