"""`make demo`: mstore's main job, end to end, with the real CLI and printed like a tutorial.

Builds a tiny Qwen2-architecture model in Hugging Face format (or takes MODEL from the Hub
when the network allows), imports it, fine-tunes it with half of it frozen, trains the
custom character-level transformer from scratch on text from Python's standard library,
generates from each, then shows the family graph, du, gc and fsck. Everything runs in a
fresh demo folder (printed at the start; the store is its `models/`), so the output is the
same every time and every path in it is relative: a reader can retype the commands.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CORPUS_MODULES = ["json.decoder", "json.encoder", "textwrap", "string", "shlex", "fnmatch",
                  "glob", "bisect", "heapq", "base64", "calendar", "colorsys", "difflib"]


def write_corpus(path: Path) -> Path:
    """Python source from the standard library: on every machine, and easy to recognise."""
    import importlib

    parts = [inspect.getsource(importlib.import_module(m)) for m in CORPUS_MODULES]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts))
    return path


def run(store: Path, *args: str, check: bool = True) -> str:
    """`mstore ARGS` in the demo folder (the working folder), on the demo's store."""
    print(f"\n$ mstore {' '.join(shlex.quote(a) for a in args)}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "mstore", "--store", str(store), *args],
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=env)
    print(proc.stdout.rstrip(), flush=True)
    if check and proc.returncode != 0:
        sys.exit(f"demo failed: mstore {' '.join(args)} exited {proc.returncode}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a Hub repo id to import instead of the tiny local model")
    ap.add_argument("--dir", type=Path, help="demo folder (default: a fresh temp folder)")
    args = ap.parse_args()
    started = time.time()
    work = args.dir.resolve() if args.dir else Path(tempfile.mkdtemp(prefix="mstore-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # every path below is relative to it, as a reader would type them
    shutil.copytree(ROOT / "configs", "configs", dirs_exist_ok=True)
    store = Path("models")
    corpus = write_corpus(Path("data") / "corpus.txt")
    print(f"demo folder: {work} (the commands below run in it)\nstore: {store}\n"
          f"corpus: {corpus} ({corpus.stat().st_size // 1024} KiB of "
          "Python standard library source)")

    if args.model:
        source, base = args.model, args.model.split("/")[-1].lower()
        freeze = ["^model\\.embed_tokens\\.", "^model\\.layers\\.([0-9]|1[01])\\."]
        ft = ["max_steps=3", "batch_size=1", "seq_len=64", "eval_interval=3"]
    else:
        from tests.tiny_models import build_qwen2

        source = str(build_qwen2(Path("tiny-qwen2")))
        base = "tiny-qwen2"
        freeze = ["^model\\.embed_tokens\\.", "^model\\.layers\\.0\\."]
        ft = ["max_steps=40", "batch_size=8", "seq_len=64", "eval_interval=20",
              "learning_rate=3e-3", "warmup_steps=4"]
        print(f"built a tiny Qwen2-architecture model in Hugging Face format: {source}")

    run(store, "init")
    run(store, "import", source, "--name", f"{base}-base", "--accept-license")
    run(store, "import", source, "--accept-license")  # identical content: nothing added
    run(store, "list")
    run(store, "show", f"{base}-base")

    freeze_yaml = "[" + ", ".join(f"'{f}'" for f in freeze) + "]"
    run(store, "train", "--config", "configs/qwen-freeze.yaml",
        "--set", f"model_name={base}-base", "--set", f"dataset={corpus}",
        "--set", f"freeze={freeze_yaml}", *[x for kv in ft for x in ("--set", kv)])
    child = f"{base}-finetuned-001"
    run(store, "diff", f"{base}-base", child)
    run(store, "train", "--config", "configs/custom-char.yaml", "--set", f"dataset={corpus}")
    run(store, "train", "--config", "configs/custom-char.yaml", "--set", f"dataset={corpus}",
        "--set", "model_name=custom-transformer-001", "--set", "max_steps=60",
        "--set", "learning_rate=1e-3")  # the same config fine-tunes the model it made

    run(store, "generate", child, "--prompt", "def ", "--max-new-tokens", "24",
        "--temperature", "0")
    run(store, "generate", "custom-transformer-001", "--prompt", "def ",
        "--max-new-tokens", "300", "--temperature", "0.7", "--seed", "0")
    run(store, "log", "custom-transformer-001-finetuned-001")
    run(store, "show", "custom-transformer-001")
    run(store, "log", "--all", "--graph")
    run(store, "du")
    run(store, "rm", f"{base}-base")
    run(store, "gc", "--grace", "0")
    run(store, "log", child)
    run(store, "generate", child, "--prompt", "def ", "--max-new-tokens", "8",
        "--temperature", "0")
    run(store, "fsck")
    run(store, "export", child, "exported")
    print(f"\ndemo finished in {time.time() - started:.0f}s; store kept at {work / store}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    main()
