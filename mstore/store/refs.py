"""RefEntry: one ref of registry.json (SPEC "registry.json"), as a typed, immutable value.

Built in one place (`RefEntry.for_commit`) from the commit's manifest, so every writer
(import, train, tag, lost-found, pull) records the same fields the same way. An entry read
from disk remembers the JSON it came from and writes it back unchanged (key order, extra
keys, odd values): rewriting registry.json for one ref never touches another.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .manifest import Manifest


@dataclass(frozen=True)
class RefEntry:
    """One ref of registry.json: a name, its commit and the listing fields (SPEC)."""

    model_name: str
    commit: str
    model_id: Any = None
    source: Any = None
    architecture_type: Any = None
    license: Any = None
    created_at: Any = None
    fine_tuned_from: Any = None
    parameters: Any = None
    size_bytes: Any = None
    _raw: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def for_commit(cls, name: str, commit: str, manifest: "Manifest", size_bytes: int,
                   fine_tuned_from: str | None) -> "RefEntry":
        """The entry a new ref to `commit` gets (the listing fields come from its manifest)."""
        return cls(model_name=name, commit=commit, model_id=manifest.model_id,
                   source=manifest.source.get("type", "custom"),
                   architecture_type=manifest.architecture, license=manifest.license,
                   created_at=manifest.created_at, fine_tuned_from=fine_tuned_from,
                   parameters=manifest.parameters, size_bytes=size_bytes)

    def renamed(self, name: str) -> "RefEntry":
        """The same entry under another name (a second ref to the same commit)."""
        return replace(self, model_name=name, _raw=None)

    def to_json(self) -> dict[str, Any]:
        """What registry.json holds for it: as read, or the SPEC fields in SPEC order."""
        if self._raw is not None:
            return dict(self._raw)
        return {k: getattr(self, k) for k in ENTRY_FIELDS}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "RefEntry":
        """An entry `registry.entry_problem` accepted; absent fields read as None.

        Filled in directly rather than through the frozen dataclass's __init__ (one
        object.__setattr__ per field): every command builds one per ref, and at 10,000
        refs that __init__ was a third of `mstore list`."""
        entry = object.__new__(cls)
        entry.__dict__.update(zip(ENTRY_FIELDS, map(d.get, ENTRY_FIELDS)), _raw=d)
        return entry


# registry.json's fields, in the order a new entry writes them (SPEC order)
ENTRY_FIELDS = tuple(f.name for f in fields(RefEntry) if not f.name.startswith("_"))
