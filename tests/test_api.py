"""The public Python API (docs/api.md): its examples run as written, and its typed results
carry exactly what the CLI prints with --json."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import mstore
from mstore.errors import BadName, ObjectMissing, StoreNotFound, UnknownModel
from mstore.store import views
from tests import tiny_models
from tests.conftest import REPO_ROOT
from tests.hub_server import clean_environ

API_DOC = REPO_ROOT / "docs" / "api.md"


def doc_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", API_DOC.read_text(), flags=re.S)


@pytest.mark.slow
def test_every_example_in_docs_api_runs(tmp_path, model_dirs):
    """The examples, in order, as one script in a folder holding what they name."""
    shutil.copytree(model_dirs["qwen2"], tmp_path / "tiny-qwen2")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "corpus.txt").write_text(tiny_models.CORPUS * 4)
    examples = doc_examples()
    assert len(examples) >= 5
    script = tmp_path / "examples.py"
    script.write_text("\n".join(examples))
    env = {**clean_environ(), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MSTORE_HOME", None)
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert re.search(r"^tiny [0-9a-f]{12} \d+ \d+$", out, flags=re.M), out
    assert "Qwen2ForCausalLM" in out
    assert "['tiny', 'tiny-finetuned-001', 'tiny-stable']" in out
    assert "fsck ok: True" in out
    assert "error: unknown model 'no-such-model'" in out
    refs = json.loads((tmp_path / "models" / "registry.json").read_text())["models"]
    assert sorted(refs) == ["tiny", "tiny-finetuned-001"]


@pytest.fixture
def two_models(cli, model_dirs, store_path):
    cli("import", model_dirs["qwen2"], "--name", "q2", "--accept-license")
    cli("import", model_dirs["qwen3"], "--name", "q3", "--accept-license")
    cli("tag", "q2", "q2-also")
    return mstore.Store(store_path)


def cli_json(cli, *args):
    return json.loads(cli(*args, "--json").stdout)


def test_typed_results_are_what_the_cli_prints(cli, two_models):
    store = two_models
    rows = store.list()
    assert all(isinstance(r, views.ModelRef) for r in rows)
    assert [r.to_json() for r in rows] == cli_json(cli, "list")
    assert [r.name for r in rows] == ["q2", "q2-also", "q3"]
    assert rows[0].commit == rows[1].commit and rows[0].architecture == "qwen2"

    info = store.show("q3")
    assert isinstance(info, views.CommitInfo)
    assert info.to_json() == cli_json(cli, "show", "q3")
    assert info.architecture == "qwen3" and info.names == ["q3"] and info.weights_present

    log = store.log("q2")
    assert [e.to_json() for e in log] == cli_json(cli, "log", "q2")
    assert log[0].names == ["q2", "q2-also"] and log[0].parent is None

    usage = store.du()
    assert usage.to_json() == cli_json(cli, "du")
    assert usage.commits == 2 and usage.refs == 3

    diff = store.diff("q2", "q3")
    assert diff.to_json() == cli_json(cli, "diff", "q2", "q3")

    report = store.fsck()
    assert report.ok and report.to_json() == cli_json(cli, "fsck")

    gc = store.gc(dry_run=True)
    assert gc.dry_run and gc.objects_deleted == 0
    assert gc.to_json() == cli_json(cli, "gc", "--dry-run")


def test_refs_through_the_api(two_models):
    store = two_models
    commit = store.tag("q3", "q3-stable")
    assert store.resolve("q3-stable").commit == commit == store.resolve(commit[:9]).commit
    assert store.rm("q3-stable") == commit
    with pytest.raises(UnknownModel) as e:
        store.show("q3-stable")
    assert isinstance(e.value, LookupError)
    with pytest.raises(BadName) as e:
        store.tag("q3", "Not A Name")
    assert isinstance(e.value, ValueError)


def test_store_default_and_missing_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MSTORE_HOME", str(tmp_path / "home"))
    assert mstore.Store().root == tmp_path / "home"
    monkeypatch.delenv("MSTORE_HOME")
    monkeypatch.chdir(tmp_path)
    assert mstore.Store().root.resolve() == (tmp_path / "models").resolve()
    with pytest.raises(StoreNotFound) as e:
        mstore.Store(tmp_path / "nowhere").list()
    assert isinstance(e.value, FileNotFoundError)
    assert not (tmp_path / "nowhere").exists()


def test_import_and_load_through_the_api(tmp_path, model_dirs):
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedModel

    store = mstore.Store(tmp_path / "s")
    result = mstore.import_model(model_dirs["qwen2"], store=store, name="m",
                                 accept_license=True)
    assert result.name == "m" and not result.already
    again = mstore.import_model(str(model_dirs["qwen2"]), store=tmp_path / "s",
                                accept_license=True)
    assert again.already and again.held_by == "m"

    model, tok = mstore.load("m", store=store, device="cpu")
    assert isinstance(model, PreTrainedModel)
    ref = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    embed = model.get_input_embeddings().weight
    oid = store.show("m").manifest["tensors"]["model.embed_tokens.weight"]["object"]
    assert embed.untyped_storage().nbytes() == store.objects.size(oid)  # the mmapped object

    os.remove(store.objects.path(oid))
    with pytest.raises(ObjectMissing) as e:
        mstore.load("m", store=store, device="cpu")
    assert isinstance(e.value, FileNotFoundError)
