"""A store on disk: objects, registry and locks together, with the operations on refs.

Write order is what keeps a crash harmless: objects (synced) -> manifest (synced) -> ref
(atomic registry rewrite). At every point a ref names a complete manifest whose objects are
all present; whatever a crash leaves behind is unreferenced and gc's to collect.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

from . import format as store_format, fsio
from .. import env
from ..errors import (
    AmbiguousRef, NameTaken, NotACommit, ObjectCorrupt, ObjectMissing, RefChanged,
    StoreNotFound, UnknownModel,
)
from .locks import StoreLock
from .manifest import LightManifest, Manifest
from .objects import ObjectStore, hash_bytes, is_oid
from .refs import RefEntry
from .registry import Registry, validate_name

if TYPE_CHECKING:
    from . import views
    from .attachments import Attachments

DEFAULT_STORE = "models"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024  # larger objects are weights, not commits


def default_store_path() -> Path:
    """--store PATH > $MSTORE_HOME > ./models."""
    return Path(env.store_home() or DEFAULT_STORE)


class Resolved(NamedTuple):
    """What a name or commit id given on the command line resolved to."""

    commit: str
    name: str | None  # the ref used, or None when given a commit id
    entry: RefEntry | None


class Store:
    def __init__(self, path: Path | str | None = None):
        """`path` None: the CLI's own default ($MSTORE_HOME, else ./models)."""
        self.root = Path(path) if path is not None else default_store_path()
        self.objects = ObjectStore(self.root)
        self.registry = Registry(self.root)
        self.lock_path = self.root / ".lock"

    @cached_property
    def attachments(self) -> "Attachments":
        """Loaded when first used: the read commands never touch attachments."""
        from .attachments import Attachments

        return Attachments(self)

    @property
    def attachments_dir(self) -> Path:
        """Where the attachment lists live; absent until the first attachment is added."""
        return self.root / "attachments"

    # -- set-up -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.registry.exists() or self.objects.objects_dir.is_dir()

    def require(self) -> None:
        """Commands that read (or write without creating) a store: a mistyped path is an
        error, never an empty store made on the spot."""
        if not self.exists():
            raise StoreNotFound(str(self.root))

    def init(self) -> bool:
        """Create the layout; returns False if it already existed (running twice is harmless).
        A damaged store (registry unreadable, or missing beside objects) is refused first."""
        self.registry.load()
        existed = self.registry.exists()
        fsio.makedirs(self.root)
        self.objects.ensure_dirs()
        if not existed:
            self.registry.update(lambda models: None)  # writes an empty, valid registry
        return not existed

    def writer_lock(self, purpose: str, create: bool = True) -> StoreLock:
        """Held (shared) by import/train/tag/rm for their whole run; gc waits for them.
        `create`: make the store if absent (import, train, pull); else it must exist."""
        if create:
            self.init()
        else:
            self.require()
            self.refs()
        store_format.migrate(self)
        return StoreLock(self.lock_path, shared=True, purpose=purpose)

    def gc_lock(self, purpose: str = "gc") -> StoreLock:
        """Exclusive; the store must exist and its registry be readable (checked first, so a
        refused gc leaves even the lock file as it was)."""
        self.require()
        self.refs()
        return StoreLock(self.lock_path, shared=False, purpose=purpose)

    # -- manifests ----------------------------------------------------------------------
    def read_manifest(self, oid: str) -> Manifest:
        """The manifest in full (its tensor table too), re-hashed."""
        return Manifest.from_bytes(self._manifest_bytes(oid), oid)

    def read_light_manifest(self, oid: str) -> LightManifest:
        """The manifest without its tensor table, re-hashed: what walks over lineages need."""
        return LightManifest.from_bytes(self._manifest_bytes(oid), oid)

    def _manifest_bytes(self, oid: str) -> bytes:
        try:
            return self.objects.read_bytes(oid, verify=True)
        except ObjectMissing:
            raise ObjectMissing(oid, "manifest") from None
        except ObjectCorrupt:
            raise ObjectCorrupt(oid, "content does not match its name", "manifest") from None

    def put_manifest(self, manifest: Manifest) -> str:
        return self.objects.put_bytes(manifest.to_bytes()).oid

    def try_manifest(self, oid: str) -> LightManifest | None:
        """The light manifest if object `oid` is an intact one, else None. Canonical JSON
        starts with '{"', which no tensor object does, so weights are never read whole."""
        try:
            with open(self.objects.path(oid), "rb") as f:
                if f.read(2) != b'{"' or os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES:
                    return None
                data = b'{"' + f.read()
        except OSError:
            return None
        if b'"tensors":' not in data or hash_bytes(data) != oid:
            return None
        try:
            return LightManifest.from_bytes(data, oid)
        except ObjectCorrupt:
            return None

    # -- refs ---------------------------------------------------------------------------
    def refs(self) -> dict[str, RefEntry]:
        return self.registry.load()

    def names_by_commit(self, refs: dict[str, RefEntry] | None = None) -> dict[str, list[str]]:
        """commit -> the names that point at it; `refs`: entries already read (one parse of
        registry.json per command, not one per question)."""
        out: dict[str, list[str]] = {}
        for name, entry in (self.refs() if refs is None else refs).items():
            out.setdefault(entry.commit, []).append(name)
        return out

    def resolve(self, ref: str) -> Resolved:
        """A model name, a full commit id, or a unique prefix (>= 7 hex) of a known commit;
        a commit no ref reaches (a dangling one) is found on disk when nothing else matches."""
        refs = self.refs()
        if ref in refs:
            return Resolved(refs[ref].commit, ref, refs[ref])
        low = ref.lower()
        if len(low) >= 7 and all(c in "0123456789abcdef" for c in low):
            if is_oid(low) and self.objects.exists(low):
                if self.try_manifest(low) is None and low not in self.known_commits(refs):
                    raise NotACommit(low)
                return Resolved(low, None, None)
            matches = sorted({c for c in self.known_commits(refs) if c.startswith(low)}) \
                or self._manifests_with_prefix(low)
            if len(matches) == 1:
                return Resolved(matches[0], None, None)
            if len(matches) > 1:
                raise AmbiguousRef(ref, matches)
        import difflib

        close = difflib.get_close_matches(ref, list(refs), n=1)
        raise UnknownModel(ref, close[0] if close else None)

    def _manifests_with_prefix(self, prefix: str) -> list[str]:
        """Manifests on disk whose id starts with `prefix` (one fan-out folder is listed)."""
        try:
            names = os.listdir(self.objects.objects_dir / prefix[:2])
        except OSError:
            return []
        return sorted(prefix[:2] + n for n in names if n.startswith(prefix[2:])
                      and is_oid(prefix[:2] + n) and self.try_manifest(prefix[:2] + n))

    def known_commits(self, refs: dict[str, RefEntry] | None = None) -> set[str]:
        """Every commit reachable from a ref through `parent` (what prefixes resolve against)."""
        seen: set[str] = set()
        for entry in (refs if refs is not None else self.refs()).values():
            for oid, _m in self.lineage(entry.commit):
                if oid in seen:
                    break
                seen.add(oid)
        return seen

    def lineage(self, commit: str, light: bool = True
                ) -> Iterator[tuple[str, LightManifest | Manifest | None]]:
        """The commit, its parent, grandparent, ... (None once a manifest is unreadable).
        LightManifests by default (no tensor table): walks need parents and object ids;
        `light=False` reads each Manifest whole (fsck checks tensor tables)."""
        seen = set()
        oid: str | None = commit
        while oid and oid not in seen:
            seen.add(oid)
            try:
                m = self.read_light_manifest(oid) if light else self.read_manifest(oid)
            except (ObjectMissing, ObjectCorrupt):
                yield oid, None
                return
            yield oid, m
            oid = m.parent

    def name_is_free(self, name: str) -> bool:
        validate_name(name)
        return name not in self.refs()

    def next_free_name(self, stem: str, fmt: str = "{stem}-v{n}", start: int = 2) -> str:
        """`stem-v2`, `stem-v3`, ... or `stem-finetuned-001` with fmt="{stem}-finetuned-{n:03d}"."""
        refs = self.refs()
        n = start
        while fmt.format(stem=stem, n=n) in refs:
            n += 1
        return validate_name(fmt.format(stem=stem, n=n))

    def registry_entry(self, name: str, commit: str, manifest: Manifest,
                       fine_tuned_from: str | None) -> RefEntry:
        """The entry for a new ref `name` -> `commit` (its size counted from this store)."""
        size = sum(self.objects.size(o) for o in manifest.object_ids())
        return RefEntry.for_commit(name, commit, manifest, size, fine_tuned_from)

    def add_ref(self, commit: str, manifest: Manifest, name: str | None,
                choose_name: Callable[[], str], fine_tuned_from: str | None = None) -> str:
        """Point a new ref at `commit`: `name` if given (an error if taken), else the name
        `choose_name()` picks, picked again if a concurrent writer takes it first."""
        for _attempt in range(10):
            target = name or choose_name()
            entry = self.registry_entry(target, commit, manifest, fine_tuned_from)
            try:
                self.registry.set_ref(entry, expected=None)
                return target
            except RefChanged:
                if name:
                    raise NameTaken(name, self.next_free_name(name)) from None
        raise NameTaken(choose_name())

    # -- ref commands -------------------------------------------------------------------
    def tag(self, ref: str, new: str) -> str:
        """A second ref to the commit `ref` resolves to; the new name must be free."""
        validate_name(new)
        with self.writer_lock("tag", create=False):
            r = self.resolve(ref)
            m = self.read_manifest(r.commit)
            parent_name = r.entry.fine_tuned_from if r.entry is not None else None
            if r.entry is None and m.parent:  # named by commit id: the parent's ref, if any
                parent_name = next(iter(sorted(self.names_by_commit().get(m.parent, []))), None)
            entry = self.registry_entry(new, r.commit, m, parent_name)
            try:
                self.registry.set_ref(entry, expected=None)
            except RefChanged as e:
                if e.found != r.commit:  # already this tag: done (a retry after a crash)
                    raise NameTaken(new, self.next_free_name(new)) from None
        return r.commit

    def remove(self, name: str) -> str:
        """Drop a ref (by name only: removing by commit id would be too easy to get wrong)."""
        with self.writer_lock("rm", create=False):
            entry = self.refs().get(name)
            if entry is None:
                self.resolve(name)  # raises UnknownModel with a suggestion
                raise UnknownModel(name)
            self.registry.remove(name, expected=entry.commit)
        return entry.commit

    # -- the Python API's read side: typed views of what `--json` prints -----------------
    def list(self) -> "list[views.ModelRef]":
        """One entry per ref, sorted by name (`mstore list`)."""
        from . import report, views

        self.require()
        return [views.ModelRef.from_json(row) for row in report.list_rows(self)]

    def show(self, ref: str) -> "views.CommitInfo":
        """The commit `ref` names, its manifest in full (`mstore show`)."""
        from . import report, views

        self.require()
        return views.CommitInfo.from_json(report.show(self, ref))

    def log(self, ref: str) -> "list[views.LogEntry]":
        """The lineage of `ref`, newest first (`mstore log`)."""
        from . import report, views

        self.require()
        return [views.LogEntry.from_json(e)
                for e in report.log_entries(self, self.resolve(ref).commit)]

    def rm(self, name: str) -> str:
        """Remove a ref (`mstore rm`); returns the commit it held."""
        return self.remove(name)

    def gc(self, *, dry_run: bool = False, grace: float | None = None,
           explain: bool = False) -> "views.GcResult":
        """Delete what no ref keeps (`mstore gc`); `grace` in seconds (default one hour);
        `explain`: the result's `kept` says why each kept object is kept."""
        from . import gc, views

        plan = gc.collect(self, grace=gc.DEFAULT_GRACE if grace is None else grace,
                          dry_run=dry_run, explain=explain)
        return views.GcResult.from_json(plan.to_json(dry_run))

    def fsck(self) -> "views.FsckReport":
        """Re-hash every object and check every ref and manifest (`mstore fsck`)."""
        from . import fsck, views

        self.require()
        return views.FsckReport.from_json(fsck.to_json(fsck.check(self)))

    def du(self) -> "views.DiskUsage":
        """Logical against physical bytes (`mstore du`)."""
        from . import report, views

        self.require()
        return views.DiskUsage.from_json(report.du(self))

    def diff(self, a: str, b: str) -> "views.TensorDiff":
        """Tensors added, removed, changed and shared between two commits (`mstore diff`)."""
        from . import report, views

        self.require()
        return views.TensorDiff.from_json(report.diff(self, a, b))
