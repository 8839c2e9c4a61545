"""What a set of refs keeps alive: the one rule gc, push, pull and clone share.

SPEC "Reachability": refs are the roots; every manifest reachable through `parent` stays
(history is small); tensor and file objects stay only while some root's OWN manifest names
them, or the manifest it is read on: an adapter child needs its base's weights, so a root
that is an adapter keeps its parent's objects too (and theirs, while each is an adapter).
The attachments of every kept manifest (eval notes, signatures) are kept with it. gc keeps exactly `closure(refs)`; a push or pull moves `closure({the ref})` minus what
the other side holds, so after a transfer gc on either side deletes nothing and a second
transfer has nothing to send. A new kind of dependency (an adapter child's base, a delta's
base object) is added here, in `closure`, and nowhere else.

Delta bases: a packed object XOR-ed against a base object cannot be rebuilt without it,
so every kept object keeps the base its packed encoding names, and that base's base, even
when no ref names them any more (`base_of`, the packed header's lookup; `delta_bases` says
which delta keeps each one, for `gc --dry-run`).

`load` reads a manifest from wherever the walk runs (the local store, or a remote for a
pull); it returns None for one that cannot be read, which ends that root's walk and is
reported in `unreadable`: gc refuses on it, a transfer decides what it can do without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from ..errors import AttachmentIndexCorrupt, ObjectCorrupt, ObjectMissing
from .manifest import LightManifest


@dataclass
class Closure:
    manifests: dict[str, LightManifest] = field(default_factory=dict)  # every reachable manifest
    objects: set[str] = field(default_factory=set)  # tensor/file/attachment objects kept
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (manifest, root label)
    order: list[str] = field(default_factory=list)  # the manifests, each after its parent
    attachments: dict[str, list[str]] = field(default_factory=dict)  # commit -> its attachments
    reasons: dict[str, str] | None = None  # oid -> why it is kept, when asked (`explain`)
    # objects kept only as the base of a kept packed delta -> that delta
    delta_bases: dict[str, str] = field(default_factory=dict)

    def keep(self) -> set[str]:
        """Every object id (manifests included) this closure keeps."""
        return set(self.manifests) | self.objects

    def why(self, oid: str) -> str | None:
        """Why `oid` is kept (a closure built with explain=True), None if it is not."""
        if self.reasons is None:
            raise ValueError("closure was built without explain=True")
        return self.reasons.get(oid)

    def _keep(self, oids, reason: str) -> None:
        if self.reasons is not None:
            for o in oids:
                if o not in self.objects:
                    self.reasons.setdefault(o, reason)
        self.objects |= set(oids)


def closure(roots: Mapping[str, str], load: Callable[[str], LightManifest | None],
            lenient: Mapping[str, str] | None = None,
            attachments: Callable[[str], list[str]] | None = None,
            explain: bool = False,
            base_of: Callable[[str], str | None] | None = None) -> Closure:
    """The objects `roots` (label -> commit id) keep alive, read through `load`.

    `lenient` roots keep what they reach too, but a manifest they cannot read is not
    reported: they are registry entries that are skipped as invalid (they protect what
    they name, yet must never hold gc back). `attachments(commit)` lists a commit's
    attachment objects (None: none are kept). `explain` records why each object is kept.
    `base_of(oid)`: the base object the packed encoding of `oid` names (None: none); each
    kept object keeps its chain of bases."""
    out = Closure(reasons={} if explain else None)
    strict = list(roots.items())
    for label, commit in strict + [(None, c) for c in (lenient or {}).values()]:
        chain: list[str] = []
        oid: str | None = commit
        head = True  # this manifest's own objects are needed (the root, or what it is read on)
        while oid and oid not in out.manifests and oid not in chain:
            m = load(oid)
            if m is None:
                if label is not None:
                    out.unreadable.append((oid, label))
                break
            out.manifests[oid] = m
            if out.reasons is not None:
                out.reasons.setdefault(oid, _root_reason(label, commit, oid, chain))
            chain.append(oid)
            if head:
                out._keep(m.object_ids(), _object_reason(label, commit, oid))
            head = head and m.needs_parent_objects
            oid = m.parent
        while head and oid in out.manifests:  # reached a manifest another root walked
            m = out.manifests[oid]
            out._keep(m.object_ids(), _object_reason(label, commit, oid))
            head = m.needs_parent_objects
            oid = m.parent
        out.order.extend(reversed(chain))
    if attachments is not None:
        for commit in out.manifests:
            listed = attachments(commit)
            if listed:
                out.attachments[commit] = listed
                out._keep(listed, f"attachment of commit {commit[:12]}")
    if base_of is not None:
        add_delta_bases(out, base_of)
    return out


def add_delta_bases(out: Closure, base_of: Callable[[str], str | None]) -> None:
    """Keep the chain of bases under every kept object (each base once; loops end)."""
    for oid in sorted(out.objects):
        cur = oid
        while True:
            base = base_of(cur)
            if base is None or base in out.objects:
                break
            out._keep([base], f"base of packed delta {cur[:12]}")
            out.delta_bases[base] = cur
            cur = base


def _root_reason(label: str | None, root: str, oid: str, chain: list[str]) -> str:
    who = f"ref {label}" if label is not None else f"invalid registry entry's commit {root[:12]}"
    return f"commit of {who}" if not chain else f"ancestor of {who}"


def _object_reason(label: str | None, root: str, manifest: str) -> str:
    who = f"ref {label}" if label is not None else f"invalid registry entry's commit {root[:12]}"
    if manifest == root:
        return f"named by {who}"
    return f"named by {manifest[:12]}, the base {who} is an adapter on"


def store_attachments(store) -> Callable[[str], list[str]]:
    """`attachments` for a local store: a commit's attachment list (a damaged list keeps
    nothing of its own; fsck names it)."""
    def listed(commit: str) -> list[str]:
        try:
            return store.attachments.index(commit)
        except AttachmentIndexCorrupt:
            return []

    return listed


def store_loader(store) -> Callable[[str], LightManifest | None]:
    """`load` for a local store: light manifests (parent and object ids), None if unreadable."""

    def load(oid: str) -> LightManifest | None:
        try:
            return store.read_light_manifest(oid)
        except (ObjectMissing, ObjectCorrupt):
            return None

    return load


def ref_closure(store, explain: bool = False, packed: set[str] | None = None) -> Closure:
    """What the store's refs keep (gc's keep set), the commits of invalid entries included.
    `packed`: the ids stored packed, from the caller's own listing of objects (gc and fsck
    have one); None lists them here. Only those can have a delta base to keep."""
    if packed is None:
        packed = store.objects.packed_ids()

    def base_of(oid: str) -> str | None:
        return store.objects.delta_base(oid) if oid in packed else None

    return closure({name: e.commit for name, e in store.refs().items()}, store_loader(store),
                   lenient={c: c for c in sorted(store.registry.invalid_commits())},
                   attachments=store_attachments(store), explain=explain, base_of=base_of)
