"""A Hugging Face Hub look-alike on 127.0.0.1 for tests that import through the real client.

The server speaks the subset of the Hub's HTTP API that huggingface_hub 2.x uses to read
model repos (checked against huggingface_hub 2.4's file_download.py, _snapshot_download.py,
hf_api.py and utils/_http.py):

    GET  /api/models/{repo}                        model_info / repo_info at the default branch
    GET  /api/models/{repo}/revision/{rev}         ... at a branch or commit; ?blobs=true adds
                                                   size, blobId and lfs to each sibling
    GET  /api/models/{repo}/tree/{rev}[/{path}]    list_repo_tree (?recursive=true)
    POST /api/models/{repo}/paths-info/{rev}       get_paths_info (form field "paths")
    GET  /api/models/{repo}/refs                   list_repo_refs
    GET  /api/models/{repo}/commits/{rev}          list_repo_commits
    GET  /api/models/{repo}/auth-check             auth_check (GatedRepo errors as for downloads)
    GET  /api/whoami-v2                            whoami (200 with a known token, else 401)
    HEAD/GET /{repo}/resolve/{rev}/{path}          file metadata / download (Range -> 206)
    HEAD/GET /cdn/{etag}/{repo}/{path}             "CDN" target of the redirect fault

Errors carry the ``X-Error-Code`` header the client maps to exceptions: RepoNotFound (404,
RepositoryNotFoundError), RevisionNotFound (404), EntryNotFound (404), GatedRepo (401
without a token, 403 with a token the server does not know: GatedRepoError). The server
never answers 5xx (the client retries those for ~23 s); a bug in the server is answered
400 "test hub server error" and recorded in ``server.errors``.

Using it from pytest
--------------------
huggingface_hub reads ``HF_ENDPOINT`` (and ``HF_HOME``, ``HF_HUB_OFFLINE``, ...) once, when
it is imported, and transformers imports huggingface_hub. The endpoint must therefore be
known before anything imports either, but the port is only known once the server is bound.
So the top of ``tests/conftest.py``, before any other import that could pull in
huggingface_hub or transformers, should be::

    from tests.hub_server import reserve_server, start_hub_server
    HUB = reserve_server()      # binds + starts now; sets HF_ENDPOINT=HUB.url,
                                # HF_HUB_DISABLE_TELEMETRY=1, HF_HUB_DISABLE_XET=1,
                                # HF_HUB_DISABLE_PROGRESS_BARS=1,
                                # HF_HUB_DISABLE_SYMLINKS_WARNING=1, HF_HOME=<fresh tmp dir>,
                                # and removes HF_TOKEN / HF_HUB_OFFLINE from os.environ

    import pytest

    @pytest.fixture(scope="session")
    def hub_server():
        return start_hub_server()   # the server reserved above

    @pytest.fixture(autouse=True)
    def _clean_hub(hub_server):
        yield
        hub_server.reset()          # faults off, request log cleared (repos kept)

Subprocesses (the CLI under test) get the same settings from ``hub_env(server, hf_home)``.
``tests.tiny_models`` imports transformers lazily, so importing it is safe at any point.

Faults (``server.faults``, all off by default; keys are a path in the repo, e.g.
"model.safetensors", which matches that file in every repo, or "org/name/model.safetensors"
for one repo only):

    faults.drop_after_bytes[path] = N   the next GET of the file's body (resolve or CDN) sends
                                        the full headers, N body bytes, then closes the
                                        connection (the client sees httpx RemoteProtocolError).
                                        Consumed once; faults.drop(path, N, times=k) cuts the
                                        next k GETs. N=0 with k >= 6 makes the file
                                        undownloadable (the client gives up after ~5 s).
    faults.corrupt_file.add(path)       the body has its last byte flipped (same length, same
                                        advertised sha256/ETag): the client does NOT notice.
    faults.missing_file.add(path)       HEAD/GET of the file answer 404 EntryNotFound although
                                        model_info and the tree still list it (a file that
                                        vanishes mid-snapshot).
    faults.redirect[path] = None        HEAD/GET of the file answer 302 to the server's second
                                        listener (``server.cdn_url``, another origin, like the
                                        Hub's LFS redirects), with X-Linked-Etag/X-Linked-Size on
                                        the 302. The client drops the Authorization header there.
    faults.redirect[path] = "http://h:p" 302 to that origin instead (e.g. ``refused_endpoint()``).
    faults.delay[path] = seconds        every GET of the file's body waits this long before the
                                        body is sent (a slow download, to overlap two imports).
    faults.ignore_range.add(path)       GETs of the file ignore Range and answer 200 with the
                                        whole body (as some CDNs do): the client must restart
                                        the file from its first byte.

What huggingface_hub 2.4 does with a cut download: within the same hf_hub_download call it
sleeps 1 s and re-requests with "Range: bytes=K-", where K is what it has written to its temp
file. It writes in DOWNLOAD_CHUNK_SIZE pieces (10 MiB; huggingface_hub.constants, read at
call time), so K is a multiple of 10 MiB: a cut in a smaller file restarts from 0 without
Range. It retries up to 5 times in a row without progress. Across calls or processes nothing
is resumed: each download writes a fresh "<etag>.<uuid>.incomplete" file and deletes it on
failure, so a pre-created partial ".incomplete" file is ignored.

Request log: ``server.requests`` is a list of ``LoggedRequest(method, path, range)`` (path
as sent, query string included; range is the Range header or None), appended when the
request arrives; each also has ``.status`` (None until answered), ``.authorization`` (the
Authorization header or None) and ``.listener`` ("hub" or "cdn").
"""

from __future__ import annotations

import atexit
import hashlib
import http.server
import json
import mimetypes
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import namedtuple
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

__all__ = [
    "HubServer",
    "HubFile",
    "Faults",
    "LoggedRequest",
    "hub_env",
    "reserve_server",
    "start_hub_server",
    "refused_endpoint",
    "clean_environ",
    "LFS_SUFFIXES",
]

# Files stored as LFS objects (sha256 oid, ``lfs`` entry), as the Hub's default
# .gitattributes does; everything else is a plain git blob.
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
    ".npy", ".npz", ".tar", ".gz", ".zip",
)
LFS_MIN_SIZE = 10 * 1024 * 1024  # any file at least this big is LFS too

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
_CHUNK = 64 * 1024


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class HubFile:
    """One file of a commit. ``blob_id`` is the git oid of what git stores (the pointer file
    for LFS files); ``sha256`` is the LFS oid, None for plain blobs."""

    path: str
    data: bytes = field(repr=False)
    blob_id: str
    sha256: str | None = None
    pointer_size: int | None = None

    @classmethod
    def make(cls, path: str, data: bytes) -> HubFile:
        if path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE:
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = (
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
            ).encode()
            return cls(path, data, _git_blob_sha1(pointer), sha256, len(pointer))
        return cls(path, data, _git_blob_sha1(data))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        """What the resolve endpoint sends as ETag, and the blob's name in the HF cache."""
        return self.sha256 or self.blob_id

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.is_lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return entry

    def sibling(self, blobs: bool) -> dict:
        sib = {"rfilename": self.path}
        if blobs:
            sib["size"] = self.size
            sib["blobId"] = self.blob_id
            if self.is_lfs:
                sib["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return sib


@dataclass
class HubCommit:
    sha: str
    files: dict[str, HubFile]
    parent: str | None
    date: str
    title: str


@dataclass
class HubRepo:
    repo_id: str
    commits: dict[str, HubCommit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    license: str | None = None
    gated: str | bool = False  # False, "manual" or "auto"
    card_data: dict | None = None
    created_at: str = _iso(_EPOCH)

    def resolve(self, revision: str) -> HubCommit | None:
        sha = self.refs.get(revision)
        if sha is None and _SHA1_RE.match(revision):
            sha = revision
        return self.commits.get(sha) if sha else None


_LoggedRequestBase = namedtuple("_LoggedRequestBase", "method path range")


class LoggedRequest(_LoggedRequestBase):
    """(method, path, range) of one request; also .status, .authorization, .listener."""

    status: int | None
    authorization: str | None
    listener: str


class Faults:
    """Fault injection switches; see the module docstring. All empty (off) by default."""

    def __init__(self) -> None:
        self.drop_after_bytes: dict[str, int] = {}
        self.drop_times: dict[str, int] = {}
        self.corrupt_file: set[str] = set()
        self.missing_file: set[str] = set()
        self.redirect: dict[str, str | None] = {}
        self.delay: dict[str, float] = {}
        self.ignore_range: set[str] = set()
        self._lock = threading.Lock()

    def drop(self, path: str, after_bytes: int, times: int = 1) -> None:
        """Cut the next ``times`` GETs of ``path`` after ``after_bytes`` body bytes."""
        with self._lock:
            self.drop_after_bytes[path] = after_bytes
            self.drop_times[path] = times

    def reset(self) -> None:
        with self._lock:
            self.drop_after_bytes.clear()
            self.drop_times.clear()
            self.corrupt_file.clear()
            self.missing_file.clear()
            self.redirect.clear()
            self.delay.clear()
            self.ignore_range.clear()

    @staticmethod
    def _key(keys, repo_id: str, path: str) -> str | None:
        for key in (f"{repo_id}/{path}", path):
            if key in keys:
                return key
        return None

    def take_drop(self, repo_id: str, path: str) -> int | None:
        """Bytes after which to cut this GET, consuming one use of the fault; None: no cut."""
        with self._lock:
            key = self._key(self.drop_after_bytes, repo_id, path)
            if key is None:
                return None
            after = self.drop_after_bytes[key]
            left = self.drop_times.get(key, 1) - 1
            if left <= 0:
                self.drop_after_bytes.pop(key, None)
                self.drop_times.pop(key, None)
            else:
                self.drop_times[key] = left
            return after

    def is_corrupt(self, repo_id: str, path: str) -> bool:
        return self._key(self.corrupt_file, repo_id, path) is not None

    def delay_for(self, repo_id: str, path: str) -> float:
        key = self._key(self.delay, repo_id, path)
        return 0.0 if key is None else self.delay[key]

    def ignores_range(self, repo_id: str, path: str) -> bool:
        return self._key(self.ignore_range, repo_id, path) is not None

    def is_missing(self, repo_id: str, path: str) -> bool:
        return self._key(self.missing_file, repo_id, path) is not None

    def redirect_target(self, repo_id: str, path: str) -> tuple[bool, str | None]:
        key = self._key(self.redirect, repo_id, path)
        return (False, None) if key is None else (True, self.redirect[key])


class _Listener(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, hub: HubServer, name: str, host: str):
        self.hub = hub
        self.name = name
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((host, 0), _Handler)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        """Stop listening and cut open keep-alive connections, so that a closed server is
        really gone for clients that pooled a connection to it."""
        self.shutdown()
        self.server_close()
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HubServer:
    """The fake Hub. Binds two ports on ``host`` and starts serving at construction.

    ``tokens``: bearer tokens accepted for gated repos (any of them opens every gated repo).
    """

    def __init__(self, tokens=("hf_test",), host: str = "127.0.0.1"):
        self.tokens: set[str] = set(tokens or ())
        self.repos: dict[str, HubRepo] = {}
        self.faults = Faults()
        self.requests: list[LoggedRequest] = []
        self.errors: list[str] = []  # tracebacks of server bugs (answered 400)
        self._lock = threading.RLock()
        self._blobs: dict[str, HubFile] = {}  # etag -> file, for the CDN listener
        self._hub = _Listener(self, "hub", host)
        self._cdn = _Listener(self, "cdn", host)
        self._threads = []
        for listener in (self._hub, self._cdn):
            t = threading.Thread(
                target=listener.serve_forever, kwargs={"poll_interval": 0.1},
                name=f"hub-server-{listener.name}", daemon=True,
            )
            t.start()
            self._threads.append(t)
        self._closed = False

    # -- addresses ---------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._hub.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint for HF_ENDPOINT, e.g. http://127.0.0.1:41234 (no trailing slash)."""
        return f"http://{self._hub.server_address[0]}:{self.port}"

    @property
    def cdn_url(self) -> str:
        """Origin of the second listener that redirected downloads go to."""
        host, port = self._cdn.server_address[:2]
        return f"http://{host}:{port}"

    # -- content -----------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        folder,
        revision: str = "main",
        license: str | None = "apache-2.0",
        gated: bool | str = False,
        card_data: dict | None = None,
        raw_paths: bool = False,
    ) -> str:
        """Publish ``folder`` (a directory, or a {path: bytes} mapping) as a commit of
        ``repo_id`` on branch ``revision``; return the commit sha (40 hex).

        The sha is sha1 over the repo id and the sorted (path, oid) pairs, so the same
        content always gives the same sha. Publishing different content to an existing
        branch moves the branch to the new commit (its parent is the old head) and the old
        sha stays servable, like a new commit pushed to the Hub. ``license``, ``gated``
        (True means "manual") and ``card_data`` are repo-level: the last call sets them.
        ``cardData`` served is ``card_data`` plus {"license": license} when license is set.
        ``raw_paths``: take a mapping's paths as given (backslashes, "..", a leading "/",
        control characters), to publish the hostile file names a real repo could list.
        """
        if not _REPO_ID_RE.match(repo_id):
            raise ValueError(f"bad repo id {repo_id!r}")
        if "/" in revision or not revision or _SHA1_RE.match(revision):
            raise ValueError(f"bad branch name {revision!r}")
        found = _read_files(folder, raw=raw_paths)
        files = {p: HubFile.make(p, data) for p, data in sorted(found.items())}
        digest = hashlib.sha1(repo_id.encode() + b"\n")
        for path, f in files.items():
            digest.update(f"{path}\0{f.etag}\n".encode())
        sha = digest.hexdigest()
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = HubRepo(repo_id)
            if sha not in repo.commits:
                n = sum(len(r.commits) for r in self.repos.values())
                repo.commits[sha] = HubCommit(
                    sha=sha,
                    files=files,
                    parent=repo.refs.get(revision),
                    date=_iso(_EPOCH + timedelta(hours=n)),
                    title=f"Upload {len(files)} files",
                )
                for f in files.values():
                    self._blobs.setdefault(f.etag, f)
            repo.refs[revision] = sha
            repo.license = license
            repo.gated = "manual" if gated is True else gated
            repo.card_data = dict(card_data) if card_data else None
        return sha

    def remove_repo(self, repo_id: str) -> None:
        with self._lock:
            self.repos.pop(repo_id, None)

    def sha(self, repo_id: str, revision: str = "main") -> str:
        """The commit ``revision`` of ``repo_id`` points at."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}")
        return commit.sha

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The bytes of every file of ``repo_id`` at ``revision``."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}")
        return {p: f.data for p, f in commit.files.items()}

    # -- lifecycle ---------------------------------------------------------------------
    def reset(self, repos: bool = False) -> None:
        """Turn all faults off and clear the request and error logs (and the repos if asked)."""
        self.faults.reset()
        self.requests.clear()
        self.errors.clear()
        if repos:
            with self._lock:
                self.repos.clear()

    def close(self) -> None:
        """Stop serving: the port refuses connections afterwards, open connections are cut."""
        if self._closed:
            return
        self._closed = True
        for listener in (self._hub, self._cdn):
            listener.close_all()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HubServer({self.url}, repos={sorted(self.repos)})"


def _read_files(folder, raw: bool = False) -> dict[str, bytes]:
    if isinstance(folder, dict):
        out = {}
        for path, data in folder.items():
            path = str(path) if raw else str(path).strip("/")
            if not path or (not raw and ".." in path.split("/")):
                raise ValueError(f"bad path {path!r}")
            out[path] = data.encode() if isinstance(data, str) else bytes(data)
        return out
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"not a directory: {root}")
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Neither git metadata nor huggingface_hub's local_dir cache belongs to a repo.
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".cache"))
        for name in filenames:
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = full.read_bytes()
    return out


# -- request handling ----------------------------------------------------------------------

class _HttpError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def _not_found_repo(repo_id: str) -> _HttpError:
    return _HttpError(404, "RepoNotFound", f"Repository not found: {repo_id}")


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every small response waits ~40 ms for the ACK
    server_version = "mstore-test-hub/1"
    timeout = 60  # idle keep-alive connections end after this

    server: _Listener

    def log_message(self, format, *args) -> None:  # noqa: A002 - silence stderr logging
        pass

    # -- entry points --
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        entry = LoggedRequest(method, self.path, self.headers.get("Range"))
        entry.status = None
        entry.authorization = self.headers.get("Authorization")
        entry.listener = self.server.name
        hub.requests.append(entry)
        self._entry = entry
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        try:
            self._route(method, body)
        except _HttpError as e:
            self._send_error(e, method)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # a bug here must not look like a Hub outage (5xx -> retries)
            tb = traceback.format_exc()
            hub.errors.append(tb)
            print(f"[hub_server] error answering {method} {self.path}:\n{tb}", file=sys.stderr)
            try:
                self._send_error(_HttpError(400, None, "test hub server error (see server.errors)"), method)
            except OSError:
                self.close_connection = True

    # -- routing --
    def _route(self, method: str, body: bytes) -> None:
        raw_path, _, query_string = self.path.partition("?")
        query = parse_qs(query_string, keep_blank_values=True)
        # Split before unquoting: revisions are quoted with safe="" (refs%2Fpr%2F1 is one
        # segment), file paths with safe="/".
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if segments and segments[-1] == "" and len(segments) > 1:
            segments = segments[:-1]
        head = method == "HEAD"

        if segments[:1] == ["cdn"] and len(segments) >= 4:
            return self._serve_cdn(segments[1], segments[2], "/".join(segments[3:]), head)
        if self.server.name == "cdn":
            raise _HttpError(404, None, "not found")
        if segments[:2] == ["api", "whoami-v2"]:
            return self._whoami(head)
        if segments[:2] == ["api", "models"] and len(segments) >= 3:
            return self._api_models(method, segments[2:], query, body)
        if "resolve" in segments[1:3] and method in ("GET", "HEAD"):
            i = segments.index("resolve", 1)
            repo_id = "/".join(segments[:i])
            rest = segments[i + 1:]
            if len(rest) < 2:
                raise _HttpError(404, None, "not found")
            return self._resolve(repo_id, rest[0], "/".join(rest[1:]), head)
        raise _HttpError(404, None, f"no such endpoint on the test hub: {method} {raw_path}")

    def _lookup_repo(self, segments: list[str]) -> tuple[HubRepo, list[str]]:
        repos = self.server.hub.repos
        for n in (2, 1):
            if len(segments) >= n and "/".join(segments[:n]) in repos:
                return repos["/".join(segments[:n])], segments[n:]
        raise _not_found_repo("/".join(segments[:2]))

    @staticmethod
    def _commit(repo: HubRepo, revision: str) -> HubCommit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HttpError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api_models(self, method: str, segments: list[str], query: dict, body: bytes) -> None:
        repo, rest = self._lookup_repo(segments)
        head = method == "HEAD"
        if method == "POST":
            if len(rest) == 2 and rest[0] == "paths-info":
                return self._paths_info(repo, rest[1], body, head)
            raise _HttpError(404, None, "not found")
        if not rest:
            return self._model_info(repo, "main", query, head)
        if rest[0] == "revision" and len(rest) == 2:
            return self._model_info(repo, rest[1], query, head)
        if rest[0] == "tree" and len(rest) >= 2:
            return self._tree(repo, rest[1], "/".join(rest[2:]), query, head)
        if rest == ["refs"]:
            return self._send_json(self._refs(repo), head)
        if rest == ["auth-check"]:
            self._check_gated(repo)
            return self._send_json({}, head)
        if rest[0] == "commits" and len(rest) == 2:
            return self._commits(repo, rest[1], head)
        raise _HttpError(404, None, "not found")

    # -- auth --
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _check_gated(self, repo: HubRepo) -> None:
        if not repo.gated:
            return
        token = self._token()
        if token is None:
            raise _HttpError(
                401, "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
            )
        if token not in self.server.hub.tokens:
            raise _HttpError(
                403, "GatedRepo",
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.",
            )

    def _whoami(self, head: bool) -> None:
        token = self._token()
        if token is None or token not in self.server.hub.tokens:
            raise _HttpError(401, None, "Invalid credentials in Authorization header")
        self._send_json(
            {"type": "user", "name": "mstore-test", "auth": {"type": "access_token",
             "accessToken": {"displayName": "test", "role": "read"}}},
            head,
        )

    # -- API views --
    def _model_info(self, repo: HubRepo, revision: str, query: dict, head: bool) -> None:
        commit = self._commit(repo, revision)
        blobs = _truthy(query.get("blobs"))
        files = commit.files
        namespace = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": namespace,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": False,
            "disabled": False,
            "gated": repo.gated,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [f.sibling(blobs) for f in files.values()],
            "spaces": [],
            "usedStorage": sum(f.size for f in files.values()),
        }
        card = dict(repo.card_data or {})
        if repo.license is not None:
            card.setdefault("license", repo.license)
        if card:
            info["cardData"] = card
        config = _json_or_none(files.get("config.json"))
        tags = []
        if config is not None:
            info["library_name"] = "transformers"
            info["pipeline_tag"] = "text-generation"
            info["config"] = {
                k: config[k] for k in ("architectures", "model_type", "auto_map") if k in config
            }
            tags += ["transformers"]
            if isinstance(config.get("model_type"), str):
                tags.append(config["model_type"])
        st = _safetensors_summary(files)
        if st is not None:
            info["safetensors"] = st
            tags.append("safetensors")
        if config is not None:
            tags.append("text-generation")
        if card.get("license"):
            tags.append(f"license:{card['license']}")
        info["tags"] = tags
        expand = query.get("expand") or query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in set(expand) | {"_id", "id"}}
        self._send_json(info, head)

    def _tree(self, repo: HubRepo, revision: str, path: str, query: dict, head: bool) -> None:
        commit = self._commit(repo, revision)
        path = path.strip("/")
        recursive = _truthy(query.get("recursive"))
        dirs = _directories(commit.files)
        if path and path not in dirs:
            raise _HttpError(404, "EntryNotFound", f"{path} does not exist on {revision}",
                             {"X-Repo-Commit": commit.sha})
        prefix = f"{path}/" if path else ""

        def wanted(p: str) -> bool:
            if not p.startswith(prefix) or p == path:
                return False
            return recursive or "/" not in p[len(prefix):]

        entries = [_dir_entry(commit, d) for d in sorted(dirs) if d and wanted(d)]
        entries += [f.tree_entry() for p, f in commit.files.items() if wanted(p)]
        self._send_json(entries, head)

    def _paths_info(self, repo: HubRepo, revision: str, body: bytes, head: bool) -> None:
        commit = self._commit(repo, revision)
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            paths = (json.loads(body or b"{}").get("paths")) or []
        else:
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        if isinstance(paths, str):
            paths = [paths]
        dirs = _directories(commit.files)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(commit.files[p].tree_entry())
            elif p and p in dirs:
                out.append(_dir_entry(commit, p))
        self._send_json(out, head)

    @staticmethod
    def _refs(repo: HubRepo) -> dict:
        return {
            "branches": [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                for name, sha in sorted(repo.refs.items())
            ],
            "converts": [],
            "tags": [],
            "pullRequests": [],
        }

    def _commits(self, repo: HubRepo, revision: str, head: bool) -> None:
        commit = self._commit(repo, revision)
        out = []
        while commit is not None:
            out.append({
                "id": commit.sha, "title": commit.title, "message": "",
                "authors": [{"user": "mstore-test"}], "date": commit.date,
            })
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send_json(out, head)

    # -- file views --
    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        hub = self.server.hub
        repo = hub.repos.get(repo_id)
        if repo is None:
            raise _not_found_repo(repo_id)
        self._check_gated(repo)
        commit = self._commit(repo, revision)
        f = commit.files.get(path)
        commit_header = {"X-Repo-Commit": commit.sha}
        if f is None or hub.faults.is_missing(repo_id, path):
            raise _HttpError(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit_header)
        headers = dict(commit_header)
        headers["ETag"] = f'"{f.etag}"'
        if f.is_lfs:
            headers["X-Linked-Etag"] = f'"{f.etag}"'
            headers["X-Linked-Size"] = str(f.size)
        redirected, target = hub.faults.redirect_target(repo_id, path)
        if redirected:
            base = (target or hub.cdn_url).rstrip("/")
            headers["X-Linked-Etag"] = f'"{f.etag}"'
            headers["X-Linked-Size"] = str(f.size)
            headers["Location"] = f"{base}/cdn/{f.etag}/{quote(repo_id, safe='')}/{quote(path)}"
            return self._send(302, b"", headers, head, content_type=None)
        self._send_file(repo_id, f, headers, head)

    def _serve_cdn(self, etag: str, repo_id: str, path: str, head: bool) -> None:
        f = self.server.hub._blobs.get(etag)
        if f is None:
            raise _HttpError(404, None, "no such object")
        self._send_file(repo_id, f, {"ETag": f'"{f.etag}"'}, head, path=path)

    def _send_file(self, repo_id: str, f: HubFile, headers: dict, head: bool, path: str | None = None) -> None:
        hub = self.server.hub
        path = path or f.path
        data = f.data
        if hub.faults.is_corrupt(repo_id, path) and data:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        size = len(data)
        headers["Accept-Ranges"] = "bytes"
        name = path.rsplit("/", 1)[-1]
        headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
        ctype = "application/octet-stream" if f.is_lfs else (mimetypes.guess_type(name)[0] or "text/plain")
        status, start, end = 200, 0, size - 1
        rng = None if hub.faults.ignores_range(repo_id, path) else self.headers.get("Range")
        if rng:
            parsed = _parse_range(rng, size)
            if parsed == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{size}"
                raise _HttpError(416, None, "Requested Range Not Satisfiable", headers)
            if parsed is not None:
                status, (start, end) = 206, parsed
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = data[start:end + 1]
        if head:
            return self._send(status, b"", headers, True, content_type=ctype, length=len(body))
        pause = hub.faults.delay_for(repo_id, path)
        if pause:
            time.sleep(pause)
        cut = hub.faults.take_drop(repo_id, path)
        if cut is None:
            return self._send(status, body, headers, False, content_type=ctype)
        # Advertise the whole body, send part of it, hang up: the client sees a connection
        # closed mid-body (httpx RemoteProtocolError), as with a network cut.
        self._send_headers(status, headers, ctype, len(body))
        self._write(body[: max(0, cut)])
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._entry.status = status

    # -- low-level output --
    def _send_headers(self, status: int, headers: dict, content_type: str | None, length: int) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _write(self, body: bytes) -> None:
        view = memoryview(body)
        for i in range(0, len(view), _CHUNK):
            self.wfile.write(view[i:i + _CHUNK])

    def _send(self, status: int, body: bytes, headers: dict, head: bool, content_type: str | None = "application/json",
              length: int | None = None) -> None:
        self._send_headers(status, headers, content_type, len(body) if length is None else length)
        if not head and body:
            self._write(body)
        self._entry.status = status

    def _send_json(self, obj, head: bool) -> None:
        self._send(200, json.dumps(obj).encode(), {}, head, content_type="application/json; charset=utf-8")

    def _send_error(self, e: _HttpError, method: str) -> None:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        headers["X-Error-Message"] = e.message
        body = json.dumps({"error": e.message}).encode()
        self._send(e.status, body, headers, method == "HEAD", content_type="application/json; charset=utf-8")


def _truthy(values) -> bool:
    return bool(values) and str(values[-1]).lower() in ("1", "true", "yes")


def _parse_range(header: str, size: int):
    """(start, end) inclusive, None to ignore the header (serve 200), or "unsatisfiable"."""
    m = _RANGE_RE.match(header)
    if not m:
        return None  # unparsable or multi-range: RFC 9110 allows ignoring it
    first, last = m.groups()
    if first == "" and last == "":
        return None
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        return "unsatisfiable"
    return start, end


def _directories(files: dict[str, HubFile]) -> set[str]:
    dirs = {""}
    for p in files:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return dirs


def _dir_entry(commit: HubCommit, d: str) -> dict:
    inside = sorted(f"{p}\0{f.blob_id}" for p, f in commit.files.items() if p.startswith(d + "/"))
    oid = hashlib.sha1(("tree\n" + "\n".join(inside)).encode()).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": d}


def _json_or_none(f: HubFile | None):
    if f is None:
        return None
    try:
        data = json.loads(f.data)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _safetensors_summary(files: dict[str, HubFile]) -> dict | None:
    """The Hub's ``safetensors`` model_info field: parameter counts per dtype, and total."""
    per_dtype: dict[str, int] = {}
    found = False
    for p, f in files.items():
        if not p.endswith(".safetensors") or len(f.data) < 8:
            continue
        n = int.from_bytes(f.data[:8], "little")
        try:
            header = json.loads(f.data[8:8 + n])
        except ValueError:
            continue
        found = True
        for name, meta in header.items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            count = 1
            for d in meta.get("shape", []):
                count *= int(d)
            per_dtype[meta.get("dtype", "?")] = per_dtype.get(meta.get("dtype", "?"), 0) + count
    if not found:
        return None
    return {"parameters": per_dtype, "total": sum(per_dtype.values())}


# -- environment helpers -------------------------------------------------------------------

def hub_env(server: HubServer, hf_home=None, token: str | None = None) -> dict[str, str]:
    """Environment variables that point huggingface_hub (in this process before its import,
    or in a subprocess) at ``server``. ``hf_home``: HF_HOME to use (default: keep unset).
    ``token``: sets HF_TOKEN. Callers should also drop any inherited HF_TOKEN /
    HF_HUB_OFFLINE (see ``clean_environ``)."""
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
    }
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


# Inherited variables that would make the client talk to something else, or not at all.
_UNSET = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "HF_HUB_CACHE",
          "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH", "HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT",
          "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def clean_environ(base=None) -> dict[str, str]:
    """A copy of ``base`` (default os.environ) without the HF variables that leak state."""
    base = os.environ if base is None else base
    return {k: v for k, v in base.items() if k not in _UNSET and k != "HF_ENDPOINT"}


_reserved: HubServer | None = None
_reserved_lock = threading.Lock()


def reserve_server(tokens=("hf_test",), hf_home=None) -> HubServer:
    """Start the session's server now and point this process's environment at it.

    Call it at the very top of conftest.py, before anything imports huggingface_hub or
    transformers. Sets HF_ENDPOINT, HF_HUB_DISABLE_TELEMETRY=1, HF_HUB_DISABLE_XET=1,
    HF_HUB_DISABLE_PROGRESS_BARS=1 and HF_HOME (a fresh temporary folder unless ``hf_home``
    is given, removed at exit), and removes HF_TOKEN, HF_HUB_OFFLINE and similar. Returns
    the same server on later calls. Raises RuntimeError if huggingface_hub was already
    imported with another endpoint, since it would never see this one.
    """
    global _reserved
    with _reserved_lock:
        if _reserved is not None:
            return _reserved
        if "huggingface_hub.constants" in sys.modules:
            raise RuntimeError(
                "huggingface_hub was imported before reserve_server(): it has read HF_ENDPOINT "
                "already. Call reserve_server() at the top of tests/conftest.py, before importing "
                "transformers or huggingface_hub (directly or through mstore)."
            )
        server = HubServer(tokens=tokens)
        if hf_home is None:
            hf_home = tempfile.mkdtemp(prefix="mstore-test-hf-home-")
            atexit.register(shutil.rmtree, hf_home, True)
        for k in _UNSET:
            os.environ.pop(k, None)
        os.environ.update(hub_env(server, hf_home=hf_home))
        atexit.register(server.close)
        _reserved = server
        return server


def start_hub_server(tokens=("hf_test",)) -> HubServer:
    """The session's server (reserving it now if conftest did not), for a session-scoped
    fixture. Checks that huggingface_hub, if imported, points at it."""
    server = reserve_server(tokens=tokens)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and getattr(constants, "ENDPOINT", None) != server.url:
        raise RuntimeError(
            f"huggingface_hub points at {constants.ENDPOINT}, not at the test server {server.url}: "
            "it was imported before reserve_server()."
        )
    return server


def refused_endpoint() -> str:
    """An http://127.0.0.1:PORT origin where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
