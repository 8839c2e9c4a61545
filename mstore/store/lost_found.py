"""Dangling commits and getting them back (git's `fsck --lost-found`).

A dangling commit is a manifest that no ref reaches, directly or through the `parent`
chain of a ref's commit; only the tips are listed (a dangling manifest that is another
dangling one's parent comes back with it, as history). Manifests are found by scanning
objects/: a lost or damaged registry.json loses names, never the commits themselves.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import fsio
from ..errors import RegistryCorrupt, RegistryMissing
from .locks import StoreLock
from .manifest import LightManifest
from .refs import RefEntry
from .registry import validate_name
from .repo import Store

LOST_FOUND_PREFIX = "lost-found-"


@dataclass
class Dangling:
    commit: str
    created_at: str
    message: str
    model_id: str
    architecture: str
    parent: str | None
    weights_present: bool

    @property
    def subject(self) -> str:
        lines = self.message.splitlines()
        return lines[0] if lines else "(no message)"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "short_commit": self.commit[:12]}


def manifests_on_disk(store: Store) -> dict[str, LightManifest]:
    """Every intact manifest in objects/ (without tensor tables)."""
    out = {}
    for oid, _st in store.objects.iter_objects():
        m = store.try_manifest(oid)
        if m is not None:
            out[oid] = m
    return out


def dangling_commits(store: Store, refs: dict[str, RefEntry] | None = None) -> list[Dangling]:
    """The tips of the commits no ref reaches, newest first. `refs`: the usable refs (pass
    {} when registry.json is damaged: then every tip is dangling)."""
    refs = store.refs() if refs is None else refs
    reached = store.known_commits(refs)
    loose = {oid: m for oid, m in manifests_on_disk(store).items() if oid not in reached}
    parents = {m.parent for m in loose.values() if m.parent}
    present: dict[str, bool] = {}
    out = []
    for oid, m in loose.items():
        if oid in parents:
            continue
        whole = all(present.setdefault(o, store.objects.exists(o)) for o in m.object_ids())
        out.append(Dangling(oid, m.created_at, m.message, m.model_id, m.architecture,
                            m.parent, whole))
    return sorted(out, key=lambda d: (d.created_at, d.commit), reverse=True)


@dataclass
class Recovery:
    registry_created: bool = False
    registry_moved_to: str | None = None
    named: list[tuple[str, str]] = field(default_factory=list)  # (name, commit)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (commit, why)

    def to_json(self) -> dict[str, Any]:
        return {"registry_created": self.registry_created,
                "registry_moved_to": self.registry_moved_to,
                "named": [{"name": n, "commit": c} for n, c in self.named],
                "skipped": [{"commit": c, "reason": r} for c, r in self.skipped]}


def recover(store: Store) -> Recovery:
    """Name every dangling tip `lost-found-<12 hex>` (its weights must all be present), first
    rebuilding a missing registry.json, or setting a damaged one aside as
    registry.json.corrupt-<UTC time> (never deleted). Under the exclusive store lock."""
    store.require()
    rec = Recovery()
    with StoreLock(store.lock_path, shared=False, purpose="fsck --lost-found"):
        try:
            store.refs()
        except RegistryMissing:
            rec.registry_created = True
        except RegistryCorrupt:
            rec.registry_moved_to = str(_set_aside(store.registry.path))
            rec.registry_created = True
        if rec.registry_created:
            store.objects.ensure_dirs()
            store.registry.update(lambda models: None, rebuild=True)
        refs = store.refs()
        taken = set(refs) | {key for key, _ in store.registry.invalid_entries()}
        for d in reversed(dangling_commits(store, refs)):  # oldest first
            if not d.weights_present:
                rec.skipped.append((d.commit, "some of its objects are missing"))
                continue
            name = _free_name(LOST_FOUND_PREFIX + d.commit[:12], taken)
            m = store.read_manifest(d.commit)
            parents = sorted(store.names_by_commit().get(m.parent, [])) if m.parent else []
            entry = store.registry_entry(name, d.commit, m, parents[0] if parents else None)
            store.registry.set_ref(entry, expected=None)
            taken.add(name)
            rec.named.append((name, d.commit))
    return rec


def _free_name(stem: str, taken: set[str]) -> str:
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}-{n}", n + 1
    return validate_name(name)


def _set_aside(path: Path) -> Path:
    """Rename a damaged registry.json to a free registry.json.corrupt-<UTC time>[-N]."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 2
    while target.exists():
        target, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    os.rename(path, target)
    fsio.fsync_dir(path.parent)
    return target
