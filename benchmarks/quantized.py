"""Quantized children side by side with their bf16 parent (issue 14), in one run.

    python -m benchmarks.quantized [--size 0.5b|tiny] [--repeats N] [--workdir DIR]

On the 0.5B shape (benchmarks/inputs.py): bytes stored, peak RSS of a whole
`mstore generate --max-new-tokens 1` process, load time and greedy decode tokens/s of the
bf16 parent, its int8 child and its int4 (g128) child. Quality needs a model that has
learned something, which random weights have not: the custom transformer trained on a
small corpus, its int8 and int4 children scored by `mstore eval` (perplexity, and greedy
token agreement with the parent). Prints a table and writes JSON next to the other results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .inputs import SHAPES, build_model_folder, compile_mstore, import_folder
from .measure import child_env, mstore_argv, run_process
from .report import machine_info, now_utc, write_json

DECODE = r"""
import json, sys, time, torch
from mstore.adapters.base import adapter_for
from mstore.store.repo import Store
store, ref, n = Store(sys.argv[1]), sys.argv[2], int(sys.argv[3])
adapter_for(store, store.resolve(ref).commit).load_checkpoint()  # warm: imports, page cache
t0 = time.perf_counter()
adapter = adapter_for(store, store.resolve(ref).commit)
model = adapter.load_checkpoint()
load_s = time.perf_counter() - t0
ids = torch.tensor([adapter.tokenizer().encode("The lighthouse keeper climbed the stairs")])
list(adapter.generate_stream(model, ids, 2, 0.0, None, None, None, []))  # warm
t0 = time.perf_counter()
out = list(adapter.generate_stream(model, ids, n, 0.0, None, None, None, []))
print(json.dumps({"load_s": load_s, "tok_s": len(out) / (time.perf_counter() - t0)}))
"""

CORPUS = "".join(f"{w} the {a} fox jumps over the {b} dog {n}.\n" for n, (w, a, b) in enumerate(
    [("see", "quick", "lazy"), ("watch", "brown", "sleepy"), ("look", "red", "old")] * 60))


def _median(xs):
    return statistics.median(xs) if xs else None


def speed_and_memory(store: Path, refs: list[str], repeats: int, tokens: int) -> dict:
    out = {r: {"rss": [], "load_s": [], "tok_s": []} for r in refs}
    for _ in range(repeats):
        for ref in refs:  # alternated: A B C A B C ...
            res = run_process(mstore_argv(store, "generate", ref, "--prompt", "The lighthouse",
                                          "--max-new-tokens", "1", "--temperature", "0"),
                              rss=True)
            out[ref]["rss"].append(res.maxrss)
            dec = run_process([sys.executable, "-c",
                               DECODE, str(store), ref, str(tokens)])
            d = json.loads(dec.stdout.strip().splitlines()[-1])
            out[ref]["load_s"].append(d["load_s"])
            out[ref]["tok_s"].append(d["tok_s"])
    return {r: {k: _median(v) for k, v in m.items()} | {"samples": m} for r, m in out.items()}


def stored_bytes(store: Path, refs: list[str]) -> dict:
    from mstore.store.repo import Store

    s = Store(store)
    du = {r["name"]: r for r in s.du().models}
    return {r: {"logical": du[r]["logical_bytes"], "new": du[r].get("new_vs_parent_bytes"),
                "run_bytes": s.show(r).doc["run_bytes"]} for r in refs}


def quality(work: Path) -> dict:
    import mstore
    from mstore.store.repo import Store
    from mstore.training.evaluate import evaluate

    data = work / "corpus.txt"
    data.write_text(CORPUS)
    store = Store(work / "quality-store")
    mstore.train({"model_name": None, "dataset": str(data), "max_steps": 200,
                           "batch_size": 8, "seq_len": 32, "n_layers": 2, "d_model": 32,
                           "n_heads": 2, "learning_rate": 1e-2, "warmup_steps": 10,
                           "eval_interval": 200,
                  "device": "cpu", "seed": 0}, store=store, output_name="char-base")
    from mstore.runtime.quantize import quantize_model

    quantize_model(store, "char-base", "int8")
    quantize_model(store, "char-base", "int4", 32)
    rows = evaluate(store, ["char-base", "char-int8", "char-int4"], data)
    base = rows[0].perplexity
    return {r.name: {"perplexity": r.perplexity, "loss": r.loss, "tokens": r.tokens,
                     "vs_parent": r.perplexity / base - 1, "agreement": r.agreement}
            for r in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quantized")
    ap.add_argument("--size", default="0.5b", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--output", type=Path, default=None)
    a = ap.parse_args(argv)
    compile_mstore()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-quant-",
                                              dir=Path(__file__).parent / "work"
                                              if (Path(__file__).parent / "work").is_dir()
                                              else None))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    build_model_folder(work / "model", SHAPES[a.size])
    store = work / "store"
    import_folder(store, work / "model", "m-base")
    quant_s = {}
    for scheme in ("int8", "int4"):
        res = run_process(mstore_argv(store, "quantize", "m-base", "--scheme", scheme,
                                      *(["--group-size", "128"] if scheme == "int4"
                                        and a.size == "0.5b" else
                                        ["--group-size", "32"] if scheme == "int4" else [])),
                          env=child_env(), rss=True)
        quant_s[scheme] = {"wall_s": res.wall, "rss": res.maxrss}
    refs = ["m-base", "m-int8", "m-int4"]
    doc = {"when": now_utc(), "machine": machine_info(work), "size": a.size,
           "bytes": stored_bytes(store, refs), "quantize": quant_s,
           "run": speed_and_memory(store, refs, a.repeats, a.tokens),
           "quality": quality(work)}
    doc["wall_s"] = time.time() - started
    print(f"{'model':8s} {'stored new':>12s} {'run bytes':>12s} {'peak RSS gen -n1':>17s} "
          f"{'load':>8s} {'decode':>10s}")
    for r in refs:
        b, run = doc["bytes"][r], doc["run"][r]
        print(f"{r:8s} {(b['new'] or b['logical']) / 2**20:10.1f}Mi {b['run_bytes'] / 2**20:10.1f}Mi "
              f"{run['rss'] / 2**20:15.1f}Mi {run['load_s'] * 1e3:6.0f}ms {run['tok_s']:7.2f}t/s")
    for n, q in doc["quality"].items():
        agree = "-" if q["agreement"] is None else f"{100 * q['agreement']:.1f}%"
        print(f"{n:10s} perplexity {q['perplexity']:.4f} ({100 * q['vs_parent']:+.2f}%) "
              f"agreement {agree}")
    out = a.output or (Path(__file__).parent / "results" /
                       f"{time.strftime('%Y-%m-%d')}-quantized-{a.size}.json")
    write_json(out, doc)
    print(f"wrote {out}")
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
