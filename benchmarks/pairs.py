"""The pairs of issue 5: each measures mstore and its baseline in the same run, alternated.

Every pair function takes the `Bench` (options, work folder, lazily built inputs) and
returns a `Pair`. Set-up (building models, stores, refs) is never timed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from . import growth, inputs, packs, startup
from .inputs import SHAPES, Shape
from .measure import (
    PY, RSS_HOW, CommandFailed, Pair, alternate, child_env, drop_dirty_pages, mstore_argv,
    run_process, summarize,
)
from .startup import TYPER

MB = 1024 * 1024
BASE_REF = "bench"
TINY_REF = "tiny"


@dataclass
class Options:
    quick: bool = False
    repeats: int = 3
    size: str = "0.5b"
    workdir: Path = Path("benchmarks/work/run")
    only: list[str] | None = None
    keep: bool = False

    @property
    def fast_repeats(self) -> int:
        """Sub-second commands: cheap, so more repeats against the noise."""
        return 1 if self.quick else max(self.repeats, 10)

    @property
    def medium_repeats(self) -> int:
        """Whole-process pairs of a few seconds (import, time to first token)."""
        return 1 if self.quick else max(self.repeats, 5)


class Bench:
    def __init__(self, opts: Options):
        self.opts = opts
        self.work = Path(opts.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.shape: Shape = SHAPES[opts.size]
        self.import_rss: list[int] = []  # peak RSS of every timed `mstore import` run
        self.growth: dict[str, dict] = {}  # growth pairs' results, by command
        self.setup_seconds: dict[str, float] = {}

    def _timed_setup(self, what: str, fn: Callable[[], Any]) -> Any:
        import time

        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.setup_seconds[what] = round(time.perf_counter() - t0, 2)

    # -- inputs (untimed) --------------------------------------------------------------
    @cached_property
    def model(self) -> tuple[Path, dict]:
        folder = self.work / f"model-{self.shape.name}"
        facts = self._timed_setup(f"build model {self.shape.name}",
                                  lambda: self.build(folder, self.shape.name))
        return folder, facts

    def build(self, folder: Path, shape: str) -> dict:
        return self.worker("build", {"dir": str(folder), "shape": shape}, tag=shape)

    @property
    def model_dir(self) -> Path:
        return self.model[0]

    @property
    def facts(self) -> dict:
        return self.model[1]

    @cached_property
    def tiny_dir(self) -> Path:
        if self.shape.name == "tiny":
            return self.model_dir
        folder = self.work / "model-tiny"
        self._timed_setup("build model tiny", lambda: self.build(folder, "tiny"))
        return folder

    @cached_property
    def dataset(self) -> Path:
        return inputs.write_dataset(self.work / "data" / "corpus.txt")

    @cached_property
    def main_store(self) -> Path:
        """The model as BASE_REF and the tiny model as TINY_REF, imported once."""
        root = self.work / "stores" / "main"
        model_dir, tiny_dir = self.model_dir, self.tiny_dir

        def setup():
            inputs.import_folder(root, model_dir, BASE_REF)
            if tiny_dir != model_dir:
                inputs.import_folder(root, tiny_dir, TINY_REF)
            else:
                from mstore.store.repo import Store

                Store(root).tag(BASE_REF, TINY_REF)
        self._timed_setup("import into the main store", setup)
        return root

    def fresh_dir(self, *parts: str) -> Path:
        path = self.work.joinpath(*parts)
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_train_config(self, name: str, **keys: Any) -> Path:
        path = self.work / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"dataset": str(self.dataset), "learning_rate": 1.0e-4, "warmup_steps": 0,
               "eval_fraction": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
               "device": "cpu", "dtype": "float32", **keys}
        import yaml

        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def worker(self, task: str, args: dict[str, Any], timeout: float = 3600,
               tag: str = "") -> dict[str, Any]:
        out = self.work / "worker" / f"{task}{'-' + tag if tag else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        run_process([PY, "-m", "benchmarks.worker", task, "--args", json.dumps(args),
                     "--out", str(out)], timeout=timeout)
        return json.loads(out.read_text())


def cp_sync(src: Path, dst: Path) -> list[str]:
    return ["sh", "-c", f'cp -r "{src}" "{dst}" && sync']


# -- storage ---------------------------------------------------------------------------------
def pair_import(b: Bench) -> Pair:
    src = b.model_dir

    def mstore(i):
        store = b.fresh_dir("runs", f"import-store-{i}")
        drop_dirty_pages()
        r = run_process(mstore_argv(store, "import", src, "--accept-license"), rss=True)
        b.import_rss.append(r.maxrss)
        shutil.rmtree(store)
        return r.wall

    def baseline(i):
        dst = b.fresh_dir("runs", f"cp-{i}")
        drop_dirty_pages()
        r = run_process(cp_sync(src, dst), rss=True)  # the same wrapper as the mstore side
        shutil.rmtree(dst)
        return r.wall

    _warm_page_cache(src)
    res = alternate(b.opts.medium_repeats, {"mstore": mstore, "baseline": baseline})
    return Pair("import", f"import a local {_gb(b.facts['total_bytes'])} HF folder, whole process",
                "mstore import DIR --accept-license (fresh store)", "cp -r DIR X && sync",
                "s", summarize(res["mstore"]), summarize(res["baseline"]), "<= 1.3x",
                ("ratio_le", 1.3), extra={"folder_bytes": b.facts["total_bytes"],
                                          "tensors": b.facts["tensors"]})


def pair_reimport(b: Bench) -> Pair:
    src, store = b.model_dir, b.main_store

    def mstore(_i):
        drop_dirty_pages()
        r = run_process(mstore_argv(store, "import", src, "--accept-license"))
        if "already imported" not in r.stdout:
            raise CommandFailed(f"re-import did not find the content: {r.stdout!r}")
        return r.wall

    baseline = _cp_baseline(b, src)

    _warm_page_cache(src)
    res = alternate(b.opts.medium_repeats, {"mstore": mstore, "baseline": baseline})
    return Pair("reimport", "re-import identical content (the store already holds it)",
                "mstore import DIR (again)", "cp -r DIR X && sync", "s",
                summarize(res["mstore"]), summarize(res["baseline"]), "<= 0.5x",
                ("ratio_le", 0.5))


def pair_import_layout(b: Bench) -> Pair:
    """The object layout's own cost: a bare copy into one file per tensor
    (benchmarks/layout.py) vs `cp -r`, for reading the import pair beside it."""
    src = b.model_dir

    def bare(i):
        dst = b.fresh_dir("runs", f"layout-{i}")
        drop_dirty_pages()
        r = run_process([PY, "-m", "benchmarks.layout", str(src), str(dst)],
                        cwd=inputs.REPO_ROOT)
        shutil.rmtree(dst)
        return r.wall

    _warm_page_cache(src)
    res = alternate(b.opts.medium_repeats, {"mstore": bare, "baseline": _cp_baseline(b, src)})
    return Pair("import-layout", f"every tensor of a {_gb(b.facts['total_bytes'])} folder "
                "copied "
                "into a file of its own, then one syncfs (no hashing, renames or manifest): "
                "what one file per tensor costs on this filesystem", "python -m benchmarks.layout",
                "cp -r DIR X && sync", "s", summarize(res["mstore"]), summarize(res["baseline"]),
                "(report: what the layout costs, beside target 1's 1.3x)", ("report", 0))


def pair_import_rss(b: Bench) -> Pair:
    notes = []
    if not b.import_rss:
        src = b.model_dir
        for i in range(b.opts.repeats if not b.opts.quick else 1):
            store = b.fresh_dir("runs", f"import-store-{i}")
            drop_dirty_pages()
            b.import_rss.append(run_process(mstore_argv(store, "import", src,
                                                        "--accept-license"), rss=True).maxrss)
            shutil.rmtree(store)
    else:
        notes.append("peak RSS of the timed runs of the import pair")
    limit = b.facts["largest_tensor_bytes"] + 300 * MB
    return Pair("import-rss", f"peak RSS of `mstore import` of the folder ({RSS_HOW})",
                "mstore import DIR", f"largest tensor ({b.facts['largest_tensor']}, "
                f"{b.facts['largest_tensor_bytes'] / MB:.0f} MB) + 300 MB", "MB",
                summarize([x / MB for x in b.import_rss]), summarize([limit / MB]),
                "< 1x", ("ratio_lt", 1.0), notes=notes)


def pair_hub_import(b: Bench) -> Pair:
    """`mstore import ORG/NAME` from the tests' Hub look-alike on loopback against
    `snapshot_download` of the same repo alone, each into a fresh HF_HOME (and store)."""
    import sys

    if str(inputs.REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(inputs.REPO_ROOT))
    from tests.hub_server import hub_env, reserve_server

    server = reserve_server()
    repo = "bench/Qwen2-Bench"
    server.add_repo(repo, b.model_dir)
    download = [PY, "-c", f"from huggingface_hub import snapshot_download; "
                          f"snapshot_download({repo!r})"]

    def env_for(i, side):
        home = b.fresh_dir("runs", f"hf-home-{side}-{i}")
        env = child_env(hub_env(server, hf_home=str(home)))
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(k, None)
        return env, home

    def mstore(i):
        store = b.fresh_dir("runs", f"hub-store-{i}")
        env, home = env_for(i, "mstore")
        drop_dirty_pages()
        r = run_process(mstore_argv(store, "import", repo, "--accept-license"), env=env)
        shutil.rmtree(store)
        shutil.rmtree(home)
        return r.wall

    def baseline(i):
        env, home = env_for(i, "baseline")
        drop_dirty_pages()
        r = run_process(download, env=env)
        shutil.rmtree(home)
        return r.wall

    res = alternate(b.opts.medium_repeats, {"mstore": mstore, "baseline": baseline})
    return Pair("hub-import", f"import a {_gb(b.facts['total_bytes'])} repo from a Hub on "
                "loopback (tests/hub_server.py), whole process",
                "mstore import ORG/NAME --accept-license (fresh store, fresh HF_HOME)",
                "snapshot_download(ORG/NAME) alone (fresh HF_HOME)", "s",
                summarize(res["mstore"]), summarize(res["baseline"]), "<= 1.1x",
                ("ratio_le", 1.1))


def pair_export(b: Bench) -> Pair:
    """Export writes the folder the import read: the same bytes `cp -r` copies, plus the
    re-hash of every object (verified while copying) and metadata.json."""
    src, store = b.model_dir, b.main_store

    def mstore(i):
        dst = b.fresh_dir("runs", f"export-{i}")
        drop_dirty_pages()
        r = run_process(["sh", "-c", " ".join(f'"{a}"' for a in mstore_argv(
            store, "export", BASE_REF, dst)) + " && sync"])
        shutil.rmtree(dst)
        return r.wall

    baseline = _cp_baseline(b, src)

    _warm_store(store)
    _warm_page_cache(src)
    res = alternate(b.opts.medium_repeats, {"mstore": mstore, "baseline": baseline})
    return Pair("export", f"export a {_gb(b.facts['total_bytes'])} model to a HF folder, whole "
                "process", "mstore export NAME DIR && sync", "cp -r DIR X && sync", "s",
                summarize(res["mstore"]), summarize(res["baseline"]), "<= 1.15x",
                ("ratio_le", 1.15))


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_page_cache() -> None:
    """Every clean page out of the page cache (root only): the next read comes from disk."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cat_every_object(store: Path) -> list[str]:
    """The fsck pairs' baseline: read every object file once, as fast as `cat` can."""
    return ["sh", "-c", f'find "{store / "objects"}" -type f -print0 | xargs -0 cat > /dev/null']


def _fsck_pair(b: Bench, cold: bool) -> Pair:
    store = b.main_store
    cat = _cat_every_object(store)
    fsck = mstore_argv(store, "fsck")

    drop = cold and not b.opts.quick  # the smoke test never empties the machine's cache

    def side(argv):
        def run(_i):
            if drop:
                drop_page_cache()
            else:
                drop_dirty_pages()
            return run_process(argv).wall
        return run

    if not cold:
        _warm_store(store)
    res = alternate(b.opts.medium_repeats, {"mstore": side(fsck), "baseline": side(cat)})
    nbytes = sum(f.stat().st_size for f in (store / "objects").rglob("*") if f.is_file())
    what = ("page cache dropped before every run of either side" if drop else
            "page cache warm (--quick: not dropped)" if cold else "page cache warm")
    return Pair(f"fsck-{'cold' if cold else 'warm'}",
                f"`mstore fsck` of a {_gb(nbytes)} store, {what}, whole process",
                "mstore fsck", "cat of every object > /dev/null", "s",
                summarize(res["mstore"]), summarize(res["baseline"]), "<= 1.2x",
                ("ratio_le", 1.2),
                notes=["cold: python, typer and mstore are read from disk too (the cat side "
                       "reads only the objects)"] if cold else [])


def pair_fsck_warm(b: Bench) -> Pair:
    return _fsck_pair(b, cold=False)


HASH_EVERY_OBJECT = r"""
import os, sys, threading, blake3
files = sorted((os.path.join(d, n) for d, _, ns in os.walk(sys.argv[1]) for n in ns),
               key=os.path.getsize, reverse=True)
todo, taking = iter(files), threading.Lock()
def work():
    while True:
        with taking:
            path = next(todo, None)
        if path is None:
            return
        blake3.blake3().update_mmap(path).hexdigest()
workers = [threading.Thread(target=work) for _ in range(os.cpu_count() or 1)]
for w in workers:
    w.start()
for w in workers:
    w.join()
"""


def pair_fsck_floor(b: Bench) -> Pair:
    """The least a full re-hash costs: a bare Python process (no typer, no mstore) that
    blake3-hashes every object file through mmap, one file per core at a time, largest
    first, against `cat` of the same files, page cache warm. Of the ways measured on
    2026-12-03 (whole processes, 0.99 GB) this was the fastest: 0.29 s, against 0.32 s for
    one file at a time split across every core (the earlier floor) and 0.53 s reading
    into a buffer per thread (sys time: 0.5 s). Where this is above 1.2x, no fsck that
    re-hashes can meet the warm target on this CPU."""
    store = b.main_store
    cat = _cat_every_object(store)
    hash_all = [PY, "-c", HASH_EVERY_OBJECT, str(store / "objects")]

    def side(argv):
        def run(_i):
            drop_dirty_pages()
            return run_process(argv).wall
        return run

    _warm_store(store)
    res = alternate(b.opts.medium_repeats, {"mstore": side(hash_all), "baseline": side(cat)})
    return Pair("fsck-floor", "blake3 of every object in a bare Python process (the floor of "
                "any fsck that re-hashes), page cache warm, whole process",
                "python -c: blake3 update_mmap of every object, one file per core, largest first",
                "cat of every object > /dev/null", "s", summarize(res["mstore"]),
                summarize(res["baseline"]), "(report; fsck-warm's target is <= 1.2x)",
                ("report", 0))


def pair_fsck_cold(b: Bench) -> Pair:
    if not b.opts.quick and not can_drop_caches():
        raise CommandFailed("needs root to drop the page cache (/proc/sys/vm/drop_caches); "
                            "fsck-warm is measured without")
    return _fsck_pair(b, cold=True)


def _warm_store(store: Path) -> None:
    for p in (Path(store) / "objects").rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 * MB):
                    pass


def pair_du_frozen(b: Bench) -> Pair:
    """Fine-tune with the embeddings and the lower half of the layers frozen; the child must
    cost exactly the bytes of the tensors it trained."""
    store = b.fresh_dir("stores", "du")
    inputs.link_store(b.main_store, store, [BASE_REF])
    layers = b.shape.layers
    lower = "|".join(str(i) for i in range(layers // 2))
    freeze = [r"^model\.embed_tokens\.", rf"^model\.layers\.({lower})\."]
    steps = 1 if b.shape.name != "tiny" else 2
    cfg = b.write_train_config("du-frozen", model_name=BASE_REF, batch_size=1, seq_len=64,
                               max_steps=steps, eval_interval=1000,
                               # large enough that every trained tensor changes in bf16
                               learning_rate=1.0e-2, freeze=freeze,
                               output_name="frozen-child")
    drop_dirty_pages()
    tr = run_process(mstore_argv(store, "train", "--config", cfg, "--json"))
    trained = json.loads(tr.stdout)
    du = json.loads(run_process(mstore_argv(store, "du", "--json")).stdout)
    row = next(m for m in du["models"] if m["name"] == "frozen-child")

    from mstore.store.repo import Store

    st = Store(store)
    child = st.read_manifest(st.resolve("frozen-child").commit)
    parent = st.read_manifest(child.parent)
    regexes = [re.compile(p) for p in freeze]
    trained_names = [n for n in child.tensors if not any(r.search(n) for r in regexes)]
    trained_bytes = sum(st.objects.size(child.tensors[n].object) for n in trained_names)
    unchanged = [n for n in trained_names
                 if parent.tensors.get(n) and parent.tensors[n].object == child.tensors[n].object]
    frozen_changed = [n for n in child.tensors if any(r.search(n) for r in regexes)
                      and child.tensors[n].object != parent.tensors[n].object]
    notes = [f"{len(trained_names)} trained tensors, {len(child.tensors) - len(trained_names)} "
             f"frozen; {steps} step(s) at lr 1e-2 through `mstore train`"]
    if unchanged:
        notes.append(f"{len(unchanged)} trained tensors came out bit-identical to the parent "
                     f"(shared, so fewer new bytes): {unchanged[:3]}")
    if frozen_changed:
        notes.append(f"FROZEN tensors changed: {frozen_changed[:3]}")
    return Pair("du-frozen", "bytes stored for a fine-tune with half the layers frozen",
                "mstore du: new_vs_parent_bytes", "bytes of the trained tensors' objects", "bytes",
                summarize([row["new_vs_parent_bytes"]]), summarize([trained_bytes]), "== 1.0x",
                ("ratio_eq", 1.0), notes=notes,
                extra={"train_process_s": tr.wall, "train_result": trained, "du_row": row,
                       "unchanged_trained": unchanged, "frozen_changed": frozen_changed})


# -- loading and running -----------------------------------------------------------------------
def pair_load(b: Bench) -> Pair:
    res = b.worker("load", {"store": str(b.main_store), "ref": BASE_REF,
                            "dir": str(b.model_dir), "repeats": b.opts.repeats
                            if b.opts.quick else max(b.opts.repeats, 5)})
    notes = [] if res["logits_equal"] else ["LOGITS DIFFER between the two loads"]
    return Pair("load", "load step only, weights ready to run (in one process, imports warm)",
                "adapter_for(store, commit).load_checkpoint()",
                "AutoModelForCausalLM.from_pretrained(DIR)", "s",
                summarize(res["mstore"]), summarize(res["baseline"]), "<= 0.5x",
                ("ratio_le", 0.5), notes=notes, extra={"logits_equal": res["logits_equal"]})


def pair_ttft(b: Bench) -> Pair:
    store, src = b.main_store, b.model_dir
    script = inputs.REPO_ROOT / "benchmarks" / "baseline_generate.py"

    def mstore(_i):
        return run_process(mstore_argv(store, "generate", BASE_REF, "--prompt", "hi",
                                       "--max-new-tokens", "1", "--temperature", "0")).wall

    def baseline(_i):
        return run_process([PY, script, src]).wall

    res = alternate(b.opts.medium_repeats, {"mstore": mstore, "baseline": baseline},
                    budget_s=180)
    return Pair("ttft", "time to first token, whole process",
                "mstore generate M --prompt hi --max-new-tokens 1 --temperature 0",
                "benchmarks/baseline_generate.py (from_pretrained + tokenizer + generate)", "s",
                summarize(res["mstore"]), summarize(res["baseline"]), "<= 1.0x",
                ("ratio_le", 1.0))


def pair_decode(b: Bench) -> Pair:
    tokens = 8 if b.opts.quick else 24
    res = b.worker("decode", {"store": str(b.main_store), "ref": BASE_REF,
                              "dir": str(b.model_dir), "tokens": tokens,
                              "repeats": b.opts.medium_repeats, "budget_s": 200})
    m = [r["tok_s"] for r in res["mstore"]]
    base = [r["tok_s"] for r in res["baseline"]]
    notes = [f"{tokens} new tokens per run (prompt 'hi'), bf16, in one process; mstore's time "
             "excludes load_checkpoint() and tokenizer()"]
    got = {r["tokens"] for r in res["mstore"]}
    if got != {tokens}:
        notes.append(f"mstore stopped early (eos): tokens per run {sorted(got)}")
    if not res["same_tokens"]:
        notes.append("greedy tokens differ between mstore and transformers")
    return Pair("decode", "greedy decode throughput (tokens/s; higher is better)",
                "generate_text(temperature=0, max_new_tokens=N) minus load",
                "model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)", "tok/s",
                summarize(m), summarize(base), ">= 0.95x", ("ratio_ge", 0.95), notes=notes,
                extra={"raw": res})


def _train_pair(b: Bench, shape: str) -> Pair:
    tiny = shape == "tiny"
    ref = TINY_REF if tiny else BASE_REF
    folder = b.tiny_dir if tiny else b.model_dir
    if tiny:  # runs of a second: as many alternations as the sub-second commands get
        batch, steps, skip = 4, (10 if b.opts.quick else 40), (2 if b.opts.quick else 5)
        repeats = b.opts.fast_repeats
    else:
        batch, steps, skip = 1, 4, 0
        repeats = b.opts.repeats
    cfg = b.write_train_config(f"train-{shape}", model_name=ref, batch_size=batch, seq_len=64,
                               max_steps=steps, eval_interval=10_000)
    res = b.worker("train", {"store": str(b.main_store), "ref": ref, "dir": str(folder),
                             "config": str(cfg), "steps": steps, "skip": skip,
                             "repeats": repeats, "budget_s": None if tiny else 240})
    return Pair(f"train-{shape}", f"training step time, {shape} shape, batch {batch} x 64 tokens, "
                "fp32 AdamW, clip 1.0",
                "mstore.training.train(store, cfg) (step-end callback)",
                "plain torch loop on from_pretrained(dtype=float32)", "s",
                summarize(res["mstore"]), summarize(res["baseline"]), "<= 1.05x",
                ("ratio_le", 1.05),
                notes=[f"{steps} steps per run, {len(res['per_repeat']['mstore'])} run(s) per side; "
                       "step times are differences of step-end stamps (so the first step never "
                       f"counts), {skip} more dropped as warm-up",
                       "mstore's loop uses torch's fused AdamW; the baseline, AdamW's default "
                       "(as a plain loop would)"],
                extra={"per_repeat": res["per_repeat"]})


def pair_train_tiny(b: Bench) -> Pair:
    return _train_pair(b, "tiny")


def pair_train_model(b: Bench) -> Pair:
    return _train_pair(b, b.shape.name)


# -- metadata commands ----------------------------------------------------------------------
def _import_tiny(b: Bench, store: Path) -> str:
    return inputs.import_folder(store, b.tiny_dir, TINY_REF)


def pair_list(b: Bench) -> Pair:
    from mstore.store.repo import Store

    root = b.fresh_dir("stores", "list")
    commit = _import_tiny(b, root)
    store = Store(root)
    m = store.read_manifest(commit)
    base = store.registry_entry("x", commit, m, None)
    n = 1000

    def add(models):
        for i in range(1, n):
            name = f"model-{i:04d}"
            models[name] = base.renamed(name)
    store.registry.update(add)
    assert len(store.refs()) == n

    res = alternate(b.opts.fast_repeats, {
        "mstore": lambda _i: run_process(mstore_argv(root, "list")).wall,
        "baseline": lambda _i: run_process(TYPER).wall})
    return Pair("list", f"`mstore list` with {n:,} refs, whole process", "mstore list",
                'python -c "import typer"', "s", summarize(res["mstore"]),
                summarize(res["baseline"]), "<= 2.5x", ("ratio_le", 2.5))


def build_chain(store_root: Path, base_ref: str, generations: int) -> str:
    """`generations` fine-tune-shaped commits on top of `base_ref`, each with a ref, each
    replacing one small tensor and carrying a training record like `mstore train` writes."""
    import numpy as np

    from mstore.store.manifest import Manifest, TensorEntry
    from mstore.store.repo import Store

    store = Store(store_root)
    parent_name = base_ref
    parent = store.resolve(base_ref).commit
    base = store.read_manifest(parent)
    change = next(n for n in ("model.norm.weight",) if n in base.tensors)
    t = base.tensors[change]
    rng = np.random.default_rng(0)
    entries = {}
    with store.objects.batch() as batch:
        for g in range(1, generations + 1):
            values = 1 + 0.02 * rng.standard_normal(math.prod(t.shape)).astype(np.float32)
            bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
            oid = batch.put_tensor_bytes(t.dtype, t.shape, bf16.tobytes()).oid
            tensors = dict(base.tensors)
            tensors[change] = TensorEntry(oid, t.dtype, list(t.shape))
            losses = [[s, round(3.0 - s / 100, 4)] for s in range(1, 101)]
            training = {
                "config": {"model_name": parent_name, "dataset": "data/corpus.txt",
                           "learning_rate": 1e-4, "batch_size": 4, "max_steps": 100,
                           "seq_len": 128, "freeze": []},
                "dataset": {"path": "/data/corpus.txt", "blake3": "0" * 64},
                "steps": 100, "tokens_seen": 51200, "train_loss": losses,
                "eval_loss": losses[::25], "wall_time_s": 400.0, "seed": 0, "device": "cpu",
                "frozen": [], "interrupted": False, "versions": {"mstore": "0.1.0"},
            }
            name = f"chain-{g:03d}"
            child = Manifest(architecture=base.architecture, model_id=base.model_id,
                             source={"type": "finetune", "parent": parent,
                                     "parent_name": parent_name},
                             license=base.license, config=base.config, files=base.files,
                             tensors=tensors, parent=parent, message=f"fine-tune {parent_name}",
                             tied_weights=base.tied_weights, training=training)
            commit = batch.put_bytes(child.to_bytes()).oid
            entries[name] = (commit, child, parent_name)
            parent, parent_name = commit, name
    rows = {name: store.registry_entry(name, c, m, p) for name, (c, m, p) in entries.items()}
    store.registry.update(lambda models: models.update(rows))
    return parent_name


def pair_log(b: Bench) -> Pair:
    root = b.fresh_dir("stores", "log")
    inputs.link_store(b.main_store, root, [BASE_REF])
    generations = 100
    head = build_chain(root, BASE_REF, generations)
    res = alternate(b.opts.fast_repeats, {
        "mstore": lambda _i: run_process(mstore_argv(root, "log", head)).wall,
        "baseline": lambda _i: run_process(TYPER).wall})
    return Pair("log", f"`mstore log` of a {generations}-generation chain ({b.facts['tensors']} "
                "tensors per manifest), whole process", f"mstore log {head}",
                'python -c "import typer"', "s", summarize(res["mstore"]),
                summarize(res["baseline"]), "<= 3x", ("ratio_le", 3.0),
                notes=[f"{generations + 1} refs, one per generation"])


def pair_gc(b: Bench) -> Pair:
    """A store of N objects: (N - N/20) reachable from 100 manifests, N/20 unreachable but
    younger than the grace period; `mstore gc` (default grace) plans over all and deletes
    nothing, so every repeat sees the same store."""
    from .growth import build_gc_store

    total = 2_000 if b.opts.quick else 20_000
    manifests = 100
    unreachable = total // 20
    root, count = build_gc_store(b, b.fresh_dir("stores", "gc"), total, manifests)

    def mstore(_i):
        drop_dirty_pages()
        r = run_process(mstore_argv(root, "gc", "--json"))
        doc = json.loads(r.stdout)
        if doc["objects_deleted"]:
            raise CommandFailed(f"gc deleted {doc['objects_deleted']} objects")
        return r.wall

    res = alternate(b.opts.medium_repeats, {"mstore": mstore})
    return Pair("gc", f"`mstore gc` over {count:,} objects, whole process", "mstore gc",
                "(none: absolute target)", "s", summarize(res["mstore"]), None, "< 2 s",
                ("abs_lt", 2.0),
                notes=[f"{count - unreachable:,} reachable from {manifests + 1} refs, "
                       f"{unreachable:,} unreachable within the grace period; nothing deleted"])


def _cp_baseline(b, src: Path):
    """The `cp -r` + `sync` side of a pair: a fresh copy of `src` each run, removed after."""
    def baseline(i):
        dst = b.fresh_dir("runs", f"cp-{i}")
        drop_dirty_pages()
        r = run_process(cp_sync(src, dst))
        shutil.rmtree(dst)
        return r.wall

    return baseline


def _warm_page_cache(folder: Path) -> None:
    for p in Path(folder).iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 * MB):
                    pass


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


PAIRS: dict[str, Callable[[Bench], Pair]] = {
    "import": pair_import,
    "import-layout": pair_import_layout,
    "reimport": pair_reimport,
    "import-rss": pair_import_rss,
    "hub-import": pair_hub_import,
    "export": pair_export,
    "fsck-warm": pair_fsck_warm,
    "fsck-floor": pair_fsck_floor,
    "fsck-cold": pair_fsck_cold,
    "load": pair_load,
    "ttft": pair_ttft,
    "decode": pair_decode,
    "train-tiny": pair_train_tiny,
    "train-model": pair_train_model,
    "list": pair_list,
    "log": pair_log,
    "gc": pair_gc,
    "du-frozen": pair_du_frozen,
    "packs-1e-5": packs.pair_packs_low,
    "packs-1e-4": packs.pair_packs_high,
    "packs-base": packs.pair_packs_base,
    "packs-push": packs.pair_packs_push,
    "packs-load": packs.pair_packs_load,
    "packs-load-resident": packs.pair_packs_load_resident,
    "packs-load-floor": packs.pair_packs_load_floor,
    "packs-first-token": packs.pair_packs_first_token,
    "startup-import": startup.pair_startup_import,
    "startup-list": startup.pair_startup_list,
    "startup-show": startup.pair_startup_show,
    "startup-log": startup.pair_startup_log,
    "list-growth": growth.pair_list_growth,
    "list-10k": growth.pair_list_10k,
    "gc-growth": growth.pair_gc_growth,
    "log-growth": growth.pair_log_growth,
}


# what the 7g shape runs (the others would need a 3B model loaded, trained, generated from)
STORAGE_PAIRS = ("import", "import-layout", "reimport", "import-rss", "hub-import", "export",
                 "fsck-warm", "fsck-floor", "fsck-cold")


def pair_names(opts: Options) -> list[str]:
    """The pairs this run measures, in order (train-model only when the shape is not tiny;
    only the storage pairs at 7g)."""
    if opts.size == "7g":
        return list(STORAGE_PAIRS)
    return [n for n in PAIRS if not (n == "train-model" and opts.size == "tiny")]

