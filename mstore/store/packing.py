"""`mstore pack` / `unpack`: change how tensor objects are stored, never what they are.

Pack: each tensor object of a commit is stored packed (`packcodec`): XOR-ed against the
parent commit's tensor of the same name, dtype and shape when there is one (a delta), else
byte-grouped alone; it stays loose where the packed form is not smaller. Ids, manifests and
refs do not change, so dedup, remotes, fsck and every reader keep their meaning.

Chains are bounded: no object is rebuilt through more than MAX_DELTA_DEPTH deltas. Every
delta level costs a whole extra decompression of the tensor on each load, which is what a
model is read for; three levels hold a base -> SFT -> preference-tuned -> task lineage
packed all the way, and a deeper child is XOR-ed against the ancestor three deltas up
(still a delta, only a less close one) instead of lengthening the chain. Packing an object
that is already a base checks the deltas on top of it too (the bound holds in any order).

Crash safety: packed files go through an ObjectBatch (written, one filesystem sync,
renamed, a second sync) before any loose file is removed; unpack writes the loose files the
same way before removing packed ones. A kill at any point leaves each object complete in
at least one encoding, and a rerun finishes the job (an object found in both encodings has
the redundant one removed). Both hold the store lock shared (gc waits) and `pack.lock`
exclusive (two packers never build deltas on each other's half-made decisions).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from . import failpoints, fsio
from ..errors import MStoreError, NothingToPack, ObjectCorrupt, ObjectMissing
from ..reporting import SILENT, Reporter
from .locks import StoreLock
from .manifest import Manifest
from .objects import hash_bytes
from .repo import Store

MAX_DELTA_DEPTH = 3
BATCH_BYTES = 1024**3  # loose bytes packed per durable batch: bounds the extra disk in use


@dataclass
class PackResult:
    commits: list[str] = field(default_factory=list)
    packed: int = 0  # objects newly packed
    deltas: int = 0  # of which against a base
    already: int = 0  # objects that were packed before
    kept_loose: int = 0  # packed form not smaller (or not a canonical tensor object)
    loose_bytes: int = 0  # loose size of the objects newly packed
    packed_bytes: int = 0  # their packed size
    unpacked: int = 0  # unpack: objects now loose
    unpacked_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ratio"] = round(self.packed_bytes / self.loose_bytes, 4) if self.loose_bytes else None
        return doc


def _targets(store: Store, names: list[str], every: bool, verb: str = "pack") -> list[str]:
    """Commits named (refs or ids), or every ref's; parents before children."""
    if not names and not every:
        raise NothingToPack(verb)
    refs = store.refs()
    wanted = ({e.commit for e in refs.values()} if every
              else {store.resolve(n).commit for n in names})
    depth = {c: sum(1 for _ in store.lineage(c)) for c in wanted}
    return sorted(wanted, key=lambda c: (depth[c], c))


def pack(store: Store, names: Iterable[str] = (), every: bool = False, *,
         reporter: Reporter = SILENT) -> PackResult:
    """Pack the tensor objects of the commits `names` (or of every ref's, `every`); the ones
    a commit shares with its parent are the parent's, packed when the parent is named."""
    names = list(names)
    store.require()
    _targets(store, names, every)  # bad input refused before a lock file is made
    with store.writer_lock("pack", create=False), \
            StoreLock(store.root / "pack.lock", shared=False, purpose="pack"):
        result = PackResult(commits=_targets(store, names, every))
        _Packer(store, result, reporter).run()
    return result


def unpack(store: Store, names: Iterable[str] = (), every: bool = False, *,
           reporter: Reporter = SILENT) -> PackResult:
    """Store the tensor objects of `names` loose again (`every`: every packed object)."""
    names = list(names)
    store.require()
    if names or not every:
        _targets(store, names, every, "unpack")  # bad input refused before any lock
    with store.writer_lock("unpack", create=False), \
            StoreLock(store.root / "pack.lock", shared=False, purpose="unpack"):
        commits = [] if every and not names else _targets(store, names, every, "unpack")
        result = PackResult(commits=commits)
        objects = store.objects
        if every:
            oids = sorted(s.oid for s in objects.iter_stored() if s.packed is not None)
        else:
            oids = sorted({t.object for c in commits
                           for t in store.read_manifest(c).tensors.values()})
        todo = [o for o in oids if objects.pack_path(o).is_file()]
        for chunk in _chunks(objects, todo):
            with objects.batch() as batch:
                for oid in chunk:
                    if objects.path(oid).is_file():
                        continue  # a loose copy is already there (an unpack cut short)
                    data = objects.tensor_bytes(oid)  # rebuilt and re-hashed
                    batch.put_encoding(oid, data, packed=False)
                    result.unpacked_bytes += data.size
            for oid in chunk:
                fsio.unlink(objects.pack_path(oid), missing_ok=True)
                failpoints.hit("unpack.packed-removed")
                result.unpacked += 1
    return result


def _chunks(objects, oids: list[str]) -> Iterable[list[str]]:
    chunk, size = [], 0
    for oid in oids:
        chunk.append(oid)
        size += objects.size(oid)
        if size >= BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Packer:
    """One pack run: decide each object's base (bounded chains, no loops), encode, write."""

    def __init__(self, store: Store, result: PackResult, reporter: Reporter):
        self.store, self.objects, self.result, self.reporter = \
            store, store.objects, result, reporter
        self.pending: dict[str, str | None] = {}  # decided this run: oid -> base
        self.dependents: dict[str, set[str]] = {}  # base -> deltas on it (whole store)
        for s in self.objects.iter_stored():
            if s.packed is not None:
                base = self.objects.delta_base(s.oid)
                if base:
                    self.dependents.setdefault(base, set()).add(s.oid)

    def run(self) -> None:
        work: list[tuple[str, Any, str | None]] = []  # (oid, entry, candidate base)
        seen: set[str] = set()
        for commit in self.result.commits:
            m = self.store.read_manifest(commit)
            parent = self._parent(m)
            # a tensor the child shares with its parent is the parent's object: packed
            # when the parent is (parents come first), never re-encoded behind its loads
            inherited = {pt.object for pt in parent.tensors.values()} if parent else set()
            for name, t in sorted(m.tensors.items()):
                if t.object in seen or t.object in inherited:
                    continue
                seen.add(t.object)
                p = parent.tensors.get(name) if parent else None
                base = (p.object if p and p.dtype == t.dtype and p.shape == t.shape
                        and p.object != t.object else None)
                work.append((t.object, t, base))
        total = sum(self.objects.size(o) for o, _t, _b in work if self.objects.exists(o))
        with self.reporter.progress(total, "pack") as bar:
            batch_items: list[str] = []
            size = 0
            batch = self.objects.batch().__enter__()
            try:
                for oid, entry, base in work:
                    n = self._one(batch, oid, entry, base)
                    bar.update(n)
                    if n:
                        batch_items.append(oid)
                        size += n
                    if size >= BATCH_BYTES:
                        self._finish(batch, batch_items)
                        batch, batch_items, size = self.objects.batch().__enter__(), [], 0
                self._finish(batch, batch_items)
            except BaseException:
                batch.abort()
                raise

    def _parent(self, m: Manifest) -> Manifest | None:
        if not m.parent:
            return None
        try:
            return self.store.read_manifest(m.parent)
        except (ObjectMissing, ObjectCorrupt):
            return None  # its history is not here: everything packs alone

    def _finish(self, batch, oids: list[str]) -> None:
        """Packed files durable and visible, then the loose ones go."""
        batch.commit()
        for oid in oids:
            fsio.unlink(self.objects.path(oid), missing_ok=True)
            failpoints.hit("pack.loose-removed")

    def _one(self, batch, oid: str, entry, candidate: str | None) -> int:
        """Stage the packed form of `oid`; returns its loose bytes (0: nothing staged)."""
        objects = self.objects
        if objects.pack_path(oid).is_file():
            self.result.already += 1
            if objects.path(oid).is_file():  # a pack cut short: finish it
                problem = objects.verify(oid)
                if problem:
                    raise ObjectCorrupt(oid, problem)
                fsio.unlink(objects.path(oid), missing_ok=True)
                failpoints.hit("pack.loose-removed")
            return 0
        try:
            with open(objects.path(oid), "rb") as f:
                loose = f.read()
        except FileNotFoundError:
            raise ObjectMissing(oid, "tensor object") from None
        if hash_bytes(loose) != oid:
            raise ObjectCorrupt(oid, "content does not match its name; not packed")
        from . import packcodec
        from .safetensors_io import DTYPE_SIZES, object_header

        nbytes = math.prod(entry.shape) * DTYPE_SIZES.get(entry.dtype, 0)
        head = object_header(entry.dtype, entry.shape, nbytes)
        if entry.dtype not in DTYPE_SIZES or not loose.startswith(head) \
                or len(loose) != len(head) + nbytes:
            self.result.kept_loose += 1  # written by another tool: stays as it is
            return 0
        base = self._choose_base(oid, candidate)
        base_data = self._base_data(base, len(head)) if base else None
        if base and base_data is None:
            base = None
        blob = packcodec.encode(entry.dtype, entry.shape, memoryview(loose)[len(head):],
                                base, base_data)
        if len(blob) >= len(loose):
            self.result.kept_loose += 1
            return 0
        problem = _check_roundtrip(oid, blob, head, base_data)
        if problem:
            raise MStoreError(f"packing {oid} does not round-trip ({problem}); nothing of it "
                              "was written: please report this")
        batch.put_encoding(oid, blob, packed=True)
        self.pending[oid] = base
        if base:
            self.dependents.setdefault(base, set()).add(oid)
            self.result.deltas += 1
        self.result.packed += 1
        self.result.loose_bytes += len(loose)
        self.result.packed_bytes += len(blob)
        return len(loose)

    def _base_data(self, base: str, start: int):
        try:
            data = self.objects.tensor_bytes(base)
        except (ObjectMissing, ObjectCorrupt):
            return None  # a damaged base is never built on (fsck names it)
        if data.size < start or hash_bytes(data) != base:
            return None
        return data[start:]

    def _chain(self, oid: str) -> list[str] | None:
        """`oid` and the bases under it, nearest first; None if the chain loops."""
        from .objects import MAX_CHAIN

        out = [oid]
        while len(out) <= MAX_CHAIN:
            cur = out[-1]
            base = self.pending[cur] if cur in self.pending else self.objects.delta_base(cur)
            if base is None:
                return out
            if base in out:
                return None
            out.append(base)
        return None

    def _height(self, oid: str, seen: frozenset = frozenset()) -> int:
        """How many deltas stand on top of `oid` (the longest chain above it)."""
        above = self.dependents.get(oid, set()) - seen
        return 1 + max(self._height(d, seen | {oid}) for d in above) if above else 0

    def _choose_base(self, oid: str, candidate: str | None) -> str | None:
        """The candidate, or the nearest base under it that keeps every chain through `oid`
        within MAX_DELTA_DEPTH; None when there is none (or one would make a loop)."""
        if candidate is None or not self.objects.exists(candidate):
            return None
        chain = self._chain(candidate)
        if chain is None or oid in chain:
            return None
        room = MAX_DELTA_DEPTH - self._height(oid)  # deltas allowed under `oid`, itself one
        for i, base in enumerate(chain):
            if len(chain) - 1 - i <= room - 1:  # depth of `base` + this delta <= room
                return base
        return None


def _check_roundtrip(oid: str, blob: bytes, head: bytes, base_data) -> str | None:
    """Decode `blob` as a reader will and re-hash: nothing unreadable is ever published."""
    import numpy as np

    from . import packcodec

    h = packcodec.parse_header(blob, oid)
    out = np.empty(len(head) + h.nbytes, dtype=np.uint8)
    out[:len(head)] = np.frombuffer(head, dtype=np.uint8)
    packcodec.decode_into(h, blob, out[len(head):], base_data, oid)
    got = hash_bytes(out)
    return None if got == oid else f"rebuilds to {got[:12]}"
