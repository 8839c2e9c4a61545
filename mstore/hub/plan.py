"""Planning an import: what a source holds and whether it may be imported, before anything
is written. A local folder (or an `hf download` snapshot inside the HF cache) is read where
it is; a Hub repo is asked through huggingface_hub (`model_info`, config.json first), and a
revision the store already holds is recognised from the manifests' `source`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import client as hub
from ..errors import (
    BadSource, ObjectCorrupt, ObjectMissing, PickleOnly, SourceNotFound,
    UnsupportedArchitecture,
)
from ..reporting import SILENT, Reporter
from ..store.repo import Store


INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter (hub/adapter_import.py)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    adapter_config: dict | None = None  # a PEFT adapter's adapter_config.json (no config.json)

    @property
    def architecture(self) -> str:
        return self.config.get("model_type")

    def estimate_params(self) -> tuple[int, str]:
        dtype = str(self.config.get("dtype") or self.config.get("torch_dtype") or "bfloat16")
        size = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}.get(dtype, 2)
        return self.weight_bytes // size, dtype


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
    if "config.json" not in names and ADAPTER_CONFIG in names:
        return _adapter_plan(names, lambda n: folder / n, str(folder),
                             {"type": "local", "path": str(folder)},
                             _cache_repo_id(cache_repo) if cache_repo else folder.name,
                             {n: (folder / n).stat().st_size for n in names},
                             hub.card_license(folder), folder=folder)
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
    held = held_by_source(store, source) if store is not None else None
    if held is not None:
        return _held_plan(store, spec, info, source, held)
    if "config.json" not in names and ADAPTER_CONFIG in names:
        fetch = lambda n: hub.fetch_file(spec.repo_id, n, info.sha, tqdm_class)  # noqa: E731
        plan = _adapter_plan([n for n in names if "/" not in n], fetch, spec.repo_id, source,
                             spec.repo_id, info.files, info.license, remote=info)
        top = plan.weight_files + plan.other_files
        plan.folder = hub.cached_snapshot(spec.repo_id, info.sha, top)
        return plan
    if "config.json" not in names:
        raise BadSource(f"{spec.repo_id} has no config.json: not a transformers model repo")
    config = _read_config(hub.fetch_file(spec.repo_id, "config.json", info.sha, tqdm_class))
    check_architecture(config)
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


def _adapter_plan(names: list[str], path_of, where: str, source: dict, model_id: str,
                  sizes: dict[str, int], license: str | None, **kw) -> SourcePlan:
    """A PEFT adapter: adapter_config.json, adapter_model.safetensors and its card."""
    from .adapter_import import read_adapter_config

    if ADAPTER_WEIGHTS not in names:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise PickleOnly(where, pickles)
        raise BadSource(f"{where} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    others = [n for n in names if _keep(n) and n != ADAPTER_WEIGHTS]
    return SourcePlan(
        source=source, model_id=model_id, default_stem=model_id.split("/")[-1], config={},
        weight_files=[ADAPTER_WEIGHTS], other_files=others,
        total_bytes=sum(sizes.get(n, 0) for n in [ADAPTER_WEIGHTS, *others]),
        weight_bytes=sizes.get(ADAPTER_WEIGHTS, 0), license=license,
        adapter_config=read_adapter_config(path_of(ADAPTER_CONFIG), where), **kw)


def held_by_source(store: Store, source: dict, prefer: str | None = None) -> str | None:
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


def check_architecture(config: dict) -> None:
    """Only the source's own adapter is loaded, unless the import is refused."""
    from ..adapters.base import is_importable

    mt = config.get("model_type")
    if not is_importable(mt):
        raise UnsupportedArchitecture(mt, supported_architectures(),
                                      remote_code=bool(config.get("auto_map")))


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
