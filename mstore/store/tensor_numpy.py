"""Tensor objects as numpy arrays, for the metadata commands that must not import torch.

numpy has no bfloat16: bf16 is the upper half of a float32, so widening is a shift.
"""

from __future__ import annotations

import numpy as np

from .repo import Store

_NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def load_native(store: Store, oid: str) -> np.ndarray | None:
    """The tensor in its own dtype, bf16 widened to float32 exactly (None for dtypes numpy
    cannot read, e.g. float8)."""
    header = store.objects.tensor_header(oid)
    (info,) = header.tensors.values()
    raw = store.objects.tensor_bytes(oid)[info.start:info.end].tobytes()
    if info.dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(info.shape)
    if info.dtype not in _NUMPY:
        return None
    native = _NUMPY[info.dtype]
    return np.frombuffer(raw, dtype=np.dtype(native).newbyteorder("<")).astype(native) \
        .reshape(info.shape)


def load_as_float(store: Store, oid: str) -> np.ndarray | None:
    """The tensor as float64 (None for dtypes numpy cannot widen, e.g. float8)."""
    native = load_native(store, oid)
    return None if native is None else native.astype(np.float64)
