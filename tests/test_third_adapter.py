"""The adapter boundary holds: an adapter mstore does not ship works end to end.

tests/llama_adapter.py serves `model_type: llama` through transformers' LlamaForCausalLM,
subclassing `TransformersAdapter`. It is registered as an outside package would register
it: a `*.dist-info` folder with an `mstore.adapters` entry point, on sys.path (and on
PYTHONPATH for a separate process). Import, generate, train and export then run through
the CLI, with no change to mstore's modules and nothing monkeypatched in them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mstore.adapters import base
from mstore.adapters.base import adapter_for
from mstore.hub.plan import supported_architectures
from tests import tiny_models
from tests.conftest import REPO_ROOT, run_mstore

PROMPT = "The quick brown fox"
TEXT = ("The quick brown fox jumps over the lazy dog. " * 6 + "\n") * 8
VARIANTS = {"tied-bf16": (True, torch.bfloat16), "untied-fp32": (False, torch.float32)}


def register_outside_package(folder: Path) -> Path:
    """A distribution `mstore-llama-test` whose only content is its entry point."""
    dist = folder / "mstore_llama_test-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mstore-llama-test\n"
                                   "Version: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[mstore.adapters]\nllama = tests.llama_adapter:LlamaAdapter\n")
    return folder


@pytest.fixture
def llama_registered(tmp_path, monkeypatch):
    site = register_outside_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    base.installed_adapters.cache_clear()
    yield site
    base.installed_adapters.cache_clear()


def build_llama(folder: Path, tie: bool, dtype: torch.dtype, seed: int = 0) -> Path:
    """A tiny LlamaForCausalLM with the test BPE tokenizer; large random weights, so that
    greedy decoding changes token from step to step (a wrong cache or rope would show)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = json.loads(tiny_models.tokenizer_files()["tokenizer.json"])["model"]["vocab"]
    eot = vocab["<|endoftext|>"]
    config = LlamaConfig(vocab_size=tiny_models.vocab_size(), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.to(dtype).save_pretrained(folder)
    tiny_models.train_bpe_tokenizer(folder)
    return folder


def hf_greedy(folder: Path, n: int, eos: list[int]) -> tuple[list[int], list[int], str]:
    """Prompt ids, `n` greedy tokens from transformers' generate, and the text `mstore
    generate` prints of them (which stops at an eos id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None)
    new = out[0, ids.shape[1]:].tolist()
    shown = next((i for i, t in enumerate(new) if t in eos), len(new))
    return ids[0].tolist(), new, tok.decode(new[:shown], skip_special_tokens=True)


def logits_of(folder: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_the_outside_adapter_is_found_through_its_entry_point(llama_registered):
    assert "llama" in base.installed_adapters()
    from tests.llama_adapter import LlamaAdapter

    assert base.adapter_class("llama") is LlamaAdapter
    assert "llama" in supported_architectures()
    assert LlamaAdapter.tie_rules({"tie_word_embeddings": True}) == {
        "lm_head.weight": "model.embed_tokens.weight"}
    assert LlamaAdapter.tie_rules({}) == {}
    base.installed_adapters.cache_clear()


def test_without_the_entry_point_llama_is_refused(cli, tmp_path):
    base.installed_adapters.cache_clear()
    src = build_llama(tmp_path / "llama", tie=True, dtype=torch.bfloat16)
    res = cli("import", src, "--accept-license", ok=False)
    assert res.exit_code != 0 and "llama" in res.stderr
    assert "llama" not in supported_architectures()


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_generate_train_export_a_llama(cli, store, tmp_path, llama_registered, variant):
    tie, dtype = VARIANTS[variant]
    src = build_llama(tmp_path / "src", tie, dtype)
    cli("import", src, "--accept-license", "--name", "llama-base")
    base_commit = store.resolve("llama-base").commit
    m = store.read_manifest(base_commit)
    assert m.architecture == "llama"
    assert m.tied_weights == ({"lm_head.weight": "model.embed_tokens.weight"} if tie else {})
    assert ("lm_head.weight" in m.tensors) is not tie
    assert {t.dtype for t in m.tensors.values()} == {"BF16" if dtype == torch.bfloat16
                                                     else "F32"}
    # the adapter's own layout check runs before import writes anything
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    res = cli("import", bad, "--accept-license", "--name", "bad", ok=False)
    assert "gate_proj.weight has shape [128, 64]" in res.stderr and "[96, 64]" in res.stderr

    # generate: greedy, token for token what transformers' own generate gives
    n = 20
    adapter = adapter_for(store, base_commit)
    prompt_ids, want, want_text = hf_greedy(src, n, adapter.tokenizer().eos_token_ids)
    assert len(set(want)) > 3
    assert adapter.tokenizer().encode(PROMPT) == prompt_ids
    model = adapter.load_checkpoint()
    got = list(adapter.generate_stream(model, torch.tensor([prompt_ids]), n, 0.0, None, None,
                                       None, []))
    assert got == want
    res = cli("generate", "llama-base", "--prompt", PROMPT, "-n", str(n), "--temperature", "0")
    assert res.stdout == want_text + "\n"  # exact to a pipe
    # ...and in a separate process, which finds the adapter through PYTHONPATH
    proc = run_mstore("generate", "llama-base", "--prompt", PROMPT, "-n", str(n),
                      "--temperature", "0", store=store.root,
                      env_extra={"PYTHONPATH": os.environ["PYTHONPATH"]})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == res.stdout
    # seeded sampling goes through the one sampler: reproducible
    sampled = [cli("generate", "llama-base", "--prompt", PROMPT, "-n", "12", "--seed", "3",
                   "--top-k", "20", "--top-p", "0.9").stdout for _ in range(2)]
    assert sampled[0] == sampled[1]

    # train: a child commit of the base, in the same architecture
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"model_name: llama-base\ndataset: {json.dumps(str(data))}\n"
                   "learning_rate: 1.0e-3\nbatch_size: 2\nmax_steps: 3\nseq_len: 16\n"
                   "warmup_steps: 1\neval_interval: 3\nseed: 0\ndevice: cpu\n")
    doc = json.loads(cli("train", "--config", cfg, "--json").stdout)
    child = store.read_manifest(doc["commit"])
    assert child.parent == base_commit and child.architecture == "llama"
    assert child.tied_weights == m.tied_weights
    assert set(child.tensors) == set(m.tensors)
    assert any(child.tensors[k].object != m.tensors[k].object for k in m.tensors)

    # export: transformers loads the exported base and gives the source model's logits
    out = tmp_path / "exported"
    cli("export", "llama-base", out)
    assert (out / "generation_config.json").is_file()
    ids = prompt_ids + want
    assert torch.equal(logits_of(out, ids), logits_of(src, ids))
    # the trained child exports to a folder transformers loads as well
    cli("export", doc["name"], tmp_path / "child")
    assert logits_of(tmp_path / "child", ids).shape == (1, len(ids), tiny_models.vocab_size())


def test_the_custom_adapter_answers_import_and_export_without_torch():
    """import and export ask adapters questions; the built-in scratch adapter answers them
    without loading torch (export and import stay torch-free)."""
    code = ("import sys\nfrom mstore.adapters.base import importable_architectures, "
            "adapter_class, scratch_adapter_class\n"
            "archs = importable_architectures()\n"
            "cls = scratch_adapter_class()\n"
            "assert cls.default_generation_config({}) is None and not cls.importable\n"
            "assert cls.architectures[0] not in archs\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_docs_name_every_method_and_attribute_of_the_interface():
    """docs/adapters.md lists the interface; a member added to `Adapter` must appear there."""
    doc = (REPO_ROOT / "docs" / "adapters.md").read_text()
    members = [n for n in vars(base.Adapter) if not n.startswith("_")]
    assert members
    missing = [n for n in members if f"def {n}(" not in doc and f"    {n}:" not in doc]
    assert not missing, f"docs/adapters.md does not list {missing}"
