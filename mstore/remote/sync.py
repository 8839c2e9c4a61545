"""Remotes: push and pull models to and from a store somewhere else, over fsspec.

A remote has the local layout (`objects/ab/cdef...`, `registry.json`), so a remote is itself
a store: a local path or `file://` remote can be opened with `mstore --store PATH`, and an
`s3://bucket/prefix` remote holds the same keys. Remotes are configured per store in
`remotes.json` (name -> URL, nothing else: credentials come from each backend's usual place,
e.g. AWS_* variables or ~/.aws for s3fs), and what this store last saw of each remote ref is
kept in `remote-refs.json` (git's refs/remotes), the "expected" value of a push's
compare-and-swap.

What travels is what gc keeps for the ref moved (`reachability.closure`, the one rule):
the manifest chain, and the objects of the commit's own manifest, not its parents' weights.
Refs are checked before anything is transferred, so a refused push or pull writes nothing.
Invalid entries in a remote's registry.json are returned (`skipped`), never fatal, never
used as paths; a push leaves them as they are.

Order of a push, each step complete before the next: objects the remote lacks (found by
listing its fan-out folders, in parallel), then the manifest chain (parents first), then the
remote ref by compare-and-swap. A pull is the reverse: every object is re-hashed before it is
published locally (through an ObjectBatch, so nothing is visible before it is verified and
synced), then the manifests, then the local ref by the registry's compare-and-swap. Objects
are content-addressed, so an interrupted push or pull resumes by sending only what the other
side still lacks.

Compare-and-swap of the remote registry.json, per backend:
- local path / file://: the remote is a store; its own `Registry.update` (flock + re-read,
  check, atomic rewrite) is used, so local `mstore` commands on it are serialised too.
- s3://: a conditional write: the ETag is read *before* the content, and the new registry is
  put with `If-Match: <etag>` (or `If-None-Match: *` when there was none); a write that lost
  the race gets 412 and is retried from the re-read. `MSTORE_REMOTE_CAS=lock` switches to the
  lock object below (for S3-compatible servers without conditional writes).
- anything else: a lock object `registry.json.lock` created exclusively (`open(..., "xb")`),
  then re-read, check, write, delete. A lock older than MSTORE_REMOTE_LOCK_STALE seconds
  (default 600) is taken to be left by a dead pusher and broken, with a warning.

This module never imports torch or transformers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

from ..store import failpoints, fsio
from ..errors import (  # noqa: F401 - the remote errors are part of this module's API
    BadRemoteName, BadRemoteURL, DestinationNotEmpty, MStoreError, NoDefaultRemote,
    NotFastForward, ObjectCorrupt, ObjectMissing, RemoteBusy, RemoteError, RemoteExists,
    RemoteLocked, RemoteNotAStore, RemoteObjectCorrupt, RemoteObjectMissing,
    LocalRefWouldMove, RegistryCorrupt, RemoteRefInvalid, RemoteRefMissing, RemoteRefMoved,
    RemoteUnavailable, StoreNotFound, UnknownRemote,
)
from ..store.locks import StoreLock, lock_wait
from ..store.manifest import Manifest
from ..store.objects import OBJECT_MODE, hash_bytes, hash_file, is_oid
from ..store.reachability import Closure, closure, store_loader
from ..store.registry import (
    ENTRY_FIELDS, NAME_RE, VERSION, parse_registry_entries, validate_name,
)
from ..store.repo import Store

REMOTES_FILE = "remotes.json"
TRACKING_FILE = "remote-refs.json"
CONFIG_LOCK = "remotes.lock"
REMOTE_LOCK = "registry.json.lock"
DEFAULT_JOBS = 8
SMALL_OBJECT = 4 * 1024 * 1024  # fetched into memory below this size, else via a temp file
BATCH_BYTES = 1024**3  # a pull publishes its objects in batches of about this many bytes
BATCH_OBJECTS = 2000
# Protocols whose put of a whole object is atomic (an object store: the key appears complete
# or not at all), so objects are put straight to their final key.
ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "hf", "memory"}


# -- results -----------------------------------------------------------------------------
@dataclass
class TransferResult:
    remote: str
    url: str
    name: str  # the ref written (remote ref for push, local ref for pull)
    commit: str
    previous: str | None  # what the ref held before
    ref_updated: bool
    objects_sent: int = 0  # push: uploaded; pull: downloaded (received)
    bytes_sent: int = 0
    objects_present: int = 0  # already on the other side
    manifests: int = 0  # manifests in the chain transferred
    forced: bool = False
    note: str = ""
    # invalid entries of the remote's registry, reported and left alone: [{name, reason}]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CloneResult:
    dir: str
    url: str
    refs: list[TransferResult] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # invalid remote entries

    def to_json(self) -> dict[str, Any]:
        return {"dir": self.dir, "url": self.url, "refs": [r.to_json() for r in self.refs],
                "skipped": self.skipped,
                "objects_received": sum(r.objects_sent for r in self.refs),
                "bytes_received": sum(r.bytes_sent for r in self.refs)}


# -- configuration: remotes.json and remote-refs.json ------------------------------------
def validate_remote_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise BadRemoteName(name)
    return name


def _read_json(path: Path, key: str) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RemoteError(f"{path} is damaged (not valid JSON); fix or remove it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(key), dict):
        raise RemoteError(f"{path} is damaged (no {key!r} table); fix or remove it")
    return doc[key]


def _update_json(store: Store, filename: str, key: str,
                 change: Callable[[dict[str, Any]], Any]) -> Any:
    """Read-modify-write of a small store-root JSON file, atomically, under remotes.lock."""
    fsio.makedirs(store.root)
    path = store.root / filename
    with StoreLock(store.root / CONFIG_LOCK, shared=False, purpose="remote config update"):
        table = _read_json(path, key)
        result = change(table)
        doc = {"version": 1, key: dict(sorted(table.items()))}
        fsio.write_atomic(path, json.dumps(doc, indent=2).encode() + b"\n",
                          store.objects.tmp_dir if store.objects.tmp_dir.is_dir() else None)
        return result


def list_remotes(store: Store) -> dict[str, str]:
    """name -> URL, as configured."""
    return {k: v for k, v in sorted(_read_json(store.root / REMOTES_FILE, "remotes").items())}


def tracking_refs(store: Store, remote: str | None = None) -> dict[str, Any]:
    """What this store last saw of each remote's refs: {remote: {ref: commit}}, or one remote's."""
    table = _read_json(store.root / TRACKING_FILE, "remotes")
    return dict(table.get(remote, {})) if remote is not None else table


def _set_tracking(store: Store, remote: str, ref: str, commit: str | None) -> None:
    def change(table):
        refs = table.setdefault(remote, {})
        if commit is None:
            refs.pop(ref, None)
        else:
            refs[ref] = commit

    _update_json(store, TRACKING_FILE, "remotes", change)


def normalize_url(url: str) -> str:
    """A local path becomes absolute; a URL is checked: known protocol, no credentials."""
    url = url.strip()
    if not url:
        raise BadRemoteURL(url, "empty")
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    parts = urlsplit(url)
    proto = url.split("://", 1)[0].lower()
    if parts.password:
        raise BadRemoteURL(url, "credentials in the URL are never stored; configure them the "
                           "backend's usual way (e.g. AWS_* variables or ~/.aws for s3://)")
    if proto == "file":
        path = url.split("://", 1)[1]
        return "file://" + os.path.abspath(os.path.expanduser(path))
    import fsspec  # light: no backend is imported by this

    if proto not in fsspec.available_protocols():
        raise BadRemoteURL(url, f"unknown protocol {proto!r} (any fsspec URL works: a path, "
                           "file://, s3://, gs://, hf://, ...)")
    return url


def add_remote(store: Store, name: str, url: str) -> str:
    validate_remote_name(name)
    url = normalize_url(url)
    local = _local_path(url)
    if local is not None and os.path.realpath(local) == os.path.realpath(store.root):
        raise BadRemoteURL(url, "that is this store itself")
    store.init()

    def change(table):
        if name in table:
            raise RemoteExists(name, table[name])
        table[name] = url

    _update_json(store, REMOTES_FILE, "remotes", change)
    return url


def remove_remote(store: Store, name: str) -> str:
    remotes = list_remotes(store)
    if name not in remotes:
        raise UnknownRemote(name, list(remotes))

    def change(table):
        if name not in table:
            raise UnknownRemote(name, list(table))
        return table.pop(name)

    url = _update_json(store, REMOTES_FILE, "remotes", change)
    if (store.root / TRACKING_FILE).exists():
        _update_json(store, TRACKING_FILE, "remotes", lambda t: t.pop(name, None))
    return url


def resolve_remote(store: Store, name: str | None) -> tuple[str, str]:
    """(name, URL) of a configured remote; None: the only one, or the one named origin."""
    remotes = list_remotes(store)
    if name is None:
        if len(remotes) == 1:
            name = next(iter(remotes))
        elif "origin" in remotes:
            name = "origin"
        else:
            raise NoDefaultRemote(list(remotes))
    if name not in remotes:
        raise UnknownRemote(name, list(remotes))
    return name, remotes[name]


def _local_path(url: str) -> str | None:
    if "://" not in url:
        return url
    if url.lower().startswith("file://"):
        return url.split("://", 1)[1]
    return None


# -- transports --------------------------------------------------------------------------
def _jobs() -> int:
    try:
        return max(1, int(os.environ.get("MSTORE_REMOTE_JOBS", DEFAULT_JOBS)))
    except ValueError:
        return DEFAULT_JOBS


def _registry_bytes(models: dict[str, Any]) -> bytes:
    doc = {"version": VERSION, "models": dict(sorted(models.items()))}
    return json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"


def _registry_with_kept(raw: bytes | None, where: str
                        ) -> tuple[dict[str, Any], list[tuple[str, str]], dict[str, Any]]:
    """(valid, invalid, the invalid entries as they are): a push rewrites only its own entry."""
    if raw is None:
        return {}, [], {}
    valid, invalid = parse_registry_entries(raw, where)
    table = json.loads(raw.decode("utf-8"))["models"]
    return valid, invalid, {k: v for k, v in table.items() if k not in valid}


def _merged_registry(models: dict[str, Any], kept: dict[str, Any]) -> bytes:
    return _registry_bytes({**{k: v for k, v in kept.items() if k not in models}, **models})


class _NoChange(Exception):
    """Raised inside a registry update whose check found nothing to write."""


class Transport:
    """How one remote URL is read and written. `fs` and `root` are the fsspec view of it."""

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

        with ThreadPoolExecutor(min(_jobs(), len(by_fan))) as pool:
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
        try:
            self.fs.mv(tmp, final)
        except Exception:
            try:
                self.fs.rm(tmp)
            except Exception:  # noqa: BLE001 - best effort; the original error matters
                pass
            raise

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

    # registry
    def read_registry_raw(self) -> bytes | None:
        self.fs.invalidate_cache(self.registry_key)
        try:
            return self.fs.cat_file(self.registry_key)
        except FileNotFoundError:
            return None

    def read_registry_entries(self) -> tuple[dict[str, dict[str, Any]],
                                             list[tuple[str, str]]] | None:
        """(valid refs, [(name, reason)] of invalid ones); None when it has no registry.json."""
        raw = self.read_registry_raw()
        return None if raw is None else parse_registry_entries(raw, self.where)

    def read_registry(self) -> dict[str, dict[str, Any]] | None:
        """The remote's valid refs; None when it has no registry.json yet."""
        got = self.read_registry_entries()
        return None if got is None else got[0]

    @property
    def where(self) -> str:
        return self.url.rstrip("/") + "/registry.json"

    def update_registry(self, change: Callable[[dict[str, Any]], None],
                        warn: Callable[[str], None]) -> None:
        """Lock object: exclusive create, re-read, `change` (raises _NoChange to skip), write."""
        lock = f"{self.root}/{REMOTE_LOCK}"
        token = uuid.uuid4().hex
        self._acquire(lock, token, warn)
        try:
            models, _invalid, kept = _registry_with_kept(self.read_registry_raw(), self.where)
            try:
                change(models)
            except _NoChange:
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

    def _acquire(self, lock: str, token: str, warn: Callable[[str], None]) -> None:
        body = json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                           "created": time.time()}).encode()
        stale_after = float(os.environ.get("MSTORE_REMOTE_LOCK_STALE", 600))
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
                warn(f"breaking a stale lock on {self.url} ({holder}, {age / 60:.0f} min old)")
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

    def update_registry(self, change, warn) -> None:
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
            models, _invalid, kept = _registry_with_kept(raw, self.where)
            try:
                change(models)
            except _NoChange:
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

    def read_registry_raw(self) -> bytes | None:
        try:
            return self.store.registry.path.read_bytes()
        except FileNotFoundError:
            return None

    @property
    def where(self) -> str:
        return str(self.store.registry.path)

    def update_registry(self, change, warn) -> None:
        """The remote store's own registry lock, re-read, check, atomic rewrite (as
        Registry.update does), keeping the entries this mstore cannot read as they are."""
        reg = self.store.registry
        with StoreLock(reg.lock_path, shared=False, purpose="registry update"):
            models, _invalid, kept = _registry_with_kept(self.read_registry_raw(), self.where)
            try:
                change(models)
            except _NoChange:
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
    if _protocol(fs) in ("s3", "s3a") and os.environ.get("MSTORE_REMOTE_CAS", "") != "lock":
        return S3Transport(url, fs, root)
    return Transport(url, fs, root)


# -- helpers -----------------------------------------------------------------------------
def _is_ancestor(store: Store, ancestor: str, commit: str) -> bool:
    """True if `ancestor` is `commit` or on its parent chain (as far as manifests are local)."""
    return any(oid == ancestor for oid, _m in store.lineage(commit))


def _skipped(invalid: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": n, "reason": why} for n, why in invalid]


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, leave=False)


def _remote_error(url: str, e: Exception) -> MStoreError:
    if isinstance(e, MStoreError):
        return e
    detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return RemoteUnavailable(url, detail)


# -- push --------------------------------------------------------------------------------
def push(store: Store, ref: str, remote: str | None = None, *, as_name: str | None = None,
         force: bool = False, progress: bool = False,
         warn: Callable[[str], None] = lambda s: None) -> TransferResult:
    """Send `ref`'s commit to a remote and set its ref there: exactly what gc keeps for it
    (`reachability.closure`): its manifest chain, and its own manifest's objects only."""
    if not store.exists():
        raise StoreNotFound(str(store.root))
    remote_name, url = resolve_remote(store, remote)
    r = store.resolve(ref)
    name = as_name or r.name
    if name is None:
        raise RemoteError(f"{ref!r} is a commit, not a ref: name the remote ref with --as NAME")
    validate_name(name)
    transport = open_transport(url)
    with store.writer_lock("push"):
        r = store.resolve(ref)
        commit = r.commit
        head = store.read_manifest(commit)
        plan = closure({name: commit}, store_loader(store))  # parents end where none is here
        for oid in sorted(plan.objects):
            if not store.objects.exists(oid):
                raise ObjectMissing(oid, "object of the pushed commit")
        objects = sorted(plan.objects)
        manifests = plan.order  # parents first, head last
        entry = store.registry_entry(name, commit, head,
                                     (r.entry or {}).get("fine_tuned_from"))
        known = tracking_refs(store, remote_name).get(name)
        state: dict[str, Any] = {}

        def check(models):
            """The push rule, applied before anything is sent and again in the swap."""
            current = models.get(name, {}).get("commit")
            state["previous"] = current
            if current == commit and not force:
                raise _NoChange()
            moved_on = current is not None and current != known and current not in plan.manifests
            if moved_on and not force:
                raise RemoteRefMoved(name, remote_name, current, known)
            state["forced"] = moved_on

        def change(models):
            check(models)
            models[name] = {k: entry.get(k) for k in ENTRY_FIELDS}
            state["written"] = True

        try:
            with transport.session(writing=True):
                listing = transport.read_registry_entries()
                models, skipped = listing if listing is not None else ({}, [])
                try:
                    check(models)
                except _NoChange:
                    pass
                present = transport.present(objects + manifests)
                to_send = [o for o in objects if o not in present]
                sizes = {o: store.objects.size(o) for o in to_send}
                sent = _upload(store, transport, to_send, sizes, progress)
                for oid in manifests:
                    if oid not in present:
                        _upload_one(store, transport, oid)
                        sent += 1
                failpoints.hit("push.objects-sent")
                transport.update_registry(change, warn)
                failpoints.hit("push.ref-updated")
        except (MStoreError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - a backend's error, said in one line
            raise _remote_error(url, e) from e
    _set_tracking(store, remote_name, name, commit)
    bytes_sent = sum(sizes.values()) + sum(store.objects.size(o) for o in manifests
                                           if o not in present)
    return TransferResult(
        remote=remote_name, url=url, name=name, commit=commit,
        previous=state.get("previous"), ref_updated=bool(state.get("written")),
        objects_sent=sent, bytes_sent=bytes_sent if sent else 0,
        objects_present=len(set(objects + manifests) & set(present)),
        manifests=len(manifests), forced=bool(state.get("forced") and state.get("written")),
        skipped=_skipped(skipped))


def _upload_one(store: Store, transport: Transport, oid: str) -> None:
    src = store.objects.path(oid)
    got = hash_file(src)
    if got != oid:  # never spread a damaged object
        raise ObjectCorrupt(oid, f"content hashes to {got[:12]}; not pushed")
    transport.put(oid, src)


def _upload(store: Store, transport: Transport, oids: list[str], sizes: dict[str, int],
            progress: bool) -> int:
    if not oids:
        return 0
    bar = _progress(sum(sizes.values()), "push", progress)
    done = 0
    pool = ThreadPoolExecutor(min(_jobs(), len(oids)))
    try:
        futures = {pool.submit(_upload_one, store, transport, o): o for o in oids}
        for fut in as_completed(futures):
            fut.result()
            done += 1
            if bar:
                bar.update(sizes[futures[fut]])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar:
            bar.close()
    return done


# -- pull --------------------------------------------------------------------------------
def pull(store: Store, name: str, remote: str | None = None, *, as_name: str | None = None,
         force: bool = False, progress: bool = False) -> TransferResult:
    """Fetch a remote ref's commit (verified object by object) and set the local ref."""
    remote_name, url = resolve_remote(store, remote)
    return _pull_from(store, remote_name, url, name, as_name=as_name, force=force,
                      progress=progress)


def _pull_from(store: Store, remote_name: str, url: str, name: str, *,
               as_name: str | None = None, force: bool = False, progress: bool = False,
               transport: Transport | None = None) -> TransferResult:
    """Plan (read the chain, decide the local ref), then transfer, then set the ref: a pull
    that is refused has written nothing."""
    validate_name(name)
    local_name = validate_name(as_name or name)
    transport = transport or open_transport(url)
    try:
        with store.writer_lock("pull"), transport.session(writing=False):
            listing = transport.read_registry_entries()
            if listing is None:
                raise RemoteNotAStore(url, "no registry.json: nothing was pushed there yet")
            models, invalid = listing
            entry = models.get(name)
            if entry is None:
                reason = dict(invalid).get(name)
                if reason is not None:
                    raise RemoteRefInvalid(name, remote_name, reason)
                raise RemoteRefMissing(name, remote_name, sorted(models))
            commit = entry["commit"]
            plan, fetched = _plan_fetch(store, transport, remote_name, commit)
            result = TransferResult(
                remote=remote_name, url=url, name=local_name, commit=commit,
                previous=None, ref_updated=False, manifests=len(plan.order),
                skipped=_skipped(invalid))
            move = _decide_local_ref(store, local_name, name, commit, plan, remote_name,
                                     force, result)
            if move or result.note == "up to date":
                _fetch(store, transport, remote_name, plan, fetched, progress, result)
            if move:
                _set_local_ref(store, local_name, commit, entry, result)
    except (MStoreError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001
        raise _remote_error(url, e) from e
    _set_tracking(store, remote_name, name, commit)
    return result


def _decide_local_ref(store: Store, local_name: str, name: str, commit: str, plan: Closure,
                      remote_name: str, force: bool, result: TransferResult) -> bool:
    """Whether the pull sets the local ref; raises (before anything is written) if it may not.

    An existing local ref moves without --force only when it is this store's copy of the
    ref pulled: the same name, holding what this store last saw of it on that remote, and
    the remote's commit descends from it (a fast-forward). Anything else needs --force."""
    current = (store.refs().get(local_name) or {}).get("commit")
    result.previous = current
    if current is None:
        return True
    if current == commit:
        result.note = "up to date"
        return False
    fast_forward = current in plan.manifests
    if not force:
        if not fast_forward and _is_ancestor(store, commit, current):
            result.note = (f"local {local_name} is ahead of {remote_name}" if local_name == name
                           else f"local {local_name} is ahead of {remote_name}'s {name}")
            return False
        if not fast_forward:
            raise NotFastForward(local_name, current, commit, remote_name)
        tracked = tracking_refs(store, remote_name).get(name)
        if local_name != name or tracked != current:
            raise LocalRefWouldMove(local_name, current, remote_name, name, commit)
    result.forced = force and not (fast_forward and local_name == name
                                   and tracking_refs(store, remote_name).get(name) == current)
    return True


def _set_local_ref(store: Store, local_name: str, commit: str, remote_entry: dict[str, Any],
                   result: TransferResult) -> None:
    head = store.read_manifest(commit)
    parent = remote_entry.get("fine_tuned_from")
    if not (isinstance(parent, str) and NAME_RE.fullmatch(parent) and ".." not in parent):
        parent = None  # a remote's hostile parent name is not copied into this registry
    local_entry = store.registry_entry(local_name, commit, head, parent)
    store.registry.set_ref(local_entry, expected=result.previous)
    result.ref_updated = True


def _plan_fetch(store: Store, transport: Transport, remote_name: str, commit: str
                ) -> tuple[Closure, dict[str, bytes]]:
    """What gc would keep for `commit` (`reachability.closure`), read from here or the
    remote: (the closure, the verified bytes of the manifests only the remote has). The
    walk ends at a parent the remote lacks; the head itself must be there."""
    fetched: dict[str, bytes] = {}

    def load(oid: str) -> Manifest | None:
        if store.objects.exists(oid):
            return store.read_manifest(oid, light=True)
        data = transport.read_object(oid)
        if data is None:
            return None
        got = hash_bytes(data)
        if got != oid:
            raise RemoteObjectCorrupt(oid, got, remote_name)
        m = Manifest.from_bytes(data, oid, light=True)
        fetched[oid] = data
        return m

    plan = closure({commit: commit}, load)
    if commit not in plan.manifests:
        raise RemoteObjectMissing(commit, remote_name, "manifest")
    return plan, fetched


def _fetch(store: Store, transport: Transport, remote_name: str, plan: Closure,
           fetched: dict[str, bytes], progress: bool, result: TransferResult) -> None:
    """Objects the plan needs and this store lacks, verified; then the new manifests,
    parents first, each durable before the next; the head last."""
    wanted = sorted(o for o in plan.objects if not store.objects.exists(o))
    remote_has = transport.present(wanted)
    for o in wanted:
        if o not in remote_has:
            raise RemoteObjectMissing(o, remote_name)
    received, nbytes = _download(store, transport, remote_name, wanted, remote_has, progress)
    for oid in plan.order:
        data = fetched.get(oid)
        if data is None:
            continue
        res = store.objects.put_bytes(data)
        if res.oid != oid:  # cannot happen: verified above
            raise RemoteObjectCorrupt(oid, res.oid, remote_name)
        received += 1
        nbytes += len(data)
    result.objects_sent, result.bytes_sent = received, nbytes
    result.objects_present = len(plan.keep()) - len(wanted) - len(fetched)


def _download(store: Store, transport: Transport, remote_name: str, oids: list[str],
              sizes: dict[str, int], progress: bool) -> tuple[int, int]:
    """Fetch objects in parallel; publish them in synced batches, each verified first."""
    if not oids:
        return 0, 0
    tmp_dir = store.objects.tmp_dir
    bar = _progress(sum(sizes.get(o, 0) for o in oids), "pull", progress)
    received = nbytes = 0
    pool = ThreadPoolExecutor(min(_jobs(), len(oids)))
    futures = {pool.submit(transport.fetch, o, sizes.get(o), tmp_dir): o for o in oids}
    batch = store.objects.batch()
    batch.__enter__()
    in_batch = 0
    batch_bytes = 0
    try:
        for fut in as_completed(futures):
            oid = futures[fut]
            data, path, is_temp = fut.result()
            try:
                res = batch.put_bytes(data) if data is not None else batch.put_file(path)
            finally:
                if is_temp:
                    fsio.unlink(path, missing_ok=True)
            if res.oid != oid:
                raise RemoteObjectCorrupt(oid, res.oid, remote_name)
            received += 1
            nbytes += res.size
            in_batch += 1
            batch_bytes += res.size
            if bar:
                bar.update(res.size)
            if in_batch >= BATCH_OBJECTS or batch_bytes >= BATCH_BYTES:
                batch.commit()  # what arrived so far survives an interruption
                in_batch = batch_bytes = 0
        batch.commit()
    except BaseException:
        batch.abort()
        for fut in futures:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in futures:  # downloads that finished after the error: drop their temp files
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                _data, path, is_temp = fut.result()
                if is_temp:
                    fsio.unlink(path, missing_ok=True)
        raise
    finally:
        pool.shutdown(wait=True)
        if bar:
            bar.close()
    return received, nbytes


# -- clone -------------------------------------------------------------------------------
def clone(url: str, dest: Path | str, ref: str | None = None, *, progress: bool = False,
          remote_name: str = "origin") -> CloneResult:
    """A new local store at `dest` from the remote at `url` (all refs, or one), with the
    remote recorded as `origin`. Running it again on the partial result resumes it."""
    url = normalize_url(url)
    dest = Path(dest)
    store = Store(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not (store.exists() and list_remotes(store).get(remote_name) == url):
            raise DestinationNotEmpty(str(dest))
    transport = open_transport(url)
    try:
        with transport.session(writing=False):
            listing = transport.read_registry_entries()
    except (MStoreError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001
        raise _remote_error(url, e) from e
    if listing is None:
        raise RemoteNotAStore(url, "no registry.json: nothing was pushed there yet")
    models, invalid = listing
    if ref is not None:
        validate_name(ref)
        reason = dict(invalid).get(ref)
        if reason is not None:
            raise RemoteRefInvalid(ref, url, reason)
        if ref not in models:
            raise RemoteRefMissing(ref, url, sorted(models))
    names = [ref] if ref is not None else sorted(models)  # invalid entries: reported, skipped
    store.init()
    if remote_name not in list_remotes(store):
        add_remote(store, remote_name, url)
    result = CloneResult(str(dest), url, skipped=_skipped(invalid))
    for name in names:
        result.refs.append(_pull_from(store, remote_name, url, name, progress=progress,
                                      transport=transport))
    return result
