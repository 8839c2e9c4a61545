"""Tensor objects <-> torch tensors, without copying on the way in.

Loading maps each object privately (`UntypedStorage.from_file(shared=False)`, MAP_PRIVATE):
the tensor's storage *is* the page cache of the object file, so loading costs no copy and
no extra memory, and writes (training) go copy-on-write to private pages, never to the
object. Every load checks the object's header against its size, so a truncated object is
caught on every load; `verify=True` also re-hashes it.

A packed object cannot be mapped: the object store rebuilds it into memory (its frames
decompressed on a thread pool) and re-hashes it, always; `load_state_dict` rebuilds the
packed ones of a model on a pool of their own, while the mapped ones need no work.
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import torch

from ..errors import ObjectCorrupt, ObjectMissing
from ..store.manifest import TensorEntry
from ..store.objects import ObjectBatch, ObjectStore, hash_file
from ..store.safetensors_io import DTYPE_SIZES, object_data_start

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def load_tensor(objects: ObjectStore, entry: TensorEntry, verify: bool = False,
                name: str = "") -> torch.Tensor:
    """A tensor whose storage is the mmapped object (no copy).

    Tensor objects are deterministic, so the manifest's dtype and shape fix the header and
    the data offset; one stat then checks the size (a truncated object fails every load)
    without parsing the header. `verify` re-hashes the whole object.
    """
    what = f"tensor object ({name})" if name else "tensor object"
    dtype = TORCH_DTYPES.get(entry.dtype)
    nbytes = math.prod(entry.shape) * DTYPE_SIZES.get(entry.dtype, 0)
    if dtype is None:
        raise ObjectCorrupt(entry.object, f"dtype {entry.dtype} unsupported by this torch", what)
    start = object_data_start(entry.dtype, tuple(entry.shape), nbytes)
    path = objects.path_str(entry.object)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return _rebuilt(objects, entry, dtype, start, what)
    if size != start + nbytes:
        raise ObjectCorrupt(entry.object, f"{size} bytes, {entry.dtype}{entry.shape} needs "
                            f"{start + nbytes} (truncated?)", what)
    if verify and hash_file(path) != entry.object:
        raise ObjectCorrupt(entry.object, "content does not match its name", what)
    if nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    try:
        storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    except RuntimeError:
        if os.path.exists(path):
            raise
        return _rebuilt(objects, entry, dtype, start, what)  # packed since our stat
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)[start:]
    return flat.view(dtype).reshape(entry.shape)


def _rebuilt(objects: ObjectStore, entry: TensorEntry, dtype: torch.dtype, start: int,
             what: str) -> torch.Tensor:
    """A packed object rebuilt in memory (re-hashed by the object store)."""
    try:
        data = objects.tensor_bytes(entry.object)
    except ObjectMissing:
        raise ObjectMissing(entry.object, what) from None
    except ObjectCorrupt as e:
        raise ObjectCorrupt(entry.object, e.reason, what) from None
    if data.size != start + math.prod(entry.shape) * dtype.itemsize:
        raise ObjectCorrupt(entry.object, f"holds {data.size - start} data bytes, "
                            f"{entry.dtype}{entry.shape} needs more or less", what)
    flat = torch.from_numpy(data)[start:]
    return flat.view(dtype).reshape(entry.shape)


def load_state_dict(objects: ObjectStore, tensors: dict[str, TensorEntry],
                    verify: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a manifest: loose ones mapped, packed ones rebuilt on threads
    (decompression and hashing release the GIL), largest first."""
    from concurrent.futures import ThreadPoolExecutor

    packed = [n for n, e in tensors.items() if objects.is_packed(e.object)]
    out: dict[str, torch.Tensor] = {}
    if len(packed) > 1:
        packed.sort(key=lambda n: -math.prod(tensors[n].shape))
        with ThreadPoolExecutor(min(len(packed), max(2, os.cpu_count() or 2)),
                                thread_name_prefix="mstore-load") as pool:
            done = pool.map(lambda n: load_tensor(objects, tensors[n], verify, n), packed)
            out.update(zip(packed, done))
    return {name: out[name] if name in out else load_tensor(objects, e, verify, name)
            for name, e in tensors.items()}


def put_tensors(batch: ObjectBatch,
                state: Iterable[tuple[str, torch.Tensor]]) -> dict[str, TensorEntry]:
    """Write tensors as objects. A frozen parameter of a fine-tune is bit-identical to its
    parent's, so it hashes to the parent's object and costs no new bytes."""
    out: dict[str, TensorEntry] = {}
    for name, t in state:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        dtype = SAFETENSORS_DTYPES[t.dtype]
        raw = t.reshape(-1).view(torch.uint8)
        res = batch.put_tensor_bytes(dtype, list(t.shape), raw.numpy().data)
        out[name] = TensorEntry(res.oid, dtype, list(t.shape))
    return out
