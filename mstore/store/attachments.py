"""Attachments: records added to a commit after it was made (eval notes, signatures).

A commit's id is the hash of its manifest, so nothing may be added to the manifest later.
An attachment is an object of its own (canonical JSON naming its commit, kind and payload,
so it is hashed, deduplicated and verified like any object), and `attachments/<commit>.json`
lists the attachment objects of one commit. The list only grows: adding is a union, which
is also how a push or pull merges two stores' lists. Objects are written before the list
that names them, and the list is replaced atomically, so a kill leaves the old list or the
new one. gc keeps a commit's attachments while it keeps the commit (reachability.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from . import failpoints, fsio
from ..errors import AttachmentIndexCorrupt, ObjectCorrupt
from .locks import StoreLock
from .manifest import canonical_json, utc_now
from .objects import is_oid

if TYPE_CHECKING:
    from .repo import Store

INDEX_VERSION = 1
TYPE = "mstore-attachment"
KINDS = ("eval", "signature")
MAX_ATTACHMENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Attachment:
    oid: str
    kind: str
    commit: str
    created_at: str
    payload: dict[str, Any]


def attachment_bytes(commit: str, kind: str, payload: dict[str, Any],
                     created_at: str | None = None) -> bytes:
    return canonical_json({"type": TYPE, "kind": kind, "commit": commit,
                           "created_at": created_at or utc_now(), "payload": payload})


def parse_attachment(data: bytes, oid: str, commit: str | None = None) -> Attachment:
    """An attachment object's record, checked (and, given `commit`, that it is that commit's)."""
    def bad(reason: str) -> ObjectCorrupt:
        return ObjectCorrupt(oid, reason, "attachment")

    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not valid JSON") from None
    if not isinstance(d, dict) or d.get("type") != TYPE:
        raise bad("not an attachment")
    if d.get("kind") not in KINDS or not isinstance(d.get("payload"), dict) \
            or not isinstance(d.get("created_at"), str) \
            or not (isinstance(d.get("commit"), str) and is_oid(d["commit"])):
        raise bad("malformed attachment record")
    if commit is not None and d["commit"] != commit:
        raise bad(f"attached to {commit} but names {d['commit']}")
    return Attachment(oid, d["kind"], d["commit"], d["created_at"], d["payload"])


def index_bytes(oids: Iterable[str]) -> bytes:
    return canonical_json({"version": INDEX_VERSION, "objects": sorted(set(oids))})


def parse_index(data: bytes, where: str) -> list[str]:
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AttachmentIndexCorrupt(where, "not valid JSON") from None
    if not isinstance(d, dict) or d.get("version") != INDEX_VERSION \
            or not isinstance(d.get("objects"), list) \
            or not all(isinstance(o, str) and is_oid(o) for o in d["objects"]):
        raise AttachmentIndexCorrupt(where, "expected {\"version\": 1, \"objects\": [ids]}")
    return sorted(set(d["objects"]))


class Attachments:
    """The attachment lists of one store."""

    def __init__(self, store: "Store"):
        self.store = store
        self.dir = store.attachments_dir
        self.lock_path = store.root / "attachments.lock"

    def index_path(self, commit: str) -> Path:
        if not is_oid(commit):
            raise ObjectCorrupt(commit, "not an object id", "commit")
        return self.dir / f"{commit}.json"

    def index(self, commit: str) -> list[str]:
        """The attachment object ids of `commit` ([] when it has none)."""
        path = self.index_path(commit)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        return parse_index(data, str(path))

    def commits(self) -> list[str]:
        """Every commit that has an attachment list."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted(n[:-5] for n in names if n.endswith(".json") and is_oid(n[:-5]))

    def list(self, commit: str, kind: str | None = None) -> list[Attachment]:
        """`commit`'s attachments (of `kind`), oldest first, each re-hashed and checked."""
        out = []
        for oid in self.index(commit):
            att = parse_attachment(self.store.objects.read_bytes(oid, verify=True), oid, commit)
            if kind is None or att.kind == kind:
                out.append(att)
        return sorted(out, key=lambda a: (a.created_at, a.oid))

    def add(self, commit: str, kind: str, payload: dict[str, Any]) -> str:
        """Attach a record to `commit` (which must be a commit here); returns its object id.
        The object is durable before the list names it; an identical record is added once."""
        if kind not in KINDS:
            raise ValueError(f"unknown attachment kind {kind!r}")
        self.store.read_light_manifest(commit)
        data = attachment_bytes(commit, kind, payload)
        with self.store.writer_lock("attach", create=False):
            oid = self.store.objects.put_bytes(data).oid
            failpoints.hit("attach.object-written")
            self.merge(commit, [oid])
        return oid

    def merge(self, commit: str, oids: Iterable[str]) -> bool:
        """Union `oids` (objects already here) into `commit`'s list; False if nothing new."""
        new = set(oids)
        with StoreLock(self.lock_path, shared=False, purpose="attachments update"):
            held = set(self.index(commit))
            if new <= held:
                return False
            fsio.makedirs(self.dir)
            fsio.write_atomic(self.index_path(commit), index_bytes(held | new),
                              self.store.objects.tmp_dir,
                              before_replace=lambda: failpoints.hit("attach.index-tmp-written"))
            return True

    def drop_orphans(self) -> list[str]:
        """gc, after deleting: remove the lists of commits that are no longer in the store
        (their attachment objects were unreachable with them)."""
        removed = []
        for commit in self.commits():
            if not self.store.objects.exists(commit):
                fsio.unlink(self.index_path(commit), missing_ok=True)
                removed.append(commit)
        return removed
