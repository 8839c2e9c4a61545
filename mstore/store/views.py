"""Typed results of the read operations: what `Store.list()`, `show()`, `log()`, `du()`,
`diff()`, `gc()` and `fsck()` return to Python callers.

Each view is built from the very document the CLI prints with `--json` (store.report,
gc, fsck), keeps it whole in `to_json()`, and lifts the shared vocabulary (docs/json.md)
into typed attributes, so the Python API and the CLI can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

V = TypeVar("V", bound="JsonView")


@dataclass(frozen=True)
class JsonView:
    """A typed face over one `--json` document."""

    doc: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls: type[V], doc: dict[str, Any]) -> V:
        names = [f.name for f in fields(cls) if f.name != "doc"]
        return cls(doc=doc, **{n: doc.get(n) for n in names})

    def to_json(self) -> dict[str, Any]:
        """The document exactly as `--json` prints it."""
        return self.doc


@dataclass(frozen=True)
class ModelRef(JsonView):
    """One ref (a `list` row)."""

    name: str
    commit: str
    architecture: str | None
    model_id: str | None
    license: str | None
    parent: str | None
    fine_tuned_from: str | None
    created_at: str | None
    parameters: int | None
    size_bytes: int | None
    kind: str | None  # full | adapter | quantized (None: the manifest is unreadable)
    variant: str | None  # "lora r=16 on qwen-base", "int8 of qwen-base"; "" for a full model


@dataclass(frozen=True)
class CommitInfo(JsonView):
    """One commit in full (`show`): `manifest` is the manifest as stored."""

    name: str | None
    names: list[str]
    commit: str
    parent: str | None
    architecture: str | None
    model_id: str | None
    license: str | None
    created_at: str | None
    message: str | None
    parameters: int | None
    size_bytes: int | None
    weights_present: bool | None
    manifest: dict[str, Any]
    kind: str
    adapter: dict[str, Any] | None
    variant: str


@dataclass(frozen=True)
class LogEntry(JsonView):
    """One generation of a lineage (`log`), newest first."""

    commit: str
    names: list[str]
    parent: str | None
    created_at: str | None
    message: str | None
    architecture: str | None
    model_id: str | None
    license: str | None
    training: dict[str, Any] | None
    weights_present: bool
    kind: str | None
    variant: str | None


@dataclass(frozen=True)
class DiskUsage(JsonView):
    """Logical against physical bytes (`du`); `models` has one row per held commit."""

    refs: int
    commits: int
    logical_bytes: int
    physical_bytes: int
    objects: int
    dedup_ratio: float | None
    models: list[dict[str, Any]]
    loose_bytes: int = 0  # physical bytes of loose objects (manifests and files included)
    packed_bytes: int = 0  # physical bytes of packed tensor objects
    packed_objects: int = 0


@dataclass(frozen=True)
class TensorDiff(JsonView):
    """What changed between two commits (`diff`)."""

    a: dict[str, Any]
    b: dict[str, Any]
    added: list[str]
    removed: list[str]
    changed: list[dict[str, Any]]
    shared: list[str]
    shared_bytes: int
    config_changed: bool
    files_changed: list[str]
    adapter: dict[str, Any] | None  # {"a"/"b": a LoRA side's summary} (None: no adapter)


@dataclass(frozen=True)
class GcResult(JsonView):
    """What gc deleted (or, with dry_run, would delete)."""

    dry_run: bool
    objects_deleted: int
    bytes_freed: int
    tmp_files_deleted: int
    kept_reachable: int
    kept_within_grace: int
    deleted: list[str]
    kept: list[dict[str, str]] | None  # with explain: [{"object", "why"}]


@dataclass(frozen=True)
class FsckReport(JsonView):
    """Every problem found; `ok` when there are none (`dangling` lists lost commits)."""

    ok: bool
    errors: list[dict[str, Any]]
    info: list[dict[str, Any]]
    dangling: list[dict[str, Any]]
