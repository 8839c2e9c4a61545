"""A store's remotes: `remotes.json` (name -> URL) and `remote-refs.json` (tracking refs).

`remotes.json` holds names and URLs only: credentials come from each backend's usual place
(AWS_* variables or ~/.aws for s3fs, ...), and a URL with a password in it is refused.
`remote-refs.json` is git's refs/remotes: what this store last saw of each remote ref, the
"expected" value a push's compare-and-swap starts from and what lets a pull fast-forward a
tracked local ref. Both are small JSON files in the store root, rewritten atomically under
`remotes.lock`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from ..errors import (
    BadRemoteName, BadRemoteURL, NoDefaultRemote, RemoteError, RemoteExists, UnknownRemote,
)
from ..store import fsio
from ..store.locks import StoreLock
from ..store.registry import NAME_RE
from ..store.repo import Store

REMOTES_FILE = "remotes.json"
TRACKING_FILE = "remote-refs.json"
CONFIG_LOCK = "remotes.lock"


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


def set_tracking(store: Store, remote: str, ref: str, commit: str | None) -> None:
    """Record that `remote`'s `ref` was seen at `commit` (None: forget it)."""
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


def local_path(url: str) -> str | None:
    """The folder of a path or file:// URL; None for any other backend."""
    if "://" not in url:
        return url
    if url.lower().startswith("file://"):
        return url.split("://", 1)[1]
    return None


def add_remote(store: Store, name: str, url: str) -> str:
    """Record remote `name` at `url` (normalized, and returned as stored)."""
    validate_remote_name(name)
    url = normalize_url(url)
    local = local_path(url)
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
    """Forget remote `name` and its tracking refs (nothing on the remote is touched)."""
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
