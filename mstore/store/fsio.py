"""Every write the store makes goes through here: temp file -> fsync -> rename.

Keeping the store's creates, fsyncs, renames and unlinks in one module is what makes the
crash-safety argument checkable: a file becomes visible under its final name only after its
bytes are durable, and the directory entry is synced before anything that points at it is
written (objects before the manifest, the manifest before the ref). An observer (`observe`)
sees each of these operations; the power-loss tests use it to rebuild what a disk could
hold after a crash at any point.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

FILE_MODE = 0o644  # registry and exports are world-readable, like git's files
DIR_MODE = 0o755

# (operation, path, other path or None); None: nobody is watching (the normal case)
_observer: Callable[[str, Path, Path | None], None] | None = None


def observe(callback: Callable[[str, Path, Path | None], None] | None) -> None:
    """Report every durable-state operation to `callback` (None stops): create, fsync,
    fsync_dir, mkdir, rename, unlink, syncfs."""
    global _observer
    _observer = callback


def _note(op: str, path: Path, other: Path | None = None) -> None:
    if _observer is not None:
        _observer(op, Path(path), Path(other) if other is not None else None)


def tmp_name(tmp_dir: Path, stem: str = "w") -> Path:
    return tmp_dir / f"{stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}.incomplete"


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _note("fsync_dir", path)


def fsync_file(f: BinaryIO, path: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    _note("fsync", path)


def makedirs(path: Path, sync: bool = True) -> None:
    """Create `path` (and parents). With sync, each new entry is made durable at once;
    without, the caller syncs the filesystem before anything depends on it."""
    path = Path(path)
    if path.is_dir():
        return
    makedirs(path.parent, sync)
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return
    _note("mkdir", path)
    if sync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def open_tmp(tmp_dir: Path, stem: str = "w") -> Iterator[tuple[Path, BinaryIO]]:
    """A new temp file in the store's tmp/ (same filesystem as its target, so rename is atomic).

    The file is removed if the block raises; on success the caller renames it.
    """
    path = tmp_name(tmp_dir, stem)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    _note("create", path)
    os.fchmod(fd, FILE_MODE)  # umask may have narrowed it
    f = os.fdopen(fd, "wb")
    written = False
    try:
        yield path, f
        f.close()  # flushes: on a full disk this is where the write fails
        written = True
    finally:
        if not written:  # whatever stopped the block (Ctrl-C included): no temp file stays
            with contextlib.suppress(OSError):
                f.close()  # a second failed flush must not keep the file from being removed
            unlink(path, missing_ok=True)


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None,
                 before_replace: Callable[[], None] | None = None) -> None:
    """Replace `path` with `data` so that readers see the old or the new bytes, never a mix."""
    tmp_dir = tmp_dir or path.parent
    with open_tmp(tmp_dir, path.name) as (tmp, f):
        f.write(data)
        fsync_file(f, tmp)
    replaced = False
    try:
        if before_replace:
            before_replace()
        replace(tmp, path)
        replaced = True
    finally:
        if not replaced:
            unlink(tmp, missing_ok=True)
    fsync_dir(path.parent)


def replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    _note("rename", src, dst)


def publish(tmp: Path, final: Path, overwrite: bool = False) -> bool:
    """Rename a synced temp file to its final name and sync the directory.

    With overwrite=False an existing `final` wins (objects are immutable: same name, same
    bytes) and the temp file is dropped; returns whether `tmp` became `final`.
    """
    if not overwrite and final.exists():
        unlink(tmp, missing_ok=True)
        return False
    replace(tmp, final)
    fsync_dir(final.parent)
    return True


def unlink(path: Path, missing_ok: bool = False) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return
    _note("unlink", path)


def touch(path: "Path | str") -> None:
    """Refresh mtime: a dedup hit on an old object must not be collected by a gc in flight."""
    os.utime(path, None)


def start_writeback(path: Path) -> None:
    """Ask the kernel to start writing this file's dirty pages now, so the disk works while
    the next objects are copied and the batch's sync has less left to do
    (POSIX_FADV_DONTNEED starts writeback of dirty pages). It guarantees nothing:
    durability still comes from the sync. A file already gone is no error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)


_libc = None


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the filesystem holding `path` (Linux syncfs), once.

    Used to make a batch of objects durable with one call instead of one fsync each;
    where syncfs is unavailable, os.sync() gives the same guarantee for all filesystems.
    """
    global _libc
    import ctypes  # here, not at the top: only writers sync (~3 ms of every start)

    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        syncfs = _libc.syncfs
    except (OSError, AttributeError):
        os.sync()
        _note("syncfs", path)
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err) if err else "syncfs failed")
    finally:
        os.close(fd)
    _note("syncfs", path)

