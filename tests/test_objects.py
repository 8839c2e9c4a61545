"""The object store, manifests and registry as a library (no CLI)."""

import json
import os
import stat
import struct
from concurrent.futures import Future

import pytest

from mstore.errors import BadName, BadObjectId, ObjectCorrupt, RefChanged, RegistryCorrupt
from mstore.store.manifest import Manifest, TensorEntry, canonical_json
from mstore.store.objects import ObjectStore, hash_bytes, hash_file, tensor_oid
from mstore.store.refs import RefEntry
from mstore.store.registry import Registry, validate_name
from mstore.store.safetensors_io import object_header, read_header_from_file
from mstore.store.repo import Store


def test_object_path_refuses_anything_but_64_hex(tmp_path):
    objects = ObjectStore(tmp_path)
    oid = "ab" + "0" * 62
    assert objects.path(oid) == tmp_path / "objects" / "ab" / ("0" * 62)
    for bad in ["../../config", "AB" + "0" * 62, "ab" * 31, "g" * 64, "", "ab/" + "0" * 61]:
        with pytest.raises(BadObjectId):
            objects.path(bad)


def test_put_bytes_is_idempotent_and_named_by_blake3(tmp_path):
    objects = ObjectStore(tmp_path)
    first = objects.put_bytes(b"hello")
    second = objects.put_bytes(b"hello")
    assert first.oid == second.oid == hash_bytes(b"hello")
    assert first.new and not second.new
    assert hash_file(objects.path(first.oid)) == first.oid
    assert list(objects.iter_objects())[0][0] == first.oid


def test_objects_are_read_only_and_world_readable(tmp_path):
    objects = ObjectStore(tmp_path)
    res = objects.put_bytes(b"data")
    mode = stat.S_IMODE(objects.path(res.oid).stat().st_mode)
    assert mode == 0o444


def test_add_object_freshens_existing_object(tmp_path):
    objects = ObjectStore(tmp_path)
    res = objects.put_bytes(b"old")
    os.utime(objects.path(res.oid), (1000, 1000))
    objects.put_bytes(b"old")
    assert objects.path(res.oid).stat().st_mtime > 1000
    with objects.batch() as batch:
        os.utime(objects.path(res.oid), (1000, 1000))
        batch.put_bytes(b"old")
    assert objects.path(res.oid).stat().st_mtime > 1000


def test_tensor_objects_are_deterministic_whatever_the_name(tmp_path):
    objects = ObjectStore(tmp_path)
    data = bytes(range(24))
    with objects.batch() as batch:
        a = batch.put_tensor_bytes("BF16", [3, 4], data)
        b = batch.put_tensor_bytes("BF16", [3, 4], data)
        c = batch.put_tensor_bytes("BF16", [4, 3], data)  # other shape, other object
        d = batch.put_tensor_bytes("F16", [3, 4], data)  # other dtype, other object
    assert a.oid == b.oid and len({a.oid, c.oid, d.oid}) == 3
    header = read_header_from_file(objects.path(a.oid))
    (info,) = header.tensors.values()
    assert info.name == "tensor" and info.dtype == "BF16" and info.shape == (3, 4)
    assert header.data_start % 8 == 0 and header.metadata == {}
    raw = objects.path(a.oid).read_bytes()
    assert raw[header.data_start:] == data
    assert raw[: header.data_start] == object_header("BF16", [3, 4], 24)


def test_tensor_object_from_a_shard_range_equals_one_from_bytes(tmp_path):
    objects = ObjectStore(tmp_path)
    shard = tmp_path / "shard.bin"
    payload = os.urandom(64)
    shard.write_bytes(b"junk" + payload + b"tail")
    import mmap

    from mstore.store.objects import hash_tensor_range

    with open(shard, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        with objects.batch() as batch:
            oid = hash_tensor_range("F32", [16], mm, 4, 68)
            from_range = batch.put_tensor(oid, "F32", [16], f.fileno(), 4, 68)
    with objects.batch() as batch:
        from_bytes = batch.put_tensor_bytes("F32", [16], payload)
    assert from_range.oid == from_bytes.oid and not from_bytes.new


class LateId(Future):
    """An id still being hashed when put_tensor starts: computed only when it is asked for."""

    def __init__(self, compute):
        super().__init__()
        self.compute = compute

    def result(self, timeout=None):
        if not self.done():
            try:
                self.set_result(self.compute())
            except Exception as e:  # noqa: BLE001 - handed to the caller, as a Future does
                self.set_exception(e)
        return super().result(timeout)


def test_put_tensor_copies_while_the_id_is_still_being_hashed(tmp_path):
    """A pending id: the copy runs first; a new object is staged under the id, a duplicate's
    copy is dropped, and a failed hash leaves no temp file."""
    objects = ObjectStore(tmp_path)
    shard = tmp_path / "shard.bin"
    known, other = os.urandom(64), os.urandom(64)
    with objects.batch() as batch:
        expected = batch.put_tensor_bytes("F32", [16], known).oid

    def after_copy(value):
        def compute():
            assert len(list(objects.tmp_dir.iterdir())) == 1  # the copy came first
            if isinstance(value, Exception):
                raise value
            return value
        return LateId(compute)

    shard.write_bytes(b"junk" + other + b"tail")
    with open(shard, "rb") as f, objects.batch() as batch:
        new = batch.put_tensor(after_copy(tensor_oid("F32", [16], other)), "F32", [16],
                               f.fileno(), 4, 68)
    assert new.new and objects.read_bytes(new.oid)[-64:] == other

    shard.write_bytes(b"junk" + known + b"tail")
    with open(shard, "rb") as f, objects.batch() as batch:
        dup = batch.put_tensor(after_copy(expected), "F32", [16], f.fileno(), 4, 68)
        assert (dup.oid, dup.new) == (expected, False)
        assert list(objects.tmp_dir.iterdir()) == []
        with pytest.raises(OSError, match="read error"):
            batch.put_tensor(after_copy(OSError("read error")), "F32", [16], f.fileno(), 4, 68)
        assert list(objects.tmp_dir.iterdir()) == []


def test_batch_publishes_nothing_when_it_fails(tmp_path):
    objects = ObjectStore(tmp_path)
    with pytest.raises(RuntimeError):
        with objects.batch() as batch:
            res = batch.put_bytes(b"never visible")
            assert not objects.exists(res.oid)
            raise RuntimeError("boom")
    assert not objects.exists(res.oid)
    assert list(objects.tmp_dir.iterdir()) == []


def test_truncated_tensor_object_is_caught_by_header_check(tmp_path):
    objects = ObjectStore(tmp_path)
    with objects.batch() as batch:
        res = batch.put_tensor_bytes("F32", [8], bytes(32))
    path = objects.path(res.oid)
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ObjectCorrupt, match="truncated"):
        objects.tensor_header(res.oid)


def test_manifest_is_canonical_and_round_trips():
    oid = "a" * 64
    m = Manifest(architecture="qwen2", model_id="x/y", source={"type": "local"}, license=None,
                 config=oid, files={"tokenizer.json": oid},
                 tensors={"w": TensorEntry(oid, "BF16", [2, 2])}, created_at="2026-01-01T00:00:00Z")
    data = m.to_bytes()
    assert data == canonical_json(json.loads(data))
    assert b" " not in data and data.index(b'"architecture"') < data.index(b'"config"')
    again = Manifest.from_bytes(data)
    assert again.to_bytes() == data and again.parameters == 4
    for bad in [b"not json", b"[]", data.replace(b'"format":2', b'"format":9')]:
        with pytest.raises(ObjectCorrupt):
            Manifest.from_bytes(bad, "f" * 64)


@pytest.mark.parametrize("name", ["qwen-0.5b-base", "a", "x.y_z-1", "0" * 127 + "z"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Qwen", "-x", "a/b", "..", "a..b", "x" * 129, "a b", "é",
                                  "0" * 128, "deadbee"])
def test_bad_names_are_refused(name):
    with pytest.raises(BadName):
        validate_name(name)


def _entry(name, commit):
    return RefEntry(model_name=name, commit=commit)


def test_registry_compare_and_swap(tmp_path):
    reg = Registry(tmp_path)
    (tmp_path / "tmp").mkdir()
    reg.set_ref(_entry("m", "1" * 64), expected=None)
    with pytest.raises(RefChanged):
        reg.set_ref(_entry("m", "2" * 64), expected=None)  # the name is taken
    with pytest.raises(RefChanged):
        reg.set_ref(_entry("m", "2" * 64), expected="3" * 64)  # someone moved it
    reg.set_ref(_entry("m", "2" * 64), expected="1" * 64)
    assert reg.get("m").commit == "2" * 64
    doc = json.loads((tmp_path / "registry.json").read_text())
    assert doc["version"] == 2 and set(doc["models"]["m"]) >= {"model_name", "commit", "license"}


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"version": 1}',
                                     b'{"version": 1, "models": []}'])
def test_damaged_registry_is_reported_and_never_overwritten(tmp_path, content):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "registry.json").write_bytes(content)
    reg = Registry(tmp_path)
    with pytest.raises(RegistryCorrupt):
        reg.load()
    with pytest.raises(RegistryCorrupt):
        reg.set_ref(_entry("m", "1" * 64))
    assert (tmp_path / "registry.json").read_bytes() == content


def test_resolve_by_name_commit_and_unique_prefix(tmp_path):
    store = Store(tmp_path / "s")
    store.init()
    cfg = store.objects.put_bytes(b"{}").oid
    commits = []
    for i in range(2):
        m = Manifest(architecture="qwen2", model_id="m", source={"type": "local"}, license=None,
                     config=cfg, files={}, tensors={}, message=str(i))
        c = store.put_manifest(m)
        commits.append(c)
        store.registry.set_ref(store.registry_entry(f"m{i}", c, m, None), expected=None)
    assert store.resolve("m0").commit == commits[0]
    assert store.resolve(commits[1]).commit == commits[1]
    assert store.resolve(commits[1][:7]).commit == commits[1]
    from mstore.errors import UnknownModel

    with pytest.raises(UnknownModel, match="did you mean 'm1'"):
        store.resolve("m11")
    with pytest.raises(UnknownModel):
        store.resolve(cfg[:10])  # a file object is not a commit


def test_header_parser_refuses_lies(tmp_path):
    from mstore.errors import InvalidSafetensors
    from mstore.store.safetensors_io import parse_header

    def blob(header: dict, data: bytes = b"\0" * 8) -> bytes:
        body = json.dumps(header).encode()
        return struct.pack("<Q", len(body)) + body + data

    cases = [
        struct.pack("<Q", 10**12) + b"{}",
        blob({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),  # out of range
        blob({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),  # size mismatch
        blob({"a": {"dtype": "U8", "shape": [6], "data_offsets": [0, 6]},
              "b": {"dtype": "U8", "shape": [6], "data_offsets": [2, 8]}}),  # overlap
        blob({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}),
        struct.pack("<Q", 4) + b"nope" + b"\0" * 8,
    ]
    for raw in cases:
        with pytest.raises(InvalidSafetensors):
            parse_header(raw, len(raw), "x")
