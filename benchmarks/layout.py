"""`python -m benchmarks.layout SRC DST`: what one file per tensor costs, bare.

Copies every tensor of every safetensors file in SRC into a file of its own under DST
(`copy_file_range`, as mstore does), then one syncfs: no hashing, no header objects, no
renames, no lock, no manifest, and nothing imported beyond the standard library. Run as
a whole process beside `cp -r` + `sync` (pair `import-layout`), it shows what the object
layout itself costs on this filesystem. (mstore's import, which also starts each object's
writeback as soon as it is copied, measured below this bare loop on 2026-12-02.)
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from pathlib import Path


def copy_tensors(src: Path, dst: Path) -> int:
    dst.mkdir(parents=True)
    n = 0
    for shard in sorted(src.glob("*.safetensors")):
        fd = os.open(shard, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, size, 8))
            for name, t in header.items():
                if name == "__metadata__":
                    continue
                start, end = (8 + size + o for o in t["data_offsets"])
                out = os.open(dst / f"{n:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
                try:
                    while start < end:
                        start += os.copy_file_range(fd, out, end - start, start)
                finally:
                    os.close(out)
                n += 1
        finally:
            os.close(fd)
    dfd = os.open(dst, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(dfd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    finally:
        os.close(dfd)
    return n


if __name__ == "__main__":
    copy_tensors(Path(sys.argv[1]), Path(sys.argv[2]))
