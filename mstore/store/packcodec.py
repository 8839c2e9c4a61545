"""The packed encoding of a tensor object: XOR against a base tensor, bytes grouped, zstd.

A fine-tune moves most weights by a few units in the last place, so XOR against the parent's
tensor leaves the sign and exponent bytes almost all zero and the mantissa bytes sparse;
putting each byte position of the elements in its own stream (ZipLLM's byte grouping) hands
zstd long runs of alike bytes. A tensor with no base gets the same grouping without the XOR
(bf16 exponents alone compress to about two thirds).

Layout (docs/format.md "Packed tensor object"):

    8 bytes   MAGIC
    u64 LE    N, the header's length
    N bytes   header: canonical JSON {"base", "dtype", "shape", "streams", "frames"}
    frames    zstd frames, in the header's order, back to back

`streams` lists, per stream, the byte positions (little-endian) of each element it holds;
each frame [stream, first, count, length] holds `count` elements of one stream from
element `first`, compressed to `length` bytes. Frames are independent, so both ways run on
a thread pool (zstandard releases the GIL). This module knows bytes only: which object is a
base, where files live and what is verified is `objects.ObjectStore`'s.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import ObjectCorrupt
from .safetensors_io import DTYPE_SIZES, object_header

MAGIC = b"MSTPACK1"
SUFFIX = ".pack"  # objects/ab/<62 hex>.pack: never an object name to code that predates it
# zstd level: measured on a 0.5B fine-tune's MLP delta (benchmarks/packs.py), level 1 gave
# 0.347 at 0.16 GB/s, level 3 0.356 at 0.04 GB/s, level 9 0.363 at 0.01 GB/s (bf16 alone:
# 0.685 / 0.712 / 0.700): the fastest level is also the smallest on byte-grouped streams,
LEVEL = 1
# ...and smaller still with level 1's match finder made nearly blind (min_match 7, a 64-entry hash table, one
# probe, the fast strategy): a byte stream of XOR deltas has few real repeats, and level 1's
# stream of short matches both decoded slower and compressed worse than leaving the bytes to
# Huffman. On 40 tensors of a real fine-tune's delta (2026-12-02): mantissa stream 0.369 vs
# 0.401 of its bytes, decoded at 0.67 vs 0.54 GB/s; exponent stream 3.05 vs 1.40 GB/s; a
# base's exponents alone 0.340 vs 0.369. Plain zstd frames: any decoder reads them.
TUNED = {"min_match": 7, "hash_log": 6, "search_log": 1}
FRAME_BYTES = 4 * 1024 * 1024  # raw bytes per frame: parallel on both sides, ratio unhurt
MAX_HEADER = 16 * 1024 * 1024
# Byte positions of each stream, most significant first: for floats the sign/exponent
# byte(s) apart from the mantissa bytes (fp32: every byte alone beat a 2+2 split, see
# benchmarks/README.md "packs").
STREAMS = {1: [[0]], 2: [[1], [0]], 4: [[3], [2], [1], [0]], 8: [[i] for i in range(7, -1, -1)]}


@dataclass(frozen=True)
class PackHeader:
    base: str | None
    dtype: str
    shape: tuple[int, ...]
    streams: list[list[int]]
    frames: list[tuple[int, int, int, int]]  # (stream, first element, elements, bytes)
    data_start: int  # where the frames begin in the packed file

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data the reconstruction holds."""
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @property
    def loose_header(self) -> bytes:
        return object_header(self.dtype, list(self.shape), self.nbytes)


_pool: ThreadPoolExecutor | None = None
_contexts = threading.local()


def _compressor(level: int):
    """This thread's zstd compression context for `level` (LEVEL: with TUNED's match
    finder): a fresh context per frame allocates (and page-faults) its window every time,
    which cost more than the work."""
    import zstandard

    ctx = getattr(_contexts, "compressors", None)
    if ctx is None:
        ctx = _contexts.compressors = {}
    if level not in ctx:
        if level == LEVEL:
            params = zstandard.ZstdCompressionParameters.from_level(
                level, strategy=zstandard.STRATEGY_FAST, write_checksum=1, **TUNED)
            ctx[level] = zstandard.ZstdCompressor(compression_params=params)
        else:
            ctx[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return ctx[level]


def _decompressor():
    """This thread's zstd decompression context (reused: measured 1.8x faster decoding
    than one context per frame on 128 MB of bf16 delta frames)."""
    import zstandard

    ctx = getattr(_contexts, "decompressor", None)
    if ctx is None:
        ctx = _contexts.decompressor = zstandard.ZstdDecompressor()
    return ctx


def pool() -> ThreadPoolExecutor:
    """One pool per process for frame work; frames never submit more work to it."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2),
                                   thread_name_prefix="mstore-pack")
    return _pool


def encode(dtype: str, shape, data, base_oid: str | None = None, base=None,
           level: int = LEVEL) -> bytes:
    """The packed bytes of tensor data `data` (any buffer), XOR-ed with `base` (the data of
    object `base_oid`, same dtype and shape) when given."""
    size = DTYPE_SIZES[dtype]
    raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if base is not None:
        other = np.frombuffer(memoryview(base).cast("B"), dtype=np.uint8)
        if other.size != raw.size:
            raise ValueError("base and tensor differ in size")
        raw = np.bitwise_xor(raw, other)
    streams = STREAMS.get(size, [[i] for i in range(size - 1, -1, -1)])
    elements = raw.reshape(-1, size) if raw.size else raw.reshape(0, size)
    jobs = []
    for s, cols in enumerate(streams):
        per_frame = max(1, FRAME_BYTES // len(cols))
        for first in range(0, elements.shape[0], per_frame):
            jobs.append((s, cols, first, min(per_frame, elements.shape[0] - first)))

    def compress(job) -> bytes:
        _s, cols, first, count = job
        block = np.ascontiguousarray(elements[first:first + count, cols])
        return _compressor(level).compress(block.data)

    blobs = list(pool().map(compress, jobs)) if len(jobs) > 1 else [compress(j) for j in jobs]
    frames = [[s, first, count, len(b)] for (s, _c, first, count), b in zip(jobs, blobs)]
    head = json.dumps({"base": base_oid if base is not None else None, "dtype": dtype,
                       "frames": frames, "shape": list(shape), "streams": streams},
                      separators=(",", ":"), sort_keys=True).encode()
    return b"".join([MAGIC, struct.pack("<Q", len(head)), head, *blobs])


def parse_header(prefix, where: str) -> PackHeader:
    """The header of packed bytes (at least the first 16 + N of them); every field checked,
    so a damaged header is a named ObjectCorrupt and never an index error later."""
    prefix = memoryview(prefix)
    if len(prefix) < 16 or bytes(prefix[:8]) != MAGIC:
        raise ObjectCorrupt(where, "not a packed object (bad magic)", "packed object")
    (n,) = struct.unpack("<Q", prefix[8:16])
    if n > MAX_HEADER or len(prefix) < 16 + n:
        raise ObjectCorrupt(where, "packed header truncated", "packed object")
    try:
        doc = json.loads(bytes(prefix[16:16 + n]))
        base, dtype = doc["base"], doc["dtype"]
        shape = tuple(int(d) for d in doc["shape"])
        streams = [[int(b) for b in s] for s in doc["streams"]]
        frames = [tuple(int(x) for x in f) for f in doc["frames"]]
    except (ValueError, KeyError, TypeError):
        raise ObjectCorrupt(where, "packed header is not valid", "packed object") from None
    size = DTYPE_SIZES.get(dtype)
    cols = sorted(b for s in streams for b in s)
    if (size is None or cols != list(range(size)) or any(d < 0 for d in shape)
            or not (base is None or isinstance(base, str))
            or any(len(f) != 4 or not 0 <= f[0] < len(streams) for f in frames)):
        raise ObjectCorrupt(where, "packed header is not valid", "packed object")
    h = PackHeader(base, dtype, shape, streams, frames, 16 + n)  # type: ignore[arg-type]
    covered = [0] * len(streams)
    for s, first, count, _length in frames:
        if first != covered[s] or count <= 0:
            raise ObjectCorrupt(where, "packed frames do not tile the tensor", "packed object")
        covered[s] += count
    if any(c != h.nbytes // size for c in covered):
        raise ObjectCorrupt(where, "packed frames do not tile the tensor", "packed object")
    return h


def header_prefix_length(first16: bytes, where: str) -> int:
    """How many bytes `parse_header` needs, from the file's first 16."""
    if len(first16) < 16 or first16[:8] != MAGIC:
        raise ObjectCorrupt(where, "not a packed object (bad magic)", "packed object")
    (n,) = struct.unpack("<Q", first16[8:16])
    if n > MAX_HEADER:
        raise ObjectCorrupt(where, "packed header truncated", "packed object")
    return 16 + n


def decode_into(h: PackHeader, packed, out: np.ndarray, base=None, where: str = "") -> None:
    """Write the tensor data into `out` (uint8, h.nbytes long), XOR-ing `base` back in.
    Frames run on the pool; a frame that does not decompress is an ObjectCorrupt."""
    import zstandard

    size = DTYPE_SIZES[h.dtype]
    elements = out.reshape(-1, size)
    packed = memoryview(packed)
    offsets = []
    pos = h.data_start
    for f in h.frames:
        offsets.append(pos)
        pos += f[3]
    if pos != len(packed):
        raise ObjectCorrupt(where, f"packed object is {len(packed)} bytes, its frames need {pos}"
                            " (truncated?)", "packed object")

    def one(i: int) -> None:
        s, first, count, length = h.frames[i]
        cols = h.streams[s]
        want = count * len(cols)
        try:
            raw = _decompressor().decompress(
                packed[offsets[i]:offsets[i] + length], max_output_size=want)
        except zstandard.ZstdError as e:
            raise ObjectCorrupt(where, f"packed frame {i} does not decompress ({e})",
                                "packed object") from None
        if len(raw) != want:
            raise ObjectCorrupt(where, f"packed frame {i} holds {len(raw)} bytes, not {want}",
                                "packed object")
        block = np.frombuffer(raw, dtype=np.uint8).reshape(count, len(cols))
        if len(cols) == size and cols == list(range(size)):
            elements[first:first + count] = block
        else:
            for j, c in enumerate(cols):
                elements[first:first + count, c] = block[:, j]

    if len(h.frames) > 1:
        for _ in pool().map(one, range(len(h.frames))):
            pass
    elif h.frames:
        one(0)
    if base is not None:
        other = np.frombuffer(memoryview(base).cast("B"), dtype=np.uint8)
        if other.size != out.size:
            raise ObjectCorrupt(where, "its base differs in size", "packed object")
        _xor_in_place(out, other)


def _xor_in_place(out: np.ndarray, other: np.ndarray) -> None:
    step = FRAME_BYTES * 4
    if out.size <= step:
        np.bitwise_xor(out, other, out=out)
        return

    def part(lo: int) -> None:
        np.bitwise_xor(out[lo:lo + step], other[lo:lo + step], out=out[lo:lo + step])

    for _ in pool().map(part, range(0, out.size, step)):
        pass
