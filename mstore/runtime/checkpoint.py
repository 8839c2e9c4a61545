"""Committing a module as a manifest: what `train` (and any library user) does at the end.

Objects first (one durable batch), then the manifest, then the ref by compare-and-swap.
A tensor equal to the parent's (a frozen one) hashes to the parent's object and costs no
new bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from . import torch_io
from ..adapters.base import Checkpoint
from ..store.manifest import Manifest
from ..store.repo import Store

FINETUNE_FMT = "{stem}-finetuned-{n:03d}"
LORA_FMT = "{stem}-lora-{n:03d}"  # an adapter child (method: lora)
SCRATCH_FMT = "{stem}-{n:03d}"  # stem: the adapter's `scratch_stem`


def finetune_stem(parent_name: str) -> str:
    """`qwen-0.5b-base` -> `qwen-0.5b`; `qwen-0.5b-finetuned-003`, `qwen-0.5b-lora-001`,
    `qwen-0.5b-merged-002` -> `qwen-0.5b`."""
    return re.sub(r"-(base|(finetuned|lora|merged)-\d{3,})$", "", parent_name) or parent_name


@dataclass
class CommitResult:
    name: str
    commit: str
    bytes_written: int
    bytes_reused: int


def commit_checkpoint(store: Store, ckpt: Checkpoint, *, architecture: str, model_id: str,
                      source: dict[str, Any], license: str | None, parent: str | None,
                      files: dict[str, str], message: str, training: dict[str, Any] | None,
                      name: str | None, stem: str, name_fmt: str,
                      fine_tuned_from: str | None,
                      dtypes: dict[str, torch.dtype] | None = None, kind: str = "full",
                      adapter: dict[str, Any] | None = None) -> CommitResult:
    """Write `ckpt` as a new manifest and ref. `dtypes` casts tensors back to the parent's
    storage dtypes (bf16 -> fp32 for training -> bf16 is exact for untouched tensors).
    `kind` "adapter" with its `adapter` summary: `ckpt` holds only the adapter's tensors
    and `parent` is the base."""
    dtypes = dtypes or {}
    store.init()  # registry before objects: a new store is made, a damaged one refused
    with store.objects.batch() as batch:
        state = ((n, t.to(dtypes[n]) if n in dtypes and t.dtype != dtypes[n] else t)
                 for n, t in sorted(ckpt.tensors.items()))
        tensors = torch_io.put_tensors(batch, state)
        config = batch.put_bytes(ckpt.config).oid
        all_files = dict(files)
        for fname, data in ckpt.files.items():
            all_files[fname] = batch.put_bytes(data).oid
    manifest = Manifest(architecture=architecture, model_id=model_id, source=source,
                        license=license, config=config, files=all_files, tensors=tensors,
                        parent=parent, message=message, tied_weights=ckpt.tied_weights,
                        training=training, kind=kind, adapter=adapter)
    commit = store.put_manifest(manifest)
    target = store.add_ref(commit, manifest, name,
                           lambda: store.next_free_name(stem, name_fmt, start=1),
                           fine_tuned_from)
    return CommitResult(target, commit, batch.written, batch.reused)
