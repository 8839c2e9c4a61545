"""The content-addressed object store: `objects/ab/cdef...`, named by blake3 of the bytes.

Three kinds of object share one namespace: single-tensor safetensors files, raw files
(config.json, tokenizer.json, ...) and manifests (canonical JSON). The store does not care
which is which; manifests say what their objects are.

Writes hash first and skip the write on a hit (refreshing the mtime, so a gc running
beside us keeps it), so re-importing identical content costs a read, not a copy.
Bulk writes go through an `ObjectBatch`: objects are written unsynced into tmp/, made
durable with one filesystem sync, and only then renamed into objects/; a second sync makes
the renames durable before the caller writes the manifest that names them.

A tensor object is stored in one of two encodings under the same id: loose (the
safetensors bytes, `objects/ab/cdef...`) or packed (`objects/ab/cdef....pack`, see
`packcodec`: XOR against a base object, byte-grouped, zstd). ObjectStore is the only place
that knows which: `exists`, `size`, `read_bytes`, `tensor_header`, `verify` and
`tensor_bytes` answer for the object whatever its encoding, and every reconstruction is
re-hashed against the id. While both files exist (a pack or unpack in flight, or one a crash
cut short) readers take the loose one; either is complete.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, NamedTuple

import blake3

from . import failpoints, fsio
from ..errors import BadObjectId, InvalidSafetensors, ObjectCorrupt, ObjectMissing
from .safetensors_io import Header, header_length, object_header, parse_header

if TYPE_CHECKING:  # concurrent.futures pulls in logging: loaded only by a batch that copies
    from concurrent.futures import Future, ThreadPoolExecutor

OID_RE = re.compile(r"[0-9a-f]{64}")
OBJECT_MODE = 0o444  # immutable once written
CHUNK = 8 * 1024 * 1024
WRITEBACK_MIN = 1024 * 1024  # a smaller new tensor object is written back by the batch's sync
PACK_SUFFIX = ".pack"  # = packcodec.SUFFIX (not imported here: it pulls in numpy)
MAX_CHAIN = 64  # a longer chain of bases than any pack writes is a damaged (cyclic) one


def is_oid(text: str) -> bool:
    return bool(OID_RE.fullmatch(text))


ALL_CORES = blake3.blake3.AUTO


def hasher(threads: int = ALL_CORES):
    return blake3.blake3(max_threads=threads)


def hash_bytes(data) -> str:
    return hasher().update(data).hexdigest()


def tensor_oid(dtype: str, shape, data, threads: int = ALL_CORES) -> str:
    """The id the tensor object for these bytes has (header + data), without writing it."""
    view = memoryview(data).cast("B")
    h = hasher(threads).update(object_header(dtype, shape, view.nbytes))
    return h.update(view).hexdigest()


def hash_file(path: Path, threads: int = ALL_CORES) -> str:
    """blake3 of a file, streamed through mmap (never the whole file in memory at once).
    `threads=1` for a caller that hashes several files at once, one per core."""
    h = hasher(threads)
    if os.path.getsize(path):
        h.update_mmap(str(path))
    return h.hexdigest()


class PutResult(NamedTuple):
    """What a put did: the object's id and size, and whether it was new."""

    oid: str
    size: int
    new: bool  # False: the object was already present (dedup hit)


class _Pending(NamedTuple):
    """A batch's object written to tmp/, waiting for the sync that publishes it."""

    tmp: Path
    final: Path
    size: int


class Stored(NamedTuple):
    """One object as it lies on disk: the stat of each encoding present (at least one)."""
    oid: str
    loose: os.stat_result | None
    packed: os.stat_result | None

    @property
    def stat(self) -> os.stat_result:
        return self.loose or self.packed  # type: ignore[return-value]

    @property
    def disk_bytes(self) -> int:
        return sum(st.st_size for st in (self.loose, self.packed) if st is not None)


class ObjectStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self._objects_str = str(self.objects_dir)

    # -- naming -------------------------------------------------------------------------
    def path(self, oid: str) -> Path:
        """The one id-to-path function; it refuses anything but 64 lowercase hex."""
        if not is_oid(oid):
            raise BadObjectId(oid)
        return self.objects_dir / oid[:2] / oid[2:]

    def path_str(self, oid: str) -> str:
        """`path` as a plain string, for hot loops (loading hundreds of tensors)."""
        if not is_oid(oid):
            raise BadObjectId(oid)
        return f"{self._objects_str}/{oid[:2]}/{oid[2:]}"

    def pack_path(self, oid: str) -> Path:
        """Where the packed encoding of `oid` lives: a name no loose object can have."""
        return self.path(oid).with_name(oid[2:] + PACK_SUFFIX)

    def exists(self, oid: str) -> bool:
        return self.path(oid).is_file() or self.pack_path(oid).is_file()

    def is_packed(self, oid: str) -> bool:
        """Stored packed only (no loose copy beside it)."""
        return not self.path(oid).is_file() and self.pack_path(oid).is_file()

    def size(self, oid: str) -> int:
        """The object's size (its loose bytes), whatever its encoding on disk."""
        try:
            return self.path(oid).stat().st_size
        except FileNotFoundError:
            pass
        try:
            h = self.pack_header(oid)
        except ObjectMissing:
            raise ObjectMissing(oid) from None
        return len(h.loose_header) + h.nbytes

    def stored_size(self, oid: str) -> int:
        """Bytes of the file a transfer moves for `oid` (`stored_file`)."""
        path, _packed = self.stored_file(oid)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise ObjectMissing(oid) from None

    def stored_file(self, oid: str) -> tuple[Path, bool]:
        """(file, packed?): the packed file if there is one (it is the smaller: pack keeps
        nothing packed that is not), else the loose one; what push and pull move as it is. The receiver verifies it (`ObjectBatch.put_stored`) before it is visible."""
        packed = self.pack_path(oid)
        if packed.is_file():
            return packed, True
        loose = self.path(oid)
        if loose.is_file():
            return loose, False
        raise ObjectMissing(oid)

    def files_of(self, oid: str) -> list[Path]:
        """Every file `oid` has on disk (loose first), for moving a damaged one aside."""
        return [p for p in (self.path(oid), self.pack_path(oid)) if p.is_file()]

    def iter_stored(self) -> Iterator[Stored]:
        """Every object on disk, once, with its encodings (one scandir per fan-out folder)."""
        if not self.objects_dir.is_dir():
            return
        for fan in os.scandir(self.objects_dir):
            if not (fan.is_dir() and len(fan.name) == 2):
                continue
            found: dict[str, list] = {}
            for entry in os.scandir(fan.path):
                name, packed = entry.name, entry.name.endswith(PACK_SUFFIX)
                oid = fan.name + (name[:-len(PACK_SUFFIX)] if packed else name)
                if is_oid(oid) and entry.is_file(follow_symlinks=False):
                    found.setdefault(oid, [None, None])[packed] = entry.stat(follow_symlinks=False)
            for oid, (loose, packed) in found.items():
                yield Stored(oid, loose, packed)

    def packed_ids(self) -> set[str]:
        """The ids that have a packed file, from one listing of names (no stat): what a walk
        over every kept object asks before it reads a packed header (gc at 200,000 objects
        spent 7 s building a path and a stat for each)."""
        out: set[str] = set()
        if not self.objects_dir.is_dir():
            return out
        with os.scandir(self.objects_dir) as fans:
            for fan in fans:
                if len(fan.name) != 2 or not fan.is_dir():
                    continue
                with os.scandir(fan.path) as entries:
                    out.update(oid for oid in (fan.name + e.name[:-len(PACK_SUFFIX)]
                                               for e in entries if e.name.endswith(PACK_SUFFIX))
                               if is_oid(oid))
        return out

    def iter_objects(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every object on disk with the stat of its file (the loose one when both are)."""
        for s in self.iter_stored():
            yield s.oid, s.stat

    def holds_any(self) -> bool:
        """At least one object is on disk (stops at the first: cheap on any store)."""
        try:
            fans = os.scandir(self.objects_dir)
        except (FileNotFoundError, NotADirectoryError):
            return False
        with fans:
            for fan in fans:
                if fan.is_dir() and len(fan.name) == 2:
                    with os.scandir(fan.path) as entries:
                        if any(is_oid(fan.name + e.name) and e.is_file(follow_symlinks=False)
                               for e in entries):
                            return True
        return False

    # -- reading ------------------------------------------------------------------------
    def read_bytes(self, oid: str, verify: bool = True) -> bytes:
        """The object's bytes; a packed one is reconstructed (and always re-hashed)."""
        try:
            data = self.path(oid).read_bytes()
        except FileNotFoundError:
            if self.pack_path(oid).is_file():
                return self.tensor_bytes(oid).tobytes()
            try:  # an unpack may have just replaced the packed file by the loose one
                data = self.path(oid).read_bytes()
            except FileNotFoundError:
                raise ObjectMissing(oid) from None
        if verify and hash_bytes(data) != oid:
            raise ObjectCorrupt(oid, "content does not match its name")
        return data

    def verify(self, oid: str, threads: int = ALL_CORES) -> str | None:
        """Re-hash one object (each encoding present); returns a problem or None.
        `threads`: for the loose encoding's hash (see hash_file)."""
        problem = None
        try:
            got = hash_file(self.path(oid), threads)
            if got != oid:
                return f"content hashes to {got[:12]}"
        except FileNotFoundError:
            problem = "missing"
        if self.pack_path(oid).is_file():
            from . import packed  # numpy: only a store that holds packed objects needs it

            return packed.verify_packed(self, oid)
        return problem

    def tensor_bytes(self, oid: str):
        """The tensor object's bytes as a writable numpy uint8 array: a loose object read
        whole, a packed one reconstructed on the pack thread pool. Packed reconstructions
        are always re-hashed (an ObjectCorrupt names a mismatch)."""
        from . import packed

        return packed.object_bytes(self, oid)

    def verify_stored_pack(self, oid: str, path: Path) -> str | None:
        """Check a packed file received for `oid` (not yet published) against this store:
        rebuilt with its base from here and re-hashed; a problem or None."""
        from . import packed

        return packed.verify_packed_bytes(self, oid, Path(path).read_bytes())

    def pack_header(self, oid: str):
        """The header of the packed encoding of `oid` (ObjectMissing if it has none)."""
        from . import packed

        return packed.read_header(self, oid)

    def delta_base(self, oid: str) -> str | None:
        """The object a packed `oid` is XOR-ed against (None: loose, or packed alone)."""
        if not os.path.isfile(self.path_str(oid) + PACK_SUFFIX):
            return None
        try:
            return self.pack_header(oid).base
        except ObjectMissing:  # unpacked meanwhile
            return None

    def tensor_header(self, oid: str) -> Header:
        """Header of a tensor object, checked against the file size (catches truncation)."""
        path = self.path(oid)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = header_length(f.read(8), size, oid)
                header = parse_header(struct.pack("<Q", n) + f.read(n), size, oid)
        except FileNotFoundError:
            if self.pack_path(oid).is_file():
                from . import packed

                return packed.tensor_header(self, oid)
            raise ObjectMissing(oid, "tensor object") from None
        except InvalidSafetensors as e:
            raise ObjectCorrupt(oid, f"truncated or damaged ({e.reason})", "tensor object") \
                from None
        if len(header.tensors) != 1:
            raise ObjectCorrupt(oid, f"holds {len(header.tensors)} tensors, not 1", "tensor object")
        (info,) = header.tensors.values()
        if info.end != size:
            raise ObjectCorrupt(oid, f"size {size} != {info.end} (truncated?)", "tensor object")
        return header

    # -- writing ------------------------------------------------------------------------
    def ensure_dirs(self) -> None:
        fsio.makedirs(self.objects_dir)
        fsio.makedirs(self.tmp_dir)

    def _hit(self, oid: str) -> bool:
        """True if the object is present (either encoding); refreshes its mtime for gc's
        grace period."""
        loose = self.path_str(oid)  # strings: a re-import touches every tensor's object
        for path in (loose, loose + PACK_SUFFIX):
            try:
                fsio.touch(path)
                return True
            except FileNotFoundError:
                pass
        return False

    def remove(self, oid: str) -> None:
        """Delete every encoding of `oid` (gc)."""
        fsio.unlink(self.path(oid), missing_ok=True)
        fsio.unlink(self.pack_path(oid), missing_ok=True)

    def write_data(self, oid: str, out_fd: int) -> None:
        """Append the tensor's data (no header) to `out_fd`: copied in the kernel from a
        loose object, written from the reconstruction of a packed one."""
        try:
            header = self.tensor_header(oid)
            (info,) = header.tensors.values()
            with open(self.path(oid), "rb") as src:
                copy_range(src.fileno(), out_fd, info.start, info.nbytes)
                return
        except FileNotFoundError:
            pass
        data = self.tensor_bytes(oid)
        (info,) = self.tensor_header(oid).tensors.values()
        view = memoryview(data)[info.start:info.end]
        while view:
            view = view[os.write(out_fd, view):]

    def link_or_copy(self, oid: str, dest: Path) -> None:
        """`dest` shows the object's bytes: a symlink to a loose object, else a copy."""
        try:
            os.symlink(self.path(oid).resolve(strict=True), dest)
        except FileNotFoundError:
            dest.write_bytes(self.read_bytes(oid))

    def put_bytes(self, data: bytes) -> PutResult:
        """Write one small object durably right away (manifests, single files)."""
        oid = hash_bytes(data)
        if self._hit(oid):
            return PutResult(oid, len(data), False)
        self.ensure_dirs()
        with fsio.open_tmp(self.tmp_dir, "obj") as (tmp, f):
            f.write(data)
            fsio.fsync_file(f, tmp)
        self._publish(tmp, oid)
        failpoints.hit("object.written")
        return PutResult(oid, len(data), True)

    def _publish(self, tmp: Path, oid: str, sync: bool = True, final: Path | None = None) -> None:
        """Rename a written temp file to its object path (`final`: another encoding's). With
        sync, the new entry (and a new fan-out folder) is durable on return; without, the
        caller syncs the filesystem."""
        final = final or self.path(oid)
        fsio.makedirs(final.parent, sync=sync)
        os.chmod(tmp, OBJECT_MODE)
        if sync:
            fsio.publish(tmp, final)
        elif final.exists():
            fsio.unlink(tmp, missing_ok=True)
        else:
            fsio.replace(tmp, final)

    def batch(self) -> "ObjectBatch":
        return ObjectBatch(self)


class ObjectBatch:
    """Many objects made durable together: write all, sync once, rename all, sync once.

    Use as a context manager; objects become visible only at `commit()` (called on a clean
    exit). On an exception every temp file is removed and nothing is published.
    """

    def __init__(self, store: ObjectStore):
        self.store = store
        self.pending: dict[str, _Pending] = {}
        self.written = 0  # bytes newly written
        self.reused = 0  # bytes already present
        self._writeback: ThreadPoolExecutor | None = None

    def __enter__(self) -> "ObjectBatch":
        self.store.ensure_dirs()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _record(self, oid: str, size: int) -> PutResult | None:
        if oid in self.pending:
            self.reused += size
            return PutResult(oid, size, False)
        if self.store._hit(oid):
            self.reused += size
            return PutResult(oid, size, False)
        return None

    def put_bytes(self, data: bytes) -> PutResult:
        oid = hash_bytes(data)
        hit = self._record(oid, len(data))
        if hit:
            return hit
        with fsio.open_tmp(self.store.tmp_dir, "obj") as (tmp, f):
            f.write(data)
        return self._stage(oid, tmp, len(data))

    def put_file(self, path: Path) -> PutResult:
        """A file object, hashed through mmap and copied by the kernel."""
        oid, size = hash_file(path), os.path.getsize(path)
        hit = self._record(oid, size)
        if hit:
            return hit
        with open(path, "rb") as src, fsio.open_tmp(self.store.tmp_dir, "obj") as (tmp, f):
            copy_range(src.fileno(), f.fileno(), 0, size)
        return self._stage(oid, tmp, size)

    def put_tensor(self, oid: "str | Future[str]", dtype: str, shape, src_fd: int,
                   start: int, end: int) -> PutResult:
        """A tensor object from bytes [start, end) of an open safetensors file, whose id the
        caller computes with `hash_tensor_range` (so hashing runs ahead of copying, on
        another thread). The copy goes file-to-file through copy_file_range: the bytes
        never pass through Python, and their writeback starts once the object is known new.

        `oid` may be the Future of an id still being hashed: rather than wait, the copy
        starts at once (a temp file needs no name), and is dropped if the id turns out to be
        an object already present. A known id never copies a duplicate.
        """
        header = object_header(dtype, shape, end - start)
        size = len(header) + end - start
        if not isinstance(oid, str) and oid.done():
            oid = oid.result()
        if isinstance(oid, str):
            hit = self._record(oid, size)
            if hit:
                return hit
        with fsio.open_tmp(self.store.tmp_dir, "obj") as (tmp, f):
            f.write(header)
            f.flush()
            copy_range(src_fd, f.fileno(), start, end - start)
        if not isinstance(oid, str):
            named: str | None = None
            try:
                named = oid.result()
            finally:
                if named is None:  # the hash failed (or was cancelled): drop the copy
                    fsio.unlink(tmp, missing_ok=True)
            oid = named
            hit = self._record(oid, size)
            if hit:
                fsio.unlink(tmp, missing_ok=True)
                return hit
        if size >= WRITEBACK_MIN:
            self._start_writeback(tmp)
        return self._stage(oid, tmp, size)

    def _start_writeback(self, path: Path) -> None:
        """Start the object's writeback on a helper thread: submitting it can block on a
        busy disk, and the next copy should not wait for that. A small object is left to
        the batch's sync, which writes it as soon: its own thread would cost more."""
        if self._writeback is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writeback = ThreadPoolExecutor(1, thread_name_prefix="mstore-writeback")
        self._writeback.submit(fsio.start_writeback, path)

    def _join_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.shutdown(wait=True)
            self._writeback = None

    def reuse(self, oid: str, size: int) -> bool:
        """Count a known object as present (refreshing its mtime); False if it is gone."""
        return self._record(oid, size) is not None

    def put_tensor_bytes(self, dtype: str, shape, data) -> PutResult:
        """A tensor object from an in-memory buffer (training results, tests)."""
        buf = memoryview(data).cast("B")
        oid = tensor_oid(dtype, shape, buf)
        header = object_header(dtype, shape, buf.nbytes)
        size = len(header) + buf.nbytes
        hit = self._record(oid, size)
        if hit:
            return hit
        with fsio.open_tmp(self.store.tmp_dir, "obj") as (tmp, f):
            f.write(header)
            f.write(buf)
        return self._stage(oid, tmp, size)

    def put_encoding(self, oid: str, data, packed: bool) -> None:
        """Stage one encoding of an object already known (pack and unpack): no dedup check,
        since the object exists in its other encoding; the caller verified `data`."""
        with fsio.open_tmp(self.store.tmp_dir, "pack" if packed else "obj") as (tmp, f):
            f.write(data)
        self._stage(oid, tmp, len(data), packed)

    def put_stored(self, oid: str, path: Path | None, data: bytes | None,
                   packed: bool) -> PutResult:
        """An object received as it was stored elsewhere (a pull): re-hashed (a packed one
        reconstructed against its base, which must be here already) before it is staged."""
        from . import packed as packed_mod

        if packed:
            blob = data if data is not None else Path(path).read_bytes()  # type: ignore[arg-type]
            problem = packed_mod.verify_packed_bytes(self.store, oid, blob)
            if problem:
                raise ObjectCorrupt(oid, problem, "received packed object")
            hit = self._record(oid, len(blob))
            if hit:
                return hit
            with fsio.open_tmp(self.store.tmp_dir, "pack") as (tmp, f):
                f.write(blob)
            return self._stage(oid, tmp, len(blob), True)
        res = self.put_bytes(data) if data is not None else self.put_file(Path(path))  # type: ignore[arg-type]
        if res.oid != oid:
            raise ObjectCorrupt(oid, f"its bytes hash to {res.oid[:12]}", "received object")
        return res

    def _stage(self, oid: str, tmp: Path, size: int, packed: bool = False) -> PutResult:
        final = self.store.pack_path(oid) if packed else self.store.path(oid)
        self.pending[oid] = _Pending(tmp, final, size)
        self.written += size
        failpoints.hit("objects.staged")
        return PutResult(oid, size, True)

    def commit(self) -> None:
        self._join_writeback()
        if not self.pending:
            return
        fsio.sync_filesystem(self.store.tmp_dir)  # object bytes durable before any rename
        failpoints.hit("objects.synced")
        for oid, p in self.pending.items():
            self.store._publish(p.tmp, oid, sync=False, final=p.final)
            failpoints.hit("objects.published")
        fsio.sync_filesystem(self.store.objects_dir)  # renames durable before the manifest
        failpoints.hit("objects.durable")
        self.pending.clear()

    def abort(self) -> None:
        self._join_writeback()
        for p in self.pending.values():
            fsio.unlink(p.tmp, missing_ok=True)
        self.pending.clear()


def hash_tensor_range(dtype: str, shape, src_map: mmap.mmap, start: int, end: int) -> str:
    """`tensor_oid` of bytes [start, end) of a mapped file; the hashed pages then leave this
    process's resident set (they stay in the page cache), so an import's peak RSS does not
    grow with the shard. One thread: an import hashes beside its copy, which has the other
    core (1 GB import 1.16 -> 1.07 s against all cores)."""
    oid = tensor_oid(dtype, shape, memoryview(src_map)[start:end], 1)
    lo = start - start % mmap.PAGESIZE
    if end > lo:
        src_map.madvise(mmap.MADV_DONTNEED, lo, end - lo)
    return oid


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy `count` bytes at `offset` of src to the current end of dst, in the kernel."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < count:
        n = min(CHUNK * 16, count - done)
        copied = 0
        if use_cfr:
            try:
                copied = os.copy_file_range(src_fd, dst_fd, n, offset + done)
            except OSError:
                use_cfr = False
        if not use_cfr:
            copied = os.write(dst_fd, os.pread(src_fd, min(n, CHUNK), offset + done))
        if copied == 0:
            raise OSError(f"source ended {count - done} bytes early")
        done += copied

