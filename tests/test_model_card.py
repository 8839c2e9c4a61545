"""The model card every export writes: Hub front matter huggingface_hub reads, the lineage,
training record and attribution in the body, and a restrictive license carried down."""

import json
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard

from mstore.store.repo import Store
from tests import tiny_models
from tests.conftest import Cli

UPSTREAM_CARD = """\
---
license: other
license_name: qwen-research
license_link: https://huggingface.co/tiny/Qwen3-Carded/blob/main/LICENSE
tags:
- "weird: [yaml] & stuff"
---

# Qwen3-Carded

A tiny model with a card.

## Usage

Use it.

## Citation

If you use this model, please cite:

```bibtex
@misc{carded2025,
  title = {Carded: a tiny model},
  year  = {2025}
}
```

## Limitations

Many.
"""


EVAL_NOTE = {"dataset": "held-out [news]", "dataset_blake3": "ab" * 32, "tokens": 4096,
             "loss": 3.25, "perplexity": 25.79, "seq_len": 16}


def front_matter(path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:text.index("\n---", 4)])


@pytest.fixture(scope="module")
def lineage(hub_server, model_dirs, tmp_path_factory):
    """tiny/Qwen3-Carded imported from the Hub (qwen-research license, its own card), a
    fine-tune of it and a fine-tune of the fine-tune: (cli, store, folder), built once."""
    tmp_path = tmp_path_factory.mktemp("cards")
    cli = Cli(tmp_path / "store")
    repo = tmp_path / "carded"
    shutil.copytree(model_dirs["qwen3"], repo)
    (repo / "README.md").write_text(UPSTREAM_CARD)
    hub_server.add_repo("tiny/Qwen3-Carded", repo, license="other",
                        card_data={"license_name": "qwen-research"})
    cli("import", "tiny/Qwen3-Carded", "--name", "carded", "--accept-license")
    corpus = tmp_path / "data [x]*.txt"
    corpus.write_text(tiny_models.CORPUS)
    for parent, child in (("carded", "ft1"), ("ft1", "ft2")):
        cfg = tmp_path / f"{child}.yaml"
        cfg.write_text(f"model_name: {parent}\ndataset: '{corpus}'\nmax_steps: 2\n"
                       "batch_size: 2\nseq_len: 16\neval_interval: 2\ndevice: cpu\n")
        cli("train", "--config", cfg, "--name", child)
    store = Store(tmp_path / "store")
    store.attachments.add(store.resolve("ft1").commit, "eval", EVAL_NOTE)
    return cli, store, tmp_path


def test_an_imported_model_keeps_its_own_card_as_it_was(lineage):
    cli, _, folder = lineage
    out = folder / "out-import"
    cli("export", "carded", out)
    assert (out / "README.md").read_text() == UPSTREAM_CARD
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other" and card.data.license_name == "qwen-research"


def test_fine_tune_cards_carry_base_model_lineage_training_and_attribution(lineage):
    cli, store, folder = lineage
    cards = {}
    for name in ("ft1", "ft2"):
        out = folder / f"out-{name}"
        cli("export", name, out)
        cards[name] = out
        meta = front_matter(out / "README.md")
        assert meta["license"] == "other" and meta["license_name"] == "qwen-research"
        assert meta["license_link"] == "https://huggingface.co/tiny/Qwen3-Carded/blob/main/LICENSE"
        assert meta["base_model"] == "tiny/Qwen3-Carded"
        assert meta["base_model_relation"] == "finetune"
        assert meta["library_name"] == "transformers"
        assert {"mstore", "qwen3", "fine-tuned"} <= set(meta["tags"])
        card = ModelCard.load(out / "README.md")
        assert card.data.base_model == "tiny/Qwen3-Carded" and card.data.license == "other"
        assert (out / "BASE_MODEL_CARD.md").read_text() == UPSTREAM_CARD
        body = card.text
        assert "@misc{carded2025," in body and "## Limitations" not in body
        assert "qwen-research" in body and "not a permissive license" in body
    body = ModelCard.load(cards["ft2"] / "README.md").text
    lines = [ln for ln in body.splitlines() if ln.startswith("- **")]
    commits = [store.resolve(n).commit for n in ("carded", "ft1", "ft2")]
    assert len(lines) == 3
    for line, name, commit in zip(lines, ("carded", "ft1", "ft2"), commits):
        assert line.startswith(f"- **{name}** `{commit[:12]}`: ")
    assert "fine-tune ft1 on data \\[x\\]\\*.txt" in lines[2]  # outside text is inert
    for name in ("ft1", "ft2"):
        t = store.read_manifest(store.resolve(name).commit).training
        section = body.split(f"### {name} (")[1].split("###")[0]
        assert "- steps: 2" in section
        assert t["dataset"]["blake3"] in section
        assert f"- final train loss: {t['train_loss'][-1][1]:.4f}" in section
        assert f"- final eval loss: {t['eval_loss'][-1][1]:.4f}" in section
        if name == "ft1":
            assert "- eval note: held-out \\[news\\], loss 3.2500, perplexity 25.7900, " \
                   "4,096 tokens" in section
        else:
            assert "- eval notes: none recorded" in section


def test_list_and_show_say_the_child_carries_a_restrictive_license(lineage):
    cli = lineage[0]
    rows = {r["name"]: r for r in json.loads(cli("list", "--json").stdout)}
    assert rows["carded"]["license_note"] is None
    assert "qwen-research is not a permissive license" in rows["ft1"]["license_note"]
    table = {ln.split()[0]: ln for ln in cli("list").stdout.splitlines()[1:]}
    assert table["ft2"].endswith("qwen-research (inherited, not permissive)")
    assert table["carded"].endswith("qwen-research")
    show = cli("show", "ft1").stdout
    assert "license       qwen-research (inherited from the parent: qwen-research is not " \
           "a permissive license)" in show


def test_hub_import_without_card_gets_one_that_names_itself_as_base(cli, hub_repos, tmp_path):
    cli("import", "tiny/Qwen3-Tiny", "--name", "q3", "--accept-license")
    cli("export", "q3", tmp_path / "st")
    meta = front_matter(tmp_path / "st" / "README.md")
    assert meta["license"] == "mit" and meta["base_model"] == "tiny/Qwen3-Tiny"
    assert "base_model_relation" not in meta and meta["library_name"] == "transformers"
    cli("export", "q3", tmp_path / "gg", "--format", "gguf")
    card = ModelCard.load(tmp_path / "gg" / "README.md")
    assert card.data.base_model == "tiny/Qwen3-Tiny" and card.data.license == "mit"
    assert card.data.base_model_relation == "quantized" and "gguf" in card.data.tags
