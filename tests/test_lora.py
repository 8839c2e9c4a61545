"""LoRA fine-tunes as adapter children (issue 13), on tiny Qwen2, Qwen3 and custom models.

Each architecture's store is built once (a base, a 4-step LoRA child); tests that write
copy it. peft itself is the reference: its own PeftModel, loaded from `export --adapter`,
gives the tokens and logits mstore must give.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mstore.hub.importer import import_model
from mstore.runtime.generate import GenerateOptions, generate_text
from mstore.runtime.lora import import_peft, load_model
from mstore.store.repo import Store
from mstore.training.config import from_mapping
from mstore.training.loop import train
from tests.conftest import Cli, snapshot
from tests.tiny_models import CORPUS

# qwen3 shares the transformers path with qwen2: it runs with the slow tests
ARCHS = ["qwen2", pytest.param("qwen3", marks=pytest.mark.slow), "custom"]
PROMPT = "The keeper"  # within the custom model's block_size (16 characters)


def _lora_config(corpus: Path, model: str, **extra) -> dict:
    return {"dataset": str(corpus), "model_name": model, "method": "lora", "max_steps": 4,
            "batch_size": 2, "seq_len": 16, "device": "cpu", "learning_rate": 2e-2,
            "warmup_steps": 0, "eval_interval": 4, **extra}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora-data") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module", params=ARCHS)
def built(request, tmp_path_factory, model_dirs, corpus):
    """(arch, store root, child name): `base` and its LoRA child `base-lora-001`."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora-{arch}") / "store"
    s = Store(root)
    if arch == "custom":
        train(s, from_mapping({"dataset": str(corpus), "model_name": None, "max_steps": 2,
                               "batch_size": 2, "seq_len": 16, "n_layers": 1, "d_model": 16,
                               "n_heads": 2, "device": "cpu", "output_name": "base"}))
    else:
        import_model(s, str(model_dirs[arch]), name="base", accept_license=True)
    result = train(s, from_mapping(_lora_config(corpus, "base")))
    assert result.name == "base-lora-001"
    return arch, root, result.name


def _copy(built, tmp_path) -> tuple[Store, Cli]:
    root = tmp_path / "store"
    shutil.copytree(built[1], root)
    return Store(root), Cli(root)


def _peft_model(store: Store, child: str, tmp_path: Path):
    """peft's own model of the child: its base exported (or, for the custom transformer,
    loaded: transformers cannot load it), then `PeftModel.from_pretrained` on the folder
    `export --adapter` wrote."""
    peft = import_peft()
    cli = Cli(store.root)
    adapter_dir = tmp_path / "adapter"
    cli("export", child, adapter_dir, "--adapter")
    m = store.read_manifest(store.resolve(child).commit)
    if m.architecture == "custom-transformer":
        base = load_model(store, m.parent).model
    else:
        from transformers import AutoModelForCausalLM

        cli("export", m.parent, tmp_path / "base")
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


def _ids(store: Store, ref: str) -> torch.Tensor:
    loaded = load_model(store, store.resolve(ref).commit)
    return torch.tensor([loaded.adapter.tokenizer().encode(PROMPT)])


def test_a_lora_child_holds_only_its_adapter(built, tmp_path):
    arch, root, child = built
    store = Store(root)
    m = store.read_manifest(store.resolve(child).commit)
    base = store.read_manifest(store.resolve("base").commit)
    assert m.kind == "adapter" and m.parent == store.resolve("base").commit
    assert m.config == base.config and set(m.files) == {"adapter_config.json"}
    assert m.tensors and all(".lora_A." in n or ".lora_B." in n for n in m.tensors)
    assert all(n.startswith("base_model.model.") for n in m.tensors)
    assert m.adapter["method"] == "lora" and m.adapter["r"] == 16 and m.adapter["alpha"] == 32
    config = json.loads(store.objects.read_bytes(m.files["adapter_config.json"]))
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert {t.dtype for t in m.tensors.values()} == {base.tensors[sorted(base.tensors)[0]].dtype}
    adapter_bytes = sum(store.objects.size(t.object) for t in m.tensors.values())
    cli = Cli(root)
    du = {r["name"]: r for r in json.loads(cli("du", "--json").stdout)["models"]}
    own = adapter_bytes + store.objects.size(m.files["adapter_config.json"])
    assert du[child]["new_vs_parent_bytes"] == own < du["base"]["logical_bytes"]
    assert du[child]["kind"] == "adapter"
    rows = {r["name"]: r for r in json.loads(cli("list", "--json").stdout)}
    assert rows[child]["variant"] == "lora r=16 on base" and rows["base"]["kind"] == "full"
    assert "lora r=16 on base" in cli("list").stdout
    assert "lora r=16 on base" in cli("show", child).stdout
    assert "Kind:   lora r=16 on base" in cli("log", child).stdout


def test_diff_of_base_and_child_names_the_weights_the_adapter_changes(built):
    arch, root, child = built
    store = Store(root)
    doc = json.loads(Cli(root)("diff", "base", child, "--json").stdout)
    m = store.read_manifest(store.resolve(child).commit)
    assert doc["added"] == [] and doc["removed"] == []
    side = doc["adapter"]["b"]
    assert sorted(side["tensors"]) == sorted(m.tensors) and side["r"] == 16
    changed = {c["name"]: c for c in doc["changed"]}
    assert set(changed) == {f"{mod}.weight" for mod in side["modules"]}
    assert all(c["relative_l2"] > 0 and "lora r=16" in c["lora"]["b"] for c in changed.values())
    assert set(doc["shared"]) == set(store.read_manifest(m.parent).tensors) - set(changed)
    text = Cli(root)("diff", "base", child).stdout
    assert "b is a LoRA adapter (r=16, alpha 32)" in text


def test_generate_and_logits_equal_peft_token_for_token(built, tmp_path):
    arch, root, child = built
    store = Store(root)
    reference = _peft_model(store, child, tmp_path)
    ids = _ids(store, child)
    model, _tok = __import__("mstore").load(child, store=store)
    assert torch.equal(_logits(model, ids), _logits(reference, ids))
    opts = GenerateOptions(max_new_tokens=12, temperature=0, device="cpu")
    loaded = load_model(store, store.resolve(child).commit)
    tok = loaded.adapter.tokenizer()
    ours = tok.encode(generate_text(store, child, PROMPT, opts))
    runnable = reference.get_base_model()
    theirs = list(loaded.adapter.generate_stream(runnable, ids, 12, 0.0, None, None, None,
                                                 tok.eos_token_ids))
    if arch != "custom":  # transformers' own generate, through the PeftModel
        with torch.no_grad():
            out = reference.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        generated = out[0, ids.shape[1]:].tolist()
        eos = set(tok.eos_token_ids)
        cut = next((i for i, t in enumerate(generated) if t in eos), len(generated))
        assert theirs == generated[:cut]
    assert tok.encode(tok.decode(theirs)) == ours


def test_merge_commits_a_full_child_sharing_untouched_tensors(built, tmp_path):
    arch, _, child = built
    store, cli = _copy(built, tmp_path)
    doc = json.loads(cli("merge", child, "--name", "merged", "--json").stdout)
    m = store.read_manifest(doc["commit"])
    adapter_m = store.read_manifest(store.resolve(child).commit)
    base = store.read_manifest(adapter_m.parent)
    assert m.kind == "full" and m.parent == store.resolve(child).commit
    changed = {c["name"] for c in json.loads(cli("diff", "base", child, "--json").stdout)
               ["changed"]}
    for name, t in base.tensors.items():
        assert (m.tensors[name].object == t.object) == (name not in changed), name
    reference = _peft_model(store, child, tmp_path).merge_and_unload()
    ids = _ids(store, child)
    ours = load_model(store, doc["commit"]).model
    assert torch.equal(_logits(ours, ids), _logits(reference, ids))
    if arch != "custom":  # exported merged: a plain HF folder with the same logits
        from transformers import AutoModelForCausalLM

        cli("export", child, tmp_path / "merged-export")
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged-export")
        assert torch.equal(_logits(exported, ids), _logits(ours, ids))


def test_export_adapter_then_import_it_back(built, tmp_path):
    arch, _, child = built
    store, cli = _copy(built, tmp_path)
    cli("export", child, tmp_path / "adapter", "--adapter")
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors", "metadata.json"]
    doc = json.loads(cli("import", tmp_path / "adapter", "--accept-license", "--name", "again",
                         "--json").stdout)
    again = store.read_manifest(doc["commit"])
    mine = store.read_manifest(store.resolve(child).commit)
    assert again.kind == "adapter" and again.parent == mine.parent
    assert {n: t.object for n, t in again.tensors.items()} == \
        {n: t.object for n, t in mine.tensors.items()}
    # the tensors and adapter_config.json are the child's objects already: only the
    # export's metadata.json (kept as a file of the import) is new
    assert doc["bytes_written"] == (tmp_path / "adapter" / "metadata.json").stat().st_size


def test_import_of_an_adapter_peft_itself_saved(tmp_path, model_dirs, cli, store):
    """A folder written by `PeftModel.save_pretrained` on the model as transformers loads
    it; the base found from base_model_name_or_path (the folder the base was imported
    from)."""
    peft = import_peft()
    from transformers import AutoModelForCausalLM

    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    base = AutoModelForCausalLM.from_pretrained(str(model_dirs["qwen2"]))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             task_type="CAUSAL_LM", init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    model.save_pretrained(tmp_path / "peft-adapter")
    doc = json.loads(cli("import", tmp_path / "peft-adapter", "--accept-license",
                         "--json").stdout)
    assert doc["name"] == "peft-adapter"
    assert "lora r=4 on base" in cli("show", "peft-adapter").stdout
    loaded, _ = __import__("mstore").load("peft-adapter", store=store)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(_logits(loaded, ids), _logits(model.eval(), ids))


def test_import_of_an_adapter_from_the_hub(tmp_path, cli, store, built, hub_server, hub_repos):
    arch, root, child = built
    if arch != "qwen2":
        pytest.skip("one architecture is enough for the Hub path")
    cli("import", "tiny/Qwen2-Tiny", "--accept-license", "--name", "hub-base")
    Cli(root)("export", child, tmp_path / "adapter", "--adapter")
    folder = tmp_path / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny/Qwen2-Tiny"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "metadata.json").unlink()
    hub_server.add_repo("tiny/Qwen2-LoRA", folder)
    doc = json.loads(cli("import", "tiny/Qwen2-LoRA", "--accept-license", "--json").stdout)
    m = store.read_manifest(doc["commit"])
    assert m.kind == "adapter" and m.parent == store.resolve("hub-base").commit
    assert m.source["type"] == "huggingface" and m.source["repo_id"] == "tiny/Qwen2-LoRA"
    again = json.loads(cli("import", "tiny/Qwen2-LoRA", "--accept-license", "--json").stdout)
    assert again["already"] and again["commit"] == doc["commit"]


def _refused(cli, root: Path, *args) -> str:
    before = snapshot(root)
    res = cli(*args, ok=False)
    assert res.exit_code != 0 and snapshot(root) == before, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    return res.stderr


def test_errors_are_one_line_and_leave_the_store_as_it_was(built, tmp_path, corpus):
    arch, _, child = built
    if arch == "qwen3":
        pytest.skip("the refusals do not depend on the architecture")
    store, cli = _copy(built, tmp_path)
    root = store.root

    def config(**doc) -> Path:
        path = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
        path.write_text(json.dumps(doc))
        return path

    full_with_lora = config(dataset=str(corpus), model_name="base", lora={"r": 8})
    assert "config key 'lora' is for method: lora" in _refused(
        cli, root, "train", "--config", full_with_lora)
    bad_target = config(**_lora_config(corpus, "base", lora={"target_modules": ["nope"]}))
    err = _refused(cli, root, "train", "--config", bad_target)
    assert "'lora.target_modules': 'nope' matches no module" in err
    assert ("q_proj" if arch != "custom" else "qkv") in err
    on_adapter = config(**_lora_config(corpus, child))
    assert "merge it first" in _refused(cli, root, "train", "--config", on_adapter)
    assert "not a LoRA adapter" in _refused(cli, root, "merge", "base")
    assert "not a LoRA adapter" in _refused(cli, root, "export", "base", tmp_path / "x",
                                            "--adapter")
    cli("export", child, tmp_path / "adapter", "--adapter")
    empty = tmp_path / "empty"
    Cli(empty)("init")
    err = _refused(Cli(empty), empty, "import", tmp_path / "adapter", "--accept-license")
    assert "is not in the store: import it first" in err and "--base REF" in err
    if arch == "custom":
        return
    train(store, from_mapping({"dataset": str(corpus), "model_name": None, "max_steps": 1,
                               "batch_size": 2, "seq_len": 16, "n_layers": 1, "d_model": 16,
                               "n_heads": 2, "device": "cpu", "output_name": "other"}))
    err = _refused(cli, root, "import", tmp_path / "adapter", "--accept-license",
                   "--base", "other")
    assert "does not fit base other: the base has no weight model.layers.0" in err


def test_rm_base_and_gc_keep_the_adapter_child_usable(built, tmp_path):
    arch, _, child = built
    store, cli = _copy(built, tmp_path)
    opts = GenerateOptions(max_new_tokens=6, temperature=0, device="cpu")
    before = generate_text(store, child, PROMPT, opts)
    cli("rm", "base")
    cli("gc", "--grace", "0")
    assert generate_text(store, child, PROMPT, opts) == before
    assert json.loads(cli("fsck", "--json").stdout)["ok"]


def test_push_and_pull_of_an_adapter_child_carry_its_base(built, tmp_path):
    arch, _, child = built
    store, cli = _copy(built, tmp_path)
    opts = GenerateOptions(max_new_tokens=6, temperature=0, device="cpu")
    before = generate_text(store, child, PROMPT, opts)
    cli("remote", "add", "origin", tmp_path / "remote")
    cli("push", child, "origin")
    fresh = tmp_path / "fresh"
    other = Cli(fresh)
    other("init")
    other("remote", "add", "origin", tmp_path / "remote")
    other("pull", child, "origin")
    assert generate_text(Store(fresh), child, PROMPT, opts) == before
    assert json.loads(other("fsck", "--json").stdout)["ok"]
