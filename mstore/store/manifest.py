"""Manifests: the commits of mstore. Canonical JSON, so the same content has one id.

A manifest names every object a model needs (config, files, one object per tensor), where
the model came from (`source`, or `parent` for a fine-tune) and how it was made
(`training`). Tied parameters are recorded by name instead of stored twice.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from ..errors import ObjectCorrupt
from .objects import is_oid

FORMAT = 1
_HEX = re.compile(r"[0-9a-f]*")


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: byte-identical for equal content."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class TensorEntry:
    object: str
    dtype: str
    shape: list[int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Manifest:
    architecture: str
    model_id: str
    source: dict[str, Any]
    license: str | None
    config: str
    files: dict[str, str]
    tensors: dict[str, TensorEntry]
    parent: str | None = None
    created_at: str = field(default_factory=utc_now)
    message: str = ""
    tied_weights: dict[str, str] = field(default_factory=dict)  # name -> name it shares
    training: dict[str, Any] | None = None
    format: int = FORMAT

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tensors"] = {k: asdict(v) for k, v in self.tensors.items()}
        return d

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes, oid: str = "?") -> "Manifest":
        """Parse and check a manifest (`LightManifest.from_bytes`: without its tensor table)."""
        d, bad = _parse_common(data, oid)
        tensors = {}
        for name, t in d["tensors"].items():
            if type(t) is not dict:
                raise bad(f"tensor entry {name!r} is malformed")
            o, dtype, shape = t.get("object"), t.get("dtype"), t.get("shape")
            if type(o) is not str or len(o) != 64 or type(dtype) is not str \
                    or type(shape) is not list:
                raise bad(f"tensor entry {name!r} is malformed")
            tensors[name] = TensorEntry(o, dtype, shape)
        if not _HEX.fullmatch("".join(t.object for t in tensors.values())):
            raise bad("a tensor's object id is malformed")
        _check_rest(d, bad)
        return cls(**_known(d, cls, "tensors"), tensors=tensors)

    # -- what it references -------------------------------------------------------------
    def object_ids(self) -> set[str]:
        """Tensor and file objects this manifest needs (not its parent)."""
        return {self.config, *self.files.values(), *(t.object for t in self.tensors.values())}

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def content_key(self) -> bytes:
        """What makes two imports 'the same content': weights, config, files; not the date."""
        return canonical_json({
            "architecture": self.architecture, "config": self.config, "files": self.files,
            "tensors": {k: asdict(v) for k, v in self.tensors.items()},
            "tied_weights": self.tied_weights,
        })


@dataclass(frozen=True)
class LightManifest:
    """A manifest read without its tensor table: what walks over long lineages need (the
    commit fields, `parent`, and every object id), checked as `Manifest.from_bytes` checks
    them. It has no `tensors` and no `parameters`: asking is an AttributeError, never 0."""

    architecture: str
    model_id: str
    source: dict[str, Any]
    license: str | None
    config: str
    files: dict[str, str]
    tensor_objects: frozenset[str]
    parent: str | None = None
    created_at: str = ""
    message: str = ""
    tied_weights: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] | None = None
    format: int = FORMAT

    @classmethod
    def from_bytes(cls, data: bytes, oid: str = "?") -> "LightManifest":
        d, bad = _parse_common(data, oid)
        try:
            objects = frozenset(t["object"] for t in d["tensors"].values())
        except (TypeError, KeyError):
            raise bad("a tensor entry is malformed") from None
        if not all(type(o) is str and len(o) == 64 for o in objects) \
                or not _HEX.fullmatch("".join(objects)):
            raise bad("a tensor's object id is malformed")
        _check_rest(d, bad)
        return cls(**_known(d, cls, "tensor_objects"), tensor_objects=objects)

    def object_ids(self) -> set[str]:
        """Tensor and file objects this manifest needs (not its parent)."""
        return {self.config, *self.files.values(), *self.tensor_objects}


def _parse_common(data: bytes, oid: str) -> tuple[dict[str, Any], Callable[[str], ObjectCorrupt]]:
    """The JSON object, its format and the types of its required fields; and `bad`, which
    makes the ObjectCorrupt that names this manifest."""
    def bad(reason: str) -> ObjectCorrupt:
        return ObjectCorrupt(oid, reason, "manifest")

    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("not valid JSON") from None
    if not isinstance(d, dict):
        raise bad("not a JSON object")
    if type(d.get("format")) is not int or d["format"] != FORMAT:
        raise bad(f"format {d.get('format')!r} is not {FORMAT}")
    for key, typ in (("architecture", str), ("model_id", str), ("source", dict),
                     ("config", str), ("files", dict), ("tensors", dict),
                     ("created_at", str), ("message", str)):
        if not isinstance(d.get(key), typ):
            raise bad(f"field {key!r} missing or not a {typ.__name__}")
    return d, bad


def _check_rest(d: dict[str, Any], bad: Callable[[str], ObjectCorrupt]) -> None:
    """The optional fields and every object id but the tensors' (checked by the caller)."""
    tied = d.get("tied_weights", {})
    if not (isinstance(tied, dict) and all(isinstance(v, str) for v in tied.values())):
        raise bad("field 'tied_weights' is not a mapping of names")
    if not isinstance(d.get("license"), (str, type(None))):
        raise bad("field 'license' is not a string")
    if not isinstance(d.get("training"), (dict, type(None))):
        raise bad("field 'training' is not an object")
    oids = [d["config"], *d["files"].values()]
    if d.get("parent") is not None:
        oids.append(d["parent"])
    if not all(isinstance(o, str) and is_oid(o) for o in oids):
        raise bad("an object id is malformed")


def _known(d: dict[str, Any], cls: type, table: str) -> dict[str, Any]:
    """The manifest's fields that `cls` has, but its tensor table (built by the caller)."""
    return {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != table}
