"""`mstore train`: fine-tunes as child commits, from-scratch models, configs, lineage."""

import json
from pathlib import Path

import pytest

from mstore.training.config import load_config
from mstore.errors import ConfigError, DatasetError, Interrupted
from mstore.training.loop import train
from tests.conftest import snapshot

TEXT = ("The quick brown fox jumps over the lazy dog. " * 6 + "\n") * 8


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def write_config(tmp_path: Path, **values) -> Path:
    lines = []
    for k, v in values.items():
        lines.append(f"{k}: {json.dumps(v)}")
    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


FT = dict(learning_rate=2e-3, batch_size=4, max_steps=12, seq_len=16, warmup_steps=2,
          eval_interval=6, seed=0, device="cpu")
SCRATCH = dict(model_name=None, learning_rate=5e-3, batch_size=8, max_steps=25, seq_len=32,
               warmup_steps=2, eval_interval=25, n_layers=2, d_model=32, n_heads=2,
               device="cpu")


@pytest.fixture
def qwen_base(cli, store, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "tiny-base")
    return store


def test_finetune_commits_a_child_sharing_frozen_tensors(cli, qwen_base, tmp_path, corpus):
    store = qwen_base
    cfg = write_config(tmp_path, model_name="tiny-base", dataset=str(corpus),
                       freeze=["^model\\.embed_tokens\\.", "^model\\.layers\\.0\\."], **FT)
    res = cli("train", "--config", cfg, "--json")
    doc = json.loads(res.stdout)
    assert doc["name"] == "tiny-finetuned-001" and not doc["interrupted"]
    base = store.resolve("tiny-base").commit
    child = store.read_manifest(doc["commit"])
    parent = store.read_manifest(base)
    assert child.parent == base and doc["parent"] == base
    frozen = [n for n in parent.tensors
              if n.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert frozen
    for name in parent.tensors:
        same = child.tensors[name].object == parent.tensors[name].object
        assert same == (name in frozen), name
        assert child.tensors[name].dtype == parent.tensors[name].dtype  # stays bf16
    assert child.tied_weights == parent.tied_weights and child.files == parent.files
    entry = store.refs()["tiny-finetuned-001"]
    assert entry.fine_tuned_from == "tiny-base" and entry.license == parent.license
    t = child.training
    assert set(t) >= {"config", "dataset", "steps", "tokens_seen", "train_loss", "eval_loss",
                      "wall_time_s", "seed", "versions"}
    assert t["steps"] == 12 and t["tokens_seen"] == 12 * 4 * 16
    assert t["dataset"]["path"] == str(corpus) and len(t["dataset"]["blake3"]) == 64
    assert set(t["versions"]) >= {"torch", "transformers", "mstore"}
    assert t["config"]["model_name"] == "tiny-base" and t["seed"] == 0
    losses = [loss for _, loss in t["train_loss"]]
    assert losses[-1] < losses[0]  # the repeated text is learnt
    # du and diff show that the frozen half cost nothing
    du = {m["name"]: m for m in json.loads(cli("du", "--json").stdout)["models"]}
    trained = sum(store.objects.size(child.tensors[n].object) for n in child.tensors
                  if n not in frozen)
    assert du["tiny-finetuned-001"]["new_vs_parent_bytes"] == trained
    diff = json.loads(cli("diff", "tiny-base", "tiny-finetuned-001", "--json").stdout)
    assert set(diff["shared"]) == set(frozen)
    log = json.loads(cli("log", "tiny-finetuned-001", "--json").stdout)
    assert [e["names"] for e in log] == [["tiny-finetuned-001"], ["tiny-base"]]
    assert "training: 12 steps" in cli("log", "tiny-finetuned-001").stdout
    # the next fine-tune of the same base, or of the child, takes the next number
    res = cli("train", "--config", cfg, "--set", "model_name=tiny-finetuned-001", "--set",
              "max_steps=2", "--json")
    assert json.loads(res.stdout)["name"] == "tiny-finetuned-002"


def test_two_runs_with_the_same_seed_give_identical_objects(cli, qwen_base, tmp_path, corpus):
    cfg = write_config(tmp_path, model_name="tiny-base", dataset=str(corpus), **FT)
    a = json.loads(cli("train", "--config", cfg, "--set", "max_steps=4", "--json").stdout)
    b = json.loads(cli("train", "--config", cfg, "--set", "max_steps=4", "--json").stdout)
    ma, mb = qwen_base.read_manifest(a["commit"]), qwen_base.read_manifest(b["commit"])
    assert {k: v.object for k, v in ma.tensors.items()} == \
        {k: v.object for k, v in mb.tensors.items()}
    assert b["bytes_written"] == 0  # every tensor object was already there


def test_scratch_model_then_two_fine_tunes_make_three_generations(cli, store, tmp_path, corpus):
    cfg = write_config(tmp_path, dataset=str(corpus), **SCRATCH)
    first = json.loads(cli("train", "--config", cfg, "--json").stdout)
    assert first["name"] == "custom-transformer-001" and first["parent"] is None
    m = store.read_manifest(first["commit"])
    assert m.architecture == "custom-transformer" and m.parent is None
    assert "tokenizer.json" in m.files and m.tied_weights == {"lm_head.weight": "tok_emb.weight"}
    assert store.refs()["custom-transformer-001"].source == "scratch"
    ft = {k: v for k, v in SCRATCH.items() if k not in ("n_layers", "d_model", "n_heads")}
    cfg2 = write_config(tmp_path, dataset=str(corpus),
                        **{**ft, "model_name": "custom-transformer-001", "max_steps": 5})
    second = json.loads(cli("train", "--config", cfg2, "--json").stdout)
    assert second["name"] == "custom-transformer-001-finetuned-001"
    third = json.loads(cli("train", "--config", cfg2, "--set",
                           "model_name=custom-transformer-001-finetuned-001", "--json").stdout)
    assert third["name"] == "custom-transformer-001-finetuned-002"
    log = json.loads(cli("log", third["name"], "--json").stdout)
    assert [e["commit"] for e in log] == [third["commit"], second["commit"], first["commit"]]
    graph = cli("log", "--all", "--graph").stdout
    assert graph.index("custom-transformer-001 ") < graph.index("finetuned-001")
    assert "└─" in graph
    out = cli("generate", third["name"], "--prompt", "The ", "-n", "20", "--temperature", "0")
    assert len(out.stdout.rstrip("\n")) > 0
    show = cli("show", first["name"]).stdout
    assert "loss curve" in show and any(c in show for c in "▁▂▃▄▅▆▇█")


def test_a_second_scratch_model_takes_the_next_number(cli, store, tmp_path, corpus):
    cfg = write_config(tmp_path, dataset=str(corpus), **{**SCRATCH, "max_steps": 2})
    cli("train", "--config", cfg)
    res = json.loads(cli("train", "--config", cfg, "--set", "seed=1", "--json").stdout)
    assert res["name"] == "custom-transformer-002"
    res = json.loads(cli("train", "--config", cfg, "--name", "mine", "--json").stdout)
    assert res["name"] == "mine"


CONFIG_ERRORS = [
    ({"learning_rat": 0.1}, "unknown config key 'learning_rat' (did you mean 'learning_rate'?)"),
    ({"batch_size": "eight"}, "config key 'batch_size' must be an integer"),
    ({"model_name": "tiny-base", "n_layers": 2}, "config key 'n_layers' is an architecture"),
    ({"dataset": "missing.txt"}, "config key 'dataset': missing.txt not found"),
    ({"dataset": None}, "config key 'dataset'"),
    ({"freeze": ["("]}, "config key 'freeze': bad regex"),
    ({"device": "tpu"}, "config key 'device' must be one of"),
    ({"model_name": "nope"}, "unknown model 'nope'"),
    ({"model_name": "tiny-base", "freeze": ["^nothing"]}, "matches no parameter"),
]


@pytest.mark.parametrize("change,message", CONFIG_ERRORS, ids=[m for _, m in CONFIG_ERRORS])
def test_config_errors_name_the_key_and_commit_nothing(cli, qwen_base, tmp_path, corpus,
                                                       change, message):
    values = {"dataset": str(corpus), **SCRATCH, **change}
    if values.get("model_name"):
        for k in ("n_layers", "d_model", "n_heads"):
            if k not in change:
                values.pop(k)
    cfg = write_config(tmp_path, **values)
    before = snapshot(qwen_base.root)
    res = cli("train", "--config", cfg, ok=False)
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and message in res.stderr, res.stderr
    assert snapshot(qwen_base.root) == before


def test_empty_dataset_and_bad_yaml_are_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DatasetError, match="is empty"):
        load_config(write_config(tmp_path, dataset=str(empty)))
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nfreeze: [*c, *c]\n"
                    "dataset: d.txt\n")
    with pytest.raises(ConfigError, match="unknown config key 'a'"):
        load_config(bomb)


def test_set_overrides_are_typed_by_the_field(tmp_path, corpus):
    cfg = load_config(write_config(tmp_path, dataset=str(corpus)),
                      ["max_steps=7", "learning_rate=1e-4", "freeze=['a', 'b']",
                       "model_name=null", "dtype=bfloat16"], name="x")
    assert cfg.max_steps == 7 and cfg.learning_rate == 1e-4 and cfg.freeze == ["a", "b"]
    assert cfg.model_name is None and cfg.output_name == "x" and cfg.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="--set max_steps: expected an integer"):
        load_config(write_config(tmp_path, dataset=str(corpus)), ["max_steps=lots"])


def test_jsonl_dataset_and_bfloat16_autocast(cli, store, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"line {i} of the data. " * 4})
                              for i in range(40)))
    cfg = write_config(tmp_path, dataset=str(data), **{**SCRATCH, "max_steps": 3,
                                                       "dtype": "bfloat16"})
    doc = json.loads(cli("train", "--config", cfg, "--json").stdout)
    assert doc["steps"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    res = cli("train", "--config", write_config(tmp_path, dataset=str(bad), **SCRATCH), ok=False)
    assert "bad.jsonl:2" in res.stderr


class StopAt:
    """A callback that presses Ctrl-C at a given step, and records what it saw."""

    def __init__(self, step: int):
        self.step, self.seen, self.evals, self.commits = step, [], [], []

    def on_step_end(self, state):
        self.seen.append(state.step)
        if state.step == self.step:
            raise KeyboardInterrupt

    def on_eval(self, state):
        self.evals.append(state.eval_loss)

    def on_commit(self, result):
        self.commits.append(result.name)


def test_ctrl_c_commits_nothing_unless_asked(store, tmp_path, corpus):
    cfg = load_config(write_config(tmp_path, dataset=str(corpus), **SCRATCH))
    store.init()
    before = snapshot(store.root)
    stop = StopAt(3)
    with pytest.raises(Interrupted, match="interrupted at step 3; nothing committed"):
        train(store, cfg, callbacks=[stop])
    assert stop.seen == [1, 2, 3] and not stop.commits
    after = snapshot(store.root)
    assert {k for k in after if k.startswith("objects/")} == \
        {k for k in before if k.startswith("objects/")}
    stop = StopAt(3)
    result = train(store, cfg, callbacks=[stop], commit_on_interrupt=True)
    assert result.interrupted and result.steps == 3 and stop.commits == [result.name]
    assert store.read_manifest(result.commit).training["interrupted"] is True


def test_callbacks_see_every_step_and_eval(store, tmp_path, corpus):
    cfg = load_config(write_config(tmp_path, dataset=str(corpus),
                                   **{**SCRATCH, "max_steps": 6, "eval_interval": 3}))
    cb = StopAt(-1)
    result = train(store, cfg, callbacks=[cb])
    assert cb.seen == list(range(1, 7)) and len(cb.evals) == 2
    assert cb.commits == [result.name]


def test_gc_after_rm_of_the_base_keeps_the_child_usable(cli, qwen_base, tmp_path, corpus):
    cfg = write_config(tmp_path, model_name="tiny-base", dataset=str(corpus),
                       freeze=["^model\\.embed_tokens\\."], **{**FT, "max_steps": 3})
    child = json.loads(cli("train", "--config", cfg, "--json").stdout)["name"]
    cli("rm", "tiny-base")
    freed = json.loads(cli("gc", "--grace", "0", "--json").stdout)
    assert freed["objects_deleted"] > 0
    assert cli("fsck").exit_code == 0
    out = cli("generate", child, "--prompt", "The quick", "-n", "5", "--temperature", "0")
    assert out.exit_code == 0
    log = json.loads(cli("log", child, "--json").stdout)
    assert len(log) == 2 and log[1]["weights_present"] is False
    assert log[1]["message"].startswith("import ")


def test_tokenizer_override_from_a_folder_replaces_the_childs_tokenizer(cli, qwen_base,
                                                                         tmp_path, corpus):
    from tests.tiny_models import tokenizer_files

    folder = tmp_path / "tok"
    folder.mkdir()
    for name, data in tokenizer_files().items():
        (folder / name).write_bytes(data)
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    (folder / "chat_template.jinja").write_text(template)
    cfg = write_config(tmp_path, model_name="tiny-base", dataset=str(corpus),
                       tokenizer=str(folder), **{**FT, "max_steps": 2})
    doc = json.loads(cli("train", "--config", cfg, "--json").stdout)
    parent = qwen_base.read_manifest(qwen_base.resolve("tiny-base").commit)
    child = qwen_base.read_manifest(doc["commit"])
    assert child.files["chat_template.jinja"] != parent.files["chat_template.jinja"]
    assert child.files["tokenizer.json"] == parent.files["tokenizer.json"]
    assert child.files["generation_config.json"] == parent.files["generation_config.json"]
    assert qwen_base.objects.read_bytes(child.files["chat_template.jinja"]).decode() == template
    assert child.training["config"]["tokenizer"] == str(folder)


def test_tokenizer_override_for_the_custom_transformer(cli, store, tmp_path, corpus):
    small = tmp_path / "small.txt"
    small.write_text("abc abc cab " * 200)
    cfg = write_config(tmp_path, dataset=str(small), **{**SCRATCH, "max_steps": 1})
    first = json.loads(cli("train", "--config", cfg, "--json").stdout)
    # a from-scratch model can take another model's vocabulary instead of building one
    cfg2 = write_config(tmp_path, dataset=str(small), tokenizer=first["name"],
                        **{**SCRATCH, "max_steps": 1})
    second = json.loads(cli("train", "--config", cfg2, "--json").stdout)
    m1, m2 = store.read_manifest(first["commit"]), store.read_manifest(second["commit"])
    assert m1.files["tokenizer.json"] == m2.files["tokenizer.json"]
    # a vocabulary larger than the model's embedding is refused, naming the key
    big = json.loads(cli("train", "--config", write_config(
        tmp_path, dataset=str(corpus), **{**SCRATCH, "max_steps": 1}), "--json").stdout)
    ft = {k: v for k, v in SCRATCH.items() if k not in ("n_layers", "d_model", "n_heads")}
    cfg3 = write_config(tmp_path, dataset=str(small), tokenizer=big["name"],
                        **{**ft, "model_name": first["name"], "max_steps": 1})
    res = cli("train", "--config", cfg3, ok=False)
    assert "config key 'tokenizer'" in res.stderr and "does not fit" in res.stderr
    res = cli("train", "--config", write_config(tmp_path, dataset=str(small),
                                                  tokenizer=str(tmp_path / "nowhere"),
                                                  **SCRATCH), ok=False)
    assert "unknown model" in res.stderr or "config key 'tokenizer'" in res.stderr


def test_optimizer_is_fused_adamw_and_steps_as_adamw_does():
    import torch

    from mstore.training.config import TrainConfig
    from mstore.training.loop import _adamw

    cfg = TrainConfig(dataset="unused.txt", learning_rate=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 7, generator=gen), torch.randn(7, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in start]
    results = []
    for make in (lambda ps: _adamw(ps, cfg),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append((opt.defaults["fused"], [p.detach() for p in params]))
    (fused, got), (_, want) = results
    assert fused is True
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want))
    assert not all(torch.equal(a, b) for a, b in zip(got, start))
