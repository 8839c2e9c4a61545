"""A trained model whose commit failed, kept in a folder until it can be committed.

Training costs minutes to days; a full disk (or any other failure) while committing must
not throw that away. `save` writes everything the commit needed outside the store, since
the store's disk may be the full one: the weights exactly as the commit would store them
(`model.safetensors`), config.json and the other files (tokenizer), and `mstore-commit.json`
with the manifest's fields and the training record, written last so that a folder holding
it is complete. `commit` (`mstore train --resume-commit DIR`) commits such a folder as the
commit that failed would have: same parent, same training record, same tensors.

Where: the folder the user named (`--recovery-dir`), else `./mstore-train-recovery-<UTC
time>/` in the working folder, else the same name under the system temp folder.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..adapters.base import Checkpoint
from ..runtime.checkpoint import CommitResult, commit_checkpoint
from ..errors import NameTaken, RecoveryError
from ..store.repo import Store

META = "mstore-commit.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = 1


def default_dirs(requested: Path | None) -> list[Path]:
    """Where to try, in order: the user's folder, ./mstore-train-recovery-<time>, temp."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"mstore-train-recovery-{stamp}"
    first = Path(requested) if requested is not None else Path.cwd() / name
    return [first, Path(tempfile.gettempdir()) / name]


def save(ckpt: Checkpoint, files: dict[str, bytes], commit_args: dict[str, Any],
         requested: Path | None = None) -> Path:
    """Write a recovery folder at the first place that takes it; returns that folder.
    Raises the last place's error when none does."""
    error: Exception | None = None
    for folder in default_dirs(requested):
        try:
            return _write(folder, ckpt, files, commit_args)
        except (OSError, SafetensorError) as e:  # a full disk, a folder we may not write
            error = e
    assert error is not None
    raise error


def _write(folder: Path, ckpt: Checkpoint, files: dict[str, bytes],
           commit_args: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    folder = _fresh(folder)
    folder.mkdir(parents=True)
    written = False
    try:
        save_file(_unshared(ckpt.tensors), str(folder / WEIGHTS))
        (folder / CONFIG).write_bytes(ckpt.config)
        names = []
        for name, data in sorted(files.items()):
            target = (folder / name).resolve()
            if name in (META, WEIGHTS, CONFIG) or folder.resolve() not in target.parents:
                continue  # a name that would not stay in the folder is not written
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            names.append(name)
        meta = {"format": FORMAT, **commit_args, "files": names,
                "tied_weights": ckpt.tied_weights}
        (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        written = True
    finally:
        if not written:  # an incomplete folder is never left to be committed
            _remove(folder)
    return folder


def _fresh(folder: Path) -> Path:
    """`folder` if free (or an empty folder), else `folder-<pid>`."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        if folder.is_dir():
            folder.rmdir()
        return folder
    return folder.with_name(f"{folder.name}-{os.getpid()}")


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing storage (safetensors refuses shared ones)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def load(folder: Path) -> tuple[Checkpoint, dict[str, Any]]:
    """A recovery folder back into the checkpoint and the commit's fields."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise RecoveryError(f"recovery folder {folder} not found")
    try:
        meta = json.loads((folder / META).read_text())
    except FileNotFoundError:
        raise RecoveryError(f"{folder} is not a recovery folder of mstore train (no {META}; "
                            "an incomplete one is not committed)") from None
    except (OSError, ValueError) as e:
        raise RecoveryError(f"cannot read {folder / META}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecoveryError(f"{folder / META} is not a recovery record this mstore reads")
    try:
        tensors = load_file(str(folder / WEIGHTS))
        config = (folder / CONFIG).read_bytes()
        files = {n: (folder / n).read_bytes() for n in meta.pop("files")}
    except (OSError, SafetensorError, KeyError) as e:
        raise RecoveryError(f"recovery folder {folder} is damaged: {e}") from None
    ckpt = Checkpoint(tensors=tensors, config=config, files=files,
                      tied_weights=meta.pop("tied_weights", {}))
    meta.pop("format")
    return ckpt, meta


def commit(store: Store, folder: Path, name: str | None = None) -> CommitResult:
    """Commit a recovery folder (`mstore train --resume-commit DIR`)."""
    ckpt, meta = load(folder)
    parent = meta.get("parent")
    if parent is not None and not store.objects.exists(parent):
        raise RecoveryError(f"the parent commit {parent[:12]} of {folder} is no longer in "
                            "the store")
    if name is not None:
        meta["name"] = name
    if meta.get("name") and not store.name_is_free(meta["name"]):
        raise NameTaken(meta["name"], store.next_free_name(meta["name"]))
    with store.writer_lock("train"):
        return commit_checkpoint(store, ckpt, files={}, **meta)
