"""Garbage collection: plan what no ref can reach, then delete it (dulwich's shape).

Roots are the refs. Every manifest reachable through `parent` stays, so `log` can always
show where a model came from; tensor and file objects stay only while some ref's own
manifest names them (or, for an adapter child, its base's), so removing a base frees its
weights while its full fine-tunes keep their history and its adapters keep working.
A commit's attachments stay with it; the lists of commits gc deletes go too. Two mechanisms keep a writer in flight safe:
  1. the store lock: writers hold it shared for their whole run, gc exclusive, so gc never
     runs beside an import or a train;
  2. the grace period: unreachable objects younger than it are kept, and a dedup hit
     refreshes an object's mtime, so even a writer that bypassed the lock keeps its objects.
A packed delta keeps its base object (and the base's base) alive even when no ref names
the base any more (`reachability.closure`); among the objects that do go, each delta is
deleted before its base, so a gc cut short never leaves a delta without its base.
gc refuses to delete anything if registry.json or any manifest on a ref's chain cannot be
read, or if registry.json is missing while objects exist: it cannot know what is reachable.
A registry entry that is skipped as invalid still protects the commit it names.
`--dry-run` takes no lock and writes nothing.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from . import failpoints, fsio
from ..errors import GcRefused, ObjectCorrupt, ObjectMissing
from .reachability import Closure, ref_closure
from .repo import Store

DEFAULT_GRACE = 3600.0


@dataclass
class GcPlan:
    delete: list[tuple[str, int]] = field(default_factory=list)  # (oid, bytes)
    tmp_delete: list[tuple[Path, int]] = field(default_factory=list)
    kept_young: int = 0
    kept_reachable: int = 0
    why: dict[str, str] | None = None  # oid -> why it is kept (explain)
    kept_as_base: dict[str, str] = field(default_factory=dict)  # base -> the delta keeping it
    delete_levels: list[int] = field(default_factory=list)  # per `delete`: deltas under it

    @property
    def bytes_freed(self) -> int:
        return sum(n for _, n in self.delete) + sum(n for _, n in self.tmp_delete)

    def to_json(self, dry_run: bool) -> dict:
        return {
            "dry_run": dry_run, "objects_deleted": len(self.delete),
            "bytes_freed": self.bytes_freed, "tmp_files_deleted": len(self.tmp_delete),
            "kept_reachable": self.kept_reachable, "kept_within_grace": self.kept_young,
            "kept_as_delta_base": [{"object": b, "delta": d}
                                   for b, d in sorted(self.kept_as_base.items())],
            "deleted": [oid for oid, _ in self.delete],
            **({"kept": [{"object": oid, "why": why} for oid, why in sorted(self.why.items())]}
               if self.why is not None else {}),
        }


def reachable(store: Store, explain: bool = False, packed: set[str] | None = None) -> Closure:
    """What the refs keep; raises GcRefused when unsure. The rule itself is
    `reachability.closure`, shared with push, pull and clone."""
    c = ref_closure(store, explain=explain, packed=packed)
    if c.unreadable:
        oid, name = c.unreadable[0]
        raise GcRefused(f"manifest {oid} (history of {name!r}) cannot be read; "
                        "run `mstore fsck`")
    return c


def plan(store: Store, grace: float = DEFAULT_GRACE, now: float | None = None,
         explain: bool = False) -> GcPlan:
    now = time.time() if now is None else now
    # listed first, so the keep rule learns which objects are packed without a second walk
    # (under gc's exclusive lock nothing is written meanwhile; a dry run may miss what a
    # concurrent import adds, which it would not delete anyway)
    stored = list(store.objects.iter_stored())
    try:
        c = reachable(store, explain, packed={s.oid for s in stored if s.packed is not None})
    except (ObjectMissing, ObjectCorrupt) as e:
        raise GcRefused(str(e)) from None
    keep = c.keep()
    p = GcPlan(why={} if explain else None, kept_as_base=dict(c.delta_bases))
    young = {s.oid for s in stored if s.oid not in keep
             and now - max(st.st_mtime for st in (s.loose, s.packed) if st) < grace}
    for cur in sorted(young):  # a young delta keeps its base as a reachable one does
        while (base := store.objects.delta_base(cur)) is not None and base not in keep:
            if base not in young:
                p.kept_as_base[base] = cur
            keep.add(base)
            cur = base
    bases: dict[str, str | None] = {}
    for s in stored:
        oid = s.oid
        if oid in young:
            p.kept_young += 1
            if p.why is not None:
                p.why[oid] = "unreachable, but younger than the grace period"
        elif oid in keep:
            p.kept_reachable += 1
            if p.why is not None:
                p.why[oid] = c.why(oid) or (f"base of packed delta {p.kept_as_base[oid][:12]}"
                                            if oid in p.kept_as_base else "reachable")
        else:
            p.delete.append((oid, s.disk_bytes))
            if s.packed is not None:
                bases[oid] = store.objects.delta_base(oid)
    if store.objects.tmp_dir.is_dir():
        for entry in os.scandir(store.objects.tmp_dir):
            st = entry.stat(follow_symlinks=False)
            if now - st.st_mtime >= grace:
                p.tmp_delete.append((Path(entry.path), _tree_size(entry)))
    depth = {oid: _depth(oid, bases) for oid, _ in p.delete}
    p.delete.sort(key=lambda item: -depth[item[0]])
    p.delete_levels = [depth[oid] for oid, _ in p.delete]
    return p


def _depth(oid: str, bases: dict[str, str | None]) -> int:
    """How many doomed deltas `oid` stands on: deleting the deepest first never leaves a
    delta whose base is gone."""
    depth, seen = 0, {oid}
    while (oid := bases.get(oid)) is not None and oid not in seen:
        depth, seen = depth + 1, seen | {oid}
    return depth


def collect(store: Store, grace: float = DEFAULT_GRACE, dry_run: bool = False,
            explain: bool = False) -> GcPlan:
    """Plan and (unless dry_run) delete, under the exclusive store lock."""
    store.require()
    with nullcontext() if dry_run else store.gc_lock():
        p = plan(store, grace, explain=explain)
        failpoints.hit("gc.planned")
        if not dry_run:
            touched: set[Path] = set()
            for i, (oid, _) in enumerate(p.delete):
                level = p.delete_levels[i] if i < len(p.delete_levels) else 0
                if touched and level < p.delete_levels[i - 1]:
                    for folder in sorted(touched):  # deltas gone for good before their bases
                        fsio.fsync_dir(folder)
                    touched.clear()
                    failpoints.hit("gc.deltas-deleted")
                store.objects.remove(oid)
                if level:
                    touched.add(store.objects.path(oid).parent)
                failpoints.hit("gc.object-deleted")
            store.attachments.drop_orphans()
            for path, _ in p.tmp_delete:
                _remove_tree(path)
                failpoints.hit("gc.tmp-deleted")
    return p


def _tree_size(entry: os.DirEntry) -> int:
    if not entry.is_dir(follow_symlinks=False):
        return entry.stat(follow_symlinks=False).st_size
    total = 0
    for root, _dirs, files in os.walk(entry.path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _remove_tree(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        fsio.unlink(path, missing_ok=True)
