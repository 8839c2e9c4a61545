"""What the read commands compute: list rows, log entries, du and diff. No torch here.

Each function returns plain data (what `--json` prints); the CLI only formats it. The
`--json` outputs share one vocabulary (docs/json.md): a commit is described by `commit`,
`names` (its refs; a `list` row has its own ref as `name`), `parent` (a commit id),
`architecture`, `model_id`, `license` (null when unknown), `created_at`, `message`;
`list` keeps the registry's own fields beside them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..errors import MStoreError, ObjectCorrupt, ObjectMissing
from .licenses import inherited_note
from .manifest import LightManifest, Manifest, TensorEntry
from .refs import RefEntry
from .repo import Store


def list_rows(store: Store, refs: "dict[str, RefEntry] | None" = None) -> list[dict[str, Any]]:
    """One row per ref: the registry entry as SPEC gives it, plus the shared vocabulary
    (`name` is the row's ref; the other names of its commit are rows of their own).
    `refs`: the entries, when the caller has read them already (registry.json is parsed
    once: at 10,000 refs a parse costs ~40 ms)."""
    heads: dict[str, LightManifest | None] = {}
    notes: dict[str, str | None] = {}
    run: dict[str, int | None] = {}
    variants: dict[str, str] = {}
    parent_notes: dict[str | None, str | None] = {}
    refs = store.refs() if refs is None else refs
    names = store.names_by_commit(refs)
    rows = []
    for name, e in sorted(refs.items()):
        commit = e.commit
        if commit not in heads:
            heads[commit] = _head_of(store, commit)
            parent = heads[commit].parent if heads[commit] else None
            if parent not in parent_notes:  # siblings share their parent's manifest read
                parent_notes[parent] = license_note(store, parent)
            notes[commit] = parent_notes[parent]
            full = heads[commit] is None or heads[commit].kind == "full"
            # a full model runs on about its stored bytes: no second read of its manifest
            run[commit] = e.size_bytes if full else _run_bytes(store, commit)
            variants[commit] = variant(heads[commit], names) if heads[commit] else ""
        m = heads[commit]
        row = e.to_json()  # a fresh dict: filled in place rather than copied again
        row.update(name=name, short_commit=commit[:12], architecture=e.architecture_type,
                   parent=m.parent if m else None, license=e.license or None,
                   license_note=notes[commit], kind=m.kind if m else None,
                   variant=variants[commit], run_bytes=run[commit])
        rows.append(row)
    return rows


def license_note(store: Store, parent: str | None) -> str | None:
    """What a child says about the license it carries from `parent` (None: nothing)."""
    if parent is None:
        return None
    try:
        parent_license = store.read_light_manifest(parent).license
    except MStoreError:  # the parent is gone or damaged: fsck names it
        return None
    return inherited_note(parent_license, True)
def _run_bytes(store: Store, commit: str) -> int | None:
    """The memory a commit's weights take to run (its tensor table's data bytes)."""
    try:
        return store.read_manifest(commit).run_bytes
    except MStoreError:
        return None


def _head_of(store: Store, commit: str) -> LightManifest | None:
    try:
        return store.read_light_manifest(commit)
    except MStoreError:  # a missing or damaged manifest: fsck names it; list still lists
        return None


def variant(m: Manifest | LightManifest, names: dict[str, list[str]]) -> str:
    """'' for a full model; 'lora r=16 on base' for an adapter, 'int8 of base' for a
    quantized child (the parent by its first ref name, else its short id)."""
    what = m.describe()
    if not what or not m.parent:
        return what
    parent = (sorted(names.get(m.parent, [])) or [m.parent[:12]])[0]
    return f"{what} {'on' if m.kind == 'adapter' else 'of'} {parent}"


def weights_present(store: Store, m: Manifest | LightManifest,
                    seen: dict[str, bool] | None = None) -> bool:
    """All of the manifest's objects are on disk. `seen` memoises across manifests: a
    lineage shares most objects between generations, so each is stat'ed once."""
    seen = {} if seen is None else seen
    for o in m.object_ids():
        if o not in seen:
            seen[o] = store.objects.exists(o)
        if not seen[o]:
            return False
    return True


def _entry(store: Store, oid: str, m: LightManifest | None, names: dict[str, list[str]],
           present: dict[str, bool]) -> dict[str, Any]:
    """One commit as `log --json` prints it (a missing manifest says so)."""
    if m is None:
        return {"commit": oid, "names": sorted(names.get(oid, [])), "parent": None,
                "created_at": None, "message": "(manifest missing)", "training": None,
                "weights_present": False, "missing": True}
    return {
        "commit": oid, "names": sorted(names.get(oid, [])), "parent": m.parent,
        "created_at": m.created_at, "message": m.message, "architecture": m.architecture,
        "model_id": m.model_id, "source": m.source, "license": m.license or None,
        "training": m.training, "weights_present": weights_present(store, m, present),
        "kind": m.kind, "variant": variant(m, names), "evals": eval_notes(store, oid),
    }


def eval_notes(store: Store, commit: str) -> list[dict[str, Any]]:
    """The commit's "eval" attachments (`mstore eval`), oldest first: each payload with
    its `created_at` and attachment id. An unreadable attachment list shows none here
    (fsck names it)."""
    if not store.attachments_dir.is_dir():  # none in this store: not worth loading the module
        return []
    try:
        notes = store.attachments.list(commit, kind="eval")
    except MStoreError:
        return []
    return [{**a.payload, "created_at": a.created_at, "attachment": a.oid} for a in notes]


def log_entries(store: Store, commit: str) -> list[dict[str, Any]]:
    """The lineage of `commit`, newest first, as `mstore log --json` prints it."""
    names = store.names_by_commit()
    present: dict[str, bool] = {}
    return [_entry(store, oid, m, names, present) for oid, m in store.lineage(commit)]


def all_commits_graph(store: Store) -> list[dict[str, Any]]:
    """Every commit reachable from any ref, newest first, each with its parent (log --all)."""
    names = store.names_by_commit()
    present: dict[str, bool] = {}
    seen: dict[str, dict[str, Any]] = {}
    for entry in store.refs().values():
        for oid, m in store.lineage(entry.commit):
            if oid in seen:
                break
            seen[oid] = _entry(store, oid, m, names, present)
    return sorted(seen.values(), key=lambda e: (e["created_at"] or "", e["commit"]), reverse=True)


def du(store: Store) -> dict[str, Any]:
    """Logical bytes (each distinct commit that refs hold, its manifest and every object it
    names, counted in full once: a second name for a commit adds nothing) against physical
    bytes on disk (`loose_bytes` + `packed_bytes`). One row per commit; `new_vs_parent_bytes`
    counts tensor and file objects; `stored_bytes` is what its objects take on disk, packed
    ones at their packed size."""
    stored = {s.oid: s for s in store.objects.iter_stored()}
    sizes = {oid: s.loose.st_size if s.loose else store.objects.size(oid)
             for oid, s in stored.items()}  # logical: what the object is, packed or not
    disk = {oid: s.disk_bytes for oid, s in stored.items()}
    by_commit = store.names_by_commit()
    held: dict[str, set[str]] = {}
    parents: dict[str, tuple[str, set[str]]] = {}
    kinds: dict[str, str | None] = {}
    for commit in by_commit:
        try:
            m = store.read_manifest(commit)
        except (ObjectMissing, ObjectCorrupt):
            held[commit] = set()
            kinds[commit] = None
            continue
        kinds[commit] = m.kind
        held[commit] = m.object_ids() | {commit}  # the manifest is part of what a ref holds
        if m.parent:
            try:
                parents[commit] = (m.parent, store.read_manifest(m.parent).object_ids())
            except (ObjectMissing, ObjectCorrupt):
                parents[commit] = (m.parent, set())
    users: dict[str, int] = {}
    for oids in held.values():
        for o in oids:
            users[o] = users.get(o, 0) + 1
    models = []
    for commit in sorted(held, key=lambda c: (sorted(by_commit[c])[0], c)):
        oids, names = held[commit], sorted(by_commit[commit])
        row = {
            "name": names[0], "names": names, "commit": commit, "kind": kinds[commit],
            "parent": parents[commit][0] if commit in parents else None,
            "logical_bytes": sum(sizes.get(o, 0) for o in oids),
            "unique_bytes": sum(sizes.get(o, 0) for o in oids if users[o] == 1),
            "objects": len(oids),
            "stored_bytes": sum(disk.get(o, 0) for o in oids),
            "packed_objects": sum(1 for o in oids if o in stored and stored[o].packed),
        }
        if commit in parents:
            base = parents[commit][1]
            row["new_vs_parent_bytes"] = sum(sizes.get(o, 0) for o in oids - base - {commit})
            row["shared_with_parent"] = len(oids & base)
        models.append(row)
    logical = sum(r["logical_bytes"] for r in models)
    physical = sum(disk.values())
    loose = sum(s.loose.st_size for s in stored.values() if s.loose)
    return {"models": models, "refs": sum(len(n) for n in by_commit.values()),
            "commits": len(models), "logical_bytes": logical, "physical_bytes": physical,
            "loose_bytes": loose, "packed_bytes": physical - loose,
            "packed_objects": sum(1 for s in stored.values() if s.packed),
            "objects": len(sizes),
            "dedup_ratio": round(logical / physical, 3) if physical else None}


def diff(store: Store, a: str, b: str) -> dict[str, Any]:
    """Tensors added, removed, changed (with relative L2 change) and shared from a to b.

    A LoRA adapter child is compared as the model it runs: its base's tensors, with each
    weight the adapter adapts being W + scaling * B @ A. So `diff base child` lists the
    base weights the adapter changes (and by how much), and `adapter` names its tensors and
    the modules they target."""
    ra, rb = store.resolve(a), store.resolve(b)
    ma, mb = store.read_manifest(ra.commit), store.read_manifest(rb.commit)
    ea, eb = effective_tensors(store, ma), effective_tensors(store, mb)
    ta, tb = ea.tensors, eb.tensors
    changed, shared = [], []
    for name in sorted(set(ta) & set(tb)):
        la, lb = ea.lora.get(name), eb.lora.get(name)
        if ta[name].object == tb[name].object and _same_lora(la, lb):
            shared.append(name)
            continue
        row: dict[str, Any] = {"name": name, "a": ta[name].object, "b": tb[name].object}
        if la or lb:
            row["lora"] = {side: lo.note for side, lo in (("a", la), ("b", lb)) if lo}
        if ta[name].shape != tb[name].shape or ta[name].dtype != tb[name].dtype:
            row["relative_l2"] = None
            row["note"] = (f"{ta[name].dtype}{ta[name].shape} -> "
                           f"{tb[name].dtype}{tb[name].shape}")
        else:
            row["relative_l2"], note = relative_l2(store, ta[name].object, tb[name].object,
                                                   la, lb)
            if note:
                row["note"] = note
        changed.append(row)
    shared_bytes = sum(store.objects.size(ta[n].object) for n in shared
                       if store.objects.exists(ta[n].object))
    return {
        "a": {"ref": a, "name": ra.name, "commit": ra.commit, "kind": ma.kind},
        "b": {"ref": b, "name": rb.name, "commit": rb.commit, "kind": mb.kind},
        "added": sorted(set(tb) - set(ta)), "removed": sorted(set(ta) - set(tb)),
        "changed": changed, "shared": shared, "shared_bytes": shared_bytes,
        "config_changed": ma.config != mb.config,
        "files_changed": sorted(k for k in set(ma.files) | set(mb.files)
                                if ma.files.get(k) != mb.files.get(k)),
        "adapter": {side: e.summary(store) for side, e in (("a", ea), ("b", eb))
                    if e.adapter is not None} or None,
    }


@dataclass
class LoraDelta:
    """One adapted weight of an adapter child: W + scaling * B @ A."""

    a: TensorEntry
    b: TensorEntry
    scaling: float
    note: str

    def key(self) -> tuple[str, str, float]:
        return (self.a.object, self.b.object, self.scaling)


def _same_lora(x: "LoraDelta | None", y: "LoraDelta | None") -> bool:
    return (x is None and y is None) or (x is not None and y is not None and x.key() == y.key())


@dataclass
class EffectiveTensors:
    """The tensors a commit runs with: its own, or an adapter child's base's plus deltas."""

    tensors: dict[str, TensorEntry]
    lora: dict[str, LoraDelta]
    adapter: Manifest | None = None

    def summary(self, store: Store) -> dict[str, Any]:
        from .lora_names import adapted_modules  # diff and export only (a dataclass, a regex)

        m = self.adapter
        modules, _ = adapted_modules(m.tensors)
        return {**(m.adapter or {}), "base": m.parent, "tensors": sorted(m.tensors),
                "modules": sorted(modules),
                "bytes": sum(store.objects.size(t.object) for t in m.tensors.values()
                             if store.objects.exists(t.object))}


def effective_tensors(store: Store, m: Manifest) -> EffectiveTensors:
    if m.kind != "adapter":
        return EffectiveTensors(m.tensors, {})
    from .lora_names import adapted_modules

    base = store.read_manifest(m.parent)
    scaling = _lora_scaling(store, m)
    lora = {}
    for mod in adapted_modules(m.tensors)[0].values():
        if mod.lora_a is None or mod.lora_b is None or mod.base_weight not in base.tensors:
            continue
        a, b = m.tensors[mod.lora_a], m.tensors[mod.lora_b]
        r = a.shape[0]
        lora[mod.base_weight] = LoraDelta(a, b, scaling(r), f"lora r={r} (A {a.shape}, B {b.shape})")
    return EffectiveTensors(base.tensors, lora, m)


def _lora_scaling(store: Store, m: Manifest):
    """scaling(r): lora_alpha / r, or / sqrt(r) with use_rslora (peft's rule)."""
    alpha = float((m.adapter or {}).get("alpha") or 0)
    rslora = False
    oid = m.files.get("adapter_config.json")
    if oid is not None:
        try:
            raw = json.loads(store.objects.read_bytes(oid))
            alpha = float(raw.get("lora_alpha", alpha))
            rslora = bool(raw.get("use_rslora"))
        except (ValueError, TypeError, AttributeError, ObjectMissing):
            pass
    return lambda r: alpha / (math.sqrt(r) if rslora else r)


def relative_l2(store: Store, oid_a: str, oid_b: str, lora_a: "LoraDelta | None" = None,
                lora_b: "LoraDelta | None" = None) -> tuple[float | None, str | None]:
    """(||b - a|| / ||a||, None), computed in float64 with numpy (no torch); or (None, why)
    when it is undefined: a was all zeros, a value is not finite, numpy lacks the dtype.
    `lora_a` / `lora_b`: a LoRA delta added to that side's weight first."""
    from .tensor_numpy import load_as_float

    x, y = load_as_float(store, oid_a), load_as_float(store, oid_b)
    for side, lo in ((0, lora_a), (1, lora_b)):
        if lo is None or (x if side == 0 else y) is None:
            continue
        da, db = load_as_float(store, lo.a.object), load_as_float(store, lo.b.object)
        if da is None or db is None:
            return None, "dtype not comparable without torch"
        if side == 0:
            x = x + lo.scaling * (db @ da)
        else:
            y = y + lo.scaling * (db @ da)
    if x is None or y is None:
        return None, "dtype not comparable without torch"
    denom = float((x * x).sum())
    num = float(((y - x) ** 2).sum())
    if not math.isfinite(num + denom):
        return None, "holds non-finite values"
    if denom == 0:
        return None, "was all zeros"
    return math.sqrt(num / denom), None


def show(store: Store, ref: str) -> dict[str, Any]:
    """The manifest in full, with the names that point at it and what is on disk."""
    r = store.resolve(ref)
    m = store.read_manifest(r.commit)
    by_commit = store.names_by_commit()
    names = sorted(by_commit.get(r.commit, []))
    parent_names = sorted(by_commit.get(m.parent, [])) if m.parent else []
    size = sum(store.objects.size(o) for o in m.object_ids() if store.objects.exists(o))
    return {"name": r.name or (names[0] if names else None), "names": names,
            "commit": r.commit, "parameters": m.parameters, "size_bytes": size,
            "weights_present": weights_present(store, m), "parent": m.parent,
            "parent_names": parent_names, "architecture": m.architecture,
            "model_id": m.model_id, "license": m.license or None,
            "license_note": license_note(store, m.parent), "created_at": m.created_at,
            "message": m.message, "kind": m.kind, "variant": variant(m, by_commit),
            "run_bytes": m.run_bytes, "evals": eval_notes(store, r.commit),
            "adapter": m.adapter, "manifest": m.to_dict()}
