"""A stat cache for re-imports, like git's index: a shard whose inode, size, mtime and
ctime are unchanged since it was imported has the same tensors, so they are not hashed again.

`import-cache.json` in the store root maps a shard's absolute path to its stat and the
tensor objects it produced. It is only an optimisation: an entry is used only if the stat
matches exactly and every object it names is still present; anything else (missing file,
bad JSON, an entry for a modified file) means a normal import. Losing it loses nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..store import fsio

FILE = "import-cache.json"
MAX_ENTRIES = 1000


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class ImportCache:
    def __init__(self, root: Path):
        self.path = Path(root) / FILE
        self.tmp_dir = Path(root) / "tmp"
        self.entries: dict[str, Any] = {}
        self.fresh: dict[str, Any] = {}
        try:
            doc = json.loads(self.path.read_text())
            if isinstance(doc, dict) and doc.get("version") == 1:
                self.entries = dict(doc.get("files") or {})
        except (OSError, ValueError):
            pass

    def lookup(self, path: Path, st: os.stat_result) -> list[list] | None:
        """[[name, oid, dtype, shape], ...] recorded for this exact file, or None."""
        entry = self.entries.get(str(path))
        if isinstance(entry, dict) and entry.get("stat") == _stat_key(st):
            tensors = entry.get("tensors")
            if isinstance(tensors, list):
                return tensors
        return None

    def record(self, path: Path, st: os.stat_result, tensors: list[list]) -> None:
        self.fresh[str(path)] = {"stat": _stat_key(st), "tensors": tensors}

    def save(self) -> None:
        """Merge what this import learnt; best effort (a lost race loses a cache entry)."""
        if not self.fresh:
            return
        merged = {**self.entries, **self.fresh}
        if merged == self.entries:
            return  # nothing new: a re-import writes nothing
        if len(merged) > MAX_ENTRIES:
            merged = dict(list(merged.items())[-MAX_ENTRIES:])
        data = json.dumps({"version": 1, "files": merged}, separators=(",", ":")).encode()
        try:
            fsio.write_atomic(self.path, data, self.tmp_dir)
        except OSError:
            pass
