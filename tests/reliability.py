"""Tools for the reliability tests: store templates, invariant checks, a power-loss model.

`PowerLoss` records the store's durable-state operations (through `mstore.fsio.observe`)
and rebuilds what a disk may hold after a crash after any prefix of them: a file's bytes
survive only if it was fsynced (or the filesystem synced) after it was written, and a
create, rename, mkdir or unlink survives only if its directory was synced afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mstore.store import fsck, fsio
from mstore.store.registry import parse_registry
from mstore.store.repo import Store


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def refs_of(store_path: Path) -> dict[str, str]:
    """name -> commit; raises if registry.json does not parse (it always must)."""
    reg = store_path / "registry.json"
    if not reg.exists():
        return {}
    return {n: e["commit"] for n, e in parse_registry(reg.read_bytes(), str(reg)).items()}


def fsck_errors(store_path: Path) -> list[str]:
    return [f.line() for f in fsck.check(Store(store_path)) if f.error]


def assert_consistent(store_path: Path, allowed: dict[str, set[str | None]] | None = None,
                      before: dict[str, str] | None = None) -> dict[str, str]:
    """registry.json parses, fsck finds no error, and each ref named in `allowed` holds one
    of the allowed commits (None: absent); every other ref kept its `before` value."""
    refs = refs_of(store_path)
    errors = fsck_errors(store_path)
    assert not errors, errors
    allowed = allowed or {}
    for name, ok in allowed.items():
        assert refs.get(name) in ok, (name, refs.get(name), ok)
    if before is not None:
        for name, commit in before.items():
            if name not in allowed:
                assert refs.get(name) == commit, (name, refs.get(name), commit)
        for name in refs:
            assert name in before or name in allowed, f"unexpected new ref {name}"
    return refs


# -- power loss ------------------------------------------------------------------------
@dataclass
class Op:
    kind: str
    path: Path
    other: Path | None = None
    contents: dict[Path, bytes] = field(default_factory=dict)  # bytes made durable by it


class PowerLoss:
    """Record fsio operations under `root`, then rebuild the disk after each prefix."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.ops: list[Op] = []
        self.initial = self._read_all()
        self.initial_dirs = {p for p in self.root.rglob("*") if p.is_dir()} | {self.root}

    def _read_all(self) -> dict[Path, bytes]:
        out = {}
        for p in self.root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    out[p] = p.read_bytes()
                except OSError:
                    pass
        return out

    def __call__(self, kind: str, path: Path, other: Path | None) -> None:
        if not (path == self.root or self.root in path.parents):
            return
        op = Op(kind, path, other)
        if kind == "fsync":
            op.contents = {path: path.read_bytes()}
        elif kind == "syncfs":
            op.contents = self._read_all()
        self.ops.append(op)

    def __enter__(self) -> "PowerLoss":
        fsio.observe(self)
        return self

    def __exit__(self, *exc) -> None:
        fsio.observe(None)

    def crash_state(self, k: int, dest: Path) -> Path:
        """The worst disk a crash after ops[:k] may leave, written out under `dest`."""
        # Volatile view: path -> inode; durable view likewise; inode -> durable bytes.
        names: dict[Path, int] = {}
        durable_names: dict[Path, int] = {}
        durable_bytes: dict[int, bytes] = {}
        for i, (p, data) in enumerate(self.initial.items()):
            names[p] = durable_names[p] = i
            durable_bytes[i] = data
        dirs = set(self.initial_dirs)
        durable_dirs = set(self.initial_dirs)
        pending: list[tuple[Path, str, Path, Path | None, int | None]] = []  # (dir, op, ...)
        next_inode = len(names)

        def settle(predicate) -> None:
            keep = []
            for entry in pending:
                d, op, a, b, ino = entry
                if not predicate(d):
                    keep.append(entry)
                    continue
                if op == "link":
                    durable_names[a] = ino
                elif op == "rename":
                    durable_names.pop(a, None)
                    durable_names[b] = ino
                elif op == "unlink":
                    durable_names.pop(a, None)
                elif op == "mkdir":
                    durable_dirs.add(a)
            pending[:] = keep

        for op in self.ops[:k]:
            if op.kind == "create":
                names[op.path] = next_inode
                pending.append((op.path.parent, "link", op.path, None, next_inode))
                next_inode += 1
            elif op.kind == "fsync":
                if op.path in names:
                    durable_bytes[names[op.path]] = op.contents[op.path]
            elif op.kind == "mkdir":
                dirs.add(op.path)
                pending.append((op.path.parent, "mkdir", op.path, None, None))
            elif op.kind == "rename":
                ino = names.pop(op.path)
                names[op.other] = ino
                pending.append((op.other.parent, "rename", op.path, op.other, ino))
            elif op.kind == "unlink":
                names.pop(op.path, None)
                pending.append((op.path.parent, "unlink", op.path, None, None))
            elif op.kind == "fsync_dir":
                settle(lambda d, target=op.path: d == target)
            elif op.kind == "syncfs":
                settle(lambda d: True)
                for p, data in op.contents.items():
                    if p in names:
                        durable_bytes[names[p]] = data
        if dest.exists():
            shutil.rmtree(dest)
        for d in sorted(durable_dirs, key=lambda p: len(p.parts)):
            if d == self.root or all(a in durable_dirs for a in d.parents
                                     if self.root in a.parents or a == self.root):
                (dest / d.relative_to(self.root)).mkdir(parents=True, exist_ok=True)
        for p, ino in durable_names.items():
            target = dest / p.relative_to(self.root)
            if target.parent.is_dir():
                target.write_bytes(durable_bytes.get(ino, b""))
        return dest


def ref_commits_json(store_path: Path) -> str:
    return json.dumps(refs_of(store_path), sort_keys=True)


def env_without_failpoints() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("MSTORE_FAILPOINT", "MSTORE_FAILPOINT_LOG")}
