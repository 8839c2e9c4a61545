"""The benchmark's inputs, built by the benchmark itself (all untimed set-up).

- `build_model_folder`: a randomly initialised Qwen2 model in Hugging Face format (config,
  generation config, bf16 safetensors through `save_pretrained`, the tests' 1000-token BPE
  tokenizer). Built on the meta device, materialised with `to_empty` and filled in place
  with `normal_` in bf16: about 3 s for the 0.5B shape, not minutes of default init.
  Every tensor gets distinct random values (norm weights too: 1 + noise), so no two tensors
  are byte-identical and an import cannot win by deduplicating inside the model.
- `write_dataset`: a text file for the training pairs.
- `link_store`: a second store sharing the first one's objects through hard links (objects
  are immutable), so set-ups that need the 1 GB model in several stores cost no copy.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int | None  # None: the tokenizer's size
    tie: bool = True
    max_shard_size: str | None = None  # None: save_pretrained's default (one file here)


SHAPES = {
    # Qwen2.5-0.5B: 494M parameters, tied embeddings, ~0.99 GB in bf16, 290 tensors.
    "0.5b": Shape("0.5b", hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2,
                  vocab=151936),
    # ~310 MB: the 0.5B layer shape, 8 layers, a 40k vocabulary (tied), 98 tensors.
    "300m": Shape("300m", hidden=896, intermediate=4864, layers=8, heads=14, kv_heads=2,
                  vocab=40000),
    # Qwen2.5-3B's shape, untied: 6.8 GB in bf16, saved in 4 shards (only on request).
    "7g": Shape("7g", hidden=2048, intermediate=11008, layers=36, heads=16, kv_heads=2,
                vocab=151936, tie=False, max_shard_size="2GB"),
    # The tests' tiny shape (tests/tiny_models.py): vocab = the 1000-token tokenizer.
    "tiny": Shape("tiny", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                  vocab=None),
}


def _tiny_models():
    import sys

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from tests import tiny_models

    return tiny_models


def compile_mstore() -> int:
    """Write mstore's bytecode, as `pip install` does for every regular install (and did for
    torch, transformers and typer here). An editable install leaves it to Python at first
    import, which PYTHONDONTWRITEBYTECODE (set on this machine) forbids: every mstore
    process would then compile its modules from source (~20 ms) and the baselines would not.
    Returns the number of modules written."""
    import compileall
    import contextlib
    import io

    package = REPO_ROOT / "mstore"
    before = set(package.rglob("*.pyc"))
    with contextlib.redirect_stdout(io.StringIO()):
        compileall.compile_dir(package, quiet=1)
    return len(set(package.rglob("*.pyc")) - before)


def build_model_folder(out: Path, shape: Shape, seed: int = 0) -> dict:
    """Write the model folder; returns facts about it (tensor count, sizes, largest tensor).

    Reuses a complete folder from an earlier run (a stamp file records the shape and seed).
    """
    out = Path(out)
    stamp = out / ".bench-stamp.json"
    want = {"shape": shape.__dict__, "seed": seed}
    if stamp.exists():
        try:
            doc = json.loads(stamp.read_text())
            if doc.get("want") == want:
                return doc["facts"]
        except (OSError, ValueError):
            pass
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tm = _tiny_models()
    eot, im_end = tm._token_id("<|endoftext|>"), tm._token_id("<|im_end|>")
    config = Qwen2Config(
        vocab_size=shape.vocab or tm.vocab_size(),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768 if shape.vocab else 512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie,
        bos_token_id=eot,
        eos_token_id=eot,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0 if shape.vocab else 10000.0},
    )
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied lm_head is not listed twice
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if shape.tie:
        model.tie_weights()
    model.eval()
    from transformers.utils import logging as tf_logging

    previous = getattr(tf_logging, "_tqdm_active", None)
    if previous is not None:
        tf_logging._tqdm_active = False
    try:
        if shape.max_shard_size:
            model.save_pretrained(out, max_shard_size=shape.max_shard_size)
        else:
            model.save_pretrained(out)
    finally:
        if previous is not None:
            tf_logging._tqdm_active = previous
    GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot,
                     do_sample=False, max_new_tokens=16).save_pretrained(out)
    tm.train_bpe_tokenizer(out)
    for p in out.iterdir():
        if p.is_file():
            p.chmod(0o644)  # safetensors writes 0600; make it look like a checkout
    facts = describe_folder(out)
    facts["parameters"] = sum(p.numel() for p in model.parameters())
    del model
    stamp.write_text(json.dumps({"want": want, "facts": facts}))
    return facts


def describe_folder(folder: Path) -> dict:
    """Tensor count, weight bytes, total bytes and the largest tensor of a model folder."""
    from mstore.store.safetensors_io import parse_header

    tensors, largest, largest_name, weight_bytes = 0, 0, "", 0
    total = 0
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        total += p.stat().st_size
        if p.suffix != ".safetensors":
            continue
        weight_bytes += p.stat().st_size
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = parse_header(n.to_bytes(8, "little") + f.read(n), p.stat().st_size, p.name)
        for info in header.tensors.values():
            tensors += 1
            if info.nbytes > largest:
                largest, largest_name = info.nbytes, info.name
    return {"tensors": tensors, "weight_bytes": weight_bytes, "total_bytes": total,
            "largest_tensor_bytes": largest, "largest_tensor": largest_name}


def write_dataset(path: Path, repeats: int = 12) -> Path:
    """Plain text for the training pairs: the tests' corpus, repeated (~12k tokens)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_tiny_models().CORPUS * repeats, encoding="utf-8")
    return path


def import_folder(store_root: Path, folder: Path, name: str) -> str:
    """Import through the library (set-up, untimed); returns the commit."""
    from mstore.hub.importer import import_model
    from mstore.store.repo import Store

    store = Store(store_root)
    return import_model(store, str(folder), name=name, accept_license=True).commit


def link_store(src_root: Path, dst_root: Path, refs: list[str]) -> None:
    """A new store holding `refs` of `src_root`: their manifests and objects are hard links
    to the source's (objects are immutable), so it costs no copy."""
    from mstore.store.repo import Store

    src, dst = Store(src_root), Store(dst_root)
    dst.init()
    entries = {n: e for n, e in src.refs().items() if n in refs}
    oids: set[str] = set()
    for e in entries.values():
        for oid, m in src.lineage(e.commit):
            oids.add(oid)
            if m is not None:
                oids |= m.object_ids()
    for oid in sorted(oids):
        target = dst.objects.path(oid)
        target.parent.mkdir(exist_ok=True)
        if not target.exists():
            os.link(src.objects.path(oid), target)
    dst.registry.update(lambda models: models.update(entries))
