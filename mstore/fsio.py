"""Every write the store makes goes through here: temp file -> fsync -> rename.

Keeping the store's writes, fsyncs, renames and unlinks in one module is what makes the
crash-safety argument checkable: a file becomes visible under its final name only after its
bytes are durable, and the directory entry is synced before anything that points at it is
written (objects before the manifest, the manifest before the ref).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

FILE_MODE = 0o644  # objects and registry are world-readable, like git's
DIR_MODE = 0o755


def tmp_name(tmp_dir: Path, stem: str = "w") -> Path:
    return tmp_dir / f"{stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.incomplete"


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs(path: Path) -> None:
    """Create `path` (and parents) and sync the parent so the new entry survives a crash."""
    if path.is_dir():
        return
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def open_tmp(tmp_dir: Path, stem: str = "w") -> Iterator[tuple[Path, BinaryIO]]:
    """A new temp file in the store's tmp/ (same filesystem as its target, so rename is atomic).

    The file is removed if the block raises; on success the caller renames it.
    """
    path = tmp_name(tmp_dir, stem)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # umask may have narrowed it
    f = os.fdopen(fd, "wb")
    try:
        yield path, f
    except BaseException:
        f.close()
        unlink(path, missing_ok=True)
        raise
    f.close()


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Replace `path` with `data` so that readers see the old or the new bytes, never a mix."""
    tmp_dir = tmp_dir or path.parent
    with open_tmp(tmp_dir, path.name) as (tmp, f):
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    publish(tmp, path, replace=True)


def publish(tmp: Path, final: Path, replace: bool = False) -> bool:
    """Rename a synced temp file to its final name and sync the directory.

    With replace=False an existing `final` wins (objects are immutable: same name, same
    bytes) and the temp file is dropped; returns whether `tmp` became `final`.
    """
    if not replace and final.exists():
        unlink(tmp, missing_ok=True)
        return False
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return True


def unlink(path: Path, missing_ok: bool = False) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def touch(path: Path) -> None:
    """Refresh mtime: a dedup hit on an old object must not be collected by a gc in flight."""
    os.utime(path, None)


_libc = None


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the filesystem holding `path` (Linux syncfs), once.

    Used to make a batch of objects durable with one call instead of one fsync each;
    where syncfs is unavailable, os.sync() gives the same guarantee for all filesystems.
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        syncfs = _libc.syncfs
    except (OSError, AttributeError):
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err) if err else "syncfs failed")
    finally:
        os.close(fd)


def is_no_space(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
