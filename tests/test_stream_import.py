"""Hub import converts each shard while it downloads (mstore/hub/stream_import.py): the
result is the same as a local import of the same files, nothing is published from bytes
that do not match the Hub's checksums, and a cut download resumes from what is on disk."""

import json
from pathlib import Path

import pytest

from mstore.errors import ChecksumMismatch
from mstore.hub.importer import import_model
from mstore.store.repo import Store

REPO = "tiny/Qwen2-Sharded"


def _shards(hub_server) -> list[str]:
    return sorted(n for n in hub_server.files(REPO) if n.endswith(".safetensors"))


def _content(store: Store, commit: str) -> tuple:
    m = store.read_manifest(commit)
    return ({k: (t.object, t.dtype, t.shape) for k, t in m.tensors.items()}, m.files, m.config,
            m.tied_weights)


def _download_folder(store: Store, hub_server) -> Path:
    return store.objects.tmp_dir / f"download-tiny--Qwen2-Sharded-{hub_server.sha(REPO)[:16]}"


@pytest.fixture(scope="module")
def local_content(model_dirs, tmp_path_factory) -> tuple:
    """What a local import of the sharded folder holds: the reference every Hub import of
    the same files must equal."""
    store = Store(tmp_path_factory.mktemp("local") / "store")
    res = import_model(store, str(model_dirs["qwen2-sharded"]), accept_license=True)
    return _content(store, res.commit)


def _gets(hub_server, name: str) -> list:
    return [r for r in hub_server.requests if r.method == "GET" and r.path.endswith(name)]


def test_a_streamed_sharded_import_holds_what_a_local_import_holds(tmp_path, hub_server,
                                                                  hub_repos, local_content):
    store = Store(tmp_path / "store")
    res = import_model(store, REPO, accept_license=True)
    assert _content(store, res.commit) == local_content
    for shard in _shards(hub_server):  # each shard fetched once, whole
        assert [r.range for r in _gets(hub_server, shard)] == [None]
    assert list(store.objects.tmp_dir.iterdir()) == []  # no second copy stays


def test_a_corrupt_shard_publishes_no_object_and_writes_no_ref(tmp_path, hub_server,
                                                               hub_repos):
    """The first shard's last byte is flipped: every tensor before it was already staged
    from the stream, and still nothing reaches objects/ or the registry."""
    first = _shards(hub_server)[0]
    hub_server.faults.corrupt_file.add(f"{REPO}/{first}")
    store = Store(tmp_path / "store")
    with pytest.raises(ChecksumMismatch, match="sha256 differs"):
        import_model(store, REPO, accept_license=True)
    assert not list((store.root / "objects").rglob("*/*"))
    assert store.refs() == {}
    folder = _download_folder(store, hub_server)
    assert not (folder / first).exists() and not (folder / f"{first}.part").exists()
    assert not [p for p in store.objects.tmp_dir.iterdir() if p.is_file()]  # staged: removed


def test_an_interrupted_download_resumes_from_its_part_file(tmp_path, hub_server, hub_repos,
                                                            local_content):
    """What a killed run leaves: the first K bytes of a shard in `<name>.part`. The retry
    reads them back from disk and asks the Hub only for the rest."""
    last = _shards(hub_server)[-1]
    data = hub_server.files(REPO)[last]
    store = Store(tmp_path / "store")
    folder = _download_folder(store, hub_server)
    folder.mkdir(parents=True)
    k = len(data) // 2
    (folder / f"{last}.part").write_bytes(data[:k])
    res = import_model(store, REPO, accept_license=True)
    assert _content(store, res.commit) == local_content
    assert [r.range for r in _gets(hub_server, last)] == [f"bytes={k}-"]
    assert list(store.objects.tmp_dir.iterdir()) == []


def test_a_part_file_with_wrong_bytes_is_refused_and_the_retry_downloads_it_again(
        tmp_path, hub_server, hub_repos, local_content):
    last = _shards(hub_server)[-1]
    data = bytearray(hub_server.files(REPO)[last])
    store = Store(tmp_path / "store")
    folder = _download_folder(store, hub_server)
    folder.mkdir(parents=True)
    k = len(data) // 2
    data[k - 1] ^= 0xFF  # a prefix that is not this file's (a power cut, a bad disk)
    (folder / f"{last}.part").write_bytes(bytes(data[:k]))
    with pytest.raises(ChecksumMismatch):
        import_model(store, REPO, accept_license=True)
    assert store.refs() == {} and not list((store.root / "objects").rglob("*/*"))
    assert not (folder / f"{last}.part").exists()
    res = import_model(store, REPO, accept_license=True)
    assert _content(store, res.commit) == local_content
    assert _gets(hub_server, last)[-1].range is None


def test_a_server_that_ignores_range_restarts_the_file_and_the_import_still_matches(
        tmp_path, hub_server, hub_repos, local_content):
    """The downloader rewinds a resumed file the server sent whole: the tensors streamed
    from the old prefix are dropped and the file is converted again once complete."""
    last = _shards(hub_server)[-1]
    data = hub_server.files(REPO)[last]
    hub_server.faults.ignore_range.add(f"{REPO}/{last}")
    store = Store(tmp_path / "store")
    folder = _download_folder(store, hub_server)
    folder.mkdir(parents=True)
    (folder / f"{last}.part").write_bytes(data[: len(data) * 3 // 4])
    res = import_model(store, REPO, accept_license=True)
    assert _content(store, res.commit) == local_content
    assert len(_gets(hub_server, last)) == 1


def test_a_connection_cut_mid_file_is_resumed_with_a_range_in_the_same_run(
        tmp_path, hub_server, hub_repos, local_content, monkeypatch):
    """huggingface_hub's own retry (1 s later, `Range: bytes=K-`) feeds the same stream."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # so K > 0 for a tiny file
    last = _shards(hub_server)[-1]
    hub_server.faults.drop(f"{REPO}/{last}", 20000)
    store = Store(tmp_path / "store")
    res = import_model(store, REPO, accept_license=True)
    assert _content(store, res.commit) == local_content
    ranges = [r.range for r in _gets(hub_server, last)]
    assert ranges[0] is None and len(ranges) == 2 and ranges[1].startswith("bytes=")
    assert int(ranges[1][len("bytes="):].rstrip("-")) > 0


def test_a_streamed_import_of_a_cli_user_prints_one_line_on_a_mismatch(cli, store_path,
                                                                       hub_server, hub_repos):
    hub_server.faults.corrupt_file.add(f"{REPO}/{_shards(hub_server)[-1]}")
    res = cli("import", REPO, "--accept-license", ok=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 1 and len(lines) == 1
    assert "does not match its published checksum" in lines[0]
    assert json.loads((store_path / "registry.json").read_text())["models"] == {}


def test_a_damaged_header_in_the_stream_is_a_checksum_mismatch_not_a_bad_source(
        tmp_path, hub_server, hub_repos):
    """A header that does not parse may be bytes damaged on the way: the whole file is
    checked before the source is called invalid."""
    first = _shards(hub_server)[0]
    data = bytearray(hub_server.files(REPO)[first])
    store = Store(tmp_path / "store")
    folder = _download_folder(store, hub_server)
    folder.mkdir(parents=True)
    data[9] = ord("[")  # the JSON header no longer starts with '{'
    (folder / f"{first}.part").write_bytes(bytes(data[:64]))
    with pytest.raises(ChecksumMismatch, match="sha256 differs"):
        import_model(store, REPO, accept_license=True)
    assert store.refs() == {} and not (folder / f"{first}.part").exists()


def test_a_streamed_import_quantizes_on_the_way_as_a_local_one_does(tmp_path, hub_server,
                                                                    hub_repos, model_dirs):
    hub = Store(tmp_path / "hub")
    local = Store(tmp_path / "local")
    a = import_model(hub, REPO, accept_license=True, quantize="int8")
    b = import_model(local, str(model_dirs["qwen2-sharded"]), accept_license=True,
                     quantize="int8")
    assert _content(hub, a.commit) == _content(local, b.commit)
    assert hub.read_manifest(a.commit).quantization == local.read_manifest(b.commit).quantization
