"""registry.json: the refs. Model names point at manifest commits, plus listing metadata.

Every change re-reads the file under a short exclusive lock, checks what the caller expected
(compare-and-swap, like dulwich's `set_if_equals`) and rewrites it atomically, so concurrent
writers never lose each other's updates and a kill -9 never leaves invalid JSON. A file that
does not parse is reported and never overwritten; so is a missing file in a store that holds
objects (an empty registry there would let gc delete everything). An entry that cannot be
used (a bad name, a malformed record) is skipped and reported, and written back untouched.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from . import failpoints, fsio
from ..errors import (
    BadName, CommitLikeName, NameHeldByInvalidEntry, RefChanged, RegistryCorrupt,
    RegistryMissing,
)
from .locks import StoreLock
from .objects import ObjectStore, is_oid
from .refs import ENTRY_FIELDS, RefEntry  # noqa: F401 - ENTRY_FIELDS: the registry's fields, part of this module's API

VERSION = 2  # the store format this mstore writes (mstore/store/format.py migrates older ones)
READABLE_VERSIONS = (1, 2)
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
COMMIT_LIKE_RE = re.compile(r"[0-9a-f]{7,}")  # would read as a commit id prefix
_ANY = object()  # "no expectation" for compare-and-swap


def validate_name(name: str) -> str:
    """A usable model name; 7+ hex digits are refused: `resolve` would take them for a commit."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise BadName(name)
    if COMMIT_LIKE_RE.fullmatch(name):
        raise CommitLikeName(name)
    return name


class Registry:
    def __init__(self, root: Path):
        self.path = Path(root) / "registry.json"
        self.lock_path = Path(root) / "registry.lock"
        self.tmp_dir = Path(root) / "tmp"
        self._objects = ObjectStore(Path(root))

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> dict[str, RefEntry]:
        """The usable entries. An absent registry is an empty one, unless objects/ holds an
        object: then the refs were lost and RegistryMissing says so."""
        return _entries(self._read()[1])

    def version(self) -> int:
        """The store format registry.json records; an absent registry is a new store's."""
        if not self.path.exists():
            return VERSION
        return self._read()[3]

    def invalid_entries(self) -> list[tuple[str, str]]:
        """(key, reason) of each entry `load` skips; they stay in the file untouched."""
        return self._read()[2]

    def invalid_commits(self) -> set[str]:
        """Commit ids that skipped entries still name: gc keeps them (never lose user data)."""
        raw, _valid, invalid, _version = self._read()
        out = set()
        for key, _reason in invalid:
            entry = raw.get(key)
            commit = entry.get("commit") if isinstance(entry, dict) else None
            if isinstance(commit, str) and is_oid(commit):
                out.add(commit)
        return out

    def _read(self, rebuild: bool = False):
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            if not rebuild and self._objects.holds_any():
                raise RegistryMissing(str(self.path)) from None
            return {}, {}, [], VERSION
        except OSError as e:
            raise RegistryCorrupt(str(self.path), f"cannot be read: {e.strerror or e}") from None
        return _parse(raw, str(self.path))

    def get(self, name: str) -> RefEntry | None:
        return self.load().get(name)

    def update(self, change: Callable[[dict[str, RefEntry]], Any], rebuild: bool = False,
               version: int | None = None) -> Any:
        """Apply `change` to the freshly read usable entries and write it back atomically,
        with the skipped entries as they were. `rebuild`: a missing registry.json may be
        created although objects exist (fsck --lost-found, under the exclusive store lock).
        The store format stays what it was unless `version` says (format.migrate does)."""
        with StoreLock(self.lock_path, shared=False, purpose="registry update"):
            failpoints.hit("registry.locked")
            raw, valid, invalid, found = self._read(rebuild)
            models = _entries(valid)
            result = change(models)
            kept = {key: raw[key] for key, _reason in invalid}
            for key, reason in invalid:
                if key in models:
                    raise NameHeldByInvalidEntry(key, reason)
            written = {name: e.to_json() for name, e in models.items()}
            doc = {"version": version or found,
                   "models": dict(sorted({**kept, **written}.items()))}
            data = json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"
            fsio.write_atomic(self.path, data, self.tmp_dir,
                              before_replace=lambda: failpoints.hit("registry.tmp-written"))
            failpoints.hit("registry.replaced")
            return result

    def set_ref(self, entry: RefEntry, expected: Any = _ANY) -> None:
        """Point `entry.model_name` at `entry.commit` if the ref still holds `expected`.

        expected=None means "the name must be free"; the default checks nothing.
        """
        name = validate_name(entry.model_name)
        fresh = replace(entry, _raw=None)  # written as the SPEC fields, whatever it was read from

        def change(models):
            current = _commit_of(models.get(name))
            if expected is not _ANY and current != expected:
                raise RefChanged(name, expected, current)
            models[name] = fresh

        self.update(change)

    def remove(self, name: str, expected: Any = _ANY) -> RefEntry:
        def change(models):
            current = _commit_of(models.get(name))
            if name not in models or (expected is not _ANY and current != expected):
                raise RefChanged(name, expected, current)
            return models.pop(name)

        return self.update(change)


def _entries(valid: dict[str, dict[str, Any]]) -> dict[str, RefEntry]:
    return {name: RefEntry.from_json(d) for name, d in valid.items()}


def _commit_of(entry: RefEntry | None) -> str | None:
    return entry.commit if entry is not None else None


def parse_registry(raw: bytes, where: str) -> dict[str, dict[str, Any]]:
    """The usable entries of a registry.json's bytes, as the JSON objects they are (a
    remote copies them as they are; see `parse_registry_entries`)."""
    return _parse(raw, where)[1]


def parse_registry_entries(raw: bytes, where: str
                           ) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """(usable entries, [(key, reason), ...] of the skipped ones). A file that is not a
    registry at all (not JSON, no 'models' table, another version) raises RegistryCorrupt;
    one bad entry never makes the others unreadable."""
    _raw, valid, invalid, _version = _parse(raw, where)
    return valid, invalid


def entry_problem(key: Any, entry: Any) -> str | None:
    """Why a registry entry cannot be used, or None."""
    try:
        validate_name(key)
    except CommitLikeName:
        return "name looks like a commit id prefix"
    except BadName:
        return "not a valid model name"
    if not isinstance(entry, dict):
        return "entry is not an object"
    if entry.get("model_name") != key:
        return "its model_name differs from its key"
    commit = entry.get("commit")
    if not (isinstance(commit, str) and is_oid(commit)):
        return "commit is not a 64-hex object id"
    return None


def _parse(raw: bytes, where: str):
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryCorrupt(where, f"not valid JSON: {e.__class__.__name__}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise RegistryCorrupt(where, "expected an object with a 'models' table")
    version = doc.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        if type(version) is int and version > VERSION:
            raise RegistryCorrupt(where, f"store format {version} is newer than this mstore "
                                         f"reads ({VERSION}); upgrade mstore")
        raise RegistryCorrupt(where, f"version {version!r} is not one of "
                                     f"{', '.join(map(str, READABLE_VERSIONS))}")
    valid, invalid = {}, []
    for key, entry in doc["models"].items():
        problem = entry_problem(key, entry)
        if problem:
            invalid.append((key, problem))
        else:
            valid[key] = entry
    return doc["models"], valid, invalid, version
