"""Hub import that converts each safetensors shard while its bytes arrive.

huggingface_hub's own downloader (`file_download.http_get`: HF_ENDPOINT, HF_TOKEN, its
retries with HTTP ranges, its progress bars) writes each weight file through a
`_GrowingFile`, which appends the bytes to `<name>.part` in the store's tmp/ download
folder and wakes the converter. The converter (the caller's thread) waits for every
shard's header and the small files, runs the same checks as any import, then puts each
tensor into its object as soon as all its bytes are on disk, and feeds the file's sha256
(or git blob id) from the same bytes. Only when a file has fully arrived and matches the
size and checksum the Hub published is it renamed to its final name; until the whole
batch is verified no object is published (ObjectBatch keeps them in tmp/), so bad bytes
never reach objects/, let alone a manifest or a ref.

A `.part` left by an interrupted run is resumed: its bytes are read back from disk (hashed
and converted like fresh ones) and the download asks for the rest with a Range request.
A file the downloader rewinds (a server that ignored the Range) or that cannot be streamed
(a Xet-stored file, fetched by `hf_hub_download` instead) is converted from disk once
complete.

The download's files are scratch, like the ones huggingface_hub writes itself: plain os
calls, not fsio (nothing names them, nothing needs them to survive a crash, and the
power-loss model follows only the store's own durable operations).
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import BadSource, ChecksumMismatch, DownloadFailed, InvalidSafetensors
from ..store import failpoints, fsio
from ..store.objects import ObjectBatch, hash_tensor_range
from ..store.manifest import TensorEntry
from ..store.safetensors_io import Header, MAX_HEADER, TensorInfo, parse_header
from . import client as hub

MAX_DOWNLOADS = 8  # snapshot_download's default max_workers
HASH_STEP = 16 * 1024 * 1024  # bytes of sha256 fed per step while waiting for a tensor


class _Cancelled(BaseException):
    """Raised inside the downloader's write: the import stopped, the download must too.
    A BaseException, so that no `except Exception` on the way (hub_errors) renames it."""


class _GrowingFile:
    """The file object huggingface_hub's http_get writes into (write/tell/seek/truncate).

    `size` is how many bytes from the start are on disk; the converter reads only below it.
    Every change of `size` is announced on the condition shared by all files of an import.
    A seek below `size` or a truncate (the downloader restarting a file whose Range the
    server ignored) sets `rewound`: bytes the converter already used may change, so it
    stops streaming this file. `reading` is held by the converter while it hashes or
    copies a range, and by a rewind, so no range is ever read while it is rewritten.
    """

    def __init__(self, part: Path, expected: int, changed: threading.Condition,
                 final: Path | None = None):
        self.part = part
        self.expected = expected
        self.changed = changed
        self.reading = threading.Lock()
        self.fd, self.size = -1, 0
        if final is None:
            self.fd = os.open(part, os.O_RDWR | os.O_CREAT, fsio.FILE_MODE)
            self.size = os.fstat(self.fd).st_size
            if self.size > expected:  # not a prefix of this file: start over
                os.ftruncate(self.fd, 0)
                self.size = 0
        self.pos = self.size
        self.rewound = False
        self.cancelled = False
        self.done = final is not None
        self.error: BaseException | None = None
        self.final = final  # set when the file is whole on disk, not streamed

    # -- what http_get calls --------------------------------------------------------------
    def write(self, data) -> int:
        if self.cancelled:
            raise _Cancelled()
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, self.pos)
            self.pos += n
            view = view[n:]
        with self.changed:
            self.size = max(self.size, self.pos)
            self.changed.notify_all()
        return len(data)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        if target < self.size:
            self._rewind()
        self.pos = target
        return self.pos

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        with self.reading:
            self.rewound = True
            os.ftruncate(self.fd, size)
            with self.changed:
                self.size = size
        return size

    def flush(self) -> None:
        pass

    def _rewind(self) -> None:
        with self.reading:
            self.rewound = True

    # -- what the download thread and the converter call ------------------------------------
    def finish(self, error: BaseException | None = None) -> None:
        with self.changed:
            self.done = True
            self.error = error
            self.changed.notify_all()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Shard:
    name: str
    file: _GrowingFile
    header: Header | None = None
    infos: list[TensorInfo] = field(default_factory=list)
    next_tensor: int = 0
    digest: "hashlib._Hash | None" = None
    hashed: int = 0


class HubStream:
    """One Hub import's downloads, started on entry and stopped (cancelled, joined) on exit.

    `folder` is the tmp/ download folder (named by repo and commit, so a retry finds what
    an earlier run left); the small files land there through snapshot_download, the
    weights as `<name>.part`, renamed to `<name>` once verified."""

    def __init__(self, folder: Path, info: hub.RemoteInfo, weights: list[str],
                 others: list[str], tqdm_class: type):
        self.folder = folder
        self.info = info
        self.others = others
        self.tqdm_class = tqdm_class
        self.changed = threading.Condition()
        self.shards: list[_Shard] = []
        self._pool: ThreadPoolExecutor | None = None
        self._others: Future | None = None
        self._weights = weights

    def __enter__(self) -> "HubStream":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(min(MAX_DOWNLOADS, len(self._weights)) + 1,
                                        thread_name_prefix="mstore-download")
        self._others = self._pool.submit(self._fetch_others)
        try:
            for name in self._weights:
                self.shards.append(self._start(name))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for s in self.shards:
            s.file.cancelled = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        for s in self.shards:
            s.file.close()

    def remove(self) -> None:
        """Drop the whole download: a refused source (a retry would be refused the same),
        or one whose every object is staged. Removed before the batch's filesystem sync,
        the download's pages, still dirty, are never written to disk."""
        self.__exit__(None, None, None)
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- downloads (pool threads) -----------------------------------------------------------
    def _start(self, name: str) -> _Shard:
        path = self.folder / name
        expected = self.info.files.get(name, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():  # verified and renamed by an earlier run
            return _Shard(name, _GrowingFile(path, expected, self.changed, final=path))
        f = _GrowingFile(self.folder / f"{name}.part", expected, self.changed)
        shard = _Shard(name, f, digest=self._new_digest(name))
        assert self._pool is not None
        self._pool.submit(self._download, name, f)
        return shard

    def _download(self, name: str, f: _GrowingFile) -> None:
        from huggingface_hub import file_download, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        repo, sha = self.info.repo_id, self.info.sha
        error: BaseException | None = None
        try:
            with hub.hub_errors(repo, sha, downloading=True):
                url = hf_hub_url(repo, name, revision=sha)
                headers = build_hf_headers()
                meta = get_hf_file_metadata(url, headers=dict(headers))
                if meta.xet_file_data is not None and file_download.is_xet_available():
                    f.final = Path(file_download.hf_hub_download(
                        repo, name, revision=sha, local_dir=self.folder,
                        tqdm_class=self.tqdm_class))
                    return
                if not _same_origin(url, meta.location):  # a signed CDN url: no token there
                    headers.pop("authorization", None)
                file_download.http_get(meta.location, f, resume_size=f.size, headers=headers,
                                       expected_size=meta.size,
                                       displayed_filename=name, tqdm_class=self.tqdm_class)
        except _Cancelled:
            error = DownloadFailed(repo, "stopped")
        except BaseException as e:  # noqa: BLE001 - handed to the converter, which raises it
            error = e
        finally:
            f.finish(error)

    def _fetch_others(self) -> None:
        if self.others:
            hub.download_snapshot(self.info.repo_id, self.info.sha, self.others, self.folder,
                                  tqdm_class=self.tqdm_class)
            hub.verify_download(self.folder, self.info, self.others)

    def _new_digest(self, name: str):
        if self.info.lfs_sha256.get(name):
            return hashlib.sha256()
        if self.info.blob_ids.get(name):
            return hashlib.sha1(f"blob {self.info.files.get(name, 0)}\0".encode())
        return None

    # -- the converter (the caller's thread) --------------------------------------------------
    def headers(self) -> dict[str, Header]:
        """Every shard's header, waiting for its first bytes; the small files, waiting for
        all of them (verified). Raises what a download raised."""
        for s in self.shards:
            if s.header is None:
                s.header = self._read_header(s)
                s.infos = sorted(s.header.tensors.values(), key=lambda t: t.start)
        assert self._others is not None
        self._others.result()
        return {s.name: s.header for s in self.shards}  # type: ignore[misc]

    def _read_header(self, s: _Shard) -> Header:
        f = s.file
        if f.final is None:
            prefix = self._header_bytes(s)
            if prefix is not None:
                try:
                    return parse_header(prefix, f.expected, s.name)
                except InvalidSafetensors as e:
                    self._verify_whole(s)  # bytes damaged on the way are refused as such
                    raise BadSource(str(e)) from None
            self._wait_done(s)  # rewound: read from the whole file once it is complete
        from ..store.safetensors_io import read_header_from_file

        try:
            return read_header_from_file(f.final or f.part, where=s.name)
        except InvalidSafetensors as e:
            raise BadSource(str(e)) from None

    def _header_bytes(self, s: _Shard) -> bytes | None:
        """The file's first 8 + header-length bytes once on disk; None if it was rewound."""
        f, size = s.file, s.file.expected
        self._wait(s, 8)
        with f.reading:
            if f.rewound:
                return None
            (n,) = struct.unpack("<Q", os.pread(f.fd, 8, 0))
        self._wait(s, min(8 + n, size) if n <= MAX_HEADER else size)
        with f.reading:
            return None if f.rewound else os.pread(f.fd, min(8 + n, size), 0)

    def _wait_done(self, s: _Shard) -> None:
        f = s.file
        with self.changed:
            while not f.done:
                self.changed.wait(1.0)
        if f.error is not None:
            self._fail(s)

    def _verify_whole(self, s: _Shard) -> None:
        """Wait for the whole file and check it (ChecksumMismatch if it differs)."""
        f = s.file
        self._wait(s, f.expected)
        self._wait_done(s)
        digest = self._new_digest(s.name)
        with mmap.mmap(f.fd, f.size, access=mmap.ACCESS_READ) as mm:
            if digest is not None:
                digest.update(mm)
        self._check(s, f.size, digest.hexdigest() if digest is not None else None)

    def convert(self, batch: ObjectBatch, tensors: dict, bar, quantizer=None) -> None:
        """Every tensor of every shard into `batch`, each as soon as its bytes are on disk
        (any shard's first: downloads run side by side), then every file verified."""
        from .importer import _convert_shard  # the whole-file path, for files not streamed

        active = list(self.shards)
        while active:
            progressed = False
            for s in list(active):
                if s.file.final is not None or s.file.rewound:
                    if not s.file.done:
                        continue
                    self._convert_whole(s, batch, tensors, bar, quantizer, _convert_shard)
                    active.remove(s)
                    progressed = True
                    continue
                if self._convert_ready(s, batch, tensors, bar, quantizer):
                    progressed = True
                if s.next_tensor == len(s.infos) and s.file.done:
                    if s.file.rewound:
                        continue  # picked up as a whole file on the next pass
                    self._finish(s)
                    active.remove(s)
                    progressed = True
            if active and not progressed:
                with self.changed:
                    if not any(self._can_progress(s) for s in active):
                        self.changed.wait(1.0)
        failpoints.hit("import.downloaded")

    def _can_progress(self, s: _Shard) -> bool:
        f = s.file
        if f.done or f.final is not None or f.rewound:
            return f.done  # a file converted whole waits for its end
        return s.next_tensor < len(s.infos) and s.infos[s.next_tensor].end <= f.size

    def _convert_ready(self, s: _Shard, batch: ObjectBatch, tensors: dict, bar,
                       quantizer) -> bool:
        """The tensors of `s` whose bytes have all arrived; False if none had."""
        f = s.file
        with self.changed:
            size = f.size
        if f.error is not None and f.done:
            self._fail(s)
        ready = s.next_tensor
        while ready < len(s.infos) and s.infos[ready].end <= size:
            ready += 1
        if ready == s.next_tensor:
            self._feed_digest(s, size)  # nothing to convert yet: hash what is there
            return False
        end = s.infos[ready - 1].end
        targets = quantizer.targets if quantizer is not None else set()
        with f.reading:
            if f.rewound:
                return True
            with mmap.mmap(f.fd, end, access=mmap.ACCESS_READ) as mm:
                self._digest_range(s, mm, end)
                for info in s.infos[s.next_tensor:ready]:
                    if info.name in targets:
                        tensors.update(quantizer.put(batch, info.name, info.dtype,
                                                     info.shape, mm, info.start, info.end))
                    else:
                        oid = hash_tensor_range(info.dtype, info.shape, mm, info.start,
                                                info.end)
                        put = batch.put_tensor(oid, info.dtype, info.shape, f.fd,
                                               info.start, info.end)
                        tensors[info.name] = TensorEntry(put.oid, info.dtype,
                                                         list(info.shape))
                    bar.update(info.nbytes)
                    failpoints.hit("import.streamed-tensor")
        s.next_tensor = ready
        return True

    def _feed_digest(self, s: _Shard, size: int) -> None:
        f = s.file
        end = min(size, s.hashed + HASH_STEP)
        if s.digest is None or end <= s.hashed:
            return
        with f.reading:
            if f.rewound:
                return
            with mmap.mmap(f.fd, end, access=mmap.ACCESS_READ) as mm:
                self._digest_range(s, mm, end)

    @staticmethod
    def _digest_range(s: _Shard, mm: mmap.mmap, end: int) -> None:
        if s.digest is not None and end > s.hashed:
            s.digest.update(memoryview(mm)[s.hashed:end])
            s.hashed = end

    def _finish(self, s: _Shard) -> None:
        """The file has fully arrived: size and checksum as published, or it is deleted."""
        f = s.file
        if f.error is not None:
            self._fail(s)
        with f.reading:
            size = f.size
            if size:
                with mmap.mmap(f.fd, size, access=mmap.ACCESS_READ) as mm:
                    self._digest_range(s, mm, size)
        self._check(s, size, s.digest.hexdigest() if s.digest is not None else None)
        os.replace(f.part, self.folder / s.name)

    def _check(self, s: _Shard, size: int, digest: str | None) -> None:
        info, name = self.info, s.name
        published = info.files.get(name)
        if published and size != published:
            self._drop(s)
            raise ChecksumMismatch(info.repo_id, name, f"{size} bytes, published {published}")
        want = info.lfs_sha256.get(name) or info.blob_ids.get(name)
        if want and digest != want:
            self._drop(s)
            kind = "sha256" if info.lfs_sha256.get(name) else "git blob id"
            raise ChecksumMismatch(info.repo_id, name, f"{kind} differs")

    def _drop(self, s: _Shard) -> None:
        for path in (s.file.part, self.folder / s.name):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _fail(self, s: _Shard) -> None:
        error = s.file.error
        assert error is not None
        raise error

    def _convert_whole(self, s: _Shard, batch: ObjectBatch, tensors: dict, bar, quantizer,
                       convert_shard) -> None:
        """A file that could not be streamed: verified whole, then converted from disk."""
        f = s.file
        if f.error is not None:
            self._fail(s)
        if f.final is None:
            f.final = self.folder / s.name
            os.replace(f.part, f.final)
        for info in s.infos[:s.next_tensor]:
            tensors.pop(info.name, None)  # converted from bytes since rewritten: again
        hub.verify_download(self.folder, self.info, [s.name])
        convert_shard(batch, f.final, tensors, bar, _NoCache(), quantizer)
        s.next_tensor = len(s.infos)

    def _wait(self, s: _Shard, nbytes: int) -> None:
        """Until `nbytes` of the file are on disk; raises what its download raised, or a
        size mismatch if it ended short."""
        f = s.file
        with self.changed:
            while f.size < nbytes and not f.done:
                self.changed.wait(1.0)
            size, done = f.size, f.done
        if size >= nbytes:
            return
        if done and f.error is not None:
            self._fail(s)
        self._check(s, size, None)
        raise ChecksumMismatch(self.info.repo_id, s.name,
                               f"{size} bytes, published {self.info.files.get(s.name)}")


class _NoCache:
    """The stat cache's interface, remembering nothing: a download folder does not stay."""

    def lookup(self, path, st):
        return None

    def record(self, path, st, tensors) -> None:
        pass


def _same_origin(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.netloc) == (y.scheme, y.netloc)
