"""The safetensors format, read and written without torch.

Import copies raw tensor bytes out of a shard into single-tensor objects; metadata commands
read object headers. Neither needs torch, and `safe_open(framework="numpy")` cannot read
bfloat16, so the header (little-endian u64 length + JSON) is parsed here and every claim it
makes is checked against the file before any byte is trusted.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass

from .errors import InvalidSafetensors

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
OBJECT_KEY = "tensor"  # the one fixed key of every tensor object: names never change bytes
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own reader refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def parse_header(prefix: bytes, file_size: int, where: str) -> Header:
    """Parse and validate a safetensors header from the file's first bytes.

    `prefix` must hold at least 8 + header length bytes (see `header_length`).
    """
    n = header_length(prefix[:8], file_size, where)
    raw = prefix[8 : 8 + n]
    if len(raw) != n:
        raise InvalidSafetensors(where, "file ends inside the header")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidSafetensors(where, f"header is not JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise InvalidSafetensors(where, "header is not a JSON object")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InvalidSafetensors(where, "__metadata__ is not an object")
    tensors: dict[str, TensorInfo] = {}
    for name, info in doc.items():
        tensors[name] = _tensor_info(name, info, data_start, data_len, where)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.nbytes)
    for (s0, e0, a), (s1, _e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise InvalidSafetensors(where, f"tensors {a!r} and {b!r} overlap")
    return Header(tensors, metadata, data_start)


def header_length(first8: bytes, file_size: int, where: str) -> int:
    if len(first8) < 8:
        raise InvalidSafetensors(where, "shorter than 8 bytes")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER or 8 + n > file_size:
        raise InvalidSafetensors(where, f"header length {n} exceeds the file ({file_size} bytes)")
    return n


def _tensor_info(name, info, data_start, data_len, where) -> TensorInfo:
    if not isinstance(info, dict):
        raise InvalidSafetensors(where, f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise InvalidSafetensors(where, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidSafetensors(where, f"tensor {name!r} has a bad shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2
        and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise InvalidSafetensors(where, f"tensor {name!r} has offsets out of range {offsets!r}")
    need = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != need:
        raise InvalidSafetensors(
            where, f"tensor {name!r}: {dtype}{shape} needs {need} bytes, header gives "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_header_from_file(path) -> Header:
    """Header of a safetensors file on disk (reads only the header bytes)."""
    import os

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = header_length(f.read(8), size, str(path))
        return parse_header(struct.pack("<Q", n) + f.read(n), size, str(path))


def object_header(dtype: str, shape: tuple[int, ...] | list[int], nbytes: int) -> bytes:
    """The deterministic header of a single-tensor object (8-byte aligned data, no metadata).

    Same dtype + shape + bytes must give the same object, so nothing variable (a tensor
    name, metadata, key order) may enter it.
    """
    body = json.dumps(
        {OBJECT_KEY: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}},
        separators=(",", ":"),
    ).encode()
    body += b" " * (-(8 + len(body)) % 8)  # data starts 8-byte aligned: zero-copy views
    return struct.pack("<Q", len(body)) + body


@functools.lru_cache(maxsize=4096)
def object_data_start(dtype: str, shape: tuple[int, ...], nbytes: int) -> int:
    """Where a tensor object's data starts (the length of its header), without building the
    header each time: a model repeats a few shapes in every layer."""
    return len(object_header(dtype, shape, nbytes))
