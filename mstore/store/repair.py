"""`fsck --repair`: mend missing and corrupt objects from good copies held elsewhere.

The objects to mend are fsck's findings (missing, corrupt, a ref's missing commit). For
each, the sources are asked in order (a remote store, the Hub revision a model was
imported from: see remote/repair.py and hub/repair.py); a copy is used only if its bytes
hash to the object's id, so a source holding a damaged copy too is refused and the next
one is asked. A corrupt object is moved aside to `lost-found/objects/<oid>.<UTC time>`
(never deleted) only once a good copy is in hand, and the good copy is then put like any
object (temp file, sync, rename). A kill between the two leaves the object missing, which
the next `fsck --repair` mends like any missing object.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import failpoints, fsio
from ..errors import MStoreError, NothingToRepairWith, ObjectCorrupt
from .objects import hash_bytes, hash_file
from .repo import Store

REPAIRABLE = ("missing", "corrupt", "dangling-ref")
LOST_FOUND_OBJECTS = Path("lost-found") / "objects"


class CopySource(Protocol):
    """Where good copies of objects may be had. A context manager (a remote's session)."""

    label: str  # how the source is named in the report: "remote origin", "the Hub"

    def __enter__(self) -> "CopySource": ...

    def __exit__(self, *exc) -> None: ...

    def covers(self, oid: str) -> bool:
        """Whether asking for `oid` can help (a Hub source knows only Hub-imported objects)."""

    def get(self, oid: str, tmp_dir: Path) -> "Copy | None":
        """The object as the source has it (unchecked: the caller re-hashes it); None
        when the source does not hold it."""


@dataclass
class Copy:
    """A candidate copy: in memory (`data`) or in a file (`path`, removed after use if
    `temp`, e.g. a download into the store's tmp/)."""
    data: bytes | None = None
    path: Path | None = None
    temp: bool = False


@dataclass
class Repaired:
    object: str
    problem: str  # what fsck found: missing | corrupt | dangling-ref
    detail: str
    source: str
    moved_to: str | None = None  # where the corrupt copy now is (relative to the store)


@dataclass
class NotRepaired:
    object: str
    problem: str
    detail: str
    reason: str


@dataclass
class RepairResult:
    repaired: list[Repaired] = field(default_factory=list)
    failed: list[NotRepaired] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"repaired": [asdict(r) for r in self.repaired],
                "failed": [asdict(f) for f in self.failed]}


def repair(store: Store, sources: list[CopySource]) -> RepairResult:
    """Mend every missing or corrupt object fsck finds, from the first source holding a copy
    that hashes to its id. Under the store's writer lock (gc waits). Raises
    NothingToRepairWith, having changed nothing, when objects need repair but no source
    can serve any of them."""
    from .fsck import check

    result = RepairResult()
    with store.writer_lock("fsck --repair", create=False):
        targets: dict[str, tuple[str, str]] = {}
        for f in check(store):
            if f.error and f.object and f.problem in REPAIRABLE:
                targets.setdefault(f.object, (f.problem, f.detail))
        if not targets:
            return result
        if not any(s.covers(oid) for s in sources for oid in targets):
            why = ("no source of good copies was given" if not sources
                   else f"{' and '.join(s.label for s in sources)} cannot serve them")
            raise NothingToRepairWith(len(targets), why)
        with contextlib.ExitStack() as stack:
            for s in sources:
                stack.enter_context(s)
            for oid, (problem, detail) in sorted(targets.items()):
                _repair_one(store, oid, problem, detail, sources, result)
    return result


def _repair_one(store: Store, oid: str, problem: str, detail: str,
                sources: list[CopySource], result: RepairResult) -> None:
    on_disk = store.objects.verify(oid)
    if on_disk is None:  # intact bytes that are not what the manifest wants: no copy helps
        result.failed.append(NotRepaired(oid, problem, detail, "its bytes match its id; the "
                                         "damage is in what was written, not on disk"))
        return
    reasons = []
    for s in sources:
        if not s.covers(oid):
            continue
        try:
            copy = s.get(oid, store.objects.tmp_dir)
        except MStoreError as e:
            reasons.append(f"{s.label}: {e}")
            continue
        if copy is None:
            reasons.append(f"{s.label} does not hold it")
            continue
        try:
            got = hash_bytes(copy.data) if copy.data is not None else hash_file(copy.path)
            if got != oid:
                reasons.append(f"{s.label} holds a corrupt copy too (it hashes to {got[:12]}); "
                               "not written")
                continue
            moved = _move_aside(store, oid) if on_disk != "missing" else None
            _put(store, oid, copy)
        finally:
            if copy.temp and copy.path is not None:
                fsio.unlink(copy.path, missing_ok=True)
        result.repaired.append(Repaired(oid, problem, detail, s.label, moved))
        return
    result.failed.append(NotRepaired(oid, problem, detail,
                                     "; ".join(reasons) or "no source can serve it"))


def _move_aside(store: Store, oid: str) -> str:
    """Rename the damaged object to lost-found/objects/<oid>.<UTC time>[-N]; returns that
    path relative to the store."""
    folder = store.root / LOST_FOUND_OBJECTS
    fsio.makedirs(folder)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = folder / f"{oid}.{stamp}", 2
    while target.exists():
        target, n = folder / f"{oid}.{stamp}-{n}", n + 1
    src = store.objects.path(oid)
    os.rename(src, target)
    fsio.fsync_dir(src.parent)
    fsio.fsync_dir(folder)
    failpoints.hit("repair.moved-aside")
    return str(target.relative_to(store.root))


def _put(store: Store, oid: str, copy: Copy) -> None:
    with store.objects.batch() as batch:
        res = batch.put_bytes(copy.data) if copy.data is not None else batch.put_file(copy.path)
        if res.oid != oid:  # hashed just before; a file changed under us
            raise ObjectCorrupt(oid, "the good copy changed while it was written; not written")
    failpoints.hit("repair.object-put")
