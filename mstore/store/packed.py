"""The packed encoding as ObjectStore sees it: read a header, rebuild an object, verify it.

Only `objects.ObjectStore` calls in here (it is its second half, split off to keep numpy
and zstandard out of the metadata commands' imports). A packed object is rebuilt as the
bytes of its loose form (the deterministic safetensors header, then the data) and
re-hashed against its id every time: a flipped byte anywhere in the pack, or in any base
along its chain, is an ObjectCorrupt naming the object, never a wrong tensor.
"""

from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ObjectCorrupt, ObjectMissing
from . import packcodec
from .safetensors_io import Header, TensorInfo

if TYPE_CHECKING:
    from .objects import ObjectStore


def read_header(objects: "ObjectStore", oid: str) -> packcodec.PackHeader:
    path = objects.pack_path(oid)
    try:
        with open(path, "rb") as f:
            first = f.read(16)
            need = packcodec.header_prefix_length(first, oid)
            prefix = first + f.read(need - 16)
    except FileNotFoundError:
        raise ObjectMissing(oid, "packed object") from None
    return packcodec.parse_header(prefix, oid)


def tensor_header(objects: "ObjectStore", oid: str) -> Header:
    """The safetensors header the loose form of packed `oid` has."""
    h = read_header(objects, oid)
    start = len(h.loose_header)
    info = TensorInfo("tensor", h.dtype, h.shape, start, start + h.nbytes)
    return Header({"tensor": info}, {}, start)


def _read_packed(objects: "ObjectStore", oid: str) -> bytes:
    try:
        return objects.pack_path(oid).read_bytes()
    except FileNotFoundError:
        raise ObjectMissing(oid, "packed object") from None


def object_bytes(objects: "ObjectStore", oid: str, depth: int = 0) -> np.ndarray:
    """The loose bytes of `oid` (loose: read; packed: rebuilt and re-hashed)."""
    from .objects import hash_bytes

    for _attempt in range(2):  # a pack or unpack may swap the files between our looks
        try:
            with open(objects.path(oid), "rb") as f:
                return np.frombuffer(bytearray(f.read()), dtype=np.uint8)
        except FileNotFoundError:
            pass
        try:
            blob = objects.pack_path(oid).read_bytes()
        except FileNotFoundError:
            continue
        out = rebuild(objects, oid, blob, depth)
        if hash_bytes(out) != oid:
            raise ObjectCorrupt(oid, "packed object does not rebuild to its name "
                                "(run `mstore fsck`)", "packed object")
        return out
    raise ObjectMissing(oid, "tensor object")


def rebuild(objects: "ObjectStore", oid: str, blob: bytes, depth: int = 0) -> np.ndarray:
    """The loose bytes packed `blob` holds, its base read from `objects` (not re-hashed)."""
    from .objects import MAX_CHAIN

    h = packcodec.parse_header(blob, oid)
    head = h.loose_header
    out = np.empty(len(head) + h.nbytes, dtype=np.uint8)
    out[:len(head)] = np.frombuffer(head, dtype=np.uint8)
    base = None
    if h.base is not None:
        if h.base == oid or depth >= MAX_CHAIN:
            raise ObjectCorrupt(oid, "its chain of bases loops", "packed object")
        try:
            base = base_data(objects, h.base, h, depth + 1)
        except ObjectMissing:
            raise ObjectCorrupt(oid, f"its base {h.base} is missing", "packed object") from None
        except ObjectCorrupt as e:
            raise ObjectCorrupt(oid, f"its base {h.base} is damaged ({e.reason})",
                                "packed object") from None
    packcodec.decode_into(h, blob, out[len(head):], base, oid)
    return out


def base_data(objects: "ObjectStore", base: str, h: packcodec.PackHeader, depth: int):
    """The data bytes of object `base` (a loose one mapped, a packed one rebuilt), which
    must be a tensor of the dtype and shape of the delta built on it."""
    start, nbytes = len(h.loose_header), h.nbytes
    try:
        with open(objects.path(base), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != start + nbytes or f.read(start) != h.loose_header:
                raise ObjectCorrupt(base, "not the tensor its delta was built on", "base")
            if not nbytes:
                return np.empty(0, dtype=np.uint8)
            # mapped, not read: the XOR reads each page once, with no copy in between
            view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return np.frombuffer(view, dtype=np.uint8, count=nbytes, offset=start)
    except FileNotFoundError:
        pass
    data = object_bytes(objects, base, depth)
    if data.size != start + nbytes or bytes(data[:start]) != h.loose_header:
        raise ObjectCorrupt(base, "not the tensor its delta was built on", "base")
    return data[start:]


def verify_packed(objects: "ObjectStore", oid: str) -> str | None:
    """fsck's check of a packed file: rebuild it and re-hash; a problem or None."""
    try:
        blob = _read_packed(objects, oid)
    except ObjectMissing:
        return None if objects.path(oid).is_file() else "missing"
    return verify_packed_bytes(objects, oid, blob)


def verify_packed_bytes(objects: "ObjectStore", oid: str, blob: bytes) -> str | None:
    from .objects import hash_bytes

    try:
        got = hash_bytes(rebuild(objects, oid, blob))
    except ObjectCorrupt as e:
        return f"packed: {e.reason}"
    return None if got == oid else f"packed: rebuilds to {got[:12]}"
