"""Format 2: manifest kinds, the format migration, adapter bases in the keep rule, and
commit attachments (kept by gc, carried by push and pull, never changing a commit id)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from mstore.store import format as store_format
from mstore.store.manifest import Manifest, TensorEntry
from mstore.store.registry import VERSION
from mstore.store.repo import Store
from tests.conftest import run_mstore, snapshot


@pytest.fixture
def base(cli, store, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    return store


def _adapter_child(store: Store, base_name: str, name: str) -> str:
    """An adapter-kind commit on `base_name`: two small tensors of its own (store layer only)."""
    parent = store.resolve(base_name).commit
    m = store.read_manifest(parent)
    rng = np.random.default_rng(7)
    tensors = {}
    with store.objects.batch() as b:
        for key in ("lora_A", "lora_B"):
            data = rng.standard_normal(32).astype(np.float32)
            res = b.put_tensor_bytes("F32", [4, 8], data.tobytes())
            tensors[f"base_model.model.model.layers.0.self_attn.q_proj.{key}.weight"] = \
                TensorEntry(res.oid, "F32", [4, 8])
        cfg = b.put_bytes(b'{"peft_type": "LORA", "r": 4}').oid
    child = Manifest(architecture=m.architecture, model_id=m.model_id,
                     source={"type": "finetune"}, license=m.license, config=m.config,
                     files={"adapter_config.json": cfg}, tensors=tensors, parent=parent,
                     message="adapter", kind="adapter",
                     adapter={"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0,
                              "target_modules": ["q_proj"]})
    commit = store.put_manifest(child)
    store.registry.set_ref(store.registry_entry(name, commit, child, base_name), expected=None)
    return commit


def _as_format_1(store: Store) -> str:
    """Rewrite the store as the first release wrote it: registry version 1, format-1
    manifests (new ids), refs repointed."""
    refs = store.refs()
    doc = json.loads(store.registry.path.read_text())
    for name, e in refs.items():
        m = store.read_manifest(e.commit)
        old = store.put_manifest(replace(m, format=1))
        doc["models"][name]["commit"] = old
    doc["version"] = 1
    store.registry.path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc["models"][sorted(refs)[0]]["commit"]


def test_a_format_1_store_reads_as_it_is_and_is_upgraded_on_the_first_write(cli, base):
    commit = _as_format_1(base)
    before = snapshot(base.root)
    assert json.loads(cli("fsck", "--json").stdout)["ok"]
    raw = base.objects.read_bytes(commit)
    m = base.read_manifest(commit)
    assert m.format == 1 and m.kind == "full" and b'"kind"' not in raw
    assert m.to_bytes() == raw  # read back, a format-1 manifest keeps its bytes and id
    cli("list"), cli("show", "base"), cli("log", "base"), cli("gc", "--dry-run")
    assert snapshot(base.root) == before  # reading changes nothing
    cli("tag", "base", "again")
    assert json.loads(base.registry.path.read_text())["version"] == VERSION == 2
    assert base.resolve("base").commit == commit  # ids unchanged by the upgrade
    assert json.loads(cli("fsck", "--json").stdout)["ok"]


def test_migration_is_idempotent_and_survives_a_kill_at_each_step(base):
    commit = _as_format_1(base)
    for point in ("migrate.to-2", "registry.tmp-written"):
        res = run_mstore("tag", "base", "again", store=base.root,
                         env_extra={"MSTORE_FAILPOINT": point})
        assert res.returncode == 137
        assert base.registry.version() == 1 and "again" not in base.refs()
    assert store_format.migrate(base) == [2]
    assert store_format.migrate(base) == []
    assert base.resolve("base").commit == commit


def test_a_newer_store_format_is_refused_by_name(cli, base):
    doc = json.loads(base.registry.path.read_text())
    doc["version"] = VERSION + 1
    base.registry.path.write_text(json.dumps(doc))
    before = snapshot(base.root)
    res = cli("tag", "base", "x", ok=False)
    assert res.exit_code == 1 and "newer than this mstore" in res.stderr and len(res.stderr.splitlines()) == 1
    assert snapshot(base.root) == before


@pytest.mark.parametrize("change, reason", [
    ({"kind": "lora"}, "field 'kind'"),
    ({"kind": "adapter"}, "needs an object in 'adapter'"),
    ({"kind": "full", "quantization": {"scheme": "int8"}}, "is set on a full"),
    ({"kind": "adapter", "adapter": {"method": "lora"}, "parent": None}, "no parent"),
    ({"format": 1, "kind": "full"}, "format 1 has no"),
    ({"format": 3}, "a newer mstore wrote it"),
])
def test_malformed_kinds_are_corrupt_manifests(base, change, reason):
    m = base.read_manifest(base.resolve("base").commit)
    d = {**m.to_dict(), **change}
    from mstore.errors import ObjectCorrupt
    from mstore.store.manifest import LightManifest, canonical_json
    for cls in (Manifest, LightManifest):
        with pytest.raises(ObjectCorrupt, match=reason):
            cls.from_bytes(canonical_json(d), "x" * 64)


def test_list_show_and_log_say_what_an_adapter_child_is(cli, base):
    _adapter_child(base, "base", "child")
    assert "lora r=4 on base" in cli("list").stdout
    assert "lora r=4 on base" in cli("show", "child").stdout
    assert "Kind:   lora r=4 on base" in cli("log", "child").stdout
    row = [r for r in json.loads(cli("list", "--json").stdout) if r["name"] == "child"][0]
    assert row["kind"] == "adapter" and row["variant"] == "lora r=4 on base"


def test_an_adapter_child_keeps_its_base_objects_after_the_base_ref_is_removed(cli, base):
    commit = _adapter_child(base, "base", "child")
    base_commit = base.resolve("base").commit
    base_objects = base.read_manifest(base_commit).object_ids()
    cli("rm", "base")
    doc = json.loads(cli("gc", "--dry-run", "--explain", "--grace", "0", "--json").stdout)
    why = {k["object"]: k["why"] for k in doc["kept"]}
    assert all("the base ref child is an adapter on" in why[o] for o in base_objects
               if o not in base.read_manifest(commit).object_ids())
    assert "named by ref child" in why[next(iter(base.read_manifest(commit).object_ids()))]
    cli("gc", "--grace", "0")
    assert all(base.objects.exists(o) for o in base_objects)
    text = cli("gc", "--dry-run", "--explain").stdout
    assert "the base ref child is an adapter on" in text
    assert json.loads(cli("fsck", "--json").stdout)["ok"]


def test_fsck_names_the_missing_base_of_an_adapter(cli, base):
    _adapter_child(base, "base", "child")
    m = base.read_manifest(base.resolve("base").commit)
    victim = sorted(m.tensors.values(), key=lambda t: t.object)[0].object
    cli("rm", "base")
    base.objects.path(victim).unlink()
    doc = json.loads(cli("fsck", "--json", ok=False).stdout)
    assert any(e["object"] == victim and "the base of child" in e["detail"]
               for e in doc["errors"])


def test_attachments_are_append_only_kept_by_gc_and_never_change_the_commit(cli, base):
    commit = base.resolve("base").commit
    a = base.attachments.add(commit, "eval", {"loss": 1.5, "dataset_blake3": "ab" * 32})
    listed = base.attachments.list(commit, "eval")
    assert listed[0].payload["loss"] == 1.5 and listed[0].commit == commit
    assert base.resolve("base").commit == commit
    cli("gc", "--grace", "0")
    assert base.attachments.list(commit, "eval")
    assert json.loads(cli("fsck", "--json").stdout)["ok"]
    cli("rm", "base")
    cli("gc", "--grace", "0")
    assert not base.objects.exists(a) and base.attachments.commits() == []


def test_fsck_names_a_damaged_attachment_list_and_a_foreign_record(cli, base):
    commit = base.resolve("base").commit
    base.attachments.add(commit, "eval", {"loss": 2.0})
    path = base.attachments.index_path(commit)
    path.write_text("{not json")
    doc = json.loads(cli("fsck", "--json", ok=False).stdout)
    assert any("attachment list" in e["detail"] for e in doc["errors"])


def test_push_and_pull_carry_attachments_and_adapter_bases(cli, base, tmp_path):
    from tests.conftest import Cli
    commit = _adapter_child(base, "base", "child")
    base.attachments.add(commit, "eval", {"loss": 3.25})
    remote = tmp_path / "remote"
    cli("remote", "add", "origin", str(remote))
    cli("push", "child")  # the base ref is not pushed; its objects are
    other = Cli(tmp_path / "other")
    other("remote", "add", "origin", str(remote))
    other("pull", "child")
    dest = Store(tmp_path / "other")
    assert [a.payload["loss"] for a in dest.attachments.list(commit)] == [3.25]
    base_commit = base.resolve("base").commit
    assert all(dest.objects.exists(o) for o in base.read_manifest(base_commit).object_ids())
    assert json.loads(other("fsck", "--json").stdout)["ok"]
    # a note added later travels on the next push, the pull that is up to date still takes it
    base.attachments.add(commit, "eval", {"loss": 2.5})
    cli("push", "child")
    other("pull", "child")
    assert sorted(a.payload["loss"] for a in dest.attachments.list(commit)) == [2.5, 3.25]


@pytest.mark.parametrize("point", ["attach.object-written", "attach.index-tmp-written"])
def test_a_kill_while_attaching_leaves_the_old_list_and_a_clean_store(cli, base, point):
    import subprocess
    import sys
    from tests.conftest import REPO_ROOT
    commit = base.resolve("base").commit
    first = base.attachments.add(commit, "eval", {"loss": 1.0})
    code = ("import sys; from mstore.store.repo import Store; "
            "Store(sys.argv[1]).attachments.add(sys.argv[2], 'eval', {'loss': 2.0})")
    env = {**__import__("os").environ, "MSTORE_FAILPOINT": point}
    res = subprocess.run([sys.executable, "-c", code, str(base.root), commit], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True)
    assert res.returncode == 137, res.stderr
    assert base.attachments.index(commit) == [first]
    assert json.loads(cli("fsck", "--json").stdout)["ok"]
    base.attachments.add(commit, "eval", {"loss": 2.0})
    assert sorted(a.payload["loss"] for a in base.attachments.list(commit)) == [1.0, 2.0]
