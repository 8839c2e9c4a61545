"""Delta packs (issue 15): a full fine-tune's packed bytes, pack speed, load and push.

The fine-tune is made, not trained: a real `torch.optim.AdamW` (lr as given, default betas,
weight decay 0.01) runs STEPS steps on an fp32 master copy of every tensor of the
0.5B-shaped bf16 model, tensor by tensor (AdamW is elementwise, so this is the same update a
whole-model step gives without grad clipping), and the result is cast back to bf16 as
`mstore train` does. The gradients are synthetic: per tensor, a fixed random direction
plus a second random field whose sign flips from step to step (0.3 of it), at the scale of
the weights, so successive steps mostly agree as real gradients do. A real forward/backward of the 0.5B model on this 2-core
machine takes about a minute a step; Adam's update size (about lr per step) does not depend
on the gradient's scale, which is what decides how many low bits a step flips.

    mstore side   load_checkpoint() of the packed child     baseline   the same child loose
    also          packed/loose child bytes, pack GB/s, the base packed alone, push bytes,
                  zstd levels 1/3/9 on one MLP tensor's delta
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

STEPS = 20


def finetune(store_root: Path, base_ref: str, name: str, lr: float, steps: int = STEPS,
             seed: int = 0) -> str:
    """Commit the AdamW-stepped child of `base_ref` as `name` (every tensor trained)."""
    import torch

    from mstore.runtime import torch_io
    from mstore.store.manifest import Manifest
    from mstore.store.repo import Store

    store = Store(store_root)
    r = store.resolve(base_ref)
    base = store.read_manifest(r.commit)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for tname, t in sorted(base.tensors.items()):
        w = torch_io.load_tensor(store.objects, t).float()
        p = torch.nn.Parameter(w.clone())
        opt = torch.optim.AdamW([p], lr=lr, fused=True)
        scale = w.abs().mean().clamp_min(1e-3)
        direction = torch.randn(w.shape, generator=gen) * scale
        noise = torch.randn(w.shape, generator=gen) * scale
        signs = torch.randint(0, 2, (steps,), generator=gen) * 2.0 - 1.0
        for step in range(steps):
            p.grad = torch.add(direction, noise, alpha=0.3 * float(signs[step])).mul_(0.7)
            opt.step()
        out[tname] = p.detach().to(torch.bfloat16 if t.dtype == "BF16" else w.dtype)
    with store.objects.batch() as batch:
        tensors = torch_io.put_tensors(batch, sorted(out.items()))
    child = Manifest(architecture=base.architecture, model_id=base.model_id,
                     source={"type": "finetune", "parent": r.commit, "parent_name": base_ref},
                     license=base.license, config=base.config, files=base.files,
                     tensors=tensors, parent=r.commit, message=f"AdamW lr {lr} x{steps}",
                     tied_weights=base.tied_weights, training=None)
    commit = store.put_manifest(child)
    store.add_ref(commit, child, name, lambda: name, base_ref)
    return commit


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
    from .measure import alternate

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

    def load(side: str):
        s = packed if side == "mstore" else loose
        t = time.perf_counter()
        m = adapter_for(s, commits[side]).load_checkpoint()
        wall = time.perf_counter() - t
        del m
        return wall

    for side in ("mstore", "baseline"):
        load(side)  # warm: imports, page cache
    times = alternate(int(a["repeats"]), {"mstore": lambda _i: load("mstore"),
                                          "baseline": lambda _i: load("baseline")})
    out: dict[str, Any] = {
        "lr": lr, "steps": int(a.get("steps", STEPS)), "made_s": round(made_s, 1),
        "load": times, "child_loose_bytes": child_loose, "child_packed_bytes": child_packed,
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


def _load_pair(b, lr: float):
    from .measure import Pair, summarize

    r = _run(b, lr)
    return Pair(NAMES[lr], f"load of a full fine-tune (AdamW lr {lr:g}, {r['steps']} "
                "steps) stored packed against its base, vs the same child loose",
                "load_checkpoint() of the packed child", "load_checkpoint() of it loose", "s",
                summarize(r["load"]["mstore"]), summarize(r["load"]["baseline"]), "<= 2.0x",
                ("ratio_le", 2.0),
                notes=[f"packed/loose child bytes {r['packed_over_loose']:.3f} (target <= 0.50)",
                       f"pack {r['pack_gb_per_s']:.3f} GB/s of loose bytes",
                       f"push to a file remote holding the base: {r['push_packed_bytes']:,} "
                       f"bytes sent packed vs {r['push_loose_bytes']:,} loose"],
                extra={k: v for k, v in r.items() if k != "load"})


def pair_packs_low(b):
    return _load_pair(b, 1e-5)


def pair_packs_high(b):
    return _load_pair(b, 1e-4)


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
