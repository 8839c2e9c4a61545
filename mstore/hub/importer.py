"""`mstore import`: a Hub repo or a local Hugging Face folder -> objects -> manifest -> ref.

Everything that can refuse an import (a damaged registry, name, architecture, pickles, unsafe
file names, size, disk, license) is checked before the first byte is written to the store
(objects or tmp/). A Hub revision the store already holds is recognised from the manifests'
`source` before anything is downloaded. Two imports of one source take turns (import_lock):
the second finds the first's result instead of racing it for the download folder.

Conversion streams each tensor's bytes from the mmapped shard into its own object (kernel
copy, no torch round trip); the objects are made durable together, then the manifest, then
the ref.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..adapters.base import adapter_class
from ..store import failpoints
from . import client as hub
from ..errors import (
    BadSource, InvalidSafetensors, LicenseNotAccepted, NameTaken, ObjectCorrupt,
    ObjectMissing, PickleOnly, RefChanged, SizeLimitExceeded, SourceNotFound, TooLarge,
    UnsupportedArchitecture,
)
from .import_cache import ImportCache
from .import_checks import check_source
from .import_lock import ImportLock
from ..store.manifest import Manifest, TensorEntry
from ..store.objects import ObjectBatch, PutResult, hash_file, hash_tensor_range
from ..store.refs import RefEntry
from ..store.registry import COMMIT_LIKE_RE, validate_name
from ..store.safetensors_io import DTYPE_SIZES, object_data_start, parse_header
from ..reporting import SILENT, Reporter
from ..store.repo import Store
from ..units import fmt_bytes, fmt_count

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TRAIN_BYTES_PER_PARAM = 16  # fp32 weights + grads + AdamW's two moments


@dataclass
class ImportResult:
    name: str
    commit: str
    parameters: int
    bytes_written: int
    bytes_present: int
    source: dict
    license: str | None
    already: bool = False  # identical content was already in the store
    held_by: str | None = None  # the ref that held it

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class SourcePlan:
    """What will be imported, known before any weight byte is read or downloaded."""

    source: dict
    model_id: str
    default_stem: str
    config: dict
    weight_files: list[str]
    other_files: list[str]
    total_bytes: int
    weight_bytes: int
    license: str | None
    folder: Path | None = None  # local folder, or the HF cache snapshot when complete there
    remote: hub.RemoteInfo | None = None
    notes: list[str] = field(default_factory=list)
    held: str | None = None  # the ref already holding this Hub revision: nothing to fetch

    @property
    def architecture(self) -> str:
        return self.config.get("model_type")

    def estimate_params(self) -> tuple[int, str]:
        dtype = str(self.config.get("dtype") or self.config.get("torch_dtype") or "bfloat16")
        size = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(dtype, 2)
        return self.weight_bytes // size, dtype


def import_model(store: Store, source: str, *, name: str | None = None,
                 revision: str | None = None, accept_license: bool = False,
                 max_size: int | None = None, confirm: Callable[[str], bool] | None = None,
                 reporter: Reporter = SILENT) -> ImportResult:
    """Import `source` (a Hub repo id or URL, or a local folder) into `store`. `confirm`
    asks the user about the license when `accept_license` is not given (None: refuse);
    `reporter` gets what is happening and the progress bars."""
    store.refs()  # a damaged registry refuses now, before anything is downloaded or written
    if name is not None:
        validate_name(name)
    plan = plan_source(source, revision, store, reporter)
    if plan.held is None:
        _check_architecture(plan.config)
    elif name is not None:
        plan.held = _held_by_source(store, plan.source, name) or plan.held
    if name is not None:
        _check_name(store, plan, name)
    _describe(plan, reporter)
    _check_space(store, plan, max_size)
    license = plan.license or "unknown"
    reporter.message(f"  license: {license}")
    if not accept_license and not (confirm and confirm(f"Accept the license {license!r}?")):
        raise LicenseNotAccepted(license)
    if plan.held is not None:
        return _already(store, plan, plan.held, name)
    if plan.folder is not None:  # local or HF cache: refused before the store is touched
        check_source(plan, plan.folder)

    with store.writer_lock("import"):
        store.refs()
        wait_note = f"  waiting for another import of {plan.model_id} to finish"
        with ImportLock(store.objects.tmp_dir, _lock_key(plan), lambda: reporter.message(wait_note)):
            held = _held_by_source(store, plan.source, name)
            if held is not None:  # a concurrent import of this revision finished first
                return _already(store, plan, held, name, locked=True)
            folder, downloaded = _materialise(store, plan, reporter)
            if downloaded:
                check_source(plan, folder, on_refusal=lambda: shutil.rmtree(downloaded, True))
            cache = ImportCache(store.root)
            manifest, batch = _convert(store, plan, folder, reporter, cache)
            result = _commit(store, plan, manifest, batch, name)
            if not downloaded:  # files that stay where they are: worth remembering
                cache.save()
            if downloaded:
                shutil.rmtree(downloaded, ignore_errors=True)
    return result


def _describe(plan: SourcePlan, reporter: Reporter) -> None:
    echo = reporter.message
    if plan.held is not None:
        echo(f"{plan.model_id}@{plan.source.get('revision', '')[:12]} is already imported "
             f"({plan.held}): nothing to download")
        return
    params, dtype = plan.estimate_params()
    echo(f"{plan.model_id} ({plan.architecture}): {fmt_bytes(plan.total_bytes)} in "
         f"{len(plan.weight_files) + len(plan.other_files)} files, ~{fmt_count(params)} "
         f"parameters ({dtype})")
    echo(f"  memory to run: ~{fmt_bytes(plan.weight_bytes)}; to fine-tune (fp32 AdamW): "
         f"~{fmt_bytes(params * TRAIN_BYTES_PER_PARAM)}")
    for note in plan.notes:
        echo(f"  {note}")

def _lock_key(plan: SourcePlan) -> str:
    return json.dumps(plan.source, sort_keys=True)


# -- planning --------------------------------------------------------------------------
def plan_source(source: str, revision: str | None, store: Store | None = None,
                reporter: Reporter = SILENT) -> SourcePlan:
    """`store`: where to look for a Hub revision already imported (then nothing is fetched);
    `reporter`: the progress of the small files (config, index, license) fetched to plan."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _plan_local(path.resolve())
    spec = hub.parse_hub_source(source, revision)
    if spec is None:
        raise SourceNotFound(source)
    return _plan_hub(spec, store, reporter.tqdm_class())


def _plan_local(folder: Path, link_root: Path | None = None) -> SourcePlan:
    """`link_root`: where symlinks may point. A user's folder may not link outside itself;
    an HF cache snapshot (what `hf download` prints: snapshots/<sha>, whose files link to
    ../../blobs) may link anywhere inside its own `models--org--name` folder, no further."""
    cache_repo = _hf_cache_repo(folder)
    root = (link_root or cache_repo or folder).resolve()
    names = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not _inside(p.resolve(), root):
            where = "its HF cache repo folder" if root != folder else "the folder"
            raise BadSource(f"{p.name} in {folder} is a symlink pointing outside {where}")
        if p.is_file():
            names.append(p.name)
    if "config.json" not in names:
        raise BadSource(f"{folder} has no config.json: not a Hugging Face model folder")
    config = _read_config(folder / "config.json")
    weights = _weight_files(names, lambda n: _read_json(folder / n), str(folder), config)
    others = [n for n in names if _keep(n) and n not in weights and n != INDEX_FILE]
    sizes = {n: (folder / n).stat().st_size for n in names}
    model_id = _cache_repo_id(cache_repo) if cache_repo else folder.name
    return SourcePlan(
        source={"type": "local", "path": str(folder)}, model_id=model_id,
        default_stem=model_id.split("/")[-1], config=config, weight_files=weights,
        other_files=others, total_bytes=sum(sizes[n] for n in weights + others),
        weight_bytes=sum(sizes[n] for n in weights), license=hub.card_license(folder),
        folder=folder,
    )


def _hf_cache_repo(folder: Path) -> Path | None:
    """The HF cache's `models--org--name` folder when `folder` is one of its snapshots."""
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and repo.name.startswith("models--") \
            and (repo / "blobs").is_dir():
        return repo
    return None


def _cache_repo_id(repo: Path) -> str:
    return "/".join(repo.name[len("models--"):].split("--"))


def _plan_hub(spec: hub.HubSpec, store: Store | None, tqdm_class: type) -> SourcePlan:
    if hub.is_offline():
        return _plan_offline(spec)
    info = hub.remote_info(spec)
    names = sorted(info.files)
    for n in names:
        hub.validate_repo_path(n)
    source = {"type": "huggingface", "repo_id": spec.repo_id, "revision": info.sha}
    held = _held_by_source(store, source) if store is not None else None
    if held is not None:
        return _held_plan(store, spec, info, source, held)
    if "config.json" not in names:
        raise BadSource(f"{spec.repo_id} has no config.json: not a transformers model repo")
    config = _read_config(hub.fetch_file(spec.repo_id, "config.json", info.sha, tqdm_class))
    _check_architecture(config)
    weights = _weight_files(
        [n for n in names if "/" not in n] + ([INDEX_FILE] if INDEX_FILE in names else []),
        lambda n: _read_json(hub.fetch_file(spec.repo_id, n, info.sha, tqdm_class)),
        spec.repo_id, config,
    )
    others = [n for n in names if "/" not in n and _keep(n) and n not in weights
              and n != INDEX_FILE]
    license = info.license
    if license is None and any(n.startswith("LICENSE") for n in names):
        lic_name = next(n for n in names if n.startswith("LICENSE"))
        license = hub.card_license(hub.fetch_file(spec.repo_id, lic_name, info.sha,
                                                   tqdm_class).parent)
    plan = SourcePlan(
        source=source, model_id=spec.repo_id, default_stem=spec.repo_id.split("/")[-1],
        config=config, weight_files=weights, other_files=others,
        total_bytes=sum(info.files.get(n, 0) for n in weights + others),
        weight_bytes=sum(info.files.get(n, 0) for n in weights), license=license, remote=info,
    )
    if info.gated:
        plan.notes.append("gated repo: downloading needs HF_TOKEN with access")
    plan.folder = hub.cached_snapshot(spec.repo_id, info.sha, weights + others)
    if plan.folder:
        plan.notes.append("all files are in the HF cache: nothing to download")
    return plan


def _held_by_source(store: Store, source: dict, prefer: str | None = None) -> str | None:
    """The ref (`prefer` if it is one) whose commit was imported from this Hub revision and
    has every object present (a re-import is how a lost object is restored).

    Only a Hub revision names its content (a local folder can change under the same path,
    so a folder's re-import is recognised by its content instead, in `_commit`)."""
    if source.get("type") != "huggingface":
        return None
    holders = []
    for ref, entry in sorted(store.refs().items()):
        if entry.source != "huggingface":
            continue
        try:
            m = store.read_light_manifest(entry.commit)
        except (ObjectMissing, ObjectCorrupt):
            continue
        if m.source == source and all(store.objects.exists(o) for o in m.object_ids()):
            holders.append(ref)
    if not holders:
        return None
    return prefer if prefer in holders else holders[0]


def _held_plan(store: Store, spec: hub.HubSpec, info: hub.RemoteInfo, source: dict,
               held: str) -> SourcePlan:
    """A plan for a revision the store already holds, from its manifest: nothing is fetched."""
    entry = store.refs()[held]
    m = store.read_light_manifest(entry.commit)
    return SourcePlan(
        source=source, model_id=spec.repo_id, default_stem=spec.repo_id.split("/")[-1],
        config={"model_type": m.architecture}, weight_files=[], other_files=sorted(m.files),
        total_bytes=int(entry.size_bytes or 0), weight_bytes=0, license=m.license,
        remote=info, held=held,
    )


def _plan_offline(spec: hub.HubSpec) -> SourcePlan:
    folder = hub.cached_snapshot(spec.repo_id, spec.revision)
    if folder is None:
        raise hub.HubOffline(spec.repo_id, "HF_HUB_OFFLINE is set and it is not in the HF cache")
    plan = _plan_local(folder, link_root=folder.parent.parent)
    plan.source = {"type": "huggingface", "repo_id": spec.repo_id, "revision": folder.name}
    plan.model_id, plan.default_stem = spec.repo_id, spec.repo_id.split("/")[-1]
    plan.notes.append("offline: importing from the HF cache")
    return plan


def _weight_files(names: list[str], read_json, where: str, config: dict) -> list[str]:
    if INDEX_FILE in names:
        index = read_json(INDEX_FILE)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise BadSource(f"{where}: {INDEX_FILE} has no weight_map")
        shards = sorted(set(wmap.values()))
        for s in shards:
            hub.validate_repo_path(str(s))
            if s not in names:
                raise BadSource(f"{where}: shard {s} named in {INDEX_FILE} is missing")
        return shards
    weights = [n for n in names if n.endswith(".safetensors")]
    if weights:
        return weights
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PickleOnly(where, pickles)
    raise BadSource(f"{where} holds no safetensors weights")


def supported_architectures() -> list[str]:
    """Hugging Face model types some installed, importable adapter serves."""
    from ..adapters.base import importable_architectures

    return importable_architectures()


def _check_architecture(config: dict) -> None:
    """Only the source's own adapter is loaded, unless the import is refused."""
    from ..adapters.base import is_importable

    mt = config.get("model_type")
    if not is_importable(mt):
        raise UnsupportedArchitecture(mt, supported_architectures(),
                                      remote_code=bool(config.get("auto_map")))


def _check_space(store: Store, plan: SourcePlan, max_size: int | None) -> None:
    if max_size is not None and plan.total_bytes > max_size:
        raise SizeLimitExceeded(plan.model_id, plan.total_bytes, max_size)
    if plan.held is not None:
        return  # nothing will be written
    need = plan.total_bytes if plan.folder else 2 * plan.total_bytes
    probe = store.root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise TooLarge("not enough free disk for the download and the objects", need, free)


def _keep(name: str) -> bool:
    import fnmatch

    if name.endswith(PICKLE_SUFFIXES) or name.endswith(".safetensors"):
        return False
    return any(fnmatch.fnmatch(name, pat) for pat in hub.KEEP_PATTERNS)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSource(f"cannot read {path}: {e}") from None


def _read_config(path: Path) -> dict:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise BadSource(f"{path} is not a JSON object")
    return config


# -- download and conversion -----------------------------------------------------------
def _materialise(store: Store, plan: SourcePlan,
                 reporter: Reporter) -> tuple[Path, Path | None]:
    """The folder to read from, and the tmp/ download folder to remove afterwards (if any)."""
    if plan.folder is not None:
        return plan.folder, None
    info = plan.remote
    assert info is not None
    slug = re.sub(r"[^A-Za-z0-9._-]", "--", info.repo_id)
    dest = store.objects.tmp_dir / f"download-{slug}-{info.sha[:16]}"
    wanted = plan.weight_files + plan.other_files
    folder = hub.download_snapshot(info.repo_id, info.sha, wanted, dest,
                                  tqdm_class=reporter.tqdm_class())
    hub.verify_download(folder, info, wanted)
    failpoints.hit("import.downloaded")
    return folder, dest


def _convert(store: Store, plan: SourcePlan, folder: Path, reporter: Reporter,
             cache: ImportCache, batch: "ObjectBatch | _HashOnly | None" = None,
             ) -> tuple[Manifest, ObjectBatch]:
    """The manifest and the objects it names; with a `_HashOnly` batch, only their ids."""
    tensors: dict = {}
    with reporter.progress(plan.weight_bytes, "converting") as bar, \
            batch or store.objects.batch() as batch:
        for shard in plan.weight_files:
            _convert_shard(batch, folder / shard, tensors, bar, cache)
        files = {n: batch.put_file(folder / n).oid for n in plan.other_files}
        config_oid = batch.put_file(folder / "config.json").oid
        files.pop("config.json", None)
    rules = adapter_class(plan.architecture).tie_rules(plan.config)
    tied = {k: v for k, v in rules.items() if k not in tensors and v in tensors}
    rev = plan.source.get("revision")
    manifest = Manifest(
        architecture=plan.architecture, model_id=plan.model_id, source=plan.source,
        license=plan.license, config=config_oid, files=files, tensors=tensors,
        tied_weights=tied,
        message=f"import {plan.model_id}" + (f"@{rev[:12]}" if rev else ""),
    )
    return manifest, batch


def _convert_shard(batch: ObjectBatch, path: Path, tensors: dict, bar,
                   cache: ImportCache) -> None:
    """Every tensor of one shard into its own object.

    A helper thread hashes tensor i+1 while tensor i is copied by the kernel (both release
    the GIL; two copies at once were slower); a copy whose hash is not ready yet (the first
    tensor, always) starts anyway. A shard the stat cache knows, whose objects
    are all present, is not read at all.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        known = cache.lookup(path, st)
        if known is not None and _reuse(batch, known, tensors, bar):
            cache.record(path, st, known)
            return
        if st.st_size < 8:
            raise BadSource(f"{path.name} is not a safetensors file (too short)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                header = parse_header(
                    mm[: min(st.st_size, 8 + int.from_bytes(mm[:8], "little"))],
                    st.st_size, path.name)
            except InvalidSafetensors as e:
                raise BadSource(str(e)) from None
            infos = sorted(header.tensors.values(), key=lambda t: t.start)
            with ThreadPoolExecutor(1, thread_name_prefix="mstore-hash") as pool:
                oids = [pool.submit(hash_tensor_range, i.dtype, i.shape, mm, i.start, i.end)
                        for i in infos]
                for info, oid in zip(infos, oids):
                    if info.name in tensors:
                        raise BadSource(f"tensor {info.name!r} appears in two shards")
                    put = batch.put_tensor(oid, info.dtype, info.shape, f.fileno(),
                                           info.start, info.end)
                    tensors[info.name] = TensorEntry(put.oid, info.dtype, list(info.shape))
                    bar.update(info.nbytes)
        cache.record(path, st, [[i.name, tensors[i.name].object, i.dtype, list(i.shape)]
                                for i in infos])


def _reuse(batch: ObjectBatch, known: list[list], tensors: dict, bar) -> bool:
    entries = {}
    for name, oid, dtype, shape in known:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        size = object_data_start(dtype, tuple(shape), nbytes) + nbytes
        if name in tensors or not batch.reuse(oid, size):
            return False
        entries[name] = TensorEntry(oid, dtype, list(shape))
        bar.update(nbytes)
    tensors.update(entries)
    return True


# -- commit ----------------------------------------------------------------------------
def _commit(store: Store, plan: SourcePlan, manifest: Manifest, batch: ObjectBatch,
            name: str | None) -> ImportResult:
    key = manifest.content_key()
    refs = store.refs()
    holders = [r for r, e in sorted(refs.items()) if _content_key(store, e.commit) == key]
    if holders:
        held = name if name in holders else holders[0]
        commit = refs[held].commit
        if name and name not in holders:  # same content under a new name: a second ref
            store.registry.set_ref(refs[held].renamed(name), expected=None)
        return ImportResult(name or held, commit, manifest.parameters, batch.written,
                            batch.reused, plan.source, plan.license, already=True,
                            held_by=held)
    stem = _default_stem(plan.default_stem)
    commit = store.put_manifest(manifest)
    target = store.add_ref(commit, manifest, name, lambda: stem if store.name_is_free(stem)
                           else store.next_free_name(stem))
    return ImportResult(target, commit, manifest.parameters, batch.written, batch.reused,
                        plan.source, plan.license)


def _content_key(store: Store, commit: str) -> bytes | None:
    try:
        return store.read_manifest(commit).content_key()
    except (ObjectMissing, ObjectCorrupt):
        return None


def _same_source(store: Store, entry: RefEntry, plan: SourcePlan) -> bool:
    try:
        return store.read_light_manifest(entry.commit).source == plan.source
    except (ObjectMissing, ObjectCorrupt):
        return False


def _check_name(store: Store, plan: SourcePlan, name: str) -> None:
    """A taken --name refuses now, before anything is written. It is not taken when it
    already holds this very content (a retry, or a re-import of an unchanged folder)."""
    refs = store.refs()
    entry = refs.get(name)
    if entry is None:
        return
    if plan.held is not None:
        if entry.commit == refs[plan.held].commit:
            return
    elif _same_source(store, entry, plan):
        if plan.source.get("type") == "huggingface":
            return  # a Hub revision names its content
        if plan.folder is not None and _content_key(store, entry.commit) == \
                _dry_content_key(store, plan):
            return
    raise NameTaken(name, store.next_free_name(name))


def _dry_content_key(store: Store, plan: SourcePlan) -> bytes:
    """What a local folder's manifest would hold, hashed without writing a byte (the stat
    cache makes it cheap for an unchanged folder)."""
    manifest, _ = _convert(store, plan, plan.folder, SILENT, ImportCache(store.root),
                           batch=_HashOnly())
    return manifest.content_key()


class _HashOnly:
    """An ObjectBatch look-alike that names objects and stores none (nor checks presence)."""

    written = reused = 0

    def __enter__(self) -> "_HashOnly":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def put_tensor(self, oid, dtype, shape, src_fd, start, end) -> PutResult:
        return PutResult(oid if isinstance(oid, str) else oid.result(), end - start, False)

    def put_file(self, path: Path) -> PutResult:
        return PutResult(hash_file(path), os.path.getsize(path), False)

    def reuse(self, oid: str, size: int) -> bool:
        return True


def _already(store: Store, plan: SourcePlan, held: str, name: str | None,
             locked: bool = False) -> ImportResult:
    """The result for a Hub revision the store holds; a new --name becomes a second ref."""
    entry = store.refs()[held]
    commit = entry.commit
    if name is not None and name != held:
        if locked:
            _add_name(store, entry, name)
        else:
            with store.writer_lock("import"):
                _add_name(store, entry, name)
    m = store.read_manifest(commit)
    return ImportResult(name or held, commit, m.parameters, 0,
                        int(entry.size_bytes or 0), plan.source, m.license,
                        already=True, held_by=held)


def _add_name(store: Store, entry: RefEntry, name: str) -> None:
    try:
        store.registry.set_ref(entry.renamed(name), expected=None)
    except RefChanged as e:
        if e.found != entry.commit:
            raise NameTaken(name, store.next_free_name(name)) from None


def _default_stem(text: str) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._") or "model"
    if COMMIT_LIKE_RE.fullmatch(stem[:120]):  # e.g. a snapshot folder named by its sha
        stem = "model-" + stem
    return validate_name(stem[:120])
