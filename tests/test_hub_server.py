"""The test Hub and the tiny models work with the real huggingface_hub client and transformers.

Client calls run in subprocesses whose environment points huggingface_hub at the server
(it reads HF_ENDPOINT at import time, and this process may have imported it already).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import tiny_models as tm
from tests.hub_server import HubServer, clean_environ, hub_env, refused_endpoint

REPO_ROOT = Path(__file__).resolve().parent.parent

# Helpers available to every client script: ARGS (the JSON passed by run_client), emit()
# to hand a JSON result back, error() to name the exception a call raises.
_PRELUDE = """\
import json, os, sys, hashlib
from pathlib import Path
ARGS = json.loads(sys.argv[1])
import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
assert huggingface_hub.constants.ENDPOINT == os.environ["HF_ENDPOINT"]

def emit(obj):
    print("RESULT " + json.dumps(obj))

def error(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except Exception as e:
        return type(e).__name__
    return None

def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
"""


def run_client(server: HubServer, code: str, tmp_path: Path, args=None, token=None, timeout=60):
    env = clean_environ()
    env.update(hub_env(server, hf_home=tmp_path / "hf_home", token=token))
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(code), json.dumps(args or {})],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT "):])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- fixtures ------------------------------------------------------------------------------

BUILDERS = {
    "qwen2": (tm.build_qwen2, {}),
    "qwen2-sharded": (tm.build_qwen2, {"sharded": True}),
    "qwen2-untied": (tm.build_qwen2, {"tie": False}),
    "qwen2-changed": (tm.build_qwen2, {"change_one_tensor": True}),
    "qwen3": (tm.build_qwen3, {}),
    "qwen2-moe": (tm.build_qwen2_moe, {}),
    "qwen3-moe": (tm.build_qwen3_moe, {}),
    "pickle-only": (tm.build_pickle_only, {}),
    "unsupported": (tm.build_unsupported_arch, {}),
}
DENSE = ["qwen2", "qwen2-sharded", "qwen2-untied", "qwen2-changed", "qwen3"]
MOE = ["qwen2-moe", "qwen3-moe"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: fn(root / name, **kw) for name, (fn, kw) in BUILDERS.items()}


@pytest.fixture(scope="module")
def hub(models):
    with HubServer(tokens={"hf_test"}) as server:
        server.add_repo("tiny/qwen2", models["qwen2"])
        server.add_repo("tiny/qwen2-sharded", models["qwen2-sharded"], license="mit")
        nested = dict(folder_bytes(models["qwen3"]))
        nested["extra/notes.txt"] = b"notes\n"
        nested["extra/deeper/more.bin"] = b"\x00\x01\x02" * 100
        server.add_repo("tiny/nested", nested)
        server.add_repo("tiny/gated", models["qwen2"], gated=True, license="llama3")
        yield server


@pytest.fixture(autouse=True)
def _reset_hub(request):
    yield
    if "hub" in request.fixturenames:
        server = request.getfixturevalue("hub")
        assert server.errors == [], server.errors[0]
        server.reset()


# -- the real client against the server ----------------------------------------------------

def test_model_info_snapshot_tree_refs_with_real_client(hub, models, tmp_path):
    src = folder_bytes(models["qwen2-sharded"])
    sha = hub.sha("tiny/qwen2-sharded")
    out = run_client(hub, """
        api = HfApi()
        info = api.model_info("tiny/qwen2-sharded", files_metadata=True)
        plain = api.model_info("tiny/qwen2-sharded")
        path = snapshot_download("tiny/qwen2-sharded", cache_dir=ARGS["cache"])
        emit({
            "sha": info.sha, "plain_sha": plain.sha, "gated": info.gated,
            "license": info.card_data.license, "model_type": info.config["model_type"],
            "params": info.safetensors.total,
            "siblings": {s.rfilename: [s.size, s.blob_id, s.lfs and s.lfs.sha256] for s in info.siblings},
            "plain_sizes": [s.size for s in plain.siblings],
            "snapshot": path,
            "files": {str(p.relative_to(path)): sha256(p) for p in Path(path).rglob("*") if p.is_file()},
            "tree": sorted(f.path for f in api.list_repo_tree("tiny/nested", recursive=True)),
            "top": sorted(f.path for f in api.list_repo_tree("tiny/nested")),
            "sub": sorted(f.path for f in api.list_repo_tree("tiny/nested", path_in_repo="extra")),
            "paths": sorted(type(f).__name__ + ":" + f.path for f in
                            api.get_paths_info("tiny/nested", ["config.json", "extra", "nope"])),
            "refs": [(b.name, b.target_commit) for b in api.list_repo_refs("tiny/nested").branches],
            "st_meta": [(m.sharded, sum(m.parameter_count.values()))
                        for m in [api.get_safetensors_metadata("tiny/qwen2-sharded")]][0],
            "exists": [api.file_exists("tiny/nested", "extra/notes.txt"), api.file_exists("tiny/nested", "x"),
                       api.repo_exists("tiny/nested"), api.repo_exists("tiny/nope")],
            "auth_check": [error(api.auth_check, "tiny/qwen2"), error(api.auth_check, "tiny/gated"),
                           error(api.auth_check, "tiny/nope")],
        })
    """, tmp_path, args={"cache": str(tmp_path / "cache")})

    assert out["sha"] == out["plain_sha"] == sha
    assert out["gated"] is False and out["license"] == "mit" and out["model_type"] == "qwen2"
    assert out["params"] > 100_000
    assert set(out["siblings"]) == set(src)
    assert len([n for n in src if n.endswith(".safetensors")]) >= 2
    for name, (size, blob_id, lfs_sha) in out["siblings"].items():
        assert size == len(src[name])
        if name.endswith(".safetensors"):
            assert lfs_sha == sha256(src[name])
        else:
            assert lfs_sha is None
            assert blob_id == hashlib.sha1(b"blob %d\0" % len(src[name]) + src[name]).hexdigest()
    assert out["plain_sizes"] == [None] * len(src)
    # The snapshot folder is named by the commit the server reported; every file is intact.
    assert Path(out["snapshot"]).name == sha
    assert out["files"] == {n: sha256(b) for n, b in src.items()}

    assert "extra/deeper/more.bin" in out["tree"] and "extra/deeper" in out["tree"]
    assert "extra" in out["top"] and "extra/notes.txt" not in out["top"]
    assert out["sub"] == ["extra/deeper", "extra/notes.txt"]
    assert out["paths"] == ["RepoFile:config.json", "RepoFolder:extra"]
    assert out["refs"] == [["main", hub.sha("tiny/nested")]]
    assert out["st_meta"] == [True, out["params"]]
    assert out["exists"] == [True, False, True, False]
    assert out["auth_check"] == [None, "GatedRepoError", "RepositoryNotFoundError"]


def test_new_commit_moves_main_and_old_commit_stays_servable(models, tmp_path):
    with HubServer() as server:
        old = server.add_repo("org/model", models["qwen2"])
        assert server.add_repo("org/model", models["qwen2"]) == old  # same content, same sha
        new = server.add_repo("org/model", models["qwen2-changed"])
        assert new != old and server.sha("org/model") == new
        out = run_client(server, """
            api = HfApi()
            new = snapshot_download("org/model", cache_dir=ARGS["cache"])
            old = snapshot_download("org/model", revision=ARGS["old"], cache_dir=ARGS["cache"])
            emit({
                "main": api.model_info("org/model").sha,
                "new": [Path(new).name, sha256(Path(new) / "model.safetensors")],
                "old": [Path(old).name, sha256(Path(old) / "model.safetensors"),
                        api.model_info("org/model", revision=ARGS["old"]).sha],
                "commits": [c.commit_id for c in api.list_repo_commits("org/model")],
            })
        """, tmp_path, args={"cache": str(tmp_path / "cache"), "old": old})
    assert out["main"] == new
    assert out["new"] == [new, sha256((models["qwen2-changed"] / "model.safetensors").read_bytes())]
    assert out["old"] == [old, sha256((models["qwen2"] / "model.safetensors").read_bytes()), old]
    assert out["commits"] == [new, old]


def test_cut_download_is_resumed_with_a_range_request(hub, models, tmp_path):
    # huggingface_hub writes to disk in DOWNLOAD_CHUNK_SIZE pieces (10 MiB) and resumes from
    # what it wrote; a smaller chunk lets a tiny file show the Range request.
    hub.faults.drop_after_bytes["model.safetensors"] = 100_000
    out = run_client(hub, """
        huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE = 65536
        path = hf_hub_download("tiny/qwen2", "model.safetensors", cache_dir=ARGS["cache"])
        emit(sha256(path))
    """, tmp_path, args={"cache": str(tmp_path / "cache")})
    assert out == sha256((models["qwen2"] / "model.safetensors").read_bytes())
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert [(r.range, r.status) for r in gets] == [(None, 200), ("bytes=65536-", 206)]
    assert hub.faults.drop_after_bytes == {}  # consumed once


@pytest.mark.slow
def test_cut_download_of_a_large_file_resumes_at_the_last_10_mib_boundary(tmp_path):
    """Unpatched client: what reached the disk (whole 10 MiB chunks) is kept, the rest re-sent."""
    import random

    data = random.Random(0).randbytes(12 * 1024 * 1024)
    with HubServer() as server:
        server.add_repo("tiny/big", {"weights.bin": data, "config.json": b"{}"})
        server.faults.drop_after_bytes["weights.bin"] = 11 * 1024 * 1024
        out = run_client(server, """
            emit(sha256(hf_hub_download("tiny/big", "weights.bin", cache_dir=ARGS["cache"])))
        """, tmp_path, args={"cache": str(tmp_path / "cache")})
        gets = [(r.range, r.status) for r in server.requests if r.method == "GET"]
    assert out == sha256(data)
    assert gets == [(None, 200), (f"bytes={10 * 1024 * 1024}-", 206)]


def test_client_errors_without_token(hub, tmp_path):
    out = run_client(hub, """
        api = HfApi()
        c = ARGS["cache"]
        emit({
            "missing_info": error(api.model_info, "tiny/nope"),
            "missing_file_dl": error(hf_hub_download, "tiny/nope", "config.json", cache_dir=c),
            "missing_snapshot": error(snapshot_download, "tiny/nope", cache_dir=c),
            "gated_info": api.model_info("tiny/gated").gated,
            "gated_dl": error(hf_hub_download, "tiny/gated", "config.json", cache_dir=c),
            "gated_snapshot": error(snapshot_download, "tiny/gated", cache_dir=c),
            "gated_wrong_token": error(hf_hub_download, "tiny/gated", "config.json", cache_dir=c,
                                       token="hf_wrong"),
            "bad_rev_info": error(api.model_info, "tiny/qwen2", revision="nope"),
            "bad_rev_dl": error(hf_hub_download, "tiny/qwen2", "config.json", revision="nope", cache_dir=c),
            "bad_rev_snapshot": error(snapshot_download, "tiny/qwen2", revision="v9", cache_dir=c),
            "no_entry": error(hf_hub_download, "tiny/qwen2", "nope.json", cache_dir=c),
            "gated_is_repo_not_found": issubclass(huggingface_hub.errors.GatedRepoError,
                                                  huggingface_hub.errors.RepositoryNotFoundError),
        })
    """, tmp_path, args={"cache": str(tmp_path / "cache")})
    assert out == {
        "missing_info": "RepositoryNotFoundError",
        "missing_file_dl": "RepositoryNotFoundError",
        "missing_snapshot": "RepositoryNotFoundError",
        "gated_info": "manual",
        "gated_dl": "GatedRepoError",
        "gated_snapshot": "GatedRepoError",
        "gated_wrong_token": "GatedRepoError",
        "bad_rev_info": "RevisionNotFoundError",
        "bad_rev_dl": "RevisionNotFoundError",
        "bad_rev_snapshot": "RevisionNotFoundError",
        "no_entry": "RemoteEntryNotFoundError",
        "gated_is_repo_not_found": True,
    }
    statuses = {(r.method, r.path.split("/resolve/")[0], r.status) for r in hub.requests}
    assert ("HEAD", "/tiny/gated", 401) in statuses and ("HEAD", "/tiny/gated", 403) in statuses
    assert not any(r.status and r.status >= 500 for r in hub.requests)


def test_gated_repo_downloads_with_token_and_redirect_drops_auth(hub, models, tmp_path):
    hub.faults.redirect["model.safetensors"] = None
    out = run_client(hub, """
        path = snapshot_download("tiny/gated", cache_dir=ARGS["cache"])
        emit({"name": Path(path).name,
              "files": {str(p.relative_to(path)): sha256(p) for p in Path(path).rglob("*") if p.is_file()}})
    """, tmp_path, args={"cache": str(tmp_path / "cache")}, token="hf_test")
    assert out["name"] == hub.sha("tiny/gated")
    assert out["files"] == {n: sha256(b) for n, b in folder_bytes(models["qwen2"]).items()}
    cdn = [r for r in hub.requests if r.listener == "cdn"]
    assert [r.method for r in cdn] == ["GET"] and cdn[0].authorization is None
    head = [r for r in hub.requests if r.method == "HEAD" and r.path.endswith("/model.safetensors")]
    assert head[0].status == 302 and head[0].authorization == "Bearer hf_test"


def test_corrupt_and_missing_file_faults(hub, models, tmp_path):
    hub.faults.corrupt_file.add("tiny/qwen2/model.safetensors")
    hub.faults.missing_file.add("tokenizer.json")
    out = run_client(hub, """
        c = ARGS["cache"]
        path = hf_hub_download("tiny/qwen2", "model.safetensors", cache_dir=c)
        emit({"corrupt": [sha256(path), Path(path).stat().st_size, Path(path).resolve().name],
              "snapshot": error(snapshot_download, "tiny/qwen2", cache_dir=c),
              "other_repo": sha256(hf_hub_download("tiny/nested", "config.json", cache_dir=c))})
    """, tmp_path, args={"cache": str(tmp_path / "cache")})
    good = (models["qwen2"] / "model.safetensors").read_bytes()
    got_sha, got_size, blob_name = out["corrupt"]
    # The client does not check the sha256 of what it downloads: the corruption goes through
    # under the advertised name (the blob is named by the expected sha256).
    assert got_size == len(good) and got_sha != sha256(good) and blob_name == sha256(good)
    assert out["snapshot"] == "RemoteEntryNotFoundError"
    assert out["other_repo"] == sha256((models["qwen3"] / "config.json").read_bytes())


# -- raw HTTP: headers, ranges, error codes ------------------------------------------------

def _http(url: str, method: str = "GET", headers=None):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_resolve_headers_ranges_and_error_codes(hub, models):
    sha = hub.sha("tiny/qwen2")
    data = (models["qwen2"] / "model.safetensors").read_bytes()
    base = f"{hub.url}/tiny/qwen2/resolve/main"

    status, h, body = _http(f"{base}/model.safetensors", "HEAD")
    assert status == 200 and body == b""
    assert h["X-Repo-Commit"] == sha and h["ETag"] == f'"{sha256(data)}"'
    assert h["X-Linked-Etag"] == f'"{sha256(data)}"' and h["X-Linked-Size"] == str(len(data))
    assert h["Content-Length"] == str(len(data)) and h["Accept-Ranges"] == "bytes"

    cfg = (models["qwen2"] / "config.json").read_bytes()
    status, h, body = _http(f"{base}/config.json")
    assert status == 200 and body == cfg and "X-Linked-Etag" not in h
    assert h["ETag"] == '"%s"' % hashlib.sha1(b"blob %d\0" % len(cfg) + cfg).hexdigest()

    status, h, body = _http(f"{base}/model.safetensors", headers={"Range": "bytes=100-199"})
    assert (status, body, h["Content-Range"]) == (206, data[100:200], f"bytes 100-199/{len(data)}")
    status, h, body = _http(f"{base}/model.safetensors", headers={"Range": "bytes=-10"})
    assert (status, body) == (206, data[-10:])
    status, h, body = _http(f"{base}/model.safetensors", headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and h["Content-Range"] == f"bytes */{len(data)}"

    cases = {
        f"{hub.url}/api/models/tiny/nope": (404, "RepoNotFound"),
        f"{hub.url}/tiny/nope/resolve/main/config.json": (404, "RepoNotFound"),
        f"{hub.url}/api/models/tiny/qwen2/revision/nope": (404, "RevisionNotFound"),
        f"{hub.url}/api/models/tiny/qwen2/tree/nope": (404, "RevisionNotFound"),
        f"{base}/nope.json": (404, "EntryNotFound"),
        f"{hub.url}/tiny/gated/resolve/main/config.json": (401, "GatedRepo"),
        f"{hub.url}/totally/unknown/endpoint/x/y": (404, None),
    }
    for url, (want_status, want_code) in cases.items():
        status, h, body = _http(url)
        assert (status, h.get("X-Error-Code")) == (want_status, want_code), url
        assert json.loads(body)["error"]
    status, h, _ = _http(f"{hub.url}/tiny/gated/resolve/main/config.json",
                         headers={"Authorization": "Bearer hf_test"})
    assert status == 200
    status, h, _ = _http(f"{hub.url}/tiny/gated/resolve/main/config.json",
                         headers={"Authorization": "Bearer hf_other"})
    assert (status, h["X-Error-Code"]) == (403, "GatedRepo")
    assert _http(f"{base}/nope.json")[1]["X-Repo-Commit"] == sha


def test_commit_sha_is_deterministic(models):
    with HubServer() as a, HubServer() as b:
        assert a.add_repo("x/y", models["qwen2"]) == b.add_repo("x/y", models["qwen2"])
        assert a.add_repo("x/z", models["qwen2"]) != a.sha("x/y")
        assert len(a.sha("x/y")) == 40 and int(a.sha("x/y"), 16) >= 0


def test_refused_endpoint_and_closed_server_refuse():
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(refused_endpoint() + "/api/models/a/b", timeout=5)
    server = HubServer()
    server.add_repo("a/b", {"config.json": b"{}"})
    assert _http(f"{server.url}/a/b/resolve/main/config.json")[2] == b"{}"
    server.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{server.url}/a/b/resolve/main/config.json", timeout=5)


# -- tiny models ---------------------------------------------------------------------------

def test_builders_are_deterministic(models, tmp_path):
    for name, (fn, kw) in BUILDERS.items():
        again = fn(tmp_path / name, **kw)
        assert folder_bytes(again) == folder_bytes(models[name]), name


@pytest.mark.slow
def test_builders_are_deterministic_across_processes(models, tmp_path):
    """A fresh process trains the tokenizer again and builds every model: same bytes."""
    code = (
        "import sys; from pathlib import Path; from tests import tiny_models as tm\n"
        "from tests.test_hub_server import BUILDERS\n"
        "for name, (fn, kw) in BUILDERS.items(): fn(Path(sys.argv[1]) / name, **kw)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=REPO_ROOT,
                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, timeout=120)
    for name in BUILDERS:
        assert folder_bytes(tmp_path / name) == folder_bytes(models[name]), name


def test_model_folders_have_the_expected_layout(models):
    from safetensors import safe_open

    def keys(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        return out

    for name in DENSE + MOE:
        files = set(os.listdir(models[name]))
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja"} <= files, name
        assert json.loads((models[name] / "config.json").read_text())["vocab_size"] == tm.vocab_size()

    base, changed = keys(models["qwen2"]), keys(models["qwen2-changed"])
    assert "lm_head.weight" not in base and "lm_head.weight" in keys(models["qwen2-untied"])
    assert set(base) == set(changed)
    assert [k for k in base if not base[k].equal(changed[k])] == [tm.DOWN_PROJ_CHANGED]
    assert all(t.dtype.is_floating_point and str(t.dtype) == "torch.bfloat16" for t in base.values())

    sharded = models["qwen2-sharded"]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert {k: v.shape for k, v in keys(sharded).items()} == {k: v.shape for k, v in base.items()}

    for name in MOE:
        assert "model.layers.0.mlp.experts.3.gate_proj.weight" in keys(models[name]), name

    pickle_files = set(os.listdir(models["pickle-only"]))
    assert "pytorch_model.bin" in pickle_files and not any(f.endswith(".safetensors") for f in pickle_files)
    cfg = json.loads((models["unsupported"] / "config.json").read_text())
    assert cfg["model_type"] == "qwen" and "AutoModelForCausalLM" in cfg["auto_map"]
    assert (models["unsupported"] / "model.safetensors").stat().st_size > 0


def test_models_load_with_transformers_and_tokenizer_applies_chat_template(models, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in DENSE + MOE:
        model = AutoModelForCausalLM.from_pretrained(models[name])
        assert model.dtype == torch.bfloat16, name
        with torch.no_grad():
            logits = model(torch.tensor([[3, 4, 5]])).logits
        assert logits.shape == (1, 3, tm.vocab_size()) and torch.isfinite(logits).all(), name
        tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert tied == (name != "qwen2-untied"), name

    state = torch.load(models["pickle-only"] / "pytorch_model.bin", weights_only=True)
    assert "model.embed_tokens.weight" in state

    tok_dir = tm.train_bpe_tokenizer(tmp_path / "tok")
    assert sorted(os.listdir(tok_dir)) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    for folder in (tok_dir, models["qwen2"]):
        tok = AutoTokenizer.from_pretrained(folder)
        assert len(tok) == tm.vocab_size() and tok.eos_token == "<|endoftext|>"
        text = tok.apply_chat_template([{"role": "user", "content": "Hello there"}],
                                       tokenize=False, add_generation_prompt=True)
        assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
        ids = tok(text)["input_ids"]
        assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
        assert tok.decode(ids) == text
