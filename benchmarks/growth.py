"""How the metadata commands' cost grows with the store (issue 16, target 7).

Each pair times one command at two sizes of the same kind of store (refs for `list`,
objects for `gc`, generations for `log`), alternated, plus the same command on a one-ref
store (start-up alone). The stores are built through the real Store / Registry /
ObjectStore API, untimed. The big side must cost at most `factor` times the small one
(linear growth); the notes give the growth of the part above start-up as an exponent
(1.0 = linear), which is what says whether an algorithm is worse than linear.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .measure import (
    CommandFailed, Pair, alternate, drop_dirty_pages, mstore_argv, run_process, summarize,
)

# (small, big) per command; --quick uses a hundredth (the smoke test runs it)
SIZES = {"list": (1_000, 10_000), "gc": (20_000, 200_000), "log": (100, 1_000)}
LIST_10K_LIMIT_S = 0.5


def sizes(b, what: str) -> tuple[int, int]:
    small, big = SIZES[what]
    return (max(small // 100, 2), big // 100) if b.opts.quick else (small, big)


def build_refs(b, root: Path, n: int) -> Path:
    """A store holding the tiny model under `n` names (one registry rewrite)."""
    from mstore.store.repo import Store

    from .pairs import TINY_REF, _import_tiny

    commit = _import_tiny(b, root)
    store = Store(root)
    entry = store.refs()[TINY_REF]
    assert entry.commit == commit
    rows = {f"model-{i:05d}": entry.renamed(f"model-{i:05d}") for i in range(1, n)}
    store.registry.update(lambda models: models.update(rows))
    return root


def build_gc_store(b, root: Path, total: int, manifests: int = 100) -> tuple[Path, int]:
    """`total` objects: (total - total/20) reachable from `manifests` manifests (one ref
    each), total/20 unreachable but younger than gc's grace period. Returns (root, count)."""
    import numpy as np

    from mstore.store.manifest import Manifest, TensorEntry
    from mstore.store.repo import Store

    from .pairs import _import_tiny

    commit = _import_tiny(b, root)
    store = Store(root)
    base = store.read_manifest(commit)
    unreachable = total // 20
    per = (total - unreachable) // manifests
    rng = np.random.default_rng(1)
    rows = {}
    with store.objects.batch() as batch:
        for j in range(manifests):
            values = rng.standard_normal((per, 16)).astype(np.float32)
            tensors = {}
            for k in range(per):
                oid = batch.put_tensor_bytes("F32", [16], values[k].tobytes()).oid
                tensors[f"t.{k}"] = TensorEntry(oid, "F32", [16])
            m = Manifest(architecture=base.architecture, model_id=f"gc/{j}",
                         source={"type": "local"}, license=None, config=base.config,
                         files=base.files, tensors=tensors, message=f"gc fixture {j}")
            rows[f"gc-{j:03d}"] = (batch.put_bytes(m.to_bytes()).oid, m)
        for _ in range(unreachable):
            batch.put_bytes(rng.bytes(64))
    store.registry.update(lambda models: models.update(
        {n: store.registry_entry(n, c, m, None) for n, (c, m) in rows.items()}))
    return root, sum(1 for _ in store.objects.iter_objects())


def _growth(b, name: str, unit: str, small: int, big: int, argv_small, argv_big, argv_one,
            check=None) -> Pair:
    def side(argv):
        def run(_i):
            drop_dirty_pages()
            r = run_process(argv)
            if check:
                check(r)
            return r.wall
        return run

    res = alternate(b.opts.fast_repeats if name != "gc" else b.opts.medium_repeats,
                    {"big": side(argv_big), "small": side(argv_small), "one": side(argv_one)})
    big_s, small_s, one_s = (summarize(res[k]) for k in ("big", "small", "one"))
    factor = big / small
    above = (big_s["median"] - one_s["median"], small_s["median"] - one_s["median"])
    exponent = (math.log(above[0] / above[1]) / math.log(factor)
                if above[0] > 0 and above[1] > 0 else None)
    notes = [f"start-up alone (the same command on a one-ref store): "
             f"{one_s['median'] * 1000:.0f} ms; above it, {small:,} -> {big:,} {unit} costs "
             f"{above[1] * 1000:.0f} -> {above[0] * 1000:.0f} ms"
             + (f" (growth exponent {exponent:.2f}; 1.0 = linear)" if exponent else "")]
    b.growth[name] = {"small": small, "big": big, "unit": unit, "big_s": big_s,
                      "small_s": small_s, "one_s": one_s, "exponent": exponent}
    return Pair(f"{name}-growth", f"`mstore {name}` at {big:,} vs {small:,} {unit}, whole process",
                f"mstore {name} ({big:,} {unit})", f"mstore {name} ({small:,} {unit})", "s",
                big_s, small_s, f"<= {factor:.0f}x (linear)", ("ratio_le", factor),
                notes=notes, extra={"startup": one_s, "growth_exponent": exponent,
                                    "sizes": [small, big]})


def pair_list_growth(b) -> Pair:
    small, big = sizes(b, "list")
    roots = {n: build_refs(b, b.fresh_dir("stores", f"list-{n}"), n) for n in (1, small, big)}
    return _growth(b, "list", "refs", small, big, *(mstore_argv(roots[n], "list")
                                                     for n in (small, big, 1)))


def pair_list_10k(b) -> Pair:
    """The absolute target at the big size, from the list-growth runs (run them first)."""
    if "list" not in b.growth:
        pair_list_growth(b)
    g = b.growth["list"]
    return Pair("list-10k", f"`mstore list` with {g['big']:,} refs, whole process",
                "mstore list", "(none: absolute target)", "s", g["big_s"], None,
                f"< {LIST_10K_LIMIT_S} s", ("abs_lt", LIST_10K_LIMIT_S),
                notes=["the samples of list-growth's big side"])


def pair_gc_growth(b) -> Pair:
    small, big = sizes(b, "gc")
    one = build_refs(b, b.fresh_dir("stores", "gc-1"), 1)
    (s_root, s_count), (b_root, b_count) = (
        build_gc_store(b, b.fresh_dir("stores", f"gc-{n}"), n) for n in (small, big))

    def nothing_deleted(r):
        doc = json.loads(r.stdout)
        if doc["objects_deleted"]:
            raise CommandFailed(f"gc deleted {doc['objects_deleted']} objects")

    return _growth(b, "gc", "objects", s_count, b_count,
                   mstore_argv(s_root, "gc", "--json"), mstore_argv(b_root, "gc", "--json"),
                   mstore_argv(one, "gc", "--json"), check=nothing_deleted)


def pair_log_growth(b) -> Pair:
    from .pairs import TINY_REF, build_chain

    small, big = sizes(b, "log")
    root = build_refs(b, b.fresh_dir("stores", "log-growth"), 1)
    head = build_chain(root, TINY_REF, big)
    return _growth(b, "log", "generations", small, big,
                   mstore_argv(root, "log", f"chain-{small:03d}"), mstore_argv(root, "log", head),
                   mstore_argv(root, "log", TINY_REF))
