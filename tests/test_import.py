"""`mstore import` from the local Hub (real huggingface_hub client) and from folders."""

import json
import os
from pathlib import Path

import pytest

from mstore.store.objects import hash_file
from mstore.store.safetensors_io import read_header_from_file
from tests.conftest import run_mstore, snapshot


def source_tensors(folder: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in a HF folder's safetensors."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        header = read_header_from_file(f)
        raw = f.read_bytes()
        for name, info in header.tensors.items():
            out[name] = (info.dtype, info.shape, raw[info.start:info.end])
    return out


def assert_round_trip(store, name: str, folder: Path) -> None:
    m = store.read_manifest(store.resolve(name).commit)
    src = source_tensors(folder)
    assert set(m.tensors) == set(src)
    for tname, (dtype, shape, data) in src.items():
        entry = m.tensors[tname]
        header = store.objects.tensor_header(entry.object)
        (info,) = header.tensors.values()
        assert (info.dtype, info.shape) == (dtype, shape) == (entry.dtype, tuple(entry.shape))
        assert store.objects.path(entry.object).read_bytes()[info.start:] == data
    for oid, _st in store.objects.iter_objects():
        assert hash_file(store.objects.path(oid)) == oid


def test_import_local_folder_round_trip(cli, store, model_dirs):
    res = cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q2")
    assert "imported q2" in res.stdout
    assert_round_trip(store, "q2", model_dirs["qwen2"])
    m = store.read_manifest(store.resolve("q2").commit)
    assert m.tied_weights == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in m.tensors
    assert {"tokenizer.json", "generation_config.json"} <= set(m.files)
    assert m.source == {"type": "local", "path": str(model_dirs["qwen2"].resolve())}


@pytest.mark.parametrize("repo,name", [("tiny/Qwen2-Tiny", "qwen2-tiny"),
                                       ("tiny/Qwen3-Tiny", "qwen3-tiny")])
def test_import_from_hub_round_trip(cli, store, model_dirs, hub_repos, repo, name):
    res = cli("import", repo, "--accept-license", "--json")
    doc = json.loads(res.stdout)
    assert doc["name"] == name and not doc["already"]
    assert doc["source"] == {"type": "huggingface", "repo_id": repo,
                             "revision": hub_repos[repo]}
    folder = model_dirs["qwen2" if "Qwen2" in repo else "qwen3"]
    assert_round_trip(store, name, folder)
    entry = store.refs()[name]
    assert entry.source == "huggingface" and entry.model_id == repo
    assert entry.license == ("mit" if "Qwen3" in repo else "apache-2.0")
    assert entry.architecture_type == ("qwen3" if "Qwen3" in repo else "qwen2")
    # downloaded into the store's tmp/ and removed once converted: no second copy left
    assert list((store.root / "tmp").iterdir()) == []
    hf_home = Path(os.environ["HF_HOME"])
    assert not list(hf_home.rglob("*.safetensors"))


def test_import_hub_url_with_tree_revision(cli, store, hub_repos):
    sha = hub_repos["tiny/Qwen2-Tiny"]
    res = cli("import", f"https://huggingface.co/tiny/Qwen2-Tiny/tree/{sha}",
              "--accept-license", "--json")
    assert json.loads(res.stdout)["source"]["revision"] == sha


def test_sharded_import_dedups_against_the_single_file(cli, store, model_dirs, hub_repos):
    assert len(list(model_dirs["qwen2-sharded"].glob("*.safetensors"))) >= 2
    cli("import", "tiny/Qwen2-Sharded", "--accept-license")
    assert_round_trip(store, "qwen2-sharded", model_dirs["qwen2-sharded"])
    res = cli("import", model_dirs["qwen2"], "--accept-license")
    assert "identical content is held by qwen2-sharded" in res.stdout
    assert list(store.refs()) == ["qwen2-sharded"]


def test_reimport_writes_nothing_and_new_revision_gets_v2(cli, store, model_dirs, hub_server,
                                                          hub_repos):
    cli("import", "tiny/Evolving", "--accept-license")
    before = snapshot(store.root)
    res = cli("import", "tiny/Evolving", "--accept-license")
    assert "identical content is held by evolving" in res.stdout
    assert snapshot(store.root) == before  # not a byte written
    du1 = json.loads(cli("du", "--json").stdout)

    new_sha = hub_server.add_repo("tiny/Evolving", model_dirs["qwen2-changed"])
    try:
        res = cli("import", "tiny/Evolving", "--accept-license", "--json")
        doc = json.loads(res.stdout)
        assert doc["name"] == "evolving-v2" and doc["source"]["revision"] == new_sha
        du2 = json.loads(cli("du", "--json").stdout)
        diff = json.loads(cli("diff", "evolving", "evolving-v2", "--json").stdout)
    finally:
        hub_server.add_repo("tiny/Evolving", model_dirs["qwen2"])
    assert [c["name"] for c in diff["changed"]] == [tiny_changed_tensor()]
    assert diff["changed"][0]["relative_l2"] > 0.1
    assert not diff["added"] and not diff["removed"]
    changed_obj = diff["changed"][0]["b"]
    size = store.objects.size(changed_obj)
    manifest_size = store.objects.size(store.resolve("evolving-v2").commit)
    # each distinct tensor is stored once: only the changed tensor and a manifest are new
    assert du2["physical_bytes"] - du1["physical_bytes"] == size + manifest_size
    assert du2["logical_bytes"] > du2["physical_bytes"] * 1.5


def tiny_changed_tensor() -> str:
    from tests.tiny_models import DOWN_PROJ_CHANGED

    return DOWN_PROJ_CHANGED


def test_moe_import_keeps_the_per_expert_layout(cli, store, hub_repos):
    cli("import", "tiny/Qwen3-MoE-Tiny", "--accept-license")
    m = store.read_manifest(store.resolve("qwen3-moe-tiny").commit)
    assert m.architecture == "qwen3_moe"
    assert any(".mlp.experts.3." in n for n in m.tensors)


# -- refusals: one clear line, and the store exactly as it was -----------------------
REFUSALS = [
    (["tiny/Does-Not-Exist", "--accept-license"], "not found on the Hub"),
    (["tiny/Gated-Tiny", "--accept-license"], "is gated"),
    (["tiny/Pickle-Only", "--accept-license"], "only pickled weights"),
    (["tiny/Remote-Code", "--accept-license"], "unsupported architecture 'qwen'"),
    (["tiny/Qwen2-Tiny"], "license 'apache-2.0' not accepted"),
    (["tiny/Qwen2-Tiny", "--accept-license", "--name", "Bad/Name"], "bad model name"),
    (["tiny/Qwen2-Tiny", "--accept-license", "--name", "taken"], "next free name: taken-v2"),
    (["tiny/Qwen2-Tiny", "--accept-license", "--max-size", "1KB"], "larger than --max-size"),
    (["tiny/Qwen2-Tiny", "--accept-license", "--revision", "nope"], "revision 'nope' not found"),
    (["./no/such/folder", "--accept-license"], "neither a local model folder"),
]


@pytest.mark.parametrize("args,message", REFUSALS, ids=[m for _, m in REFUSALS])
def test_import_refusals_leave_the_store_untouched(cli, store, model_dirs, hub_repos, args,
                                                   message):
    cli("import", model_dirs["qwen3"], "--accept-license", "--name", "taken")
    before = snapshot(store.root)
    res = cli("import", *args, ok=False)
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(store.root) == before


def test_refusal_on_an_absent_store_creates_nothing(cli, store_path, hub_repos):
    res = cli("import", "tiny/Pickle-Only", "--accept-license", ok=False)
    assert res.exit_code == 1 and not store_path.exists()


def test_gated_repo_imports_with_a_token(tmp_path, hub_repos):
    res = run_mstore("import", "tiny/Gated-Tiny", "--accept-license", store=tmp_path / "s",
                     env_extra={"HF_TOKEN": "hf_test"}, hf_home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    assert "imported gated-tiny" in res.stdout


def test_license_prompt_needs_a_terminal_yes(cli, store, hub_repos):
    # CliRunner's stdin is not a terminal: no prompt, a clear refusal instead
    res = cli("import", "tiny/Qwen3-Tiny", ok=False, input="y\n")
    assert "--accept-license" in res.stderr and not store.root.exists()


def test_no_network_is_a_clear_error(tmp_path):
    from tests.hub_server import refused_endpoint

    res = run_mstore("import", "tiny/Qwen2-Tiny", "--accept-license", store=tmp_path / "s",
                     env_extra={"HF_ENDPOINT": refused_endpoint()}, hf_home=tmp_path / "hf")
    assert res.returncode == 1
    assert res.stderr.startswith("error: cannot reach the Hub") and "Traceback" not in res.stderr


def test_offline_mode_imports_from_the_hf_cache(tmp_path, hub_repos):
    hf_home = tmp_path / "hf"
    offline = {"HF_HUB_OFFLINE": "1"}
    res = run_mstore("import", "tiny/Qwen2-Tiny", "--accept-license", store=tmp_path / "s",
                     env_extra=offline, hf_home=hf_home)
    assert res.returncode == 1 and "HF_HUB_OFFLINE" in res.stderr
    # fill the HF cache the way `hf download` would, then import offline from it
    import subprocess
    import sys

    from tests.conftest import HUB
    from tests.hub_server import clean_environ, hub_env

    env = {**clean_environ(), **hub_env(HUB, hf_home=hf_home)}
    subprocess.run([sys.executable, "-c", "from huggingface_hub import snapshot_download;"
                    "snapshot_download('tiny/Qwen2-Tiny')"], check=True, env=env)
    res = run_mstore("import", "tiny/Qwen2-Tiny", "--accept-license", "--json",
                     store=tmp_path / "s", env_extra=offline, hf_home=hf_home)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["source"]["revision"] == hub_repos["tiny/Qwen2-Tiny"]


def test_hub_import_reads_a_complete_hf_cache_instead_of_downloading(tmp_path, hub_server,
                                                                     hub_repos):
    import subprocess
    import sys

    from tests.conftest import HUB
    from tests.hub_server import clean_environ, hub_env

    hf_home = tmp_path / "hf"
    env = {**clean_environ(), **hub_env(HUB, hf_home=hf_home)}
    subprocess.run([sys.executable, "-c", "from huggingface_hub import snapshot_download;"
                    "snapshot_download('tiny/Qwen3-Tiny')"], check=True, env=env)
    hub_server.reset()
    res = run_mstore("import", "tiny/Qwen3-Tiny", "--accept-license", store=tmp_path / "s",
                     hf_home=hf_home)
    assert res.returncode == 0, res.stderr
    assert not [r for r in hub_server.requests
                if r.method == "GET" and r.path.endswith(".safetensors")]


@pytest.mark.slow
def test_cut_off_download_fails_clearly_and_a_retry_completes(tmp_path, hub_server, hub_repos):
    shards = sorted(n for n in hub_server.files("tiny/Qwen2-Sharded") if n.endswith(".safetensors"))
    hub_server.faults.drop(f"tiny/Qwen2-Sharded/{shards[-1]}", 0, times=8)
    store = tmp_path / "s"
    res = run_mstore("import", "tiny/Qwen2-Sharded", "--accept-license", store=store,
                     hf_home=tmp_path / "hf")
    assert res.returncode == 1 and "run the same import again to resume" in res.stderr
    assert not (store / "registry.json").exists() or json.loads(
        (store / "registry.json").read_text())["models"] == {}
    hub_server.reset()
    res = run_mstore("import", "tiny/Qwen2-Sharded", "--accept-license", store=store,
                     hf_home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    fetched = [r.path for r in hub_server.requests if r.method == "GET" and "/resolve/" in r.path]
    assert any(shards[-1] in p for p in fetched)
    assert not any(shards[0] in p for p in fetched)  # the finished shard was kept
    assert list((store / "tmp").iterdir()) == []


def test_corrupted_transfer_is_refused(tmp_path, hub_server, hub_repos):
    hub_server.faults.corrupt_file.add("tiny/Qwen3-Tiny/model.safetensors")
    res = run_mstore("import", "tiny/Qwen3-Tiny", "--accept-license", store=tmp_path / "s",
                     hf_home=tmp_path / "hf")
    assert res.returncode == 1 and "does not match its published checksum" in res.stderr


def test_reimport_of_an_unchanged_folder_skips_hashing(store, model_dirs, tmp_path,
                                                       monkeypatch):
    import shutil

    from mstore.hub import importer
    from mstore.store import objects

    folder = tmp_path / "src"
    shutil.copytree(model_dirs["qwen2"], folder)
    first = importer.import_model(store, str(folder), name="a", accept_license=True)
    assert (store.root / "import-cache.json").exists()

    def no_hashing(*a, **k):
        raise AssertionError("an unchanged shard was hashed again")

    monkeypatch.setattr(objects, "tensor_oid", no_hashing)
    again = importer.import_model(store, str(folder), accept_license=True)
    assert again.already and again.commit == first.commit
    # a rewritten shard (new mtime) is hashed again, whatever the cache says
    monkeypatch.undo()
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    calls = []
    real = objects.tensor_oid
    monkeypatch.setattr(objects, "tensor_oid", lambda *a: calls.append(1) or real(*a))
    assert importer.import_model(store, str(folder), accept_license=True).already
    assert calls


def test_reimport_of_a_held_unchanged_folder_runs_no_check_and_writes_nothing(store, model_dirs,
                                                                            tmp_path):
    """The stat cache names the content; a ref holds it: no header or tokenizer is read
    (tokenizers is never loaded), nothing is written, and the output is the full path's."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, clean_environ

    folder = tmp_path / "src"
    shutil.copytree(model_dirs["qwen2"], folder)
    first = run_mstore("import", str(folder), "--accept-license", "--name", "a", "--json",
                       store=store.root)
    assert first.returncode == 0, first.stderr
    before = snapshot(store.root)
    probe = ("import json, sys; from mstore.hub.importer import import_model; "
             "from mstore.store import Store; "
             f"r = import_model(Store({str(store.root)!r}), {str(folder)!r}, "
             "accept_license=True); "
             "print(json.dumps([r.to_json(), 'tokenizers' in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=clean_environ(), cwd=REPO_ROOT, check=True)
    doc, tokenizer_loaded = json.loads(res.stdout)
    assert not tokenizer_loaded
    assert snapshot(store.root) == before
    # the same result the conversion path gives: every object counted as present
    first_doc = json.loads(first.stdout)
    assert doc == {**first_doc, "bytes_written": 0, "bytes_present": doc["bytes_present"],
                   "already": True, "held_by": "a"}
    assert doc["bytes_present"] == first_doc["bytes_written"] + first_doc["bytes_present"]
    (folder / "model.safetensors").touch()  # a new mtime: the shard is read and hashed again
    slow = run_mstore("import", str(folder), "--accept-license", "--json", store=store.root)
    assert json.loads(slow.stdout) == doc


def test_reimport_of_an_unchanged_folder_restores_a_lost_object(cli, store, model_dirs,
                                                                tmp_path):
    import shutil

    folder = tmp_path / "src"
    shutil.copytree(model_dirs["qwen2"], folder)
    cli("import", str(folder), "--accept-license", "--name", "a")
    m = store.read_manifest(store.resolve("a").commit)
    lost = sorted(t.object for t in m.tensors.values())[0]
    store.objects.path(lost).unlink()
    res = cli("import", str(folder), "--accept-license", "--json")
    doc = json.loads(res.stdout)
    assert doc["already"] and doc["bytes_written"] == store.objects.size(lost)
    assert json.loads(cli("fsck", "--json").stdout)["ok"]
    res = cli("import", str(folder), "--accept-license", "--name", "b")
    assert "identical content is held by a" in res.stdout and "added the name b" in res.stdout
    assert store.resolve("b").commit == store.resolve("a").commit


def test_stat_cache_pointing_at_collected_objects_is_not_trusted(store, model_dirs, tmp_path):
    import shutil

    from mstore.hub import importer
    from mstore.store.gc import collect

    folder = tmp_path / "src"
    shutil.copytree(model_dirs["qwen2"], folder)
    importer.import_model(store, str(folder), name="a", accept_license=True)
    store.remove("a")
    collect(store, grace=0)
    res = importer.import_model(store, str(folder), name="b", accept_license=True)
    assert not res.already and res.bytes_written > 0
    assert_round_trip(store, "b", folder)


def test_too_little_free_disk_is_refused_before_anything_is_written(cli, store, hub_repos,
                                                                    monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    res = cli("import", "tiny/Qwen2-Tiny", "--accept-license", ok=False)
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines()[-1].startswith("error: not enough free disk")
    assert not store.root.exists()
