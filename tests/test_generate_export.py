"""`mstore generate` and `mstore export` against transformers, and the custom transformer."""

import json
import os
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mstore.adapters.base import Checkpoint, adapter_for
from mstore.adapters.custom import ARCHITECTURE, CustomTransformerAdapter, config_bytes
from mstore.runtime.checkpoint import commit_checkpoint
from mstore.store.manifest import Manifest
from mstore.nn.char_tokenizer import CharTokenizer
from mstore.nn.transformer import Transformer, TransformerConfig
from tests import tiny_models

PROMPT = "The quick brown fox"


def lively(src, dst, seed=0):
    """The tiny model with larger random weights: greedy decoding then varies from token to
    token, so a wrong cache or a wrong position would show."""
    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(dst)
    for name, data in tiny_models.tokenizer_files().items():
        (dst / name).write_bytes(data)
    return dst


@pytest.fixture(scope="module")
def lively_dirs(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("lively")
    return {k: lively(model_dirs[k], root / k) for k in ("qwen2", "qwen3")}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_greedy_generate_prints_what_transformers_generates(cli, lively_dirs, arch):
    src = lively_dirs[arch]
    cli("import", src, "--accept-license", "--name", arch)
    n = 24
    hf = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(set(out[0, ids.shape[1]:].tolist())) > 3
    res = cli("generate", arch, "--prompt", PROMPT, "--max-new-tokens", str(n),
              "--temperature", "0")
    assert res.stdout == expected + "\n"


def test_seeded_sampling_is_reproducible_and_chat_works(cli, lively_dirs):
    cli("import", lively_dirs["qwen2"], "--accept-license", "--name", "q")
    args = ["generate", "q", "-p", PROMPT, "-n", "16", "--temperature", "1.0", "--top-k", "50",
            "--top-p", "0.9"]
    a = cli(*args, "--seed", "7").stdout
    b = cli(*args, "--seed", "7").stdout
    assert a == b
    assert cli("generate", "q", "-p", "hi", "-n", "4", "--chat", "--temperature", "0",
               "--dtype", "float32", "--verify").exit_code == 0


def test_export_round_trip(cli, store, lively_dirs, tmp_path):
    src = lively_dirs["qwen3"]
    cli("import", src, "--accept-license", "--name", "q3")
    dest = tmp_path / "exported"
    doc = json.loads(cli("export", "q3", dest, "--json").stdout)
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "metadata.json"} <= set(doc["files"])
    a = AutoModelForCausalLM.from_pretrained(src)
    b = AutoModelForCausalLM.from_pretrained(dest)
    x = torch.tensor([[5, 17, 99, 3, 250, 7]])
    assert torch.equal(a(x).logits, b(x).logits)
    ta, tb = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(dest)
    text = "Exported tokenizers encode the same: 123 ünïcode!"
    assert ta(text)["input_ids"] == tb(text)["input_ids"]
    meta = json.loads((dest / "metadata.json").read_text())
    assert meta["name"] == "q3" and meta["commit"] == store.resolve("q3").commit
    assert meta["source"]["type"] == "local" and meta["lineage"][0]["commit"] == meta["commit"]
    assert all(oct(p.stat().st_mode)[-3:] == "644" for p in dest.iterdir())
    res = cli("export", "q3", dest, ok=False)
    assert "exists and is not empty" in res.stderr


def test_export_shards_past_the_limit(store, cli, model_dirs, tmp_path):
    from mstore.hub.export import export_model

    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q2")
    dest = tmp_path / "sharded"
    export_model(store, "q2", dest, shard_bytes=64 * 1024)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a = AutoModelForCausalLM.from_pretrained(model_dirs["qwen2"])
    b = AutoModelForCausalLM.from_pretrained(dest)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(a(x).logits, b(x).logits)


def corrupt(store, oid, flip=True):
    path = store.objects.path(oid)
    os.chmod(path, 0o644)
    if flip:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    else:
        os.unlink(path)


def test_corrupt_and_missing_objects_are_named(cli, store, model_dirs, tmp_path):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q2")
    m = store.read_manifest(store.resolve("q2").commit)
    bad = m.tensors["model.layers.1.self_attn.k_proj.weight"].object
    corrupt(store, bad)
    res = cli("export", "q2", tmp_path / "out", ok=False)
    assert res.exit_code == 1 and bad in res.stderr and "k_proj" in res.stderr
    # found while copying (export hashes what it copies): nothing published, nothing left
    assert [p.name for p in tmp_path.iterdir() if "out" in p.name] == []
    res = cli("generate", "q2", "-p", "hi", "-n", "2", "--verify", ok=False)
    assert bad in res.stderr and res.stderr.startswith("error: corrupt")
    gone = m.tensors["model.norm.weight"].object
    corrupt(store, gone, flip=False)
    res = cli("generate", "q2", "-p", "hi", "-n", "2", ok=False)
    assert gone in res.stderr and "missing" in res.stderr


def test_export_names_the_last_tensor_corrupt_and_publishes_nothing(cli, store, model_dirs,
                                                                     tmp_path):
    """The tensor copied last is checked too, and a truncated object is refused as well."""
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q2")
    m = store.read_manifest(store.resolve("q2").commit)
    users = Counter(t.object for t in m.tensors.values())
    last_name = [n for n in sorted(m.tensors) if users[m.tensors[n].object] == 1][-1]
    last = m.tensors[last_name].object
    corrupt(store, last)
    res = cli("export", "q2", tmp_path / "out", ok=False)
    assert res.exit_code == 1 and last in res.stderr and last_name in res.stderr
    assert [p.name for p in tmp_path.iterdir() if "out" in p.name] == []
    path = store.objects.path(last)
    path.write_bytes(path.read_bytes()[:-2])
    res = cli("export", "q2", tmp_path / "out", ok=False)
    assert res.exit_code == 1 and last in res.stderr
    assert [p.name for p in tmp_path.iterdir() if "out" in p.name] == []


def test_unknown_architecture_names_the_installed_adapters(cli, store):
    store.init()
    cfg = store.objects.put_bytes(b'{"model_type": "llama"}').oid
    m = Manifest(architecture="llama", model_id="x", source={"type": "local"}, license=None,
                 config=cfg, files={}, tensors={})
    commit = store.put_manifest(m)
    store.registry.set_ref(store.registry_entry("llama-x", commit, m, None), expected=None)
    res = cli("generate", "llama-x", "-p", "hi", ok=False)
    assert "no adapter for architecture 'llama'" in res.stderr
    assert "custom-transformer" in res.stderr and "qwen2" in res.stderr


def test_custom_transformer_saved_loaded_and_generated_through_the_store(store):
    tok = CharTokenizer.from_text("abcdefghij klmnop")
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tok.vocab_size, n_layers=2, d_model=32,
                                          n_heads=2, block_size=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8)  # lively: greedy output varies
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ckpt = Checkpoint(tensors=state, config=config_bytes(model.config),
                      files={"tokenizer.json": tok.to_json()},
                      tied_weights=model.tied_weights())
    result = commit_checkpoint(store, ckpt, architecture=ARCHITECTURE, model_id="custom",
                               source={"type": "scratch"}, license=None, parent=None, files={},
                               message="test", training=None, name=None,
                               stem="custom-transformer", name_fmt="{stem}-{n:03d}",
                               fine_tuned_from=None)
    assert result.name == "custom-transformer-001"
    adapter = adapter_for(store, result.commit)
    assert isinstance(adapter, CustomTransformerAdapter)
    loaded = adapter.load_checkpoint()
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    x = torch.tensor([tok.encode("abc def")])
    assert torch.equal(loaded(x)[0], model(x)[0])
    cached = loaded.generate(x, 30, temperature=0)
    full = loaded.generate(x, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, full) and len(set(cached[0].tolist())) > 2
    assert adapter.tokenizer().decode(adapter.tokenizer().encode("fab")) == "fab"
    # the loaded weights are the mmapped objects, not copies
    obj = adapter.manifest.tensors["blocks.0.attn.qkv.weight"].object
    with open("/proc/self/maps") as f:
        maps = [line for line in f if str(store.objects.path(obj).resolve()) in line]
    ptr = loaded.blocks[0].attn.qkv.weight.data_ptr()
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps]
    assert any(lo <= ptr < hi for lo, hi in spans)
