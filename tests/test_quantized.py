"""Quantized children and `mstore eval` (issue 14): what a quantized child shares with its
parent, what it costs in perplexity on a model that has learned something, that it runs,
exports and is refused where it must be, and that eval notes are attachments that survive
gc, push and pull without changing a commit id."""

import json
import subprocess
import sys
import time

import pytest

import mstore
from mstore.store.repo import Store
from tests.conftest import Cli, REPO_ROOT, snapshot

# A small character-level corpus the custom transformer learns well in a few hundred steps.
CORPUS = "".join(f"{w} the {a} fox jumps over the {b} dog {n}.\n" for n, (w, a, b) in enumerate(
    [("see", "quick", "lazy"), ("watch", "brown", "sleepy"), ("look", "red", "old")] * 60))


def _text(cli_result) -> str:
    return cli_result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store with a custom transformer trained until its loss is far below random,
    its int8 and int4 children, and an eval of all three (the timing is printed)."""
    root = tmp_path_factory.mktemp("quantized")
    data = root / "corpus.txt"
    data.write_text(CORPUS)
    store = Store(root / "store")
    started = time.time()
    result = mstore.train({"model_name": None, "dataset": str(data), "max_steps": 200,
                           "batch_size": 8, "seq_len": 32, "n_layers": 2, "d_model": 32,
                           "n_heads": 2, "learning_rate": 1e-2, "warmup_steps": 10,
                           "eval_interval": 200, "device": "cpu", "seed": 0},
                          store=store, output_name="tiny-base")
    trained_s = time.time() - started
    cli = Cli(store.root)
    cli("quantize", "tiny-base", "--scheme", "int8")
    cli("quantize", "tiny-base", "--scheme", "int4", "--group-size", "32")
    doc = json.loads(cli("eval", "tiny-base", "tiny-int8", "tiny-int4", "--dataset", data,
                         "--json").stdout)
    print(f"trained fixture: {trained_s:.1f}s training, {time.time() - started:.1f}s in all")
    return {"store": store, "cli": cli, "data": data, "evals": {d["name"]: d for d in doc},
            "train_loss": result.train_loss}


def test_quantized_children_keep_the_parents_embeddings_and_its_perplexity(trained):
    store, evals = trained["store"], trained["evals"]
    assert trained["train_loss"] < 1.0  # a char model at random starts near ln(vocab) ~ 3.3
    base = store.read_manifest(store.resolve("tiny-base").commit)
    for name, scheme, dtype in (("tiny-int8", "int8", "I8"), ("tiny-int4", "int4", "U8")):
        m = store.read_manifest(store.resolve(name).commit)
        assert m.kind == "quantized" and m.quantization["scheme"] == scheme
        assert m.parent == store.resolve("tiny-base").commit
        for kept in ("tok_emb.weight", "pos_emb.weight", "ln_f.weight", "blocks.0.ln1.weight",
                     "blocks.1.attn.qkv.bias"):
            assert m.tensors[kept].object == base.tensors[kept].object
        assert m.tensors["blocks.0.attn.qkv.weight"].dtype == dtype
        assert "blocks.0.attn.qkv.weight_scale" in m.tensors
    du = {r["name"]: r for r in json.loads(trained["cli"]("du", "--json").stdout)["models"]}
    assert du["tiny-int8"]["shared_with_parent"] >= 2 + 2 * 8  # embeddings, norms, biases
    assert du["tiny-int4"]["new_vs_parent_bytes"] < du["tiny-int8"]["new_vs_parent_bytes"]
    ppl = {n: evals[n]["perplexity"] for n in evals}
    assert ppl["tiny-base"] < 3.0
    assert abs(ppl["tiny-int8"] / ppl["tiny-base"] - 1) < 0.01, ppl
    assert abs(ppl["tiny-int4"] / ppl["tiny-base"] - 1) < 0.05, ppl
    assert evals["tiny-int8"]["agreement"] > 0.95 and evals["tiny-int4"]["agreement"] > 0.8
    for d in evals.values():
        assert {"name", "commit", "dataset_blake3", "tokens", "loss", "perplexity"} <= set(d)


def test_quantized_child_generates_greedily_and_log_shows_its_lineage(trained):
    cli = trained["cli"]
    first = _text(cli("generate", "tiny-int4", "--prompt", "see the", "-n", "20", "-t", "0"))
    again = _text(cli("generate", "tiny-int4", "--prompt", "see the", "-n", "20", "-t", "0"))
    assert first == again and len(first.strip()) > 5
    assert "fox" in _text(cli("generate", "tiny-int8", "--prompt", "see the quick brown",
                              "-n", "8", "-t", "0"))
    log = _text(cli("log", "tiny-int4"))
    assert "int4 g32 of tiny-base" in log and "quantize tiny-base to int4 g32" in log
    assert log.index("(tiny-int4)") < log.index("(tiny-base)")
    assert "eval: perplexity" in log
    listing = _text(cli("list"))
    assert "int8 of tiny-base" in listing and "RUN MEM" in listing
    show = _text(cli("show", "tiny-int8"))
    assert "to run (weights)" in show and "eval " in show


def test_load_returns_a_model_that_runs_in_quantized_memory(trained):
    model, tok = mstore.load("tiny-int8", store=trained["store"])
    from optimum.quanto import QTensor

    assert isinstance(model.blocks[0].attn.qkv.weight, QTensor)
    assert model.tok_emb.weight.dtype.is_floating_point


@pytest.mark.parametrize("source", ["qwen2", "qwen3"])
def test_quantize_a_qwen_model_shares_embeddings_and_generates(cli, store, model_dirs, source):
    cli("import", model_dirs[source], "--name", f"{source}-base", "--accept-license")
    cli("quantize", f"{source}-base", "--scheme", "int4", "--group-size", "32")
    cli("quantize", f"{source}-base", "--scheme", "int8", "--name", "eight")
    base = store.read_manifest(store.resolve(f"{source}-base").commit)
    for name in (f"{source}-int4", "eight"):
        m = store.read_manifest(store.resolve(name).commit)
        emb = "model.embed_tokens.weight"
        assert m.tensors[emb].object == base.tensors[emb].object
        assert m.tensors["model.norm.weight"].object == base.tensors["model.norm.weight"].object
        assert m.parameters == base.parameters
        out = _text(cli("generate", name, "--prompt", "The lighthouse", "-n", "5", "-t", "0"))
        assert out.strip()
    doc = json.loads(cli("show", "eight", "--json").stdout)
    assert doc["run_bytes"] < json.loads(cli("show", f"{source}-base", "--json").stdout)["run_bytes"]


def test_export_needs_dequantize_and_then_loads_in_transformers(cli, store, model_dirs, tmp_path):
    cli("import", model_dirs["qwen2"], "--name", "q", "--accept-license")
    cli("quantize", "q", "--scheme", "int8")
    before = snapshot(store.root)
    res = cli("export", "q-int8", tmp_path / "out", ok=False)
    assert res.exit_code == 1 and "--dequantize" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    assert snapshot(store.root) == before
    cli("export", "q-int8", tmp_path / "out", "--dequantize")
    import torch
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    quantized, tok = mstore.load("q-int8", store=store)
    ids = torch.tensor([tok("The lighthouse keeper")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits.float(), quantized(ids).logits.float(),
                              atol=1e-2)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["dequantized_from"]["scheme"] == "int8"


@pytest.mark.slow
def test_import_quantize_writes_no_full_precision_linear_weight_and_stays_small(
        store, model_dirs, tmp_path):
    full = Store(tmp_path / "full")
    mstore.import_model(model_dirs["qwen2"], store=full, name="f", accept_license=True)
    fm = full.read_manifest(full.resolve("f").commit)
    # a wrapper that imports nothing heavy runs the command and reports its child's peak
    wrapper = ("import resource, subprocess, sys\n"
               "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
               "assert rc == 0, rc\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")

    def peak_kib(*args: str) -> int:
        res = subprocess.run([sys.executable, "-c", wrapper, sys.executable, *args],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
        assert res.returncode == 0, res.stderr
        return int(res.stdout.strip().splitlines()[-1])

    peak = peak_kib("-m", "mstore", "--store", str(store.root), "import",
                    str(model_dirs["qwen2"]), "--name", "q8", "--quantize", "int8",
                    "--accept-license")
    # the same modules loaded, no model: what the process costs before any tensor
    baseline = peak_kib("-c", "import mstore.hub.importer, mstore.runtime.quantize, "
                        "transformers, optimum.quanto")
    m = store.read_manifest(store.resolve("q8").commit)
    assert m.kind == "quantized" and m.parent is None and m.source["type"] == "local"
    linear = [n for n in fm.tensors if n.endswith("_proj.weight")]
    on_disk = {oid for oid, _ in store.objects.iter_objects()}
    assert linear and not {fm.tensors[n].object for n in linear} & on_disk
    assert fm.tensors["model.embed_tokens.weight"].object in on_disk
    assert peak < baseline + 100 * 1024, (peak, baseline)  # KiB: the model is ~0.3 MiB


def test_eval_notes_survive_gc_push_and_pull_and_leave_the_commit(cli, store, model_dirs, tmp_path):
    cli("import", model_dirs["qwen2"], "--name", "q", "--accept-license")
    cli("quantize", "q", "--scheme", "int8")
    data = tmp_path / "text.txt"
    data.write_text(CORPUS)
    commit = store.resolve("q-int8").commit
    cli("eval", "q-int8", "--dataset", data, "--max-tokens", "200")
    cli("gc", "--grace", "0")
    assert store.resolve("q-int8").commit == commit
    notes = store.attachments.list(commit, kind="eval")
    assert len(notes) == 1 and notes[0].payload["tokens"] == 199
    cli("remote", "add", "origin", tmp_path / "remote")
    cli("push", "q-int8")
    other = Cli(tmp_path / "other")
    other("remote", "add", "origin", tmp_path / "remote")
    other("pull", "q-int8")
    dest = Store(tmp_path / "other")
    assert dest.resolve("q-int8").commit == commit
    assert [a.payload["loss"] for a in dest.attachments.list(commit, kind="eval")] == \
        [notes[0].payload["loss"]]
    assert "eval: perplexity" in _text(other("log", "q-int8"))
    assert json.loads(other("fsck", "--json").stdout)["ok"]


@pytest.mark.parametrize("args, words", [
    (["quantize", "q", "--scheme", "int3"], "unknown quantization scheme 'int3'"),
    (["quantize", "q", "--scheme", "int4"], "group size 128 does not divide"),
    (["quantize", "q", "--scheme", "int4", "--group-size", "48"], "does not divide"),
    (["quantize", "q", "--scheme", "int8", "--group-size", "32"], "for int4 only"),
    (["quantize", "q-int8", "--scheme", "int4", "--group-size", "32"], "already a quantized"),
    (["quantize", "q", "--scheme", "int8", "--name", "q-int8"], "already taken"),
    (["eval", "q", "--dataset", "EMPTY"], "is empty"),
    (["eval", "q", "nope", "--dataset", "TEXT"], "unknown model 'nope'"),
    (["import", "QWEN2", "--name", "z", "--quantize", "int4", "--accept-license"],
     "does not divide"),
    (["import", "QWEN2", "--name", "z", "--quantize", "fp4", "--accept-license"],
     "unknown quantization scheme"),
])
def test_bad_input_is_one_line_and_leaves_the_store_as_it_was(cli, store, model_dirs, tmp_path,
                                                              args, words):
    cli("import", model_dirs["qwen2"], "--name", "q", "--accept-license")
    cli("quantize", "q", "--scheme", "int8")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text(CORPUS)
    subst = {"EMPTY": tmp_path / "empty.txt", "TEXT": tmp_path / "text.txt",
             "QWEN2": model_dirs["qwen2"]}
    before = snapshot(store.root)
    res = cli(*[subst.get(a, a) for a in args], ok=False)
    assert res.exit_code != 0
    lines = res.stderr.strip().splitlines()
    if args[0] == "import":  # after the plan's lines (size, memory), as every import refusal
        lines = lines[-1:]
        assert sum(line.startswith("error: ") for line in res.stderr.splitlines()) == 1
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.stderr
    assert snapshot(store.root) == before

