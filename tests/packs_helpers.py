"""Fine-tune-shaped children for the pack tests: every float tensor nudged as a few
optimizer steps would (a few units in the last place), written through the store's own
batch and committed with `parent` set, as `mstore train` commits."""

from __future__ import annotations

import math

import numpy as np

from mstore.store.manifest import Manifest, TensorEntry
from mstore.store.repo import Store

NUMPY = {"F32": np.float32, "F16": np.float16}


def nudged(dtype: str, raw: bytes, rng, scale: float) -> bytes:
    """`raw` (one tensor's bytes) with about a third of its values moved by `scale`."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        values = bits.view(np.float32)
    elif dtype in NUMPY:
        values = np.frombuffer(raw, dtype=NUMPY[dtype]).astype(np.float32)
    else:
        flip = rng.random(len(raw)) < 0.05
        data = np.frombuffer(raw, dtype=np.uint8).copy()
        data[flip] = (data[flip] ^ 1) if dtype == "BOOL" else data[flip] + 1
        return data.tobytes()
    moved = rng.random(values.size) < 0.33
    values = values + moved * values * scale * rng.standard_normal(values.size).astype(np.float32)
    if dtype == "BF16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return values.astype(NUMPY[dtype]).tobytes()


def make_child(store: Store, parent_ref: str, name: str, scale: float = 0.01,
               seed: int = 0, frozen: tuple[str, ...] = ()) -> str:
    """A child of `parent_ref` with every tensor but `frozen` ones nudged; its commit."""
    rng = np.random.default_rng(seed)
    r = store.resolve(parent_ref)
    parent = store.read_manifest(r.commit)
    tensors = {}
    with store.objects.batch() as batch:
        for tname, t in sorted(parent.tensors.items()):
            if tname in frozen:
                tensors[tname] = t
                continue
            (info,) = store.objects.tensor_header(t.object).tensors.values()
            raw = store.objects.read_bytes(t.object)[info.start:info.end]
            data = nudged(t.dtype, raw, rng, scale)
            tensors[tname] = TensorEntry(batch.put_tensor_bytes(t.dtype, t.shape, data).oid,
                                         t.dtype, list(t.shape))
    child = Manifest(architecture=parent.architecture, model_id=parent.model_id,
                     source={"type": "finetune", "parent": r.commit, "parent_name": parent_ref},
                     license=parent.license, config=parent.config, files=parent.files,
                     tensors=tensors, parent=r.commit, message=f"nudged {parent_ref}",
                     tied_weights=parent.tied_weights, training=None)
    commit = store.put_manifest(child)
    store.add_ref(commit, child, name, lambda: name, parent_ref)
    return commit


def dtype_model(store: Store, name: str, parent: str | None = None, seed: int = 0) -> str:
    """A commit holding one tensor of each dtype mstore stores (bf16, fp16, fp32, int8,
    uint8, bool); with `parent`, the parent's tensors nudged."""
    rng = np.random.default_rng(seed)
    shape = [48, 40]
    n = math.prod(shape)
    tensors = {}
    base = store.read_manifest(store.resolve(parent).commit) if parent else None
    with store.objects.batch() as batch:
        for dtype in ("BF16", "F16", "F32", "I8", "U8", "BOOL"):
            tname = f"t.{dtype.lower()}"
            if base is not None:
                raw = store.objects.read_bytes(base.tensors[tname].object)[-_nbytes(dtype, n):]
                data = nudged(dtype, raw, rng, 0.01)
            else:
                values = (rng.standard_normal(n) * 0.02).astype(np.float32)
                data = {"BF16": (values.view(np.uint32) >> 16).astype("<u2").tobytes(),
                        "F16": values.astype(np.float16).tobytes(),
                        "F32": values.tobytes(),
                        "I8": rng.integers(-128, 128, n, dtype=np.int8).tobytes(),
                        "U8": rng.integers(0, 256, n, dtype=np.uint8).tobytes(),
                        "BOOL": (rng.random(n) < 0.5).astype(np.uint8).tobytes()}[dtype]
            tensors[tname] = TensorEntry(batch.put_tensor_bytes(dtype, shape, data).oid,
                                         dtype, shape)
        config = batch.put_bytes(b'{"model_type":"none"}').oid
    m = Manifest(architecture="custom-transformer", model_id="dtypes", source={"type": "scratch"},
                 license=None, config=config, files={}, tensors=tensors,
                 parent=store.resolve(parent).commit if parent else None,
                 message=f"dtypes {name}", tied_weights={}, training=None)
    commit = store.put_manifest(m)
    store.add_ref(commit, m, name, lambda: name, parent)
    return commit


def _nbytes(dtype: str, n: int) -> int:
    return n * {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "BOOL": 1}[dtype]
