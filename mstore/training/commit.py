"""The commit of a training run's result: the training record, the child manifest (or a
from-scratch root), and, when the commit fails, the recovery folder that keeps the model.
"""

from __future__ import annotations

import os
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from ..adapters.base import TOKENIZER_FILES, Checkpoint
from ..errors import CommitFailed, MStoreError
from ..runtime import distributed, lora
from ..runtime.checkpoint import (
    FINETUNE_FMT, LORA_FMT, SCRATCH_FMT, CommitResult, commit_checkpoint, finetune_stem,
)
from ..runtime.torch_io import TORCH_DTYPES
from ..store import failpoints
from ..store.objects import hash_file
from ..store.repo import Store
from . import recovery
from .config import TrainConfig

if TYPE_CHECKING:
    from .loop import _Loop, _Setup


MAX_HISTORY = 100  # loss points kept in the manifest (evenly spaced)


def _compact(history: list[list[float]]) -> list[list[float]]:
    if len(history) <= MAX_HISTORY:
        return history
    stride = len(history) / MAX_HISTORY
    picked = [history[int(i * stride)] for i in range(MAX_HISTORY - 1)]
    return picked + [history[-1]]


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("mstore", "torch", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def commit_result(store: Store, cfg: TrainConfig, s: _Setup, loop: _Loop, frozen: list[str],
            data_path: Path, started: float, device: str, interrupted: bool,
            ctx: distributed.DistContext, recovery_dir: Path | None) -> CommitResult:
    training = {
        "config": cfg.to_dict(),
        "dataset": {"path": str(data_path), "blake3": hash_file(data_path)},
        "steps": loop.step, "tokens_seen": loop.tokens_seen,
        "train_loss": _compact(loop.train_losses), "eval_loss": _compact(loop.eval_losses),
        "wall_time_s": round(time.time() - started, 3), "seed": cfg.seed, "device": device,
        "frozen": frozen, "interrupted": interrupted, "versions": _versions(),
        "processes": ctx.world, "strategy": cfg.strategy if ctx.active else None,
    }
    s.model.eval()
    if cfg.method == "lora":
        return _commit_adapter(store, cfg, s, data_path, training, recovery_dir)
    ckpt = s.adapter.save_checkpoint(s.model)
    if s.parent is None:
        ckpt.files.update(s.new_files)
        scratch = type(s.adapter)
        args = dict(architecture=scratch.architectures[0], model_id=scratch.scratch_model_id,
                    source={"type": "scratch"}, license=None, parent=None,
                    message=f"train {scratch.scratch_title} from scratch on {data_path.name}",
                    training=training, name=cfg.output_name, stem=scratch.scratch_stem,
                    name_fmt=SCRATCH_FMT, fine_tuned_from=None)
        return _commit_or_keep(store, ckpt, {}, {}, args, recovery_dir)
    m = s.adapter.manifest
    files = dict(m.files)
    if s.new_files:  # a tokenizer override replaces the parent's tokenizer files
        files = {n: o for n, o in files.items() if n not in TOKENIZER_FILES}
        ckpt.files.update(s.new_files)
    dtypes = {n: TORCH_DTYPES[t.dtype] for n, t in m.tensors.items() if t.dtype in TORCH_DTYPES}
    args = _child_args(cfg, s, training, "fine-tune", data_path, FINETUNE_FMT)
    return _commit_or_keep(store, ckpt, files, dtypes, args, recovery_dir)


def _child_args(cfg: TrainConfig, s: _Setup, training: dict[str, Any], what: str,
                data_path: Path, name_fmt: str, **extra: Any) -> dict[str, Any]:
    """commit_checkpoint's fields for a child of the model `s` trained on."""
    m = s.adapter.manifest
    return dict(architecture=m.architecture, model_id=m.model_id,
                source={"type": "finetune", "parent": s.parent, "parent_name": s.parent_name},
                license=m.license, parent=s.parent,
                message=f"{what} {s.parent_name or s.parent[:12]} on {data_path.name}",
                training=training, name=cfg.output_name,
                stem=finetune_stem(s.parent_name or m.model_id.split("/")[-1].lower()),
                name_fmt=name_fmt, fine_tuned_from=s.parent_name, **extra)


def _commit_adapter(store: Store, cfg: TrainConfig, s: _Setup, data_path: Path,
                    training: dict[str, Any], recovery_dir: Path | None) -> CommitResult:
    """An adapter child: only the LoRA tensors (peft's names, in the base's dtype) and peft's
    adapter_config.json; the base's config.json; `parent` the base."""
    m = s.adapter.manifest
    parts = lora.adapter_parts(s.model, m)
    failpoints.hit("train.adapter-built")
    ckpt = Checkpoint(tensors=parts.tensors, config=store.objects.read_bytes(m.config),
                      files={lora.ADAPTER_CONFIG: parts.config_json})
    args = _child_args(cfg, s, training, "lora fine-tune", data_path, LORA_FMT,
                       kind="adapter", adapter=parts.summary)
    return _commit_or_keep(store, ckpt, {}, {}, args, recovery_dir)


def _commit_or_keep(store: Store, ckpt: Checkpoint, files: dict[str, str],
                    dtypes: dict[str, torch.dtype], args: dict[str, Any],
                    recovery_dir: Path | None) -> CommitResult:
    """Commit; if that fails for any reason (a full disk, most likely), remove the temp
    files this commit made and keep the trained model in a recovery folder outside the
    store, named in the error, for `mstore train --resume-commit DIR`."""
    before = _own_tmp_files(store)
    try:
        return commit_checkpoint(store, ckpt, files=files, dtypes=dtypes, **args)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - any failure keeps the model
        for leftover in _own_tmp_files(store) - before:
            leftover.unlink(missing_ok=True)
        reason = _reason(e)
        try:
            kept = Checkpoint(
                tensors={n: t.to(dtypes[n]) if n in dtypes and t.dtype != dtypes[n] else t
                         for n, t in ckpt.tensors.items()},
                config=ckpt.config, tied_weights=ckpt.tied_weights)
            every_file = {n: store.objects.read_bytes(o) for n, o in files.items()}
            folder = recovery.save(kept, {**every_file, **ckpt.files}, args, recovery_dir)
        # a full disk, no memory for the copy, an object gone: said with the commit's error
        except (OSError, RuntimeError, ValueError, SafetensorError, MStoreError) as save_error:
            raise CommitFailed(reason, None, _reason(save_error)) from e
        raise CommitFailed(reason, str(folder)) from e


def _own_tmp_files(store: Store) -> set[Path]:
    """This process's temp files in the store's tmp/ (fsio names them `*.<pid>.*`)."""
    marker = f".{os.getpid()}."
    try:
        return {p for p in (store.root / "tmp").iterdir() if marker in p.name and p.is_file()}
    except OSError:
        return set()


def _reason(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e) if isinstance(e, MStoreError) else f"{type(e).__name__}: {e}"
