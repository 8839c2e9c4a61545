"""`python -m benchmarks.lora`: LoRA against full fine-tuning, and mstore's LoRA against peft.

On the 0.5B-shaped bf16 model (benchmarks/inputs.py), same data, batch and steps:

- full fine-tune vs LoRA fine-tune (`mstore train`, method full / lora): peak RSS of the
  process, median step time, bytes the commit wrote (target: LoRA RSS <= 40% of full,
  LoRA commit <= 2% of the model);
- mstore's LoRA step vs a plain peft loop (`from_pretrained` in bf16, `get_peft_model`,
  AdamW on the adapter, the same batch): target <= 1.05x;
- generation from the LoRA child, the adapter wrapped (what mstore does) vs merged in
  memory first: load time and greedy tokens per second.

Each side runs in its own process (peak RSS is the process's own, `ru_maxrss`), sides
alternate; prints a table and writes JSON (`--output`, default benchmarks/results/).

    python -m benchmarks.lora [--steps 4] [--repeats 2] [--size 0.5b|tiny] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from .inputs import REPO_ROOT, SHAPES, build_model_folder, import_folder, write_dataset

BATCH, SEQ = 1, 64


def _config(workdir: Path, method: str, steps: int) -> dict:
    return {"dataset": str(workdir / "data.txt"), "model_name": "base", "method": method,
            "max_steps": steps, "batch_size": BATCH, "seq_len": SEQ, "device": "cpu",
            "warmup_steps": 0, "eval_interval": 10**6, "eval_fraction": 0.0}


def child(kind: str, workdir: Path, steps: int) -> dict:
    """One measured side, in this (fresh) process."""
    import torch

    torch.manual_seed(0)
    if kind in ("full", "lora"):
        from mstore.store.repo import Store
        from mstore.training.config import from_mapping
        from mstore.training.loop import train

        times: list[float] = []

        class StepTimes:
            last = None

            def on_step_end(self, state):
                now = time.perf_counter()
                if self.last is not None:
                    times.append(now - self.last)
                self.last = now

        timer = StepTimes()
        start = time.perf_counter()
        cfg = from_mapping({**_config(workdir, kind, steps + 1), "output_name": None})
        store = Store(workdir / "store")
        result = train(store, cfg, callbacks=[timer])
        return {"step_s": statistics.median(times), "steps_timed": len(times),
                "bytes_written": result.bytes_written, "total_s": time.perf_counter() - start,
                "commit_bytes": _new_tensor_bytes(store, result.commit),
                "commit": result.commit, "name": result.name,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if kind == "peft":
        return _plain_peft(workdir, steps)
    if kind in ("wrapped", "merged"):
        return _generation(workdir, kind)
    raise SystemExit(f"unknown side {kind}")


def _new_tensor_bytes(store, commit: str) -> int:
    """Bytes of the commit's tensor objects its parent does not hold (what `du` charges it;
    unlike bytes_written, the same on a rerun into a store that already has them)."""
    m = store.read_manifest(commit)
    held = {t.object for t in store.read_manifest(m.parent).tensors.values()} if m.parent else set()
    return sum(store.objects.size(t.object) for t in m.tensors.values() if t.object not in held)


def _plain_peft(workdir: Path, steps: int) -> dict:
    """What a peft user writes: the same model, the same LoRA settings and batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mstore.adapters.base import adapter_for
    from mstore.store.repo import Store
    from mstore.training.data import pack, read_documents

    store = Store(workdir / "store")
    tok = adapter_for(store, store.resolve("base").commit).tokenizer()
    blocks, _ = pack(tok, read_documents(workdir / "data.txt"), SEQ, 0.0)
    from mstore.runtime.lora import frozen_base_dtype

    base = store.read_manifest(store.resolve("base").commit)
    dtype = frozen_base_dtype(base, "cpu") or torch.bfloat16  # as mstore trains on this CPU
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=dtype)
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        x = blocks[torch.randint(0, blocks.shape[0], (BATCH,), generator=gen)]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[1:]), "steps_timed": steps,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _generation(workdir: Path, kind: str, tokens: int = 24) -> dict:
    import torch

    from mstore.runtime.lora import load_model, quiet_peft
    from mstore.store.repo import Store

    store = Store(workdir / "store")
    t0 = time.perf_counter()
    loaded = load_model(store, store.resolve("bench-lora").commit)
    model = loaded.runnable
    if kind == "merged":
        with quiet_peft():
            model = loaded.model.merge_and_unload()
    load_s = time.perf_counter() - t0
    tok = loaded.adapter.tokenizer()
    ids = torch.tensor([tok.encode("The lighthouse keeper climbed the stairs")])
    list(loaded.adapter.generate_stream(model, ids, 2, 0.0, None, None, None, []))  # warm
    t0 = time.perf_counter()
    out = list(loaded.adapter.generate_stream(model, ids, tokens, 0.0, None, None, None, []))
    return {"load_s": load_s, "tok_s": len(out) / (time.perf_counter() - t0),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_side(kind: str, workdir: Path, steps: int) -> dict:
    res = subprocess.run([sys.executable, "-m", "benchmarks.lora", "--child", kind,
                          "--workdir", str(workdir), "--steps", str(steps)],
                         cwd=REPO_ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side")
    ap.add_argument("--size", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--sides", default="full,lora,peft,generate",
                    help="which sides to run (e.g. lora,peft for the step pair alone)")
    ap.add_argument("--workdir", type=Path, default=REPO_ROOT / "benchmarks" / "work" / "lora")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.steps)))
        return 0
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    facts = build_model_folder(work / "model", SHAPES[args.size])
    write_dataset(work / "data.txt")
    if not (work / "store").exists():
        import_folder(work / "store", work / "model", "base")
    model_bytes = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors"))
    sides = set(args.sides.split(","))
    runs: dict[str, list[dict]] = {k: [] for k in ("full", "lora", "peft") if k in sides}
    for i in range(args.repeats):
        order = [k for k in ("full", "lora", "peft") if k in runs]
        for kind in (order if i % 2 == 0 else order[::-1]):
            runs[kind].append(run_side(kind, work, args.steps))
            print(f"  {kind}: {runs[kind][-1]}", file=sys.stderr)
    from mstore.store.repo import Store

    store = Store(work / "store")
    gen = {}
    if "generate" in sides and "lora" in runs:
        store.tag(runs["lora"][-1]["name"], "bench-lora")
        gen = {k: run_side(k, work, args.steps) for k in ("wrapped", "merged")}
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("step_s", "peak_rss")}
           for k, v in runs.items()}
    rows = [
        ("peak RSS, LoRA vs full", ("lora", "peak_rss"), ("full", "peak_rss"), 0.40),
        ("step time, LoRA vs full", ("lora", "step_s"), ("full", "step_s"), None),
        ("LoRA step, mstore vs plain peft", ("lora", "step_s"), ("peft", "step_s"), 1.05),
        ("bytes committed, LoRA vs model", ("lora", "bytes"), ("model", "bytes"), 0.02),
        ("bytes committed, full vs model", ("full", "bytes"), ("model", "bytes"), None),
        ("generate tok/s, wrapped vs merged", ("wrapped", "tok_s"), ("merged", "tok_s"), None),
        ("generate load s, wrapped vs merged", ("wrapped", "load_s"), ("merged", "load_s"),
         None),
    ]

    def value(side: str, field: str):
        if side == "model":
            return model_bytes
        if field == "bytes":
            return runs[side][-1].get("commit_bytes") if side in runs else None
        return (med.get(side) or gen.get(side) or {}).get(field)

    table = []
    for name, (sa, fa), (sb, fb), target in rows:
        a, b = value(sa, fa), value(sb, fb)
        if a is None or b is None:
            continue
        ratio = a / b if b else float("nan")
        verdict = "" if target is None else ("pass" if ratio <= target else "FAIL")
        table.append({"measure": name, "a": a, "b": b, "ratio": round(ratio, 4),
                      "target": target, "verdict": verdict})
        print(f"{name:38} {a:>14.4g} {b:>14.4g} {ratio:8.3f}x  "
              f"{'' if target is None else f'<= {target}'} {verdict}")
    doc = {"size": args.size, "model": facts, "model_bytes": model_bytes, "batch": BATCH,
           "seq_len": SEQ, "steps": args.steps, "repeats": args.repeats, "runs": runs,
           "generation": gen, "table": table, "sides": sorted(sides),
           "date": datetime.now().isoformat(timespec="seconds")}
    out = args.output or REPO_ROOT / "benchmarks" / "results" / \
        f"{datetime.now():%Y-%m-%d}-lora-{args.size}.json"
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
