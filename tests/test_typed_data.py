"""Issue 12: typed data across modules (RefEntry, LightManifest, error bases, mstore.env)."""

import dataclasses
import json

import pytest

from mstore import env, errors
from mstore.store.manifest import LightManifest, Manifest
from mstore.store.refs import ENTRY_FIELDS, RefEntry
from mstore.store.repo import Store


def _store_with_commit(tmp_path):
    store = Store(tmp_path / "s")
    store.init()
    cfg = store.objects.put_bytes(b"{}").oid
    m = Manifest(architecture="qwen2", model_id="org/m", source={"type": "local"},
                 license="mit", config=cfg, files={}, tensors={}, message="first",
                 created_at="2020-01-01T00:00:00Z")
    return store, store.put_manifest(m), m


def test_ref_entry_fields_are_the_spec_registry_fields_in_order():
    assert ENTRY_FIELDS == ("model_name", "commit", "model_id", "source", "architecture_type",
                            "license", "created_at", "fine_tuned_from", "parameters",
                            "size_bytes")


def test_ref_entry_is_built_once_and_round_trips(tmp_path):
    store, commit, m = _store_with_commit(tmp_path)
    entry = store.registry_entry("a", commit, m, None)
    assert isinstance(entry, RefEntry)
    assert entry == RefEntry.for_commit("a", commit, m, entry.size_bytes, None)
    assert list(entry.to_json()) == list(ENTRY_FIELDS)
    assert entry.to_json()["source"] == "local" and entry.parameters == 0
    assert RefEntry.from_json(entry.to_json()) == entry
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.commit = "0" * 64
    other = entry.renamed("b")
    assert other.model_name == "b" and other.commit == entry.commit
    assert entry.model_name == "a"


def test_refs_are_ref_entries_read_by_attribute(tmp_path):
    store, commit, m = _store_with_commit(tmp_path)
    store.add_ref(commit, m, "a", lambda: "x")
    (entry,) = store.refs().values()
    assert isinstance(entry, RefEntry) and entry.commit == commit and entry.license == "mit"
    with pytest.raises(TypeError):
        entry["commit"]  # not a dict: the fields are attributes
    assert store.resolve("a").entry == entry


def test_entries_read_from_disk_are_written_back_as_they_were(tmp_path):
    store, commit, m = _store_with_commit(tmp_path)
    store.add_ref(commit, m, "a", lambda: "x")
    doc = json.loads(store.registry.path.read_text())
    hand = {"commit": commit, "note": [1, 2], "model_name": "hand"}
    doc["models"]["hand"] = hand
    doc["models"]["broken"] = {"model_name": "other", "commit": 5}
    store.registry.path.write_text(json.dumps(doc))
    store.tag("hand", "copy")  # a rewrite for another ref
    after = json.loads(store.registry.path.read_text())["models"]
    assert after["hand"] == hand and list(after["hand"]) == list(hand)
    assert after["broken"] == {"model_name": "other", "commit": 5}
    assert list(after["copy"]) == list(ENTRY_FIELDS)  # a new entry: the SPEC fields only


def test_a_light_manifest_has_no_tensor_table(tmp_path):
    store, commit, m = _store_with_commit(tmp_path)
    light = store.read_light_manifest(commit)
    assert isinstance(light, LightManifest) and not isinstance(light, Manifest)
    assert light.object_ids() == m.object_ids() and light.message == "first"
    assert light.parent is None and light.created_at == m.created_at
    for name in ("parameters", "tensors"):
        with pytest.raises(AttributeError):
            getattr(light, name)
    assert isinstance(store.read_manifest(commit), Manifest)
    assert isinstance(store.read_light_manifest(commit), LightManifest)
    assert all(isinstance(x, LightManifest) for _oid, x in store.lineage(commit))
    assert all(isinstance(x, Manifest) for _oid, x in store.lineage(commit, light=False))
    assert isinstance(store.try_manifest(commit), LightManifest)


@pytest.mark.parametrize("cls, args, base", [
    (errors.ObjectMissing, ("a" * 64,), FileNotFoundError),
    (errors.StoreNotFound, ("/nowhere",), FileNotFoundError),
    (errors.SourceNotFound, ("nothing",), FileNotFoundError),
    (errors.BadName, ("Bad",), ValueError),
    (errors.CommitLikeName, ("deadbeef",), ValueError),
    (errors.BadSource, ("not a model folder",), ValueError),
    (errors.ConfigError, ("config key 'x' is unknown",), ValueError),
    (errors.BadObjectId, ("xyz",), ValueError),
    (errors.InvalidSafetensors, ("f.safetensors", "truncated"), ValueError),
    (errors.UnknownModel, ("m", "n"), LookupError),
    (errors.UnknownRemote, ("r", []), LookupError),
    (errors.UnknownAdapter, ("llama", ["qwen2"]), LookupError),
    (errors.StoreBusy, ("pid 1 gc", 3.0), TimeoutError),
    (errors.RemoteBusy, ("s3://b/x", 10), TimeoutError),
])
def test_errors_are_also_the_stdlib_type_they_are(cls, args, base):
    e = cls(*args)
    assert isinstance(e, errors.MStoreError) and isinstance(e, base)
    assert not isinstance(e, KeyError)  # KeyError's str() would quote the message
    assert e.args == (str(e),)
    if isinstance(e, OSError):  # one argument: str() is the message, no errno/filename
        assert e.errno is None and e.strerror is None and e.filename is None


def test_error_messages_are_unchanged():
    """The library's words (the CLI adds its flag hints: tests/test_reporting.py)."""
    assert str(errors.StoreNotFound("models")) == "no store at models"
    assert str(errors.ObjectMissing("ab" * 32, "manifest")) == \
        f"manifest {'ab' * 32} is missing from the store (run `mstore fsck`)"
    assert str(errors.UnknownModel("m")) == "unknown model 'm' (see `mstore list`)"
    assert str(errors.StoreBusy("pid 1", 2.4)) == \
        "store is busy: pid 1 (waited 2s; try again later)"


def test_env_reads_each_variable_when_asked(monkeypatch):
    monkeypatch.setenv("MSTORE_HOME", "elsewhere")
    monkeypatch.setenv("MSTORE_LOCK_TIMEOUT", "not a number")
    monkeypatch.setenv("MSTORE_REMOTE_JOBS", "0")
    monkeypatch.delenv("MSTORE_DEBUG", raising=False)
    assert env.store_home() == "elsewhere" and str(Store().root) == "elsewhere"
    assert env.lock_timeout(60.0) == 60.0 and env.remote_jobs(8) == 1
    assert not env.debug()
    monkeypatch.setenv("MSTORE_HOME", "")
    assert env.store_home() is None and str(Store().root) == "models"
