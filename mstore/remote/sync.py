"""Push, pull and clone: moving a model between this store and a remote.

What travels is what gc keeps for the ref moved (`reachability.closure`, the one rule):
the manifest chain, and the objects of the commit's own manifest, not its parents' weights.
Refs are checked before anything is transferred, so a refused push or pull writes nothing.
Invalid entries in a remote's registry.json are returned (`skipped`), never fatal, never
used as paths; a push leaves them as they are.

A push is plan -> send objects -> swap the ref: the objects the remote lacks (found by
listing its fan-out folders, in parallel), then the manifest chain (parents first), then the
remote ref by the transport's compare-and-swap (`Transport.set_ref_if_equals`). A pull is
plan -> check the local ref -> fetch -> set the local ref: every object is re-hashed before
it is published locally (through an ObjectBatch, so nothing is visible before it is verified
and synced), then the manifests, then the local ref by the registry's compare-and-swap.
Objects are content-addressed, so an interrupted push or pull resumes by sending only what
the other side still lacks.

Progress and warnings go to the caller's `Reporter` (silent by default); nothing here
prints. This module never imports torch or transformers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    CommitNeedsRefName,
    DestinationNotEmpty, LocalRefWouldMove, NotFastForward, ObjectCorrupt, ObjectMissing,
    RemoteBusy, RemoteNotAStore, RemoteObjectCorrupt, RemoteObjectMissing,
    RemoteRefInvalid, RemoteRefMissing, RemoteRefMoved, SignatureRequired, StoreNotFound,
)
from ..reporting import SILENT, Reporter
from ..store import failpoints, fsio
from ..store.manifest import LightManifest, Manifest
from ..store.objects import hash_bytes, hash_file
from ..store.attachments import parse_attachment
from ..store.reachability import Closure, closure, store_attachments, store_loader
from ..store.registry import NAME_RE, validate_name
from ..store.signing import check_signature
from ..store.repo import Store
from .config import (
    add_remote, list_remotes, normalize_url, resolve_remote, set_tracking, tracking_refs,
)
from .transports import Transport, backend_errors, open_transport, transfer_jobs

BATCH_BYTES = 1024**3  # a pull publishes its objects in batches of about this many bytes
BATCH_OBJECTS = 2000
SWAP_TRIES = 10  # compare-and-swaps a push tries while the remote ref keeps moving


# -- results -----------------------------------------------------------------------------
@dataclass
class TransferResult:
    remote: str
    url: str
    name: str  # the ref written (remote ref for push, local ref for pull)
    commit: str
    previous: str | None  # what the ref held before
    ref_updated: bool
    objects_sent: int = 0  # push: uploaded; pull: downloaded (received)
    bytes_sent: int = 0
    objects_present: int = 0  # already on the other side
    manifests: int = 0  # manifests in the chain transferred
    forced: bool = False
    note: str = ""
    # invalid entries of the remote's registry, reported and left alone: [{name, reason}]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CloneResult:
    dir: str
    url: str
    refs: list[TransferResult] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # invalid remote entries

    def to_json(self) -> dict[str, Any]:
        return {"dir": self.dir, "url": self.url, "refs": [r.to_json() for r in self.refs],
                "skipped": self.skipped,
                "objects_received": sum(r.objects_sent for r in self.refs),
                "bytes_received": sum(r.bytes_sent for r in self.refs)}


def _skipped(invalid: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": n, "reason": why} for n, why in invalid]


# -- push --------------------------------------------------------------------------------
@dataclass
class _PushPlan:
    """What a push moves: gc's keep set for the ref, and the remote entry it ends with."""
    name: str
    commit: str
    objects: list[str]
    manifests: list[str]  # parents first, head last
    entry: dict[str, Any]
    known: str | None  # what this store last saw of the remote ref
    force: bool
    attachments: dict[str, list[str]] = field(default_factory=dict)  # commit -> its attachments

    def may_set(self, current: str | None, remote_name: str) -> tuple[bool, bool]:
        """The push rule for a remote ref holding `current`: (write it?, forced?). Raises
        RemoteRefMoved if it moved on since this store last saw it (unless forced)."""
        if current == self.commit and not self.force:
            return False, False
        moved_on = (current is not None and current != self.known
                    and current not in self.manifests)
        if moved_on and not self.force:
            raise RemoteRefMoved(self.name, remote_name, current, self.known)
        return True, moved_on


def push(store: Store, ref: str, remote: str | None = None, *, as_name: str | None = None,
         force: bool = False, reporter: Reporter = SILENT) -> TransferResult:
    """Send `ref`'s commit to a remote and set its ref there: exactly what gc keeps for it
    (`reachability.closure`): its manifest chain, and its own manifest's objects only."""
    if not store.exists():
        raise StoreNotFound(str(store.root))
    remote_name, url = resolve_remote(store, remote)
    resolved = store.resolve(ref)  # for its name; _plan_push resolves it again under the lock
    name = as_name or resolved.name
    if name is None:
        raise CommitNeedsRefName(ref)
    validate_name(name)
    transport = open_transport(url)
    with store.writer_lock("push"):
        plan = _plan_push(store, ref, name, tracking_refs(store, remote_name).get(name), force)
        with backend_errors(url), transport.session(writing=True):
            listing = transport.read_registry_entries()
            models, skipped = listing if listing is not None else ({}, [])
            plan.may_set((models.get(name) or {}).get("commit"), remote_name)  # before sending
            present = transport.present(plan.objects + plan.manifests)
            sent, bytes_sent = _send_objects(store, transport, plan, present, reporter)
            failpoints.hit("push.objects-sent")
            for commit, listed in sorted(plan.attachments.items()):
                transport.merge_attachments(commit, listed)
            previous, written, forced = _swap_remote_ref(transport, plan, remote_name, url,
                                                         reporter)
            failpoints.hit("push.ref-updated")
    set_tracking(store, remote_name, name, plan.commit)
    return TransferResult(
        remote=remote_name, url=url, name=name, commit=plan.commit, previous=previous,
        ref_updated=written, objects_sent=sent, bytes_sent=bytes_sent,
        objects_present=len(set(plan.objects + plan.manifests) & set(present)),
        manifests=len(plan.manifests), forced=forced, skipped=_skipped(skipped))


def _plan_push(store: Store, ref: str, name: str, known: str | None, force: bool) -> _PushPlan:
    """Under the writer lock: the commit `ref` names now and everything it needs, all here."""
    r = store.resolve(ref)
    head = store.read_manifest(r.commit)
    plan = closure({name: r.commit}, store_loader(store),  # parents end where none is here
                   attachments=store_attachments(store))
    objects = sorted(plan.objects)
    for oid in objects:
        if not store.objects.exists(oid):
            raise ObjectMissing(oid, "object of the pushed commit")
    entry = store.registry_entry(name, r.commit, head,
                                 r.entry.fine_tuned_from if r.entry else None)
    return _PushPlan(name=name, commit=r.commit, objects=objects, manifests=plan.order,
                     entry=entry.to_json(), known=known, force=force,
                     attachments=plan.attachments)


def _send_objects(store: Store, transport: Transport, plan: _PushPlan, present: dict[str, int],
                  reporter: Reporter) -> tuple[int, int]:
    """(objects, bytes) sent: the objects the remote lacks, in parallel, then the manifests
    it lacks, parents first, each complete before the next."""
    to_send = [o for o in plan.objects if o not in present]
    sizes = {o: store.objects.size(o) for o in to_send}
    sent = _upload(store, transport, to_send, sizes, reporter)
    nbytes = sum(sizes.values())
    for oid in plan.manifests:
        if oid not in present:
            _upload_one(store, transport, oid)
            sent += 1
            nbytes += store.objects.size(oid)
    return sent, nbytes if sent else 0


def _swap_remote_ref(transport: Transport, plan: _PushPlan, remote_name: str, url: str,
                     reporter: Reporter) -> tuple[str | None, bool, bool]:
    """(previous commit, written?, forced?): the push rule applied to the ref as it is now
    (it may have moved while the objects were sent), then the compare-and-swap; a swap that
    lost a race is decided again from what won it."""
    for _ in range(SWAP_TRIES):
        current = transport.ref(plan.name)
        write, forced = plan.may_set(current, remote_name)
        if not write:
            return current, False, False
        if transport.set_ref_if_equals(plan.name, current, plan.entry, reporter):
            return current, True, forced
    raise RemoteBusy(url, SWAP_TRIES)


def _upload_one(store: Store, transport: Transport, oid: str) -> None:
    src = store.objects.path(oid)
    got = hash_file(src)
    if got != oid:  # never spread a damaged object
        raise ObjectCorrupt(oid, f"content hashes to {got[:12]}; not pushed")
    transport.put(oid, src)


def _upload(store: Store, transport: Transport, oids: list[str], sizes: dict[str, int],
            reporter: Reporter) -> int:
    if not oids:
        return 0
    done = 0
    pool = ThreadPoolExecutor(min(transfer_jobs(), len(oids)))
    with reporter.progress(sum(sizes.values()), "push") as bar:
        try:
            futures = {pool.submit(_upload_one, store, transport, o): o for o in oids}
            for fut in as_completed(futures):
                fut.result()
                done += 1
                bar.update(sizes[futures[fut]])
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return done


# -- pull --------------------------------------------------------------------------------
def pull(store: Store, name: str, remote: str | None = None, *, as_name: str | None = None,
         force: bool = False, require_signature: str | None = None,
         reporter: Reporter = SILENT) -> TransferResult:
    """Fetch a remote ref's commit (verified object by object) and set the local ref.
    `require_signature`: a key fingerprint (signing.fingerprint); the commit must carry a
    valid signature by that key on the remote, checked before anything is fetched."""
    remote_name, url = resolve_remote(store, remote)
    return _pull_from(store, remote_name, url, name, as_name=as_name, force=force,
                      require_signature=require_signature, reporter=reporter)


def _pull_from(store: Store, remote_name: str, url: str, name: str, *,
               as_name: str | None = None, force: bool = False,
               require_signature: str | None = None, reporter: Reporter = SILENT,
               transport: Transport | None = None) -> TransferResult:
    """Plan (read the chain), check the signature asked for and the local ref, fetch, set
    the ref: a pull that is refused has written nothing."""
    validate_name(name)
    local_name = validate_name(as_name or name)
    transport = transport or open_transport(url)
    if require_signature is not None:  # first without the lock: a refusal leaves no lock file
        with backend_errors(url), transport.session(writing=False):
            commit = _remote_entry(transport, url, remote_name, name)[0]["commit"]
            plan, fetched = _plan_fetch(store, transport, remote_name, commit)
            _require_signature(store, transport, remote_name, name, commit, plan, fetched,
                               require_signature)
    with backend_errors(url), store.writer_lock("pull"), transport.session(writing=False):
        entry, invalid = _remote_entry(transport, url, remote_name, name)
        commit = entry["commit"]
        plan, fetched = _plan_fetch(store, transport, remote_name, commit)
        if require_signature is not None:  # again: the remote ref may have moved since
            _require_signature(store, transport, remote_name, name, commit, plan, fetched,
                               require_signature)
        result = TransferResult(
            remote=remote_name, url=url, name=local_name, commit=commit,
            previous=None, ref_updated=False, manifests=len(plan.order),
            skipped=_skipped(invalid))
        move = _check_local_ref(store, local_name, name, commit, plan, remote_name, force,
                                result)
        if move or result.note == "up to date":
            _fetch(store, transport, remote_name, plan, fetched, reporter, result)
        if move:
            _set_local_ref(store, local_name, commit, entry, result)
    set_tracking(store, remote_name, name, commit)
    return result


def _remote_entry(transport: Transport, url: str, remote_name: str, name: str
                  ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The remote's registry entry for `name`, and the invalid entries it skipped."""
    listing = transport.read_registry_entries()
    if listing is None:
        raise RemoteNotAStore(url, "no registry.json: nothing was pushed there yet")
    models, invalid = listing
    entry = models.get(name)
    if entry is None:
        reason = dict(invalid).get(name)
        if reason is not None:
            raise RemoteRefInvalid(name, remote_name, reason)
        raise RemoteRefMissing(name, remote_name, sorted(models))
    return entry, invalid


def _check_local_ref(store: Store, local_name: str, name: str, commit: str, plan: Closure,
                     remote_name: str, force: bool, result: TransferResult) -> bool:
    """Whether the pull sets the local ref; raises (before anything is written) if it may not.

    An existing local ref moves without --force only when it is this store's copy of the
    ref pulled: the same name, holding what this store last saw of it on that remote, and
    the remote's commit descends from it (a fast-forward). Anything else needs --force."""
    held = store.refs().get(local_name)
    current = held.commit if held else None
    result.previous = current
    if current is None:
        return True
    if current == commit:
        result.note = "up to date"
        return False
    fast_forward = current in plan.manifests
    if not force:
        if not fast_forward and _is_ancestor(store, commit, current):
            result.note = (f"local {local_name} is ahead of {remote_name}" if local_name == name
                           else f"local {local_name} is ahead of {remote_name}'s {name}")
            return False
        if not fast_forward:
            raise NotFastForward(local_name, current, commit, remote_name)
        tracked = tracking_refs(store, remote_name).get(name)
        if local_name != name or tracked != current:
            raise LocalRefWouldMove(local_name, current, remote_name, name, commit)
    result.forced = force and not (fast_forward and local_name == name
                                   and tracking_refs(store, remote_name).get(name) == current)
    return True


def _is_ancestor(store: Store, ancestor: str, commit: str) -> bool:
    """True if `ancestor` is `commit` or on its parent chain (as far as manifests are local)."""
    return any(oid == ancestor for oid, _m in store.lineage(commit))


def _set_local_ref(store: Store, local_name: str, commit: str, remote_entry: dict[str, Any],
                   result: TransferResult) -> None:
    head = store.read_manifest(commit)
    parent = remote_entry.get("fine_tuned_from")
    if not (isinstance(parent, str) and NAME_RE.fullmatch(parent) and ".." not in parent):
        parent = None  # a remote's hostile parent name is not copied into this registry
    local_entry = store.registry_entry(local_name, commit, head, parent)
    store.registry.set_ref(local_entry, expected=result.previous)
    result.ref_updated = True


def _plan_fetch(store: Store, transport: Transport, remote_name: str, commit: str
                ) -> tuple[Closure, dict[str, bytes]]:
    """What gc would keep for `commit` (`reachability.closure`), read from here or the
    remote: (the closure, the verified bytes of the manifests only the remote has). The
    walk ends at a parent the remote lacks; the head itself must be there."""
    fetched: dict[str, bytes] = {}

    def load(oid: str) -> LightManifest | None:
        if store.objects.exists(oid):
            return store.read_light_manifest(oid)
        data = transport.read_object(oid)
        if data is None:
            return None
        got = hash_bytes(data)
        if got != oid:
            raise RemoteObjectCorrupt(oid, got, remote_name)
        m = LightManifest.from_bytes(data, oid)
        fetched[oid] = data
        return m

    plan = closure({commit: commit}, load, attachments=transport.attachment_index)
    if commit not in plan.manifests:
        raise RemoteObjectMissing(commit, remote_name, "manifest")
    return plan, fetched


def _require_signature(store: Store, transport: Transport, remote_name: str, name: str,
                       commit: str, plan: Closure, fetched: dict[str, bytes], keyid: str) -> None:
    """The commit's signature attachments as the remote holds them (read, not stored),
    each re-hashed and checked against the manifest it will get; refuses unless one is a
    valid signature by `keyid`. The objects the statement names are re-hashed on arrival,
    as every object of a pull is."""
    data = fetched.get(commit)
    m = Manifest.from_bytes(data, commit) if data is not None else store.read_manifest(commit)
    others = []
    for oid in plan.attachments.get(commit, []):
        raw = store.objects.read_bytes(oid) if store.objects.exists(oid) \
            else transport.read_object(oid)
        if raw is None:
            raise RemoteObjectMissing(oid, remote_name, "attachment")
        got = hash_bytes(raw)
        if got != oid:
            raise RemoteObjectCorrupt(oid, got, remote_name)
        try:
            att = parse_attachment(raw, oid, commit)
        except ObjectCorrupt as e:
            raise RemoteObjectCorrupt(oid, f"not an attachment of {commit[:12]}: {e.reason}",
                                      remote_name) from None
        if att.kind != "signature":
            continue
        check = check_signature(att, m, {keyid})
        if check.valid and check.trusted:
            return
        if check.valid:
            others.append(check.keyid)
    raise SignatureRequired(name, remote_name, commit, keyid, sorted(set(others)))


def _fetch(store: Store, transport: Transport, remote_name: str, plan: Closure,
           fetched: dict[str, bytes], reporter: Reporter, result: TransferResult) -> None:
    """Objects the plan needs and this store lacks, verified; then the new manifests,
    parents first, each durable before the next; the head last."""
    wanted = sorted(o for o in plan.objects if not store.objects.exists(o))
    remote_has = transport.present(wanted)
    for o in wanted:
        if o not in remote_has:
            raise RemoteObjectMissing(o, remote_name)
    received, nbytes = _download(store, transport, remote_name, wanted, remote_has, reporter)
    for oid in plan.order:
        data = fetched.get(oid)
        if data is None:
            continue
        res = store.objects.put_bytes(data)
        if res.oid != oid:  # cannot happen: verified above
            raise RemoteObjectCorrupt(oid, res.oid, remote_name)
        received += 1
        nbytes += len(data)
    for commit, listed in sorted(plan.attachments.items()):
        for oid in listed:  # hashed on arrival; a record of another commit is refused
            try:
                parse_attachment(store.objects.read_bytes(oid), oid, commit)
            except ObjectCorrupt as e:
                raise RemoteObjectCorrupt(oid, f"not an attachment of {commit[:12]}: {e.reason}",
                                          remote_name) from None
        store.attachments.merge(commit, listed)
    result.objects_sent, result.bytes_sent = received, nbytes
    result.objects_present = len(plan.keep()) - len(wanted) - len(fetched)


def _download(store: Store, transport: Transport, remote_name: str, oids: list[str],
              sizes: dict[str, int], reporter: Reporter) -> tuple[int, int]:
    """Fetch objects in parallel; publish them in synced batches, each verified first."""
    if not oids:
        return 0, 0
    tmp_dir = store.objects.tmp_dir
    bar = reporter.progress(sum(sizes.get(o, 0) for o in oids), "pull")
    received = nbytes = 0
    pool = ThreadPoolExecutor(min(transfer_jobs(), len(oids)))
    futures = {pool.submit(transport.fetch, o, sizes.get(o), tmp_dir): o for o in oids}
    batch = store.objects.batch()
    batch.__enter__()
    in_batch = 0
    batch_bytes = 0
    try:
        for fut in as_completed(futures):
            oid = futures[fut]
            data, path, is_temp = fut.result()
            try:
                res = batch.put_bytes(data) if data is not None else batch.put_file(path)
            finally:
                if is_temp:
                    fsio.unlink(path, missing_ok=True)
            if res.oid != oid:
                raise RemoteObjectCorrupt(oid, res.oid, remote_name)
            received += 1
            nbytes += res.size
            in_batch += 1
            batch_bytes += res.size
            bar.update(res.size)
            if in_batch >= BATCH_OBJECTS or batch_bytes >= BATCH_BYTES:
                batch.commit()  # what arrived so far survives an interruption
                in_batch = batch_bytes = 0
        batch.commit()
    except BaseException:
        batch.abort()
        for fut in futures:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in futures:  # downloads that finished after the error: drop their temp files
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                _data, path, is_temp = fut.result()
                if is_temp:
                    fsio.unlink(path, missing_ok=True)
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
    return received, nbytes


# -- clone -------------------------------------------------------------------------------
def clone(url: str, dest: Path | str, ref: str | None = None, *, reporter: Reporter = SILENT,
          remote_name: str = "origin") -> CloneResult:
    """A new local store at `dest` from the remote at `url` (all refs, or one), with the
    remote recorded as `origin`. Running it again on the partial result resumes it."""
    url = normalize_url(url)
    dest = Path(dest)
    store = Store(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not (store.exists() and list_remotes(store).get(remote_name) == url):
            raise DestinationNotEmpty(str(dest))
    transport = open_transport(url)
    with backend_errors(url), transport.session(writing=False):
        listing = transport.read_registry_entries()
    if listing is None:
        raise RemoteNotAStore(url, "no registry.json: nothing was pushed there yet")
    models, invalid = listing
    if ref is not None:
        validate_name(ref)
        reason = dict(invalid).get(ref)
        if reason is not None:
            raise RemoteRefInvalid(ref, url, reason)
        if ref not in models:
            raise RemoteRefMissing(ref, url, sorted(models))
    names = [ref] if ref is not None else sorted(models)  # invalid entries: reported, skipped
    store.init()
    if remote_name not in list_remotes(store):
        add_remote(store, remote_name, url)
    result = CloneResult(str(dest), url, skipped=_skipped(invalid))
    for name in names:
        result.refs.append(_pull_from(store, remote_name, url, name, reporter=reporter,
                                      transport=transport))
    return result
