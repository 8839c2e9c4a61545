"""One import of a given source at a time, per store: `tmp/import-<key>.lock`.

Two imports of the same Hub revision share its download folder in tmp/ (that is what makes
a retry resume); without this lock the first to finish deletes the folder under the other.
The second waits (as long as the first runs: flock is freed when a process dies, so a
killed import never blocks the next one), then finds the model already imported and
downloads nothing. Imports of different sources never wait for each other.

The holder removes the lock file before releasing it; a waiter that then gets the lock on
the removed file notices (its inode is no longer the one at the path) and tries again.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

from ..store import fsio
from ..store.objects import hash_bytes


class ImportLock:
    def __init__(self, tmp_dir: Path, key: str, on_wait: Callable[[], None] = lambda: None):
        # blake3, the store's own hash (already loaded): hashlib would load OpenSSL for it
        digest = hash_bytes(key.encode("utf-8", "surrogateescape"))[:24]
        self.tmp_dir = Path(tmp_dir)
        self.path = self.tmp_dir / f"import-{digest}.lock"
        self.on_wait = on_wait
        self._fd: int | None = None

    def __enter__(self) -> "ImportLock":
        fsio.makedirs(self.tmp_dir)
        waited = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not waited:
                        self.on_wait()
                        waited = True
                    fcntl.flock(fd, fcntl.LOCK_EX)  # blocks; Ctrl-C interrupts it
                if _same_file(fd, self.path):
                    self._fd = fd
                    return self
            finally:
                if self._fd != fd:  # failed, or the holder removed that file: try the new one
                    os.close(fd)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fsio.unlink(self.path, missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
