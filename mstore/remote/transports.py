"""Transports: how one remote URL is read and written, and its one compare-and-swap.

A remote has the local layout (`objects/ab/cdef...`, `registry.json`), so a path remote is
itself a store and an `s3://bucket/prefix` remote holds the same keys. A transport lists,
puts and fetches objects, reads the remote registry, and moves a ref with
`set_ref_if_equals` (dulwich's `RefsContainer.set_if_equals`): written only if the ref
still holds what the caller expected. That one method is built on each backend's atomic
read-modify-write of registry.json (`update_registry`), which rewrites only the entry it is
given and keeps the ones this mstore cannot read as they are:

- local path / file:// (LocalTransport): the remote is a store; its own registry lock
  (flock), re-read, check, atomic rewrite, so local `mstore` commands on it are serialised
  too.
- s3:// (S3Transport): a conditional write: the ETag is read *before* the content, and the
  new registry is put with `If-Match: <etag>` (or `If-None-Match: *` when there was none); a
  write that lost the race gets 412 and is retried from the re-read. `MSTORE_REMOTE_CAS=lock`
  switches to the lock object below (for S3-compatible servers without conditional writes).
- anything else (Transport): a lock object `registry.json.lock` created exclusively
  (`open(..., "xb")`), then re-read, check, write, delete. A lock older than
  MSTORE_REMOTE_LOCK_STALE seconds (default 600) is taken to be left by a dead pusher and
  broken, with a warning to the caller's reporter.

fsspec and its backends are imported only when a transport is opened.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .. import env
from ..errors import (
    MStoreError, ObjectCorrupt, RemoteBusy, RemoteError, RemoteLocked, RemoteNotAStore,
    RemoteUnavailable,
)
from ..reporting import SILENT, Reporter
from ..store import fsio
from ..store.attachments import index_bytes, parse_index
from ..store.locks import StoreLock, lock_wait
from ..store.objects import OBJECT_MODE, is_oid
from ..store.registry import VERSION, parse_registry_entries
from ..store.repo import Store

REMOTE_LOCK = "registry.json.lock"
DEFAULT_JOBS = 8
SMALL_OBJECT = 4 * 1024 * 1024  # fetched into memory below this size, else via a temp file
# Protocols whose put of a whole object is atomic (an object store: the key appears complete
# or not at all), so objects are put straight to their final key.
ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "hf", "memory"}

Models = dict[str, dict[str, Any]]
# A registry change: edits the freshly read valid refs in place; True if they are to be written.
RegistryChange = Callable[[Models], bool]


def transfer_jobs() -> int:
    """Parallel listings and transfers per remote (MSTORE_REMOTE_JOBS, default 8)."""
    return env.remote_jobs(DEFAULT_JOBS)


@contextmanager
def backend_errors(url: str) -> Iterator[None]:
    """A backend's own exception (botocore, OSError, ...) becomes one RemoteUnavailable line;
    mstore's errors and an interrupt pass as they are."""
    try:
        yield
    except (MStoreError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a backend's error, said in one line
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise RemoteUnavailable(url, detail) from e


def _registry_bytes(models: dict[str, Any]) -> bytes:
    doc = {"version": VERSION, "models": dict(sorted(models.items()))}
    return json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"


def _registry_with_kept(raw: bytes | None, where: str) -> tuple[Models, dict[str, Any]]:
    """(valid refs, the invalid entries as they are): a change rewrites only valid ones."""
    if raw is None:
        return {}, {}
    valid, _invalid = parse_registry_entries(raw, where)
    table = json.loads(raw.decode("utf-8"))["models"]
    return valid, {k: v for k, v in table.items() if k not in valid}


def _merged_registry(models: Models, kept: dict[str, Any]) -> bytes:
    return _registry_bytes({**{k: v for k, v in kept.items() if k not in models}, **models})


class Transport:
    """How one remote URL is read and written. `fs` and `root` are the fsspec view of it.

    This base class works on any fsspec backend and swaps the registry under a lock object;
    subclasses replace `update_registry` (and, for a path, the object calls) where the
    backend offers something better."""

    def __init__(self, url: str, fs, root: str):
        self.url, self.fs, self.root = url, fs, root.rstrip("/")
        self.protocol = _protocol(fs)

    # naming
    def key(self, oid: str) -> str:
        if not is_oid(oid):
            raise ObjectCorrupt(oid, "not an object id", "remote reference")
        return f"{self.root}/objects/{oid[:2]}/{oid[2:]}"

    @property
    def registry_key(self) -> str:
        return f"{self.root}/registry.json"

    @property
    def where(self) -> str:
        """The remote registry, as named in messages."""
        return self.url.rstrip("/") + "/registry.json"

    # life cycle
    @contextmanager
    def session(self, writing: bool) -> Iterator[None]:
        yield

    # objects
    def present(self, oids: Iterable[str]) -> dict[str, int]:
        """Which of `oids` the remote holds, with their sizes: one listing per fan-out folder."""
        by_fan: dict[str, set[str]] = {}
        for oid in oids:
            self.key(oid)
            by_fan.setdefault(oid[:2], set()).add(oid)
        if not by_fan:
            return {}
        self.fs.invalidate_cache()
        found: dict[str, int] = {}

        def list_fan(fan: str) -> dict[str, int]:
            try:
                entries = self.fs.ls(f"{self.root}/objects/{fan}", detail=True)
            except FileNotFoundError:
                return {}
            out = {}
            for e in entries:
                if e.get("type", "file") != "file":
                    continue
                oid = fan + e["name"].rstrip("/").rsplit("/", 1)[-1]
                if oid in by_fan[fan]:
                    out[oid] = int(e.get("size") or 0)
            return out

        with ThreadPoolExecutor(min(transfer_jobs(), len(by_fan))) as pool:
            for part in pool.map(list_fan, sorted(by_fan)):
                found.update(part)
        return found

    def put(self, oid: str, src: Path) -> None:
        """Upload one object (already verified by the caller) to its final key."""
        final = self.key(oid)
        if self.protocol in ATOMIC_PUT:
            self.fs.put_file(str(src), final)
            return
        # A filesystem-like backend: temp name, then a rename, so no partial object is seen.
        tmp = f"{self.root}/tmp/{oid[:16]}.{uuid.uuid4().hex[:12]}.incomplete"
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(src), tmp)
        moved = False
        try:
            self.fs.mv(tmp, final)
            moved = True
        finally:
            if not moved:  # best effort: the original error is the one that matters
                with contextlib.suppress(OSError):
                    self.fs.rm(tmp)

    def fetch(self, oid: str, size: int | None, tmp_dir: Path) -> tuple[bytes | None, Path | None, bool]:
        """(bytes, None, False) for small objects, else (None, path, is_temp)."""
        if size is not None and size < SMALL_OBJECT:
            return self.fs.cat_file(self.key(oid)), None, False
        dest = fsio.tmp_name(tmp_dir, "pull")
        try:
            self.fs.get_file(self.key(oid), str(dest))
        except BaseException:
            fsio.unlink(dest, missing_ok=True)
            raise
        return None, dest, True

    def read_object(self, oid: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.key(oid))
        except FileNotFoundError:
            return None

    # attachment lists (mstore/store/attachments.py): unions, never shrunk
    def attachments_key(self, commit: str) -> str:
        if not is_oid(commit):
            raise ObjectCorrupt(commit, "not an object id", "remote reference")
        return f"{self.root}/attachments/{commit}.json"

    def attachment_index(self, commit: str) -> list[str]:
        """The remote's attachment list of `commit` ([] when it has none)."""
        key = self.attachments_key(commit)
        self.fs.invalidate_cache(key)
        try:
            data = self.fs.cat_file(key)
        except FileNotFoundError:
            return []
        return parse_index(data, self.url.rstrip("/") + f"/attachments/{commit}.json")

    def merge_attachments(self, commit: str, oids: Iterable[str]) -> None:
        """Union `oids` (objects already uploaded) into the remote's list for `commit`. Two
        pushes racing on one list may lose one's additions there (never an object); the
        next push of that commit adds them again."""
        held = set(self.attachment_index(commit))
        if set(oids) <= held:
            return
        key = self.attachments_key(commit)
        data = index_bytes(held | set(oids))
        if self.protocol in ATOMIC_PUT:
            self.fs.pipe_file(key, data)
            return
        tmp = f"{self.root}/tmp/attachments.{uuid.uuid4().hex[:12]}.incomplete"
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        self.fs.makedirs(f"{self.root}/attachments", exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, key)

    # registry: reading
    def read_registry_raw(self) -> bytes | None:
        self.fs.invalidate_cache(self.registry_key)
        try:
            return self.fs.cat_file(self.registry_key)
        except FileNotFoundError:
            return None

    def read_registry_entries(self) -> tuple[Models, list[tuple[str, str]]] | None:
        """(valid refs, [(name, reason)] of invalid ones); None when it has no registry.json."""
        raw = self.read_registry_raw()
        return None if raw is None else parse_registry_entries(raw, self.where)

    def read_registry(self) -> Models | None:
        """The remote's valid refs; None when it has no registry.json yet."""
        got = self.read_registry_entries()
        return None if got is None else got[0]

    def ref(self, name: str) -> str | None:
        """The commit remote ref `name` holds now (None: absent, or not a valid entry)."""
        return ((self.read_registry() or {}).get(name) or {}).get("commit")

    # registry: the one compare-and-swap
    def set_ref_if_equals(self, name: str, expected: str | None,
                          entry: dict[str, Any] | None, reporter: Reporter = SILENT) -> bool:
        """Point remote ref `name` at `entry` (None: delete the ref) if it still holds the
        commit `expected` (None: if it is absent). False, with nothing written, when it holds
        something else: the caller re-reads and decides again."""
        swapped = False

        def change(models: Models) -> bool:
            nonlocal swapped  # per attempt: a backend may retry a write that lost a race
            swapped = (models.get(name) or {}).get("commit") == expected
            if not swapped or (entry is None and name not in models):
                return False
            if entry is None:
                del models[name]
            else:
                models[name] = entry
            return True

        self.update_registry(change, reporter)
        return swapped

    def update_registry(self, change: RegistryChange, reporter: Reporter) -> None:
        """The backend's atomic read-modify-write of registry.json; here: a lock object
        (exclusive create), re-read, `change`, write, delete the lock."""
        lock = f"{self.root}/{REMOTE_LOCK}"
        token = uuid.uuid4().hex
        self._acquire(lock, token, reporter)
        try:
            models, kept = _registry_with_kept(self.read_registry_raw(), self.where)
            if not change(models):
                return
            self._check_lock(lock, token)
            self._write_registry(_merged_registry(models, kept))
        finally:
            try:
                if self._lock_token(lock) == token:
                    self.fs.rm(lock)
            except FileNotFoundError:
                pass

    def _write_registry(self, data: bytes) -> None:
        if self.protocol in ATOMIC_PUT:
            self.fs.pipe_file(self.registry_key, data)
            return
        tmp = f"{self.root}/tmp/registry.{uuid.uuid4().hex[:12]}.incomplete"
        self.fs.makedirs(f"{self.root}/tmp", exist_ok=True)
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, self.registry_key)

    # the lock object
    def _lock_token(self, lock: str) -> str | None:
        self.fs.invalidate_cache(lock)
        try:
            return json.loads(self.fs.cat_file(lock)).get("token")
        except FileNotFoundError:
            return None
        except (ValueError, AttributeError):
            return "?"

    def _check_lock(self, lock: str, token: str) -> None:
        if self._lock_token(lock) != token:
            raise RemoteError(f"lost the lock {self.root}/{REMOTE_LOCK} on {self.url} (broken "
                              "by another pusher as stale?); nothing was written, try again")

    def _acquire(self, lock: str, token: str, reporter: Reporter) -> None:
        body = json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                           "created": time.time()}).encode()
        stale_after = env.remote_lock_stale()
        start, delay = time.monotonic(), 0.05
        while True:
            try:
                self._create_exclusive(lock, body)
                self._check_lock(lock, token)
                return
            except FileExistsError:
                pass
            holder, age = self._describe_lock(lock)
            if age is not None and age > stale_after:
                reporter.warning(f"breaking a stale lock on {self.url} ({holder}, "
                                 f"{age / 60:.0f} min old)")
                try:
                    self.fs.rm(lock)
                except FileNotFoundError:
                    pass
                continue
            waited = time.monotonic() - start
            if waited >= lock_wait():
                raise RemoteLocked(self.url, holder, waited)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    def _create_exclusive(self, path: str, data: bytes) -> None:
        if self.protocol not in ATOMIC_PUT and self.protocol not in ("file", "local"):
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return
        except FileExistsError:
            raise
        except (ValueError, NotImplementedError, TypeError):
            pass  # this backend has no exclusive create
        # Best effort where the backend cannot create exclusively: check, write, read back.
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            raise FileExistsError(path)
        self.fs.pipe_file(path, data)

    def _describe_lock(self, lock: str) -> tuple[str, float | None]:
        self.fs.invalidate_cache(lock)
        try:
            doc = json.loads(self.fs.cat_file(lock))
            holder = f"pid {doc.get('pid')} on {doc.get('host')}"
            return holder, time.time() - float(doc.get("created"))
        except FileNotFoundError:
            return "nobody (just released)", None
        except (ValueError, TypeError, AttributeError):
            return "an unreadable lock", None


class S3Transport(Transport):
    """S3 (and compatibles): the registry is replaced by a conditional put (If-Match)."""

    def update_registry(self, change: RegistryChange, reporter: Reporter) -> None:
        tries = 10
        for attempt in range(tries):
            key = self.registry_key
            self.fs.invalidate_cache(key)
            # ETag first, then the content: if it changes in between, our If-Match fails and
            # we retry; the other order could overwrite a change we never saw.
            try:
                etag = self.fs.info(key)["ETag"]
                raw = self.fs.cat_file(key)
            except FileNotFoundError:
                etag, raw = None, None
            models, kept = _registry_with_kept(raw, self.where)
            if not change(models):
                return
            data = _merged_registry(models, kept)
            try:
                if etag is None:
                    self.fs.pipe_file(key, data, mode="create")  # If-None-Match: *
                else:
                    self.fs.pipe_file(key, data, IfMatch=etag)
                self.fs.invalidate_cache(key)
                return
            except Exception as e:  # noqa: BLE001 - only a lost race is retried
                if not _precondition_failed(e):
                    raise
            time.sleep(0.05 * (attempt + 1) * (0.5 + random.random()))
        raise RemoteBusy(self.url, tries)


def _precondition_failed(e: BaseException) -> bool:
    """True for a conditional write that lost (412 PreconditionFailed, 409 conflict)."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 5:
        resp = getattr(cur, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


class LocalTransport(Transport):
    """A remote on a local (or mounted) filesystem: it is a store, and is used as one."""

    def __init__(self, url: str, fs, root: str):
        super().__init__(url, fs, root)
        self.store = Store(Path(root))

    @contextmanager
    def session(self, writing: bool) -> Iterator[None]:
        path = self.store.root
        if writing:
            if path.exists() and not path.is_dir():
                raise RemoteNotAStore(self.url, "a file")
            if path.is_dir() and any(path.iterdir()) and not self.store.exists():
                raise RemoteNotAStore(self.url, "a folder that holds other things")
            with self.store.writer_lock("push"):  # the remote's gc waits for us
                yield
        else:
            if not self.store.exists():
                raise RemoteNotAStore(self.url, "no registry.json or objects/")
            yield

    def present(self, oids: Iterable[str]) -> dict[str, int]:
        out = {}
        for oid in oids:
            try:
                out[oid] = self.store.objects.path(oid).stat().st_size
            except FileNotFoundError:
                pass
        return out

    def put(self, oid: str, src: Path) -> None:
        objects = self.store.objects
        final = objects.path(oid)
        with open(src, "rb") as s, fsio.open_tmp(objects.tmp_dir, "push") as (tmp, f):
            shutil.copyfileobj(s, f, 8 * 1024 * 1024)
            fsio.fsync_file(f, tmp)
        fsio.makedirs(final.parent)
        os.chmod(tmp, OBJECT_MODE)
        fsio.publish(tmp, final)

    def fetch(self, oid, size, tmp_dir):
        path = self.store.objects.path(oid)
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return None, path, False

    def read_object(self, oid: str) -> bytes | None:
        try:
            return self.store.objects.path(oid).read_bytes()
        except FileNotFoundError:
            return None

    def attachment_index(self, commit: str) -> list[str]:
        return self.store.attachments.index(commit)

    def merge_attachments(self, commit: str, oids: Iterable[str]) -> None:
        self.store.attachments.merge(commit, oids)

    def read_registry_raw(self) -> bytes | None:
        try:
            return self.store.registry.path.read_bytes()
        except FileNotFoundError:
            return None

    @property
    def where(self) -> str:
        return str(self.store.registry.path)

    def update_registry(self, change: RegistryChange, reporter: Reporter) -> None:
        """The remote store's own registry lock, re-read, `change`, atomic rewrite (as
        Registry.update does)."""
        reg = self.store.registry
        with StoreLock(reg.lock_path, shared=False, purpose="registry update"):
            models, kept = _registry_with_kept(self.read_registry_raw(), self.where)
            if not change(models):
                return
            fsio.write_atomic(reg.path, _merged_registry(models, kept),
                              reg.tmp_dir if reg.tmp_dir.is_dir() else None)


def _protocol(fs) -> str:
    proto = fs.protocol
    return (proto[0] if isinstance(proto, (tuple, list)) else proto).lower()


def open_transport(url: str) -> Transport:
    """The transport for a remote URL (a path, file://, s3://, gs://, hf://, ...)."""
    try:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        fs, root = fsspec.core.url_to_fs(url)
    except ImportError as e:
        proto = url.split("://", 1)[0] if "://" in url else "file"
        hint = " (pip install 'mstore[s3]')" if proto in ("s3", "s3a") else ""
        raise RemoteUnavailable(url, f"{e}{hint}") from None
    except (ValueError, OSError) as e:
        raise RemoteUnavailable(url, str(e)) from None
    if isinstance(fs, LocalFileSystem):
        return LocalTransport(url, fs, root)
    if _protocol(fs) in ("s3", "s3a") and env.remote_cas() != "lock":
        return S3Transport(url, fs, root)
    return Transport(url, fs, root)
