"""`mstore train` on two CPU processes (torchrun, gloo): DDP and FSDP2 against one process."""

import json

import pytest
import torch

from mstore.store.repo import Store
from mstore.runtime.torch_io import load_tensor
from tests.conftest import run_mstore

pytestmark = pytest.mark.slow
FREEZE = "['^model\\.embed_tokens\\.', '^model\\.layers\\.0\\.']"


@pytest.fixture
def base(tmp_path, model_dirs):
    store = tmp_path / "store"
    res = run_mstore("import", model_dirs["qwen2"], "--accept-license", "--name", "tiny-base",
                     store=store)
    assert res.returncode == 0, res.stderr
    data = tmp_path / "corpus.txt"
    data.write_text(("Two processes train one model, and only rank 0 commits. " * 4 + "\n") * 20)
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"model_name: tiny-base\ndataset: {data}\nmax_steps: 4\nbatch_size: 4\n"
                   "seq_len: 16\nlearning_rate: 1.0e-3\nwarmup_steps: 1\neval_interval: 4\n"
                   f"seed: 3\ndevice: cpu\nfreeze: {FREEZE}\n")
    return store, cfg


def train(store, cfg, *extra):
    res = run_mstore("train", "--config", cfg, "--json", *extra, store=store, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def tensors(store_path, commit):
    s = Store(store_path)
    m = s.read_manifest(commit)
    return m, {n: load_tensor(s.objects, t).float() for n, t in m.tensors.items()}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(base, strategy):
    store, cfg = base
    single = json.loads(train(store, cfg, "--name", "single").stdout)
    res = train(store, cfg, "--nproc", "2", "--set", f"strategy={strategy}", "--name", "multi")
    out = json.loads(res.stdout)  # one JSON document: only rank 0 reported
    assert out["name"] == "multi" and out["steps"] == 4
    refs = Store(store).refs()
    assert sorted(refs) == ["multi", "single", "tiny-base"]  # exactly one child commit
    parent, _ = tensors(store, refs["tiny-base"].commit)
    m1, t1 = tensors(store, single["commit"])
    m2, t2 = tensors(store, out["commit"])
    assert m2.parent == refs["tiny-base"].commit
    assert m2.training["processes"] == 2 and m2.training["strategy"] == strategy
    frozen = [n for n in parent.tensors if n.startswith(("model.embed_tokens.", "model.layers.0."))]
    for n in frozen:  # bit-identical, shared with the parent
        assert m2.tensors[n].object == parent.tensors[n].object
    trained = [n for n in parent.tensors if n not in frozen]
    assert any(m2.tensors[n].object != parent.tensors[n].object for n in trained)
    for n in trained:  # same global batch and seed: the same weights, up to reduction order
        assert torch.allclose(t1[n], t2[n], rtol=2e-2, atol=2e-3), n
    losses1 = [x[1] for x in m1.training["train_loss"]]
    losses2 = [x[1] for x in m2.training["train_loss"]]
    assert losses1 == pytest.approx(losses2, rel=1e-3)


def test_batch_must_split_evenly(base):
    store, cfg = base
    res = run_mstore("train", "--config", cfg, "--nproc", "2", "--set", "batch_size=3",
                     store=store, timeout=300)
    assert res.returncode != 0
    assert "must be divisible by the number of processes (2)" in res.stderr
    assert sorted(Store(store).refs()) == ["tiny-base"]
