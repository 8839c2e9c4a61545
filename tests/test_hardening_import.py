"""Issue 11, import items: refusals before any write (2), concurrent imports of one source
(10), Hub errors named rightly (13), HF cache snapshot folders (15), re-import of a held
Hub revision without downloading (19)."""

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import HUB, REPO_ROOT, run_mstore, snapshot
from tests.hub_server import clean_environ, hub_env


def one_error_line(res) -> str:
    """The stderr's error line; asserts there is exactly one and no traceback."""
    err = res.stderr if hasattr(res, "stderr") else ""
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "unexpected" not in err, err
    return errors[0]


def resolves(hub_server) -> list[str]:
    return [r.path for r in hub_server.requests if "/resolve/" in r.path]


# -- item 2: every refusal before the first byte reaches the store ---------------------
DAMAGED = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "garbage": lambda raw: b"\x00\xffnot json at all",
    "empty-object": lambda raw: b"{}",
    "wrong-version": lambda raw: re.sub(rb'"version": \d+', b'"version": 77', raw),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
@pytest.mark.parametrize("source", ["local", "hub"])
def test_damaged_registry_refuses_before_converting_or_downloading(
        cli, store, model_dirs, hub_server, hub_repos, damage, source):
    cli("import", model_dirs["qwen3"], "--accept-license", "--name", "base")
    reg = store.root / "registry.json"
    reg.write_bytes(DAMAGED[damage](reg.read_bytes()))
    before = snapshot(store.root)
    hub_server.reset()
    src = str(model_dirs["qwen2"]) if source == "local" else "tiny/Qwen2-Tiny"
    res = cli("import", src, "--accept-license", ok=False)
    assert res.exit_code == 1
    assert "damaged" in one_error_line(res)
    assert snapshot(store.root) == before  # no object, no tmp file, no download folder
    assert hub_server.requests == []  # refused before even asking the Hub


def test_a_changed_folder_under_its_taken_name_refuses_before_writing(cli, store, model_dirs,
                                                                       tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(model_dirs["qwen2"], folder)
    cli("import", folder, "--accept-license", "--name", "mine")
    # the same folder unchanged under its own name: a no-op, not a taken name
    res = cli("import", folder, "--accept-license", "--name", "mine")
    assert "already imported" in res.stdout
    shutil.copy(model_dirs["qwen2-changed"] / "model.safetensors", folder / "model.safetensors")
    before = snapshot(store.root)
    res = cli("import", folder, "--accept-license", "--name", "mine", ok=False)
    assert res.exit_code == 1
    assert "'mine' is already taken; next free name: mine-v2" in one_error_line(res)
    assert snapshot(store.root) == before


def test_a_new_hub_revision_under_the_old_revisions_name_downloads_nothing(
        cli, store, model_dirs, hub_server, hub_repos):
    cli("import", "tiny/Evolving", "--accept-license", "--name", "evo")
    hub_server.add_repo("tiny/Evolving", model_dirs["qwen2-changed"])
    try:
        before = snapshot(store.root)
        hub_server.reset()
        res = cli("import", "tiny/Evolving", "--accept-license", "--name", "evo", ok=False)
    finally:
        hub_server.add_repo("tiny/Evolving", model_dirs["qwen2"])
    assert res.exit_code == 1 and "'evo' is already taken" in one_error_line(res)
    assert snapshot(store.root) == before
    assert not [p for p in resolves(hub_server) if p.endswith(".safetensors")]


@pytest.mark.parametrize("args,message", [
    (["--name", "Upper/Case"], "bad model name"),
    (["--name", "-dash"], "bad model name"),
    (["--name", "taken"], "'taken' is already taken"),
    ([], "not accepted: pass --accept-license"),
    (["--max-size", "10KB"], "larger than --max-size"),
], ids=["bad-name-slash", "bad-name-dash", "taken", "license", "too-large"])
@pytest.mark.parametrize("source", ["local", "hub"])
def test_refusals_write_nothing_and_download_nothing(cli, store, model_dirs, hub_server,
                                                     hub_repos, args, message, source):
    cli("import", model_dirs["qwen3"], "--accept-license", "--name", "taken")
    before = snapshot(store.root)
    hub_server.reset()
    src = str(model_dirs["qwen2"]) if source == "local" else "tiny/Qwen2-Tiny"
    extra = [] if "license" in message else ["--accept-license"]
    res = cli("import", src, *extra, *args, ok=False)
    assert res.exit_code == 1 and message in one_error_line(res)
    assert snapshot(store.root) == before
    assert not [p for p in resolves(hub_server) if p.endswith(".safetensors")]


# -- item 10: two imports of one source at once ----------------------------------------
def _popen_import(source: str, store: Path, hf_home: Path, *extra: str) -> subprocess.Popen:
    env = {**clean_environ(), **hub_env(HUB, hf_home=hf_home)}
    return subprocess.Popen([sys.executable, "-m", "mstore", "--store", str(store), "import",
                             source, "--accept-license", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO_ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("shared_hf_home", [True, False])
def test_two_imports_of_one_hub_repo_at_once_both_succeed(tmp_path, hub_server, hub_repos,
                                                          shared_hf_home):
    store = tmp_path / "s"
    run_mstore("init", store=store)
    hub_server.faults.delay["tiny/Qwen2-Sharded/model-00001-of-00003.safetensors"] = 2.0
    procs = [_popen_import("tiny/Qwen2-Sharded", store,
                           tmp_path / ("hf" if shared_hf_home else f"hf{i}"))
             for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    said = sorted(out.split()[0] for out, _ in outs)
    assert said == ["already", "imported"], outs
    assert list(json.loads((store / "registry.json").read_text())["models"]) == ["qwen2-sharded"]
    assert list((store / "tmp").iterdir()) == []  # download folder and lock file gone
    got = [r for r in hub_server.requests if r.method == "GET"
           and r.path.endswith("model-00001-of-00003.safetensors")]
    assert len(got) == 1  # one download; the second import waited and reused the result


@pytest.mark.slow
def test_two_imports_of_one_local_folder_at_once_both_succeed(tmp_path, model_dirs):
    store = tmp_path / "s"
    run_mstore("init", store=store)
    folder = tmp_path / "src"
    shutil.copytree(model_dirs["qwen2-sharded"], folder)
    procs = [_popen_import(str(folder), store, tmp_path / "hf") for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    said = sorted(out.split()[0] for out, _ in outs)
    assert said == ["already", "already", "imported"], outs
    assert list(json.loads((store / "registry.json").read_text())["models"]) == ["src"]
    assert list((store / "tmp").iterdir()) == []
    res = run_mstore("fsck", store=store)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_waiting_import_holds_no_lock_after_the_holder_removed_the_file(tmp_path):
    from mstore.hub.import_lock import ImportLock

    order = []
    first = ImportLock(tmp_path, "k")
    first.__enter__()

    def second():
        with ImportLock(tmp_path, "k", on_wait=lambda: order.append("waiting")):
            order.append("second")
            time.sleep(0.2)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    order.append("first-done")
    first.__exit__(None, None, None)
    # a third comer after the file was removed must wait for the second, not run beside it
    time.sleep(0.05)
    with ImportLock(tmp_path, "k"):
        order.append("third")
    t.join()
    assert order == ["waiting", "first-done", "second", "third"]
    assert list(tmp_path.iterdir()) == []


# -- item 13: Hub errors named rightly ---------------------------------------------------
@pytest.mark.parametrize("path", ["model.safetensors", "tokenizer.json"])
def test_a_file_that_does_not_match_its_checksum_says_so_every_time(cli, store_path,
                                                                    hub_server, hub_repos, path):
    hub_server.faults.corrupt_file.add(f"tiny/Qwen3-Tiny/{path}")
    for _attempt in range(2):  # a rerun fails the same way, and says the same
        res = cli("import", "tiny/Qwen3-Tiny", "--accept-license", ok=False)
        line = one_error_line(res)
        assert res.exit_code == 1
        assert f"'{path}' downloaded from 'tiny/Qwen3-Tiny' does not match its published " \
               "checksum" in line, line
        assert "failed (" not in line and "resume" not in line
    assert json.loads((store_path / "registry.json").read_text())["models"] == {}
    assert not list((store_path / "objects").rglob("*/*"))
    hub_server.faults.reset()
    res = cli("import", "tiny/Qwen3-Tiny", "--accept-license")
    assert "imported qwen3-tiny" in res.stdout
    assert list((store_path / "tmp").iterdir()) == []


UNSAFE_NAMES = ["tokenizer\\evil.json", "..\\..\\evil.json", "sub/../../evil.json",
                "/etc/evil.json", "./config2.json", "a//b.json", "C:evil.json",
                "x\x1b[2Jy.json", "nul\x00.json", "new\nline.json", "del\x7f.json"]


@pytest.mark.parametrize("bad", UNSAFE_NAMES, ids=[ascii(n) for n in UNSAFE_NAMES])
def test_unsafe_hub_file_names_are_refused_before_anything_is_fetched(cli, store_path,
                                                                      hub_server, model_dirs,
                                                                      bad):
    files = {p.name: p.read_bytes() for p in model_dirs["qwen2"].iterdir() if p.is_file()}
    files[bad] = b"{}"
    hub_server.add_repo("evil/Names", files, raw_paths=True)
    try:
        hub_server.reset()
        res = cli("import", "evil/Names", "--accept-license", ok=False)
    finally:
        hub_server.remove_repo("evil/Names")
    assert res.exit_code == 1
    assert one_error_line(res).startswith("error: refusing repo file name ")
    assert not store_path.exists()  # no tmp folder, no store even
    assert resolves(hub_server) == []


def _hub_case(hub_server, model_dirs, tmp_path):
    """Failure cases that reach a user through the Hub client: (name, setup, args)."""
    qwen2 = {p.name: p.read_bytes() for p in model_dirs["qwen2"].iterdir() if p.is_file()}
    bad_config = {**qwen2, "config.json": b"{not json"}
    bad_st = {**qwen2, "model.safetensors": b"\xff" * 7}
    bad_index = {**qwen2, "model.safetensors.index.json":
                 json.dumps({"weight_map": {"w": "..\\model.safetensors"}}).encode()}
    huge_header = {**qwen2, "model.safetensors": (2**40).to_bytes(8, "little") + b"{}"}
    from tests.hub_server import refused_endpoint

    return [
        ("sha256", lambda: hub_server.faults.corrupt_file.add("tiny/Qwen2-Tiny/model.safetensors"),
         ["tiny/Qwen2-Tiny"]),
        ("blob-id", lambda: hub_server.faults.corrupt_file.add("tiny/Qwen2-Tiny/tokenizer.json"),
         ["tiny/Qwen2-Tiny"]),
        ("missing", lambda: hub_server.faults.missing_file.add("tiny/Qwen2-Tiny/tokenizer.json"),
         ["tiny/Qwen2-Tiny"]),
        ("refused-cdn", lambda: hub_server.faults.redirect.update(
            {"tiny/Qwen2-Tiny/model.safetensors": refused_endpoint()}), ["tiny/Qwen2-Tiny"]),
        ("repo-id-dashes", None, ["tiny/bad--name"]),
        ("repo-id-dots", None, ["tiny/bad..name"]),
        ("repo-id-long", None, ["tiny/" + "a" * 120]),
        ("revision", None, ["tiny/Qwen2-Tiny", "--revision", "../../x"]),
        ("gated", None, ["tiny/Gated-Tiny"]),
        ("not-found", None, ["tiny/Nope"]),
        ("pickle", None, ["tiny/Pickle-Only"]),
        ("bad-config", lambda: hub_server.add_repo("bad/Config", bad_config), ["bad/Config"]),
        ("bad-safetensors", lambda: hub_server.add_repo("bad/St", bad_st), ["bad/St"]),
        ("huge-header", lambda: hub_server.add_repo("bad/Huge", huge_header), ["bad/Huge"]),
        ("bad-index", lambda: hub_server.add_repo("bad/Index", bad_index), ["bad/Index"]),
    ]


@pytest.mark.slow
def test_no_hub_failure_is_reported_as_unexpected(hub_server, hub_repos, model_dirs, tmp_path):
    from tests.conftest import Cli

    failures = []
    for name, setup, args in _hub_case(hub_server, model_dirs, tmp_path):
        hub_server.reset()
        if setup:
            setup()
        res = Cli(tmp_path / name)("import", *args, "--accept-license", ok=False)
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        if res.exit_code == 0 or len(lines) != 1 or "unexpected" in res.stderr \
                or "Traceback" in res.stderr:
            failures.append((name, res.exit_code, res.stderr, repr(res.exception)))
    hub_server.reset()
    assert not failures, "\n".join(f"{n}: exit {c}: {err!r} {exc}" for n, c, err, exc in failures)


def test_an_unsafe_shard_name_in_a_local_index_is_refused(cli, store, model_dirs, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(model_dirs["qwen2-sharded"], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "..\\outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    res = cli("import", folder, "--accept-license", ok=False)
    assert res.exit_code == 1
    assert one_error_line(res).startswith("error: refusing repo file name '..\\\\outside")
    assert not store.root.exists()


# -- item 15: the folder `hf download` prints --------------------------------------------
def _hf_download(repo: str, cache: Path) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, cache_dir=cache))


def test_an_hf_cache_snapshot_folder_imports(cli, store, hub_repos, model_dirs, tmp_path):
    from tests.test_import import assert_round_trip

    snap = _hf_download("tiny/Qwen2-Tiny", tmp_path / "hf-cache")
    assert snap.parent.name == "snapshots" and (snap / "config.json").is_symlink()
    res = cli("import", snap, "--accept-license", "--json")
    doc = json.loads(res.stdout)
    assert doc["name"] == "qwen2-tiny" and not doc["already"]  # named by repo, not by sha
    assert_round_trip(store, "qwen2-tiny", model_dirs["qwen2"])
    assert store.refs()["qwen2-tiny"].model_id == "tiny/Qwen2-Tiny"


@pytest.mark.parametrize("target", ["outside", "other-repo", "cache-root"])
def test_a_snapshot_symlink_leaving_its_cache_repo_is_refused(cli, store_path, hub_repos,
                                                              tmp_path, target):
    cache = tmp_path / "hf-cache"
    snap = _hf_download("tiny/Qwen2-Tiny", cache)
    other = _hf_download("tiny/Qwen3-Tiny", cache)
    secret = {"outside": tmp_path / "secret.json",
              "other-repo": (other / "tokenizer_config.json").resolve(),
              "cache-root": cache / "stray.json"}[target]
    if not secret.exists():
        secret.write_text("{}")
    (snap / "tokenizer_config.json").unlink()
    (snap / "tokenizer_config.json").symlink_to(secret)
    res = cli("import", snap, "--accept-license", ok=False)
    assert res.exit_code == 1
    assert "symlink pointing outside its HF cache repo folder" in one_error_line(res)
    assert not store_path.exists()


def test_a_plain_folder_named_like_a_snapshot_still_may_not_link_out(cli, store_path,
                                                                     model_dirs, tmp_path):
    # snapshots/<x> inside a folder that is not a models--* cache repo: the folder's own rule
    snap = tmp_path / "not-a-cache" / "snapshots" / "abc"
    shutil.copytree(model_dirs["qwen2"], snap)
    (tmp_path / "not-a-cache" / "blobs").mkdir()
    (tmp_path / "not-a-cache" / "blobs" / "x.json").write_text("{}")
    (snap / "tokenizer_config.json").unlink()
    (snap / "tokenizer_config.json").symlink_to(tmp_path / "not-a-cache" / "blobs" / "x.json")
    res = cli("import", snap, "--accept-license", ok=False)
    assert "symlink pointing outside the folder" in one_error_line(res)


# -- item 19: a held Hub revision is not downloaded again ------------------------------
@pytest.mark.parametrize("how", ["repo-id", "url-with-sha", "revision-main"])
def test_reimporting_a_held_hub_revision_fetches_no_file(cli, store, hub_server, hub_repos, how):
    sha = hub_repos["tiny/Qwen3-Tiny"]
    cli("import", "tiny/Qwen3-Tiny", "--accept-license")
    before = snapshot(store.root)
    hub_server.reset()
    args = {"repo-id": ["tiny/Qwen3-Tiny"],
            "url-with-sha": [f"https://huggingface.co/tiny/Qwen3-Tiny/tree/{sha}"],
            "revision-main": ["tiny/Qwen3-Tiny", "--revision", "main"]}[how]
    res = cli("import", *args, "--accept-license")
    assert "already imported: identical content is held by qwen3-tiny" in res.stdout
    assert resolves(hub_server) == []  # model_info only: no file downloaded
    (only,) = hub_server.requests  # one model_info call resolves the revision
    assert only.path.startswith("/api/models/tiny/Qwen3-Tiny")
    assert snapshot(store.root) == before


def test_a_held_hub_revision_under_a_new_name_is_a_second_ref_without_download(
        cli, store, hub_server, hub_repos):
    cli("import", "tiny/Qwen2-Tiny", "--accept-license")
    hub_server.reset()
    res = cli("import", "tiny/Qwen2-Tiny", "--accept-license", "--name", "alias", "--json")
    doc = json.loads(res.stdout)
    assert doc["already"] and doc["held_by"] == "qwen2-tiny" and doc["name"] == "alias"
    assert doc["parameters"] > 0
    refs = store.refs()
    assert refs["alias"].commit == refs["qwen2-tiny"].commit
    assert resolves(hub_server) == []
    # the name is the holder now: asking again adds nothing
    res = cli("import", "tiny/Qwen2-Tiny", "--accept-license", "--name", "alias")
    assert "held by alias" in res.stdout and "nothing added" in res.stdout


def test_a_held_revision_with_a_lost_object_is_downloaded_again_to_restore_it(
        cli, store, hub_server, hub_repos):
    cli("import", "tiny/Qwen2-Tiny", "--accept-license")
    m = store.read_manifest(store.resolve("qwen2-tiny").commit)
    lost = store.objects.path(next(iter(m.tensors.values())).object)
    lost.unlink()
    hub_server.reset()
    res = cli("import", "tiny/Qwen2-Tiny", "--accept-license")
    assert "identical content is held by qwen2-tiny" in res.stdout
    assert any(p.endswith("model.safetensors") for p in resolves(hub_server))
    assert lost.is_file()
    assert cli("fsck").exit_code == 0


def test_a_second_name_for_a_held_revision_is_reported_as_its_holder(cli, store, hub_repos):
    cli("import", "tiny/Qwen2-Tiny", "--accept-license", "--name", "b-first")
    cli("tag", "b-first", "z-second")
    res = cli("import", "tiny/Qwen2-Tiny", "--accept-license", "--name", "z-second")
    assert "held by z-second" in res.stdout and "nothing added" in res.stdout
    assert sorted(store.refs()) == ["b-first", "z-second"]


def test_hub_file_names_with_glob_characters_are_downloaded_as_themselves(cli, store,
                                                                          hub_server, model_dirs):
    files = {p.name: p.read_bytes() for p in model_dirs["qwen2"].iterdir() if p.is_file()}
    files["extra[1]*?.json"] = b'{"odd": true}'
    files["extra1x.json"] = b'{"plain": true}'  # what the name, read as a pattern, matches
    hub_server.add_repo("odd/Globs", files)
    try:
        cli("import", "odd/Globs", "--accept-license")
    finally:
        hub_server.remove_repo("odd/Globs")
    m = store.read_manifest(store.resolve("globs").commit)
    got = store.objects.read_bytes(m.files["extra[1]*?.json"])
    assert got == b'{"odd": true}'
    assert list((store.root / "tmp").iterdir()) == []
