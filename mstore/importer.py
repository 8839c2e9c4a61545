"""`mstore import`: a Hub repo or a local Hugging Face folder -> objects -> manifest -> ref.

Everything that can refuse an import (name, architecture, pickles, size, disk, license) is
checked before the store is touched. Conversion streams each tensor's bytes from the mmapped
shard into its own object (kernel copy, no torch round trip); the objects are made durable
together, then the manifest, then the ref.
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

from . import failpoints, hub
from .errors import (
    BadSource, InvalidSafetensors, LicenseNotAccepted, NameTaken, ObjectCorrupt, ObjectMissing,
    PickleOnly, SourceNotFound, TooLarge, UnsupportedArchitecture,
)
from .import_cache import ImportCache
from .import_checks import check_source
from .manifest import Manifest, TensorEntry
from .objects import ObjectBatch, hash_tensor_range
from .registry import COMMIT_LIKE_RE, validate_name
from .safetensors_io import DTYPE_SIZES, object_data_start, parse_header
from .store import Store
from .units import fmt_bytes, fmt_count

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TIED_PAIRS = {"lm_head.weight": "model.embed_tokens.weight"}
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
                 echo: Callable[[str], None] = lambda s: None, quiet: bool = True) -> ImportResult:
    plan = plan_source(source, revision)
    _check_architecture(plan.config)
    if name is not None:
        validate_name(name)
        held = store.refs().get(name)
        # a name taken by this same source may still hold identical content (a retry):
        # conversion finds out, and only then is a differing model refused
        if held and not _same_source(store, held, plan):
            raise NameTaken(name, store.next_free_name(name))
    params, dtype = plan.estimate_params()
    echo(f"{plan.model_id} ({plan.architecture}): {fmt_bytes(plan.total_bytes)} in "
         f"{len(plan.weight_files) + len(plan.other_files)} files, ~{fmt_count(params)} "
         f"parameters ({dtype})")
    echo(f"  memory to run: ~{fmt_bytes(plan.weight_bytes)}; to fine-tune (fp32 AdamW): "
         f"~{fmt_bytes(params * TRAIN_BYTES_PER_PARAM)}")
    for note in plan.notes:
        echo(f"  {note}")
    _check_space(store, plan, max_size)
    license = plan.license or "unknown"
    echo(f"  license: {license}")
    if not accept_license and not (confirm and confirm(f"Accept the license {license!r}?")):
        raise LicenseNotAccepted(license)

    if plan.folder is not None:  # local or HF cache: refused before the store is touched
        check_source(plan, plan.folder)
    with store.writer_lock("import"):
        folder, downloaded = _materialise(store, plan, quiet)
        if downloaded:
            check_source(plan, folder, on_refusal=lambda: shutil.rmtree(downloaded, True))
        cache = ImportCache(store.root)
        manifest, batch = _convert(store, plan, folder, quiet, cache)
        result = _commit(store, plan, manifest, batch, name)
        if not downloaded:  # files that stay where they are: worth remembering
            cache.save()
        if downloaded:
            shutil.rmtree(downloaded, ignore_errors=True)
    return result


# -- planning --------------------------------------------------------------------------
def plan_source(source: str, revision: str | None) -> SourcePlan:
    path = Path(source).expanduser()
    if path.is_dir():
        return _plan_local(path.resolve())
    spec = hub.parse_hub_source(source, revision)
    if spec is None:
        raise SourceNotFound(source)
    return _plan_hub(spec)


def _plan_local(folder: Path, link_root: Path | None = None) -> SourcePlan:
    """`link_root`: where symlinks may point (the HF cache repo folder for snapshots, whose
    files link to ../../blobs); a user's folder may not link outside itself."""
    names = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not _inside(p.resolve(), (link_root or folder).resolve()):
            raise BadSource(f"{p.name} in {folder} is a symlink pointing outside the folder")
        if p.is_file():
            names.append(p.name)
    if "config.json" not in names:
        raise BadSource(f"{folder} has no config.json: not a Hugging Face model folder")
    config = _read_config(folder / "config.json")
    weights = _weight_files(names, lambda n: _read_json(folder / n), str(folder), config)
    others = [n for n in names if _keep(n) and n not in weights and n != INDEX_FILE]
    sizes = {n: (folder / n).stat().st_size for n in names}
    return SourcePlan(
        source={"type": "local", "path": str(folder)}, model_id=folder.name,
        default_stem=folder.name, config=config, weight_files=weights, other_files=others,
        total_bytes=sum(sizes[n] for n in weights + others),
        weight_bytes=sum(sizes[n] for n in weights), license=hub.card_license(folder),
        folder=folder,
    )


def _plan_hub(spec: hub.HubSpec) -> SourcePlan:
    if hub.is_offline():
        return _plan_offline(spec)
    info = hub.remote_info(spec)
    names = sorted(info.files)
    for n in names:
        hub.validate_repo_path(n)
    if "config.json" not in names:
        raise BadSource(f"{spec.repo_id} has no config.json: not a transformers model repo")
    config = _read_config(hub.fetch_file(spec.repo_id, "config.json", info.sha))
    _check_architecture(config)
    weights = _weight_files(
        [n for n in names if "/" not in n] + ([INDEX_FILE] if INDEX_FILE in names else []),
        lambda n: _read_json(hub.fetch_file(spec.repo_id, n, info.sha)), spec.repo_id, config,
    )
    others = [n for n in names if "/" not in n and _keep(n) and n not in weights
              and n != INDEX_FILE]
    license = info.license
    if license is None and any(n.startswith("LICENSE") for n in names):
        lic_name = next(n for n in names if n.startswith("LICENSE"))
        license = hub.card_license(hub.fetch_file(spec.repo_id, lic_name, info.sha).parent)
    plan = SourcePlan(
        source={"type": "huggingface", "repo_id": spec.repo_id, "revision": info.sha},
        model_id=spec.repo_id, default_stem=spec.repo_id.split("/")[-1], config=config,
        weight_files=weights, other_files=others,
        total_bytes=sum(info.files.get(n, 0) for n in weights + others),
        weight_bytes=sum(info.files.get(n, 0) for n in weights), license=license, remote=info,
    )
    if info.gated:
        plan.notes.append("gated repo: downloading needs HF_TOKEN with access")
    plan.folder = hub.cached_snapshot(spec.repo_id, info.sha, weights + others)
    if plan.folder:
        plan.notes.append("all files are in the HF cache: nothing to download")
    return plan


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
    """Hugging Face model types some installed adapter serves (entry points, no import)."""
    from .adapters.base import installed_adapters

    return sorted(a for a in installed_adapters() if a != "custom-transformer")


def _check_architecture(config: dict) -> None:
    mt = config.get("model_type")
    supported = supported_architectures()
    if mt not in supported:
        raise UnsupportedArchitecture(mt, supported, remote_code=bool(config.get("auto_map")))


def _check_space(store: Store, plan: SourcePlan, max_size: int | None) -> None:
    if max_size is not None and plan.total_bytes > max_size:
        raise TooLarge(f"{plan.model_id} is larger than --max-size", plan.total_bytes, max_size)
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
def _materialise(store: Store, plan: SourcePlan, quiet: bool) -> tuple[Path, Path | None]:
    """The folder to read from, and the tmp/ download folder to remove afterwards (if any)."""
    if plan.folder is not None:
        return plan.folder, None
    info = plan.remote
    assert info is not None
    slug = re.sub(r"[^A-Za-z0-9._-]", "--", info.repo_id)
    dest = store.objects.tmp_dir / f"download-{slug}-{info.sha[:16]}"
    wanted = plan.weight_files + plan.other_files
    folder = hub.download_snapshot(info.repo_id, info.sha, wanted, dest, quiet)
    hub.verify_download(folder, info, wanted)
    failpoints.hit("import.downloaded")
    return folder, dest


def _convert(store: Store, plan: SourcePlan, folder: Path, quiet: bool,
             cache: ImportCache) -> tuple[Manifest, ObjectBatch]:
    tensors: dict = {}
    bar = _progress(plan.weight_bytes, "converting", quiet)
    with store.objects.batch() as batch:
        for shard in plan.weight_files:
            _convert_shard(batch, folder / shard, tensors, bar, cache)
        files = {n: batch.put_file(folder / n).oid for n in plan.other_files}
        config_oid = batch.put_file(folder / "config.json").oid
        files.pop("config.json", None)
    if bar:
        bar.close()
    tied = {}
    if plan.config.get("tie_word_embeddings", False):
        tied = {k: v for k, v in TIED_PAIRS.items() if k not in tensors and v in tensors}
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
                    if bar:
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
        if bar:
            bar.update(nbytes)
    tensors.update(entries)
    return True


def _progress(total: int, desc: str, quiet: bool):
    import sys

    if quiet or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)


# -- commit ----------------------------------------------------------------------------
def _commit(store: Store, plan: SourcePlan, manifest: Manifest, batch: ObjectBatch,
            name: str | None) -> ImportResult:
    key = manifest.content_key()
    refs = store.refs()
    holders = [r for r, e in sorted(refs.items()) if _content_key(store, e["commit"]) == key]
    if holders:
        held = name if name in holders else holders[0]
        commit = refs[held]["commit"]
        if name and name not in holders:  # same content under a new name: a second ref
            store.registry.set_ref({**refs[held], "model_name": name}, expected=None)
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


def _same_source(store: Store, entry: dict, plan: SourcePlan) -> bool:
    try:
        return store.read_manifest(entry["commit"]).source == plan.source
    except Exception:
        return False


def _default_stem(text: str) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._") or "model"
    if COMMIT_LIKE_RE.fullmatch(stem[:120]):  # e.g. a snapshot folder named by its sha
        stem = "model-" + stem
    return validate_name(stem[:120])
