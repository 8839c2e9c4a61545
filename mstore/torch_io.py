"""Tensor objects <-> torch tensors, without copying on the way in.

Loading maps each object privately (`UntypedStorage.from_file(shared=False)`, MAP_PRIVATE):
the tensor's storage *is* the page cache of the object file, so loading costs no copy and
no extra memory, and writes (training) go copy-on-write to private pages, never to the
object. Every load checks the object's header against its size, so a truncated object is
caught on every load; `verify=True` also re-hashes it.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import ObjectCorrupt
from .manifest import TensorEntry
from .objects import ObjectBatch, ObjectStore, hash_file

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
    """A tensor whose storage is the mmapped object (no copy)."""
    header = objects.tensor_header(entry.object)  # raises on missing or truncated
    (info,) = header.tensors.values()
    what = f"tensor object ({name})" if name else "tensor object"
    if info.dtype != entry.dtype or list(info.shape) != list(entry.shape):
        raise ObjectCorrupt(entry.object, f"holds {info.dtype}{list(info.shape)}, manifest "
                            f"says {entry.dtype}{entry.shape}", what)
    path = objects.path(entry.object)
    if verify and hash_file(path) != entry.object:
        raise ObjectCorrupt(entry.object, "content does not match its name", what)
    dtype = TORCH_DTYPES.get(info.dtype)
    if dtype is None:
        raise ObjectCorrupt(entry.object, f"dtype {info.dtype} unsupported by this torch", what)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=info.end)
    flat = torch.empty(0, dtype=torch.uint8).set_(storage)[info.start:info.end]
    return flat.view(dtype).reshape(info.shape)


def load_state_dict(objects: ObjectStore, tensors: dict[str, TensorEntry],
                    verify: bool = False) -> dict[str, torch.Tensor]:
    return {name: load_tensor(objects, e, verify, name) for name, e in tensors.items()}


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
