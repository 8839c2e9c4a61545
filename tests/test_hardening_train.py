"""Hardening of `mstore train` (issue 11, items 3, 16, 17, 20): a failed commit loses no
trained model and leaves no temp file; numbers are numbers; a from-scratch model's own
config fine-tunes it; `generate --config` needs no dataset; `--nproc` errors are one line."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mstore.store import fsio
from mstore.training.config import config_model_name, load_config
from mstore.errors import ConfigError
from mstore.store.repo import Store
from mstore.runtime.torch_io import load_tensor
from tests.conftest import REPO_ROOT, snapshot
from tests.hub_server import clean_environ

TEXT = ("Every trained model is kept, even when the disk is full. " * 5 + "\n") * 10
SCRATCH = ("model_name: null\ndataset: {data}\nlearning_rate: 5e-3\nmax_steps: 3\n"
           "batch_size: 4\nseq_len: 16\nwarmup_steps: 1\neval_interval: 3\nn_layers: 1\n"
           "d_model: 16\nn_heads: 2\ndropout: 0.0\ndevice: cpu\n")


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def mstore(store: Path, *args, cwd: Path, failpoint: str | None = None,
           env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI as its own process, in `cwd` (where the default recovery folder goes)."""
    env = {k: v for k, v in clean_environ().items()
           if k not in ("MSTORE_FAILPOINT", "MSTORE_FAILPOINT_LOG", "MSTORE_DEBUG")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(env_extra or {})
    if failpoint:
        env["MSTORE_FAILPOINT"] = failpoint
    return subprocess.run([sys.executable, "-m", "mstore", "--store", str(store),
                           *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def unlocked(snap: dict) -> dict:
    """A snapshot without the writer lock's empty file, which a refused command may create."""
    return {k: v for k, v in snap.items() if k != ".lock"}


def tmp_entries(store: Path) -> list[str]:
    tmp = store / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def recovery_folder(stderr: str, cwd: Path) -> Path:
    (line,) = error_lines(stderr)
    assert "--resume-commit " in line, line
    return cwd / line.rsplit("--resume-commit ", 1)[1].rstrip("`")


# -- item 3: a failed commit keeps the model -------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("point", ["objects.staged:2", "objects.synced:1", "object.written:1",
                                   "registry.tmp-written:1"])
def test_enospc_while_committing_a_scratch_model_keeps_it(tmp_path, corpus, point):
    store = tmp_path / "store"
    assert mstore(store, "init", cwd=tmp_path).returncode == 0
    cfg = tmp_path / "scratch.yaml"
    cfg.write_text(SCRATCH.format(data=corpus))
    before = snapshot(store)
    res = mstore(store, "train", "--config", cfg, cwd=tmp_path, failpoint=f"{point}:enospc")
    assert res.returncode == 1, res.stderr
    (line,) = error_lines(res.stderr)
    assert line.startswith("error: commit failed (No space left on device"), line
    assert "nothing was committed" in line and "Traceback" not in res.stderr
    folder = recovery_folder(res.stderr, tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("mstore-train-recovery-")
    assert {"model.safetensors", "config.json", "tokenizer.json", "mstore-commit.json"} \
        <= {p.name for p in folder.iterdir()}
    kept = load_file(str(folder / "model.safetensors"))
    assert "tok_emb.weight" in kept
    assert Store(store).refs() == {} and tmp_entries(store) == []
    if point.startswith("objects.staged"):  # nothing was published: the store is untouched
        assert unlocked(snapshot(store)) == before
    # the documented way back: commit the folder as the failed commit would have
    res = mstore(store, "train", "--resume-commit", folder.name, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["name"] == "custom-transformer-001"
    s = Store(store)
    m = s.read_manifest(doc["commit"])
    assert m.parent is None and m.training["steps"] == 3 and "tokenizer.json" in m.files
    for name, entry in m.tensors.items():
        assert load_tensor(s.objects, entry).equal(kept[name]), name
    assert tmp_entries(store) == []


@pytest.mark.slow
def test_a_failed_fine_tune_commit_resumes_to_the_commit_it_would_have_made(
        tmp_path, corpus, model_dirs):
    store = tmp_path / "store"
    res = mstore(store, "import", model_dirs["qwen2"], "--name", "tiny-base",
                 "--accept-license", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"model_name: tiny-base\ndataset: {corpus}\nlearning_rate: 2e-3\n"
                   "max_steps: 2\nbatch_size: 2\nseq_len: 16\nwarmup_steps: 1\n"
                   "eval_interval: 2\ndevice: cpu\nfreeze: ['^model\\.embed_tokens\\.']\n")
    refs = Store(store).refs()
    chosen = tmp_path / "kept-here"
    res = mstore(store, "train", "--config", cfg, "--recovery-dir", chosen, cwd=tmp_path,
                 failpoint="registry.tmp-written:1:enospc")
    assert res.returncode == 1
    assert recovery_folder(res.stderr, tmp_path) == chosen
    assert Store(store).refs() == refs and tmp_entries(store) == []
    res = mstore(store, "train", "--resume-commit", chosen, "--name", "kept", "--json",
                 cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    kept = Store(store).read_manifest(json.loads(res.stdout)["commit"])
    res = mstore(store, "train", "--config", cfg, "--name", "direct", "--json", cwd=tmp_path)
    direct = Store(store).read_manifest(json.loads(res.stdout)["commit"])
    assert json.loads(res.stdout)["bytes_written"] == 0  # the recovered tensors, bit for bit
    assert kept.tensors == direct.tensors and kept.files == direct.files
    assert kept.parent == direct.parent == refs["tiny-base"].commit
    assert kept.tied_weights == direct.tied_weights
    assert Store(store).refs()["kept"].fine_tuned_from == "tiny-base"


@pytest.mark.slow
def test_an_unwritable_recovery_dir_falls_back_to_the_temp_folder(tmp_path, corpus):
    store = tmp_path / "store"
    cfg = tmp_path / "scratch.yaml"
    cfg.write_text(SCRATCH.format(data=corpus))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    res = mstore(store, "train", "--config", cfg, "--recovery-dir", blocker / "inside",
                 cwd=tmp_path, failpoint="objects.synced:1:enospc",
                 env_extra={"TMPDIR": str(systmp)})
    assert res.returncode == 1
    folder = recovery_folder(res.stderr, tmp_path)
    assert folder.parent == systmp and (folder / "model.safetensors").is_file()
    assert tmp_entries(store) == []


def test_an_incomplete_or_missing_recovery_folder_is_refused(cli, store_path, tmp_path):
    cli("init")
    half = tmp_path / "mstore-train-recovery-x"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"")  # the record is written last: incomplete
    before = snapshot(store_path)
    for folder, message in [(half, "is not a recovery folder of mstore train"),
                            (tmp_path / "nowhere", "not found")]:
        res = cli("train", "--resume-commit", folder, ok=False)
        assert res.exit_code == 1
        assert res.stderr.startswith("error: ") and message in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    assert snapshot(store_path) == before


def test_a_temp_file_whose_write_fails_is_removed(tmp_path):
    """A real ENOSPC (writes to /dev/full): the data left in the buffer fails again when the
    file is closed, which must not keep the half-written temp file."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as err:
        with fsio.open_tmp(tmp_path, "obj") as (_path, f):
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, f.fileno())
            os.close(full)
            f.write(b"header")  # buffered
            f.write(b"x" * (1 << 20))  # too big for the buffer: written now, and fails
    assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError):  # failing only when the buffer is flushed at close
        with fsio.open_tmp(tmp_path, "obj") as (_path, f):
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, f.fileno())
            os.close(full)
            f.write(b"small")
    assert list(tmp_path.iterdir()) == []


# -- item 16: numbers people write are numbers ------------------------------------------
SPELLINGS = [("learning_rate", "1e-4", 1e-4), ("learning_rate", "1E-4", 1e-4),
             ("learning_rate", "+1e-4", 1e-4), ("learning_rate", '"2.5e-3"', 2.5e-3),
             ("weight_decay", "1e-2", 0.01), ("min_lr_ratio", ".5", 0.5),
             ("max_grad_norm", "3.", 3.0), ("max_steps", "1e3", 1000),
             ("max_steps", "1_000", 1000), ("batch_size", "'8'", 8),
             ("warmup_steps", "2E1", 20), ("eval_interval", "+5", 5)]


@pytest.mark.parametrize("key,text,value", SPELLINGS, ids=[f"{k}={t}" for k, t, _ in SPELLINGS])
def test_numbers_in_yaml_and_set_are_numbers(tmp_path, corpus, key, text, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {corpus}\n{key}: {text}\n")
    got = getattr(load_config(cfg), key)
    assert got == pytest.approx(value) and type(got) is type(value)
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"dataset: {corpus}\n")
    got = getattr(load_config(plain, [f"{key}={text.strip(chr(34) + chr(39))}"]), key)
    assert got == pytest.approx(value) and type(got) is type(value)


REFUSED = [("learning_rate", "fast", "config key 'learning_rate' must be a number, got 'fast'"),
           ("learning_rate", "1e-4e", "must be a number, got '1e-4e'"),
           ("learning_rate", "'inf'", "must be a number"),
           ("max_steps", "2.5", "config key 'max_steps' must be an integer, got 2.5"),
           ("max_steps", "1e-1", "config key 'max_steps' must be an integer"),
           ("batch_size", "true", "config key 'batch_size' must be an integer, got True"),
           ("seed", "0x", "config key 'seed' must be an integer, got '0x'")]


@pytest.mark.parametrize("key,text,message", REFUSED, ids=[f"{k}={t}" for k, t, _ in REFUSED])
def test_non_numbers_are_still_refused(cli, store_path, tmp_path, corpus, key, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {corpus}\n{key}: {text}\n")
    cli("init")
    before = snapshot(store_path)
    res = cli("train", "--config", cfg, ok=False)
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and message in res.stderr, res.stderr
    assert snapshot(store_path) == before
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"dataset: {corpus}\n")
    want = "an integer" if "integer" in message else "a number"
    with pytest.raises(ConfigError, match=f"(--set {key}: expected|{key!r} must be) {want}"):
        load_config(plain, [f"{key}={text.strip(chr(39))}"])


# -- item 17: the README's workflow, as written ----------------------------------------
def test_a_scratch_model_fine_tunes_with_its_own_config(cli, store, store_path, tmp_path,
                                                        corpus):
    """configs/custom-char.yaml trains a model; the same file plus model_name fine-tunes it;
    generate --config needs no dataset."""
    small = ["--set", f"dataset={corpus}", "--set", "max_steps=1", "--set", "seq_len=16",
             "--set", "batch_size=2", "--set", "eval_interval=1"]
    cfg = REPO_ROOT / "configs" / "custom-char.yaml"
    first = json.loads(cli("train", "--config", cfg, *small, "--json").stdout)
    assert first["name"] == "custom-transformer-001"
    child = json.loads(cli("train", "--config", cfg, *small, "--set",
                           "model_name=custom-transformer-001", "--json").stdout)
    assert child["name"] == "custom-transformer-001-finetuned-001"
    assert child["parent"] == first["commit"]
    # the same with model_name written in a copy of the file (README's tour)
    text = cfg.read_text().replace("model_name: null", "model_name: custom-transformer-001")
    assert "model_name: custom-transformer-001" in text
    own = tmp_path / "mine.yaml"
    own.write_text(text.replace("dataset: data/corpus.txt", f"dataset: {corpus}"))
    second = json.loads(cli("train", "--config", own, *small[2:], "--json").stdout)
    assert second["name"] == "custom-transformer-001-finetuned-002"
    # an architecture key that differs is an error naming the key and both values
    before = snapshot(store_path)
    for key, given, has in [("d_model", "64", "128"), ("n_heads", "8", "4"),
                            ("dropout", "0.1", "0.0")]:
        res = cli("train", "--config", own, *small[2:], "--set", f"{key}={given}", ok=False)
        assert res.exit_code == 1
        line = res.stderr.strip()
        assert line.startswith(f"error: config key {key!r} is an architecture parameter"), line
        shown = float(given) if key == "dropout" else given
        assert f"has {key} {has}" in line and f"gives {shown}" in line, line
    res = cli("train", "--config", own, "--set", "seq_len=1024", ok=False)
    assert "config key 'seq_len' (1024) is longer than the context" in res.stderr
    assert snapshot(store_path) == before
    # generate --config: the dataset is neither needed nor checked
    gen = tmp_path / "gen.yaml"
    gen.write_text(text.replace("data/corpus.txt", "no-such-dataset.txt"))
    res = cli("generate", "--config", gen, "-p", "Every ", "-n", "5", "--temperature", "0")
    assert len(res.stdout.rstrip("\n")) == 5  # five characters of a character model
    gen.write_text("model_name: custom-transformer-001\n")  # no dataset key at all
    assert config_model_name(gen) == "custom-transformer-001"
    res = cli("generate", "--config", gen, "-p", "E", "-n", "3", "--temperature", "0")
    assert len(res.stdout.rstrip("\n")) == 3


def test_generate_config_still_checks_model_name(cli, store_path, tmp_path):
    gen = tmp_path / "gen.yaml"
    gen.write_text("model_name: 7\n")
    res = cli("generate", "--config", gen, ok=False)
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: config key 'model_name' must be a string, got 7"


# -- item 20: --nproc errors are one line ----------------------------------------------
NPROC_FAILURES = [  # both ranks fail after launch, each with the same one-line error
    (["--set", "seq_len=4000", "--set", "block_size=4000"],
     "error: config key 'dataset': only ", "tokens, fewer than seq_len (4000)"),
    (["--set", "tokenizer=no-such-model"], "error: ", "'no-such-model'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("sets,start,end", NPROC_FAILURES, ids=["seq_len", "tokenizer"])
def test_nproc_failure_inside_the_workers_is_one_error_line(tmp_path, corpus, sets, start,
                                                            end):
    store = tmp_path / "store"
    assert mstore(store, "init", cwd=tmp_path).returncode == 0
    cfg = tmp_path / "scratch.yaml"
    cfg.write_text(SCRATCH.format(data=corpus))
    before = snapshot(store)
    res = mstore(store, "train", "--config", cfg, "--nproc", "2", *sets, cwd=tmp_path)
    assert res.returncode != 0
    (line,) = error_lines(res.stderr)
    assert line.startswith(start) and end in line, res.stderr
    assert "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert unlocked(snapshot(store)) == before
