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
from typing import NamedTuple

from ..errors import InvalidSafetensors

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
OBJECT_KEY = "tensor"  # the one fixed key of every tensor object: names never change bytes
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own reader refuses larger headers too


class TensorInfo(NamedTuple):
    """One tensor of a safetensors header, its offsets made absolute."""

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


class Header(NamedTuple):
    """A validated safetensors header: tensors, metadata, where the data starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def parse_header(prefix: bytes, file_size: int, where: str) -> Header:
    """Parse and validate a safetensors header from the file's first bytes.

    `prefix` must hold at least 8 + header length bytes (see `header_length`). Refuses what
    the safetensors spec (and its Rust reader) forbids: a header that is not a UTF-8 JSON
    object starting with '{', duplicate keys, a `__metadata__` that is not a str -> str
    map, unknown dtypes, bad shapes, and data offsets that do not tile the data section
    exactly (no gap, no overlap, begin <= end, nothing past or short of the file's end).
    """
    n = header_length(prefix[:8], file_size, where)
    raw = prefix[8 : 8 + n]
    if len(raw) != n:
        raise InvalidSafetensors(where, "file ends inside the header")
    if not raw.startswith(b"{"):
        raise InvalidSafetensors(where, "header does not start with '{'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidSafetensors(where, "header is not valid UTF-8") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise InvalidSafetensors(where, f"header has the key {e.key!r} twice") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise InvalidSafetensors(where, f"header is not JSON ({e.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise InvalidSafetensors(where, "header is not a JSON object")
    data_start = 8 + n
    data_len = file_size - data_start
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not (isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise InvalidSafetensors(where, "__metadata__ is not a map of strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, info in doc.items():
        tensors[name] = _tensor_info(name, info, data_start, data_len, where)
    _check_tiling(tensors, data_start, data_len, where)
    return Header(tensors, metadata, data_start)


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        self.key = key


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys: a tensor would silently vanish."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_tiling(tensors: dict[str, TensorInfo], data_start: int, data_len: int,
                  where: str) -> None:
    """The tensors' byte ranges, in offset order, must cover the data section exactly."""
    pos, prev = data_start, None
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start < pos:
            raise InvalidSafetensors(where, f"tensors {prev!r} and {t.name!r} overlap")
        if t.start > pos:
            after = f" after {prev!r}" if prev is not None else ""
            raise InvalidSafetensors(where, f"data bytes {pos - data_start}..{t.start - data_start}"
                                     f"{after} belong to no tensor (a gap before {t.name!r})")
        pos, prev = t.end, t.name
    if pos != data_start + data_len:
        raise InvalidSafetensors(where, f"tensors end at data byte {pos - data_start} but the "
                                 f"file holds {data_len} data bytes")


def header_length(first8: bytes, file_size: int, where: str) -> int:
    if len(first8) < 8:
        raise InvalidSafetensors(where, "shorter than 8 bytes")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER:
        raise InvalidSafetensors(where, f"header length {n} is over the {MAX_HEADER} byte limit")
    if 8 + n > file_size:
        raise InvalidSafetensors(where, f"header length {n} exceeds the file ({file_size} bytes)")
    return n


def _tensor_info(name, info, data_start, data_len, where) -> TensorInfo:
    if not isinstance(info, dict):
        raise InvalidSafetensors(where, f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InvalidSafetensors(where, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InvalidSafetensors(where, f"tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)):
        raise InvalidSafetensors(where, f"tensor {name!r} has bad data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end:
        raise InvalidSafetensors(where, f"tensor {name!r} has data_offsets out of order "
                                 f"{offsets!r} (begin after end)")
    if end > data_len:
        raise InvalidSafetensors(where, f"tensor {name!r} has data_offsets {offsets!r}: offsets "
                                 f"out of range, past the end of the data ({data_len} bytes)")
    need = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != need:
        raise InvalidSafetensors(
            where, f"tensor {name!r}: {dtype}{shape} needs {need} bytes, header gives "
            f"{end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header_from_file(path, where: str | None = None) -> Header:
    """Header of a safetensors file on disk (reads only the header bytes); errors name the
    file as `where` (default: the path)."""
    import os

    where = str(path) if where is None else where
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = header_length(f.read(8), size, where)
        return parse_header(struct.pack("<Q", n) + f.read(n), size, where)


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
