"""Manifests: the commits of mstore. Canonical JSON, so the same content has one id.

A manifest names every object a model needs (config, files, one object per tensor), where
the model came from (`source`, or `parent` for a fine-tune) and how it was made
(`training`). Tied parameters are recorded by name instead of stored twice.

Its `kind` says how to read the tensors: `full` (a whole model), `adapter` (only a LoRA
adapter's tensors; the weights are the `parent`'s, which it therefore keeps alive) or
`quantized` (weight-only quantized layout, described by `quantization`). Format-1 manifests
have no `kind` and read as `full`.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Callable, NamedTuple

from ..errors import ObjectCorrupt
from .objects import is_oid
from .quant_layout import data_bytes, logical_tensors

FORMAT = 2  # what this mstore writes
READABLE_FORMATS = (1, 2)
KINDS = ("full", "adapter", "quantized")
_HEX = re.compile(r"[0-9a-f]*")


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: byte-identical for equal content."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TensorEntry(NamedTuple):
    """One tensor of a manifest: the object holding it, its dtype and shape."""

    object: str
    dtype: str
    shape: list[int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        """What `asdict` gives, without its recursive deep copy (a manifest holds hundreds
        of these: asdict was most of a re-import's CPU time)."""
        return {"object": self.object, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Manifest:
    """A commit: the model's tensors, files, config and lineage (docs/format.md)."""

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
    kind: str = "full"
    adapter: dict[str, Any] | None = None  # kind "adapter": method, r, alpha, targets...
    quantization: dict[str, Any] | None = None  # kind "quantized": scheme, group size...
    format: int = FORMAT

    # -- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields its format has: a format-1 manifest read back gives its own bytes (and id)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
             if f.name != "tensors"}
        d["tensors"] = {k: v.to_dict() for k, v in self.tensors.items()}
        if self.format == 1:
            for key in ("kind", "adapter", "quantization"):
                del d[key]
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
        return cls(**_known(d, cls.__dataclass_fields__, "tensors"), tensors=tensors)

    # -- what it references -------------------------------------------------------------
    def object_ids(self) -> set[str]:
        """Tensor and file objects this manifest needs (not its parent)."""
        return {self.config, *self.files.values(), *(t.object for t in self.tensors.values())}

    @property
    def parameters(self) -> int:
        """Parameters of the model it stands for (a quantized child: its full-precision
        shapes, not its packed data and scales)."""
        if self.kind != "quantized":
            return sum(t.numel for t in self.tensors.values())
        return sum(math.prod(shape) for _dtype, shape
                   in logical_tensors(self.tensors, self.quantization).values())

    @property
    def run_bytes(self) -> int:
        """Bytes its weights take in memory when run (quantized data as stored)."""
        return data_bytes(self.tensors)

    def describe(self) -> str:
        return describe(self)

    @property
    def needs_parent_objects(self) -> bool:
        """An adapter is read on top of its parent's weights: it keeps them alive."""
        return self.kind == "adapter"

    def content_key(self) -> bytes:
        """What makes two imports 'the same content': weights, config, files, and how the
        tensors are to be read; not the date (nor the format: a format-1 import of the same
        files is the same content)."""
        key = {
            "architecture": self.architecture, "config": self.config, "files": self.files,
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
            "tied_weights": self.tied_weights,
        }
        if self.kind != "full":
            key.update(kind=self.kind, adapter=self.adapter, quantization=self.quantization)
        return canonical_json(key)


class LightManifest(NamedTuple):
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
    tied_weights: dict[str, str] = {}  # never shared: from_bytes passes its own
    training: dict[str, Any] | None = None
    kind: str = "full"
    adapter: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
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
        return cls(**{"tied_weights": {}, **_known(d, cls._fields, "tensor_objects")},
                   tensor_objects=objects)

    def object_ids(self) -> set[str]:
        """Tensor and file objects this manifest needs (not its parent)."""
        return {self.config, *self.files.values(), *self.tensor_objects}

    def describe(self) -> str:
        return describe(self)

    @property
    def needs_parent_objects(self) -> bool:
        """An adapter is read on top of its parent's weights: it keeps them alive."""
        return self.kind == "adapter"


def describe(m: "Manifest | LightManifest") -> str:
    """What kind of model this is, in a few words: '' for a full model, 'lora r=16' for an
    adapter, 'int8' / 'int4 g128' for a quantized one. Views add 'on/of <parent>'."""
    if m.kind == "adapter" and m.adapter:
        method = str(m.adapter.get("method", "adapter"))
        r = m.adapter.get("r")
        return f"{method} r={r}" if isinstance(r, int) else method
    if m.kind == "quantized" and m.quantization:
        scheme = str(m.quantization.get("scheme", "quantized"))
        group = m.quantization.get("group_size")
        return f"{scheme} g{group}" if isinstance(group, int) and scheme != "int8" else scheme
    return "" if m.kind == "full" else m.kind


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
    if type(d.get("format")) is not int or d["format"] not in READABLE_FORMATS:
        raise bad(f"format {d.get('format')!r} is not one this mstore reads "
                  f"({', '.join(map(str, READABLE_FORMATS))}); a newer mstore wrote it")
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
    _check_kind(d, bad)
    oids = [d["config"], *d["files"].values()]
    if d.get("parent") is not None:
        oids.append(d["parent"])
    if not all(isinstance(o, str) and is_oid(o) for o in oids):
        raise bad("an object id is malformed")


def _check_kind(d: dict[str, Any], bad: Callable[[str], ObjectCorrupt]) -> None:
    """Format 2: `kind` is one of KINDS, with its description (`adapter`, `quantization`)
    present exactly when it is that kind; an adapter names the parent it is read on."""
    if d["format"] == 1:
        if any(k in d for k in ("kind", "adapter", "quantization")):
            raise bad("format 1 has no 'kind', 'adapter' or 'quantization'")
        return
    kind = d.get("kind")
    if kind not in KINDS:
        raise bad(f"field 'kind' is {kind!r}, not one of {', '.join(KINDS)}")
    for key, owner in (("adapter", "adapter"), ("quantization", "quantized")):
        value = d.get(key)
        if kind == owner and not isinstance(value, dict):
            raise bad(f"a {kind} manifest needs an object in {key!r}")
        if kind != owner and value is not None:
            raise bad(f"field {key!r} is set on a {kind} manifest")
    if kind == "adapter" and d.get("parent") is None:
        raise bad("an adapter manifest has no parent to be read on")


def _known(d: dict[str, Any], names, table: str) -> dict[str, Any]:
    """The manifest's fields among `names` (the class's), but its tensor table (built by
    the caller)."""
    return {k: v for k, v in d.items() if k in names and k != table}
