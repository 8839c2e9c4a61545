"""In-process measurements, run as a child: `python -m benchmarks.worker TASK --args JSON`.

Each task imports everything both sides need and warms both sides once (untimed) before
timing, then alternates the sides (A B B A ...), so imports, lazy module loading and the
page cache are the same for both. Results go to the JSON file named by --out.

    load    mstore: adapter_for(store, commit).load_checkpoint()
            baseline: AutoModelForCausalLM.from_pretrained(DIR)
    decode  mstore: generate_text(..., GenerateOptions(temperature=0, max_new_tokens=N)),
                    minus the time spent in load_checkpoint() and tokenizer()
            baseline: model.generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)
    train   mstore: mstore.training.train(store, cfg) with a callback stamping each step end
            baseline: from_pretrained(dtype=float32), AdamW, loss, backward, clip, step
    build   (set-up) write a model folder, see inputs.build_model_folder
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

from .measure import alternate


def _quiet_transformers() -> None:
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()
    if hasattr(tf_logging, "_tqdm_active"):
        tf_logging._tqdm_active = False  # the "Loading weights" bar: mstore hides its own too


def _free() -> None:
    gc.collect()


# -- load -----------------------------------------------------------------------------------
def task_load(a: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from mstore.adapters.base import adapter_for
    from mstore.store.repo import Store

    _quiet_transformers()
    store = Store(a["store"])
    commit = store.resolve(a["ref"]).commit

    def mstore_load():
        return adapter_for(store, commit).load_checkpoint()

    def hf_load():
        return AutoModelForCausalLM.from_pretrained(a["dir"])

    # warm both: imports of the model code, lazy transformers modules, page cache
    for fn in (mstore_load, hf_load):
        m = fn()
        del m
        _free()
    check = _same_logits(mstore_load(), hf_load())

    def timed(fn):
        def run(_i):
            _free()
            t0 = time.perf_counter()
            m = fn()
            dt = time.perf_counter() - t0
            del m
            return dt
        return run

    res = alternate(a["repeats"], {"mstore": timed(mstore_load), "baseline": timed(hf_load)})
    return {**res, "logits_equal": check}


def _same_logits(m1, m2) -> bool:
    import torch

    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        same = torch.equal(m1(input_ids=ids).logits, m2(input_ids=ids).logits)
    del m1, m2
    _free()
    return bool(same)


# -- decode ---------------------------------------------------------------------------------
def task_decode(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mstore.runtime.generate as mgen
    import mstore.runtime.lora as mload  # where generate_text's load_model binds a commit
    from mstore.store.repo import Store

    _quiet_transformers()
    store = Store(a["store"])
    n = int(a["tokens"])
    prompt = a.get("prompt", "hi")
    probe: dict[str, Any] = {}

    real_adapter_for = mload.adapter_for

    def instrumented_adapter_for(st, commit):
        """Times load_checkpoint() and tokenizer() and counts the tokens generate_stream
        yields; the adapter itself is untouched (measurement only)."""
        adapter = real_adapter_for(st, commit)
        stream = adapter.generate_stream

        def counted_as_load(fn):
            def timed(*args, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    probe["load"] += time.perf_counter() - t0
            return timed

        def generate_stream(*args, **kw):
            for t in stream(*args, **kw):
                probe["tokens"] += 1
                probe["ids"].append(t)
                yield t

        adapter.load_checkpoint = counted_as_load(adapter.load_checkpoint)
        adapter.tokenizer = counted_as_load(adapter.tokenizer)
        adapter.generate_stream = generate_stream
        return adapter

    mload.adapter_for = instrumented_adapter_for

    def mstore_run(tokens: int) -> tuple[float, int]:
        probe.update(load=0.0, tokens=0, ids=[])
        opts = mgen.GenerateOptions(temperature=0, max_new_tokens=tokens, device="cpu")
        t0 = time.perf_counter()
        mgen.generate_text(store, a["ref"], prompt, opts)
        total = time.perf_counter() - t0
        return total - probe["load"], probe["tokens"]

    model = AutoModelForCausalLM.from_pretrained(a["dir"])
    hf_tok = AutoTokenizer.from_pretrained(a["dir"])
    inputs = hf_tok(prompt, return_tensors="pt")

    def hf_run(tokens: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=tokens,
                                 min_new_tokens=tokens)
        return time.perf_counter() - t0, int(out.shape[1] - inputs["input_ids"].shape[1])

    # warm both sides (first forward passes allocate, oneDNN picks kernels), and check that
    # greedy decoding on the same bf16 weights gives the same tokens on both
    k = min(n, 8)
    mstore_run(k)
    mstore_ids = list(probe["ids"])
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=k, min_new_tokens=k)
    hf_ids = out[0, inputs["input_ids"].shape[1]:].tolist()

    def rate(fn):
        def run(_i):
            _free()
            dt, got = fn(n)
            return {"seconds": dt, "tokens": got, "tok_s": got / dt}
        return run

    res = alternate(a["repeats"], {"mstore": rate(mstore_run), "baseline": rate(hf_run)},
                    budget_s=a.get("budget_s"))
    return {**res, "same_tokens": mstore_ids == hf_ids, "mstore_ids": mstore_ids,
            "baseline_ids": hf_ids}


# -- train ----------------------------------------------------------------------------------
class StepClock:
    """mstore train callback: perf_counter() at the end of every step."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, state) -> None:
        self.stamps.append(time.perf_counter())


def _step_times(stamps: list[float], skip: int) -> list[float]:
    """Differences between consecutive step ends (so the first step is never counted),
    dropping the first `skip` of them as warm-up."""
    diffs = [b - a for a, b in zip(stamps, stamps[1:])]
    return diffs[skip:]


def task_train(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mstore.training.config import load_config
    from mstore.store.repo import Store
    from mstore.training.loop import train

    _quiet_transformers()
    store = Store(a["store"])
    steps, skip = int(a["steps"]), int(a["skip"])
    cfg_path = Path(a["config"])

    def mstore_run(_i):
        cfg = load_config(cfg_path)
        clock = StepClock()
        _free()
        result = train(store, cfg, callbacks=[clock])
        store.remove(result.name)  # keep the ref list short; gc at the end frees the objects
        return _step_times(clock.stamps, skip)

    cfg0 = load_config(cfg_path)
    tok = AutoTokenizer.from_pretrained(a["dir"])
    text = Path(cfg0.dataset).read_text(encoding="utf-8")
    ids = tok(text, verbose=False)["input_ids"]
    seq, batch = cfg0.seq_len, cfg0.batch_size
    nblocks = len(ids) // seq
    blocks = torch.tensor(ids[: nblocks * seq], dtype=torch.long).view(nblocks, seq)

    def baseline_run(_i):
        torch.manual_seed(cfg0.seed)
        gen = torch.Generator().manual_seed(cfg0.seed)
        _free()
        model = AutoModelForCausalLM.from_pretrained(a["dir"], dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg0.learning_rate,
                                weight_decay=cfg0.weight_decay)
        stamps = []
        for _ in range(steps):
            x = blocks[torch.randint(0, nblocks, (batch,), generator=gen)]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            stamps.append(time.perf_counter())
        del model, opt
        _free()
        return _step_times(stamps, skip)

    res = alternate(a["repeats"], {"mstore": mstore_run, "baseline": baseline_run},
                    budget_s=a.get("budget_s"))
    return {"mstore": [t for run in res["mstore"] for t in run],
            "baseline": [t for run in res["baseline"] for t in run],
            "per_repeat": res}


# -- build ----------------------------------------------------------------------------------
def task_build(a: dict[str, Any]) -> dict[str, Any]:
    """Build a model folder here, so the benchmark's own process never imports torch (a
    child forked from a big process inherits its RSS until exec, which skews peak RSS)."""
    from .inputs import SHAPES, build_model_folder

    return build_model_folder(Path(a["dir"]), SHAPES[a["shape"]], int(a.get("seed", 0)))


def task_packs(a: dict[str, Any]) -> dict[str, Any]:
    from .packs import task_packs as run

    return run(a)


TASKS = {"build": task_build, "load": task_load, "decode": task_decode, "train": task_train,
         "packs": task_packs}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--args", required=True, help="JSON object of task arguments")
    ap.add_argument("--out", required=True)
    ns = ap.parse_args()
    result = TASKS[ns.task](json.loads(ns.args))
    Path(ns.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
