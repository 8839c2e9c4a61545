"""Delta packs (issue 15): a packed object is the same object, stored smaller.

Packing changes how tensor objects lie on disk, never their ids, manifests or refs: every
reader (load, generate, export, fsck, push, pull) sees the same bytes, a damaged pack is
named and refused, gc keeps what a delta needs."""

import json
import os
import shutil
from pathlib import Path

import pytest

from mstore.store import packing
from mstore.store.repo import Store
from tests.conftest import snapshot
from tests.packs_helpers import dtype_model, make_child
from tests.reliability import fsck_errors


def _objects(store: Store) -> dict[str, bytes]:
    return {o: store.objects.read_bytes(o) for o, _ in store.objects.iter_objects()}


def _packed(store: Store) -> set[str]:
    return {s.oid for s in store.objects.iter_stored() if s.packed is not None}


def _manifests_and_refs(store: Store) -> tuple[bytes, dict[str, bytes]]:
    return ((store.root / "registry.json").read_bytes(),
            {c: store.objects.path(c).read_bytes() for c in store.known_commits()})


@pytest.fixture(scope="module")
def family(tmp_path_factory, model_dirs) -> Path:
    """A qwen2 tiny base, a child with every tensor nudged, and a grandchild: loose."""
    from mstore.hub.importer import import_model

    root = tmp_path_factory.mktemp("family") / "store"
    s = Store(root)
    import_model(s, str(model_dirs["qwen2"]), name="base", accept_license=True)
    make_child(s, "base", "child", seed=1)
    make_child(s, "child", "grandchild", seed=2)
    return root


@pytest.fixture
def fam(family, tmp_path, monkeypatch) -> Store:
    root = tmp_path / "store"
    shutil.copytree(family, root)
    monkeypatch.setenv("MSTORE_HOME", str(root))
    return Store(root)


def test_every_dtype_round_trips_bit_for_bit(cli, store):
    import torch

    from mstore.runtime.torch_io import load_tensor

    store.init()
    dtype_model(store, "p")
    dtype_model(store, "c", parent="p", seed=1)
    before, kept = _objects(store), _manifests_and_refs(store)
    doc = json.loads(cli("pack", "--all", "--json").stdout)
    assert doc["packed"] >= 8 and doc["deltas"] >= 4, doc
    assert _manifests_and_refs(store) == kept  # no manifest, no ref changed
    assert _objects(store) == before
    for name in ("p", "c"):
        for tname, t in store.read_manifest(store.resolve(name).commit).tensors.items():
            got = load_tensor(store.objects, t)
            want = torch.frombuffer(bytearray(before[t.object][-got.nbytes:]),
                                    dtype=got.dtype).reshape(got.shape)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), tname
    assert not fsck_errors(store.root)
    cli("unpack", "--all")
    assert not _packed(store) and _objects(store) == before


def test_a_packed_model_generates_and_exports_exactly_as_loose(cli, fam, tmp_path):
    args = ["generate", "grandchild", "-p", "hello", "-n", "8", "--temperature", "0"]
    loose_text = cli(*args).stdout
    cli("export", "grandchild", tmp_path / "loose")
    doc = json.loads(cli("pack", "child", "grandchild", "--json").stdout)
    assert doc["deltas"] > 0 and doc["packed_bytes"] < doc["loose_bytes"] / 2, doc
    m = fam.read_manifest(fam.resolve("grandchild").commit)
    packed = [t for t in m.tensors.values() if fam.objects.is_packed(t.object)]
    assert len(packed) > len(m.tensors) / 2  # tiny ones may stay loose (not smaller)
    assert cli(*args).stdout == loose_text
    cli("export", "grandchild", tmp_path / "packed")
    assert snapshot(tmp_path / "packed") == snapshot(tmp_path / "loose")
    du = json.loads(cli("du", "--json").stdout)
    assert du["packed_objects"] == len(_packed(fam)) and du["packed_bytes"] > 0
    assert du["loose_bytes"] + du["packed_bytes"] == du["physical_bytes"]
    assert "packed" in cli("du").stdout
    res = cli("fsck", "--json")
    assert json.loads(res.stdout)["ok"]


def test_chains_stay_within_the_depth_bound(fam):
    store = fam
    for i in range(3):
        make_child(store, "grandchild" if i == 0 else f"g{i}", f"g{i + 1}", seed=10 + i)
    packing.pack(store, every=True)

    def depth(oid):
        n = 0
        while (oid := store.objects.delta_base(oid)) is not None:
            n += 1
        return n

    depths = [depth(o) for o in _packed(store)]
    assert max(depths) == packing.MAX_DELTA_DEPTH
    again = packing.pack(store, every=True)
    assert again.packed == 0 and again.already > 0


def test_gc_keeps_the_bases_of_a_packed_child_after_its_parent_goes(cli, fam):
    packing.pack(fam, ["grandchild"])
    bases = {fam.objects.delta_base(o) for o in _packed(fam)} - {None}
    assert bases
    cli("rm", "child")
    cli("rm", "base")
    dry = cli("gc", "--grace", "0", "--dry-run")
    assert "base of packed delta" in dry.stdout
    doc = json.loads(cli("gc", "--grace", "0", "--json").stdout)
    assert doc["objects_deleted"] > 0  # the parents' config-free leftovers go ...
    assert {k["object"] for k in doc["kept_as_delta_base"]} == bases
    assert all(fam.objects.exists(b) for b in bases)  # ... their bases stay
    assert not fsck_errors(fam.root)
    cli("generate", "grandchild", "-p", "hi", "-n", "2", "--temperature", "0")
    cli("unpack", "grandchild")
    cli("gc", "--grace", "0")
    assert not any(fam.objects.exists(b) for b in bases)
    assert not fsck_errors(fam.root)


def test_a_flipped_byte_in_a_packed_object_is_named_by_fsck_and_refused_by_load(cli, fam):
    packing.pack(fam, ["child"])
    m = fam.read_manifest(fam.resolve("child").commit)
    name, t = max(m.tensors.items(), key=lambda kv: fam.objects.stored_size(kv[1].object))
    path = fam.objects.pack_path(t.object)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    res = cli("fsck", "--json", ok=False)
    assert ("corrupt", t.object) in {(e["problem"], e["object"])
                                     for e in json.loads(res.stdout)["errors"]}
    res = cli("generate", "child", "-p", "hi", "-n", "2", ok=False)
    assert res.exit_code == 1 and t.object in res.stderr and res.stderr.startswith("error: ")
    res = cli("export", "child", fam.root.parent / "out", ok=False)
    assert res.exit_code == 1 and not (fam.root.parent / "out").exists()


def test_push_and_pull_move_packed_objects_as_they_are(cli, fam, tmp_path):
    from mstore.remote import sync
    from mstore.store.manifest import Manifest

    loose = sum(fam.objects.size(t.object) for t in
                fam.read_manifest(fam.resolve("grandchild").commit).tensors.values())
    packing.pack(fam, ["grandchild"])
    remote = tmp_path / "remote"
    cli("remote", "add", "origin", remote)
    sync.push(fam, "child", "origin")
    r = sync.push(fam, "grandchild", "origin")
    assert 0 < r.bytes_sent < loose / 2
    remote_store = Store(remote)
    assert _packed(remote_store) == _packed(fam)
    assert not fsck_errors(remote)
    # a fresh store pulls only the grandchild: the deltas' bases come with it
    other = Store(tmp_path / "other")
    sync.clone(str(remote), other.root, "grandchild")
    assert _packed(other) == _packed(fam)
    assert not fsck_errors(other.root)
    m: Manifest = other.read_manifest(other.resolve("grandchild").commit)
    assert all(other.objects.read_bytes(t.object) == fam.objects.read_bytes(t.object)
               for t in m.tensors.values())


def test_a_pull_refuses_a_packed_object_that_does_not_rebuild(cli, fam, tmp_path):
    from mstore.errors import RemoteObjectCorrupt
    from mstore.remote import sync

    packing.pack(fam, ["child"])
    remote = tmp_path / "remote"
    cli("remote", "add", "origin", remote)
    sync.push(fam, "child", "origin")
    victim = sorted(_packed(Store(remote)))[0]
    path = Store(remote).objects.pack_path(victim)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    other = tmp_path / "other"
    with pytest.raises(RemoteObjectCorrupt):
        sync.clone(str(remote), other, "child")
    assert not Store(other).objects.exists(victim)


@pytest.mark.parametrize("args", [["pack"], ["unpack"], ["pack", "nosuch"],
                                  ["unpack", "nosuch"], ["pack", "child", "nosuch"]])
def test_bad_input_is_one_line_and_leaves_the_store_untouched(cli, fam, args):
    before = snapshot(fam.root)
    res = cli(*args, ok=False)
    assert res.exit_code != 0 and res.stderr.startswith("error: ")
    assert res.stderr.count("\n") == 1, res.stderr
    assert snapshot(fam.root) == before


def test_train_pack_commits_the_child_loose_then_packs_it(cli, fam, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the lighthouse keeper climbed the stairs and lit the lamp. " * 40)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name: child\ndataset: {json.dumps(str(corpus))}\n"
                   "learning_rate: 1e-3\nbatch_size: 2\nmax_steps: 2\nseq_len: 16\n"
                   "warmup_steps: 0\neval_interval: 100\ndevice: cpu\n")
    doc = json.loads(cli("train", "--config", cfg, "--name", "tuned", "--pack",
                         "--json").stdout)
    assert doc["name"] == "tuned" and doc["packed"]["deltas"] > 0, doc
    assert doc["packed"]["commits"] == [doc["commit"]]
    m = fam.read_manifest(doc["commit"])
    assert m.parent == fam.resolve("child").commit
    parent_objects = {t.object for t in fam.read_manifest(m.parent).tensors.values()}
    new = [t.object for t in m.tensors.values() if t.object not in parent_objects]
    assert new and any(fam.objects.is_packed(o) for o in new)
    assert not any(fam.objects.is_packed(o) for o in parent_objects)  # only the child's
    text = cli("generate", "tuned", "-p", "hello", "-n", "4", "--temperature", "0").stdout
    cli("unpack", "tuned")
    assert cli("generate", "tuned", "-p", "hello", "-n", "4",
               "--temperature", "0").stdout == text
    out = cli("train", "--config", cfg, "--name", "tuned2", "--pack").stdout
    assert "packed" in out and "as deltas" in out
    assert json.loads(cli("fsck", "--json").stdout)["ok"]
