"""The Hub revision a model was imported from, as a source of good copies for
`fsck --repair` (store/repair.py).

A manifest whose `source` is a Hub revision (`repo_id` + 40-hex `revision`) names, for
each of its objects, the repo file it came from: config.json and the other files as they
are, and each tensor object as one tensor of a safetensors file, rebuilt the way import
builds it (the deterministic single-tensor header, then the tensor's bytes; which shard
holds it comes from the revision's model.safetensors.index.json, else model.safetensors).
The copy is re-hashed by the repair like any other, so only a revision whose files still
hash to the objects' ids can mend them. Downloads go through huggingface_hub (HF cache,
HF_ENDPOINT, HF_TOKEN as for import).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import MStoreError
from ..reporting import SILENT, Reporter
from ..store import fsio
from ..store.manifest import Manifest
from ..store.objects import copy_range
from ..store.repair import Copy
from ..store.repo import Store
from ..store.safetensors_io import object_header, read_header_from_file
from .client import fetch_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class HubOrigin:
    repo_id: str
    revision: str
    filename: str | None  # a file object: its name in the repo
    tensor: str | None = None  # a tensor object: the tensor's name
    dtype: str = ""
    shape: tuple[int, ...] = ()


def hub_origins(store: Store) -> dict[str, HubOrigin]:
    """Where each object of a Hub-imported commit that refs reach came from."""
    out: dict[str, HubOrigin] = {}
    seen: set[str] = set()
    for entry in store.refs().values():
        for oid, light in store.lineage(entry.commit):
            if light is None or oid in seen:
                break
            seen.add(oid)
            src = light.source
            if src.get("type") != "huggingface" or not isinstance(src.get("repo_id"), str) \
                    or not isinstance(src.get("revision"), str):
                continue
            m: Manifest = store.read_manifest(oid)
            repo, rev = src["repo_id"], src["revision"]
            out.setdefault(m.config, HubOrigin(repo, rev, "config.json"))
            for name, obj in m.files.items():
                out.setdefault(obj, HubOrigin(repo, rev, name))
            for name, t in m.tensors.items():
                out.setdefault(t.object, HubOrigin(repo, rev, None, name, t.dtype,
                                                   tuple(t.shape)))
    return out


class HubCopies:
    """Good copies from the Hub revisions the store's models were imported from."""

    label = "the Hub"

    def __init__(self, store: Store, reporter: Reporter = SILENT):
        self.origins = hub_origins(store)
        self.reporter = reporter
        self._shard_of: dict[tuple[str, str], dict[str, str] | None] = {}

    def __enter__(self) -> "HubCopies":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def covers(self, oid: str) -> bool:
        return oid in self.origins

    def get(self, oid: str, tmp_dir: Path) -> Copy | None:
        o = self.origins.get(oid)
        if o is None:
            return None
        if o.filename is not None:
            return Copy(path=self._download(o, o.filename))
        shard = self._download(o, self._shard(o))
        info = read_header_from_file(shard, f"{o.repo_id}@{o.revision[:12]}").tensors.get(o.tensor)
        if info is None or info.dtype != o.dtype or tuple(info.shape) != o.shape:
            return None  # the revision no longer holds this tensor as it was imported
        fsio.makedirs(tmp_dir)
        with open(shard, "rb") as src, fsio.open_tmp(tmp_dir, "repair") as (tmp, f):
            f.write(object_header(info.dtype, info.shape, info.nbytes))
            f.flush()
            copy_range(src.fileno(), f.fileno(), info.start, info.nbytes)
        return Copy(path=tmp, temp=True)

    def _download(self, o: HubOrigin, filename: str) -> Path:
        return fetch_file(o.repo_id, filename, o.revision, self.reporter.tqdm_class())

    def _shard(self, o: HubOrigin) -> str:
        """The repo file holding tensor `o.tensor`: from the revision's index, if it has one."""
        key = (o.repo_id, o.revision)
        if key not in self._shard_of:
            try:
                index = json.loads(self._download(o, INDEX).read_text())
                self._shard_of[key] = dict(index.get("weight_map") or {})
            except (MStoreError, ValueError, OSError):
                self._shard_of[key] = None
        weight_map = self._shard_of[key]
        return (weight_map or {}).get(o.tensor, SINGLE)
