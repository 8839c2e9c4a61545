"""`python -m benchmarks`: measure every pair of issue 5, print a table, write JSON.

    python -m benchmarks                      0.5B shape, 3 repeats, results/<date>-<host>.json
    python -m benchmarks --quick              tiny inputs, 1 repeat, JSON in the work folder
    python -m benchmarks --only import,load   a subset (names: see --list)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

from . import inputs, report
from .inputs import REPO_ROOT, SHAPES
from .measure import Pair
from .pairs import PAIRS, Bench, Options, pair_names

ALIASES = {"train-0.5b": "train-model", "rss": "import-rss", "du": "du-frozen"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny inputs, 1 repeat, fewer steps (the smoke test); JSON goes to "
                         "the work folder, not results/")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per side for the heavy pairs (default 3; 1 with --quick). "
                         "Whole-process pairs of a few seconds use max(N, 5), sub-second "
                         "commands max(N, 10)")
    ap.add_argument("--only", default=None, help="comma-separated pair names")
    ap.add_argument("--size", choices=["tiny", "300m", "1g", "0.5b", "7g"], default=None,
                    help="model shape (default 1g, the Qwen2.5-0.5B shape, also called 0.5b; "
                         "tiny with --quick). 300m: ~310 MB; 7g: the Qwen2.5-3B shape untied, "
                         "6.8 GB in 4 shards, storage pairs only, only when asked for")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="work folder (default a new folder under benchmarks/work/, which git "
                         "ignores); big files are removed at the end")
    ap.add_argument("--keep", action="store_true", help="keep the work folder's models and stores")
    ap.add_argument("--tag", default=None, help="machine tag in the results file name "
                                                "(default the hostname)")
    ap.add_argument("--output", type=Path, default=None, help="JSON path (overrides the default)")
    ap.add_argument("--list", action="store_true", help="list the pair names and exit")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    size = {"1g": "0.5b"}.get(ns.size, ns.size) or ("tiny" if ns.quick else "0.5b")
    repeats = ns.repeats if ns.repeats is not None else (1 if ns.quick else 3)
    if repeats < 1:
        print("--repeats must be >= 1", file=sys.stderr)
        return 2
    workdir = ns.workdir or (REPO_ROOT / "benchmarks" / "work" /
                             datetime.now().strftime("run-%Y%m%d-%H%M%S"))
    opts = Options(quick=ns.quick, repeats=repeats, size=size, workdir=workdir, keep=ns.keep)
    names = pair_names(opts)
    if ns.list:
        print("\n".join(n if n != "train-model" else f"train-model (alias train-{size})"
                        for n in names))
        return 0
    if ns.only:
        wanted = [ALIASES.get(w.strip(), w.strip()) for w in ns.only.split(",") if w.strip()]
        if "packs" in wanted:  # the group: every packs-* pair
            wanted = [w for w in wanted if w != "packs"] + [n for n in PAIRS
                                                            if n.startswith("packs-")]
        unknown = [w for w in wanted if w not in PAIRS]
        if unknown:
            print(f"unknown pair(s): {', '.join(unknown)}; known: {', '.join(names)}",
                  file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]

    started, t0 = report.now_utc(), time.perf_counter()
    compiled = inputs.compile_mstore()
    bench = Bench(opts)
    print(f"benchmarks: {size} shape, repeats {repeats}{' (quick)' if ns.quick else ''}, "
          f"work folder {workdir}", flush=True)
    pairs: list[Pair] = []
    timings: dict[str, float] = {}
    try:
        for name in names:
            print(f"[{time.perf_counter() - t0:6.0f} s] {name} ...", flush=True)
            p0 = time.perf_counter()
            try:
                pair = PAIRS[name](bench).judge()
            except Exception as e:  # noqa: BLE001 - one failing pair must not hide the rest
                traceback.print_exc()
                pair = Pair(name, "", "", "", "", {}, None, "", ("ratio_le", 0),
                            error=f"{type(e).__name__}: {e}")
            if name == "train-model":
                pair.name = f"train-{size}"
            timings[name] = round(time.perf_counter() - p0, 1)
            pairs.append(pair)
            if not pair.error:
                print("    " + report.table([pair]).splitlines()[-1], flush=True)
    finally:
        if not opts.keep:
            _clean(workdir, keep_json=ns.quick)
    total = time.perf_counter() - t0

    doc = {
        "started": started, "wall_s": round(total, 1),
        "options": {"quick": ns.quick, "repeats": repeats, "size": size,
                    "fast_repeats": opts.fast_repeats, "medium_repeats": opts.medium_repeats,
                    "only": ns.only},
        "machine": report.machine_info(workdir),
        "model": bench.__dict__.get("model", (None, None))[1],
        "setup_s": bench.setup_seconds, "pair_wall_s": timings,
        "mstore_bytecode_written_now": compiled,  # 0: it was already current
        # the benchmark process itself stays small (children forked from it start with its RSS)
        "runner_imported_torch": "torch" in sys.modules,
        "pairs": [p.to_json() for p in pairs],
    }
    out = ns.output or (workdir / "results.json" if ns.quick else report.results_path(ns.tag))
    report.write_json(out, doc)
    print()
    print(report.table(pairs))
    print()
    print(report.notes(pairs))
    m = doc["machine"]
    print(f"\nmachine: {m['cpu_count']} x {m['cpu_model']}, "
          f"{(m['ram_bytes'] or 0) / 2**30:.0f} GiB RAM, torch {m['versions'].get('torch')}, "
          f"transformers {m['versions'].get('transformers')}, git {str(m['git']['commit'])[:12]}"
          + (" (mstore/ has uncommitted changes)" if m["git"]["mstore_dirty"] else ""))
    print(f"total {total:.0f} s; JSON: {out}")
    return 1 if any(p.error for p in pairs) else 0


def _clean(workdir: Path, keep_json: bool) -> None:
    """Remove the big files: models, stores, copies (the JSON stays)."""
    for sub in ("stores", "runs", "worker", "configs", "data", *(f"model-{s}" for s in SHAPES)):
        shutil.rmtree(Path(workdir) / sub, ignore_errors=True)
    if not keep_json:
        try:
            Path(workdir).rmdir()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
