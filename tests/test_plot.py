"""`mstore plot`: PNG and SVG of one or several lineages at the requested size, terminal
curves, and a clear refusal when there is nothing to plot."""

import plotext
import pytest
from PIL import Image

from mstore.plots.curves import lineage_curves
from mstore.plots.render import terminal_plot
from mstore.store.repo import Store
from tests import tiny_models
from tests.conftest import Cli, snapshot
from tests.test_layers import loaded_after


@pytest.fixture(scope="module")
def trained(model_dirs, tmp_path_factory):
    """base (an import), ft (4 steps on it) and two children of ft (3 steps each)."""
    tmp = tmp_path_factory.mktemp("plot")
    cli = Cli(tmp / "store")
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    corpus = tmp / "corpus.txt"
    corpus.write_text(tiny_models.CORPUS)
    for parent, child, steps, lr in (("base", "ft", 4, 3e-3), ("ft", "a", 3, 3e-3),
                                     ("ft", "b", 3, 1e-3)):
        cfg = tmp / f"{child}.yaml"
        cfg.write_text(f"model_name: {parent}\ndataset: {corpus}\nmax_steps: {steps}\n"
                       f"batch_size: 2\nseq_len: 16\neval_interval: 2\ndevice: cpu\n"
                       f"learning_rate: {lr}\n")
        cli("train", "--config", cfg, "--name", child)
    store = Store(tmp / "store")
    store.attachments.add(store.resolve("a").commit, "eval", {
        "dataset": "held-out", "dataset_blake3": "cd" * 32, "tokens": 512, "loss": 6.5,
        "perplexity": 665.1, "seq_len": 16})
    return cli, store, tmp


def test_generations_follow_their_parents_on_one_step_axis(trained):
    _, store, _ = trained
    curves = lineage_curves(store, ["a", "b"])
    assert [c.label.split(" ")[0] for c in curves] == ["ft", "a", "b"]
    ft, a, b = curves
    assert (ft.start, a.start, b.start) == (0, 4, 4)
    assert [s for s, _ in ft.train] == [1, 2, 3, 4]
    assert [s for s, _ in a.train] == [5, 6, 7] and [s for s, _ in b.eval][-1] == 7
    losses = store.read_manifest(store.resolve("a").commit).training["train_loss"]
    assert [v for _, v in a.train] == [v for _, v in losses]
    assert a.notes == [(7, 6.5, "held-out")] and not b.notes and not ft.notes


@pytest.mark.parametrize("names, suffix, size", [(["a"], ".png", "640x400"),
                                                 (["a", "b"], ".png", None),
                                                 (["a"], ".svg", None),
                                                 (["a", "b"], ".svg", "800x500")])
def test_picture_is_written_at_its_size_and_is_not_blank(trained, names, suffix, size):
    cli, _, tmp = trained
    out = tmp / f"{'-'.join(names)}-{size}{suffix}"
    res = cli("plot", *names, "-o", out, *(["--size", size] if size else []))
    assert "wrote" in res.stdout and out.is_file()
    width, height = map(int, (size or "1200x700").split("x"))
    if suffix == ".png":
        with Image.open(out) as img:
            assert img.size == (width, height)
            colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colours) > 50  # curves, text and legend, not an empty canvas
    else:
        text = out.read_text()
        assert f'width="{width * 0.75:g}pt" height="{height * 0.75:g}pt"' in text
        assert text.count("<path") > 10 and "cumulative training step" in text


def test_a_model_without_training_record_is_refused_in_one_line(trained):
    cli, store, tmp = trained
    before = snapshot(store.root)
    res = cli("plot", "base", "-o", tmp / "none.png", ok=False)
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: base has no training record") and "nothing to plot" \
        in res.stderr
    assert not (tmp / "none.png").exists() and snapshot(store.root) == before


@pytest.mark.parametrize("args, words", [(["-o", "x.jpg"], "must be a .png or .svg"),
                                         (["-o", "x.png", "--size", "12x7"], "--size '12x7'"),
                                         ([], "stdout is not a terminal: give -o")])
def test_bad_output_is_one_line(trained, args, words):
    cli = trained[0]
    res = cli("plot", "a", *args, ok=False)
    assert res.exit_code != 0 and words in res.stderr and res.stderr.count("\n") == 1


def test_terminal_plot_draws_the_same_curves(trained):
    text = terminal_plot(lineage_curves(trained[1], ["a"]), 100, 25)
    text = plotext.uncolorize(text)
    assert "Training loss by generation" in text and "a (" in text and "ft (" in text
    assert len(text.splitlines()) >= 20


def test_only_the_plot_command_loads_matplotlib():
    loaded = loaded_after("import mstore.cli.app, mstore.store.report")
    assert not loaded & {"matplotlib", "plotext", "torch"}
