"""Store-wide locks: writers share, gc excludes; the kernel frees them when a process dies.

`fcntl.flock` locks belong to the open file, so a process killed with -9 releases its lock
and never blocks the next one. A lock that cannot be had within the wait time is an error
that names who holds it (read from /proc/locks), never a silent break of another's lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from . import failpoints
from .. import env
from ..errors import StoreBusy

DEFAULT_WAIT = 60.0  # seconds; MSTORE_LOCK_TIMEOUT overrides


def lock_wait() -> float:
    return env.lock_timeout(DEFAULT_WAIT)


class StoreLock:
    """`shared=True` for writers (import, train, tag, rm), `shared=False` for gc."""

    def __init__(self, path: Path, shared: bool, purpose: str, timeout: float | None = None):
        self.path = Path(path)
        self.shared = shared
        self.purpose = purpose
        self.timeout = lock_wait() if timeout is None else timeout
        self._fd: int | None = None

    def __enter__(self) -> "StoreLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        op = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        start = time.monotonic()
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= self.timeout:
                    holder = describe_holders(self.path)
                    os.close(fd)
                    raise StoreBusy(holder, waited) from None
                time.sleep(min(delay, max(self.timeout - waited, 0.001)))
                delay = min(delay * 2, 0.25)
        if not self.shared:
            # Only an exclusive holder may say who it is; waiters read it from here.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.purpose}\n".encode(), 0)
        self._fd = fd
        if self.purpose != "registry update":
            failpoints.hit("store.locked")
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            if not self.shared:
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last fd releases the flock
            self._fd = None


def describe_holders(path: Path) -> str:
    """'gc running in pid N' or '2 writers running (pids 5, 6)', from /proc/locks."""
    try:
        ino = os.stat(path).st_ino
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return "another mstore process holds the lock"
    readers, writers = [], []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (blocked waiters have "->")
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        try:
            pid, dev_ino = int(parts[4]), parts[5]
        except ValueError:
            continue
        if dev_ino.rsplit(":", 1)[-1] == str(ino):
            (writers if parts[3] == "WRITE" else readers).append(pid)
    if writers:
        purpose = _exclusive_purpose(path) or "gc"
        return f"{purpose} running in pid {writers[0]}"
    if readers:
        pids = ", ".join(str(p) for p in sorted(set(readers)))
        n = len(set(readers))
        return f"{n} writer{'s' if n > 1 else ''} running (pid {pids})"
    return "another mstore process holds the lock"


def _exclusive_purpose(path: Path) -> str | None:
    try:
        text = Path(path).read_text().split()
        return " ".join(text[1:]) or None
    except OSError:
        return None
