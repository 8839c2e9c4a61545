"""registry.json: the refs. Model names point at manifest commits, plus listing metadata.

Every change re-reads the file under a short exclusive lock, checks what the caller expected
(compare-and-swap, like dulwich's `set_if_equals`) and rewrites it atomically, so concurrent
writers never lose each other's updates and a kill -9 never leaves invalid JSON. A file that
does not parse is reported and never overwritten.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from . import failpoints, fsio
from .errors import BadName, RefChanged, RegistryCorrupt
from .locks import StoreLock

VERSION = 1
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
ENTRY_FIELDS = ("model_name", "commit", "model_id", "source", "architecture_type", "license",
                "created_at", "fine_tuned_from", "parameters", "size_bytes")
_ANY = object()  # "no expectation" for compare-and-swap


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise BadName(name)
    return name


class Registry:
    def __init__(self, root: Path):
        self.path = Path(root) / "registry.json"
        self.lock_path = Path(root) / "registry.lock"
        self.tmp_dir = Path(root) / "tmp"

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> dict[str, dict[str, Any]]:
        """The models table; an absent registry is an empty one."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        return parse_registry(raw, str(self.path))

    def get(self, name: str) -> dict[str, Any] | None:
        return self.load().get(name)

    def update(self, change: Callable[[dict[str, dict[str, Any]]], Any]) -> Any:
        """Apply `change` to the freshly read models table and write it back atomically."""
        with StoreLock(self.lock_path, shared=False, purpose="registry update"):
            failpoints.hit("registry.locked")
            models = self.load()
            result = change(models)
            doc = {"version": VERSION, "models": dict(sorted(models.items()))}
            data = json.dumps(doc, indent=2, ensure_ascii=False).encode() + b"\n"
            fsio.write_atomic(self.path, data, self.tmp_dir,
                              before_replace=lambda: failpoints.hit("registry.tmp-written"))
            failpoints.hit("registry.replaced")
            return result

    def set_ref(self, entry: dict[str, Any], expected: Any = _ANY) -> None:
        """Point `entry['model_name']` at `entry['commit']` if the ref still holds `expected`.

        expected=None means "the name must be free"; the default checks nothing.
        """
        name = validate_name(entry["model_name"])

        def change(models):
            current = models.get(name, {}).get("commit")
            if expected is not _ANY and current != expected:
                raise RefChanged(name, expected, current)
            models[name] = {k: entry.get(k) for k in ENTRY_FIELDS}

        self.update(change)

    def remove(self, name: str, expected: Any = _ANY) -> dict[str, Any]:
        def change(models):
            current = models.get(name, {}).get("commit")
            if name not in models or (expected is not _ANY and current != expected):
                raise RefChanged(name, expected, current)
            return models.pop(name)

        return self.update(change)


def parse_registry(raw: bytes, where: str) -> dict[str, dict[str, Any]]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RegistryCorrupt(where, f"not valid JSON: {e.__class__.__name__}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise RegistryCorrupt(where, "expected an object with a 'models' table")
    if doc.get("version") != VERSION:
        raise RegistryCorrupt(where, f"version {doc.get('version')!r} is not {VERSION}")
    for name, entry in doc["models"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("commit"), str)
                and entry.get("model_name") == name):
            raise RegistryCorrupt(where, f"entry {name!r} is malformed")
    return doc["models"]
