"""Delta packs (issue 15): a full fine-tune's packed bytes, pack speed, load and push.

The fine-tune is a real one: `mstore train` (the library's `training.train`), method full
(every tensor trained), STEPS AdamW steps of batch 1 x 64 tokens on the benchmark's text at
the given peak learning rate (cosine schedule, no warm-up, mstore's defaults otherwise), on
fp32 master weights committed back in the model's bf16, as any user's fine-tune is.

    mstore side   load of the packed child            baseline   the same child loose
                  (load_checkpoint; also with every weight's pages resident, and the first
                  token of `mstore generate` as a whole process)
    floor         the loose child loaded and every weight copied into fresh memory: the
                  least any rebuild into memory does (no decoding), beside the mmap load
    also          packed/loose child bytes, pack GB/s, the base packed alone, push bytes,
                  zstd levels 1/3/9 on one MLP tensor's delta
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

STEPS = 20
BATCH, SEQ = 1, 64


def finetune(store_root: Path, base_ref: str, name: str, lr: float, steps: int = STEPS,
             seed: int = 0) -> str:
    """Commit a real full fine-tune of `base_ref` as `name`; returns its commit."""
    from mstore.store.repo import Store
    from mstore.training.config import from_mapping
    from mstore.training.loop import train

    from .inputs import write_dataset

    data = write_dataset(Path(store_root).parent / "data.txt")
    cfg = from_mapping({"model_name": base_ref, "dataset": str(data), "method": "full",
                        "output_name": name, "learning_rate": lr, "max_steps": steps,
                        "batch_size": BATCH, "seq_len": SEQ, "warmup_steps": 0,
                        "seed": seed, "device": "cpu", "eval_interval": 10**6,
                        "eval_fraction": 0.0})
    return train(Store(store_root), cfg).commit


def _touch_every_page(model) -> None:
    """Read one byte of every page of every weight: a mapped (loose) tensor's pages are
    faulted in, as the first forward pass would; a rebuilt (packed) one is already resident."""
    import torch

    for t in list(model.state_dict().values()):
        if t.numel() and t.device.type == "cpu":
            flat = t.detach().reshape(-1).view(torch.uint8)
            flat[::4096].sum()


def _copy_into_fresh_memory(model) -> None:
    """Give every weight a copy of itself in newly allocated memory: what rebuilding the
    model's tensors costs before any decoding (allocation, page faults, one write of each
    byte), the floor under a packed load."""
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel() and t.device.type == "cpu":
                t.data = t.data.clone()


def tensor_bytes(store, ref: str, stored: bool) -> int:
    m = store.read_manifest(store.resolve(ref).commit)
    size = store.objects.stored_size if stored else store.objects.size
    return sum(size(t.object) for t in m.tensors.values())


def task_packs(a: dict[str, Any]) -> dict[str, Any]:
    """(worker) Build the child in a loose store and a packed twin, measure everything."""
    import shutil

    from transformers.utils import logging as tf_logging

    from mstore.adapters.base import adapter_for
    from mstore.remote import sync
    from mstore.remote.config import add_remote
    from mstore.store import packing
    from mstore.store.repo import Store

    from .inputs import link_store
    from .measure import alternate, child_env, mstore_argv, run_process

    tf_logging.set_verbosity_error()
    work, lr, base_ref = Path(a["work"]), float(a["lr"]), a["base_ref"]
    loose_root, packed_root = work / "loose", work / "packed"
    for p in (loose_root, packed_root, work / "remote-loose", work / "remote-packed"):
        shutil.rmtree(p, ignore_errors=True)
    link_store(Path(a["main_store"]), loose_root, [base_ref])
    t0 = time.perf_counter()
    finetune(loose_root, base_ref, "child", lr, int(a.get("steps", STEPS)))
    made_s = time.perf_counter() - t0
    link_store(loose_root, packed_root, [base_ref, "child"])
    loose, packed = Store(loose_root), Store(packed_root)
    child_loose = tensor_bytes(loose, "child", stored=True)
    t0 = time.perf_counter()
    res = packing.pack(packed, ["child"])
    pack_s = time.perf_counter() - t0
    child_packed = tensor_bytes(packed, "child", stored=True)

    commits = {s: s_store.resolve("child").commit
               for s, s_store in (("mstore", packed), ("baseline", loose))}

    def load(side: str, resident: bool = False, fresh: bool = False):
        s = packed if side == "mstore" else loose
        t = time.perf_counter()
        m = adapter_for(s, commits[side]).load_checkpoint()
        if resident:
            _touch_every_page(m)
        if fresh:
            _copy_into_fresh_memory(m)
        wall = time.perf_counter() - t
        del m
        return wall

    def first_token(side: str):
        root = packed_root if side == "mstore" else loose_root
        return run_process(mstore_argv(root, "generate", "child", "-p", "The", "-n", "1",
                                       "--seed", "0"), env=child_env()).wall

    for side in ("mstore", "baseline"):
        load(side)  # warm: imports, page cache
    n = int(a["repeats"])
    times = alternate(n, {"mstore": lambda _i: load("mstore"),
                          "baseline": lambda _i: load("baseline")})
    resident = alternate(n, {"mstore": lambda _i: load("mstore", True),
                             "baseline": lambda _i: load("baseline", True)})
    floor = alternate(n, {"mstore": lambda _i: load("baseline", fresh=True),
                          "baseline": lambda _i: load("baseline")})
    ttft = alternate(n, {"mstore": lambda _i: first_token("mstore"),
                         "baseline": lambda _i: first_token("baseline")})
    out: dict[str, Any] = {
        "lr": lr, "steps": int(a.get("steps", STEPS)), "made_s": round(made_s, 1),
        "load": times, "load_resident": resident, "load_floor": floor, "first_token": ttft,
        "child_loose_bytes": child_loose, "child_packed_bytes": child_packed,
        "packed_over_loose": round(child_packed / child_loose, 4),
        "pack_s": round(pack_s, 2), "pack_gb_per_s": round(res.loose_bytes / pack_s / 1e9, 3),
        "deltas": res.deltas, "kept_loose": res.kept_loose,
    }
    # push of the child to a file remote that already holds the base: packed vs loose
    for side, s in (("packed", packed), ("loose", loose)):
        remote = work / f"remote-{side}"
        add_remote(s, "bench", str(remote))
        sync.push(s, base_ref, "bench")
        out[f"push_{side}_bytes"] = sync.push(s, "child", "bench").bytes_sent
        shutil.rmtree(remote)
    if a.get("base_alone"):
        alone = work / "alone"
        shutil.rmtree(alone, ignore_errors=True)
        link_store(Path(a["main_store"]), alone, [base_ref])
        s = Store(alone)
        t0 = time.perf_counter()
        r = packing.pack(s, [base_ref])
        out["base_alone"] = {"loose_bytes": r.loose_bytes, "packed_bytes": r.packed_bytes,
                             "kept_loose": r.kept_loose,
                             "ratio": round(r.packed_bytes / r.loose_bytes, 4),
                             "gb_per_s": round(r.loose_bytes / (time.perf_counter() - t0) / 1e9, 3)}
        out["levels"] = _levels(loose)
        shutil.rmtree(alone)
    shutil.rmtree(packed_root)
    shutil.rmtree(loose_root)
    return out


def _levels(store) -> dict[str, Any]:
    """zstd levels 1/3/9 on the delta of the largest MLP tensor, and on it alone."""
    from mstore.store import packcodec

    child = store.read_manifest(store.resolve("child").commit)
    parent = store.read_manifest(child.parent)
    name = max((n for n in child.tensors if "mlp" in n),
               key=lambda n: math.prod(child.tensors[n].shape))
    t, b = child.tensors[name], parent.tensors[name]
    data, base = store.objects.tensor_bytes(t.object), store.objects.tensor_bytes(b.object)
    start = data.size - (math.prod(t.shape) * 2)
    out: dict[str, Any] = {"tensor": name}
    for level in (1, 3, 9):
        for what, ref in (("delta", base[start:]), ("alone", None)):
            t0 = time.perf_counter()
            blob = packcodec.encode(t.dtype, t.shape, data[start:], b.object if ref is not None
                                    else None, ref, level=level)
            dt = time.perf_counter() - t0
            out[f"{what}_level{level}"] = {"ratio": round(len(blob) / (data.size - start), 4),
                                           "gb_per_s": round((data.size - start) / dt / 1e9, 3)}
    return out


# -- the pairs -----------------------------------------------------------------------------
NAMES = {1e-5: "packs-1e-5", 1e-4: "packs-1e-4"}


def _run(b, lr: float) -> dict[str, Any]:
    key = NAMES[lr]
    cache = b.__dict__.setdefault("_packs", {})
    if key not in cache:
        from .pairs import BASE_REF

        cache[key] = b.worker("packs", {
            "work": str(b.work / "stores" / key), "main_store": str(b.main_store),
            "base_ref": BASE_REF, "lr": lr, "steps": 2 if b.opts.quick else STEPS,
            "repeats": 1 if b.opts.quick else b.opts.repeats,
            "base_alone": lr == 1e-5}, tag=key, timeout=7200)
    return cache[key]


def _bytes_pair(b, lr: float):
    from .measure import Pair, summarize

    r = _run(b, lr)
    return Pair(NAMES[lr], f"bytes of a full fine-tune (mstore train, lr {lr:g}, "
                f"{r['steps']} steps, every tensor trained) packed against its base",
                "packed child bytes", "loose child bytes", "bytes",
                summarize([r["child_packed_bytes"]]), summarize([r["child_loose_bytes"]]),
                "<= 0.50x" if lr == 1e-5 else "(report)",
                ("ratio_le", 0.5) if lr == 1e-5 else ("report", 0),
                notes=[f"pack {r['pack_gb_per_s']:.3f} GB/s of loose bytes",
                       f"{r['deltas']} deltas, {r['kept_loose']} kept loose"],
                extra={k: v for k, v in r.items() if k not in ("load", "load_resident",
                                                               "load_floor", "first_token")})


def pair_packs_low(b):
    return _bytes_pair(b, 1e-5)


def pair_packs_high(b):
    return _bytes_pair(b, 1e-4)


def _load_pair(b, key: str, name: str, what: str, mstore: str, baseline: str, target):
    from .measure import Pair, summarize

    r = _run(b, 1e-5)
    return Pair(name, what, mstore, baseline, "s", summarize(r[key]["mstore"]),
                summarize(r[key]["baseline"]), "<= 2.0x" if target else "(report)",
                ("ratio_le", 2.0) if target else ("report", 0))


def pair_packs_load(b):
    return _load_pair(b, "load", "packs-load", "load step of the lr 1e-5 child, packed vs "
                      "loose (a loose load maps its objects and reads no page)",
                      "load_checkpoint(), packed", "load_checkpoint(), loose (mmap)", True)


def pair_packs_load_resident(b):
    return _load_pair(b, "load_resident", "packs-load-resident", "load step until every "
                      "weight is in memory: loose pages faulted in (as the first forward "
                      "pass does), packed ones rebuilt", "load_checkpoint(), packed",
                      "load_checkpoint() + one byte of every page, loose", True)


def pair_packs_load_floor(b):
    return _load_pair(b, "load_floor", "packs-load-floor", "the floor under packs-load: the "
                      "loose child loaded, then every weight copied into fresh memory (what "
                      "any rebuild into memory does before decoding)",
                      "load_checkpoint() + a fresh copy of every weight, loose",
                      "load_checkpoint(), loose (mmap)", False)


def pair_packs_first_token(b):
    return _load_pair(b, "first_token", "packs-first-token", "`mstore generate child -n 1`, "
                      "whole process, packed vs loose", "generate, packed child",
                      "generate, loose child", False)


def pair_packs_base(b):
    from .measure import Pair, summarize

    r = _run(b, 1e-5)["base_alone"]
    return Pair("packs-base", "the bf16 base packed with no parent (byte-grouped, zstd)",
                "packed bytes", "loose bytes", "bytes", summarize([r["packed_bytes"]]),
                summarize([r["loose_bytes"]]), "<= 0.75x (lossless bf16 ceiling ~0.67)",
                ("ratio_le", 0.75), notes=[f"{r['gb_per_s']:.3f} GB/s"], extra=r)


def pair_packs_push(b):
    from .measure import Pair, summarize

    r = _run(b, 1e-5)
    return Pair("packs-push", "push of the lr 1e-5 child to a file remote that holds its base",
                "bytes sent, child packed", "bytes sent, child loose", "bytes",
                summarize([r["push_packed_bytes"]]), summarize([r["push_loose_bytes"]]),
                "<= 0.5x", ("ratio_le", 0.5), extra={"levels": r.get("levels")})
