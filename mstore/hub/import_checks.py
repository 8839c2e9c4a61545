"""What import checks of a source folder before it writes a single object.

Every shard's safetensors header (parsed and validated by `safetensors_io`), no tensor
in two shards, then the adapter's own checks: config.json against the tensor names and
shapes (`Adapter.check_tensors`) and the tokenizer files (`Adapter.check_tokenizer`).
Only headers and small files are read; no torch, no transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..adapters.base import TOKENIZER_FILES, adapter_class
from ..errors import BadSource, MStoreError
from ..store.safetensors_io import Header, read_header_from_file

if TYPE_CHECKING:
    from .importer import SourcePlan

MAX_SIDE_FILE = 256 * 1024 * 1024  # a tokenizer file bigger than this is not one


def check_source(plan: "SourcePlan", folder: Path,
                 on_refusal: Callable[[], None] | None = None,
                 headers: dict[str, Header] | None = None) -> None:
    """Refuse the source before any object is written; `on_refusal` runs first (import
    removes a download: a retry would be refused the same way, nothing to resume).
    `headers`: the shards' headers when they are known already (a download in flight)."""
    try:
        _check(plan, folder, headers)
    except MStoreError:
        if on_refusal is not None:
            on_refusal()
        raise


def source_tensors(plan: "SourcePlan", folder: Path, headers: dict[str, Header] | None = None
                   ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of every tensor of the source, from the shards' headers
    (`headers`, else read from the shards in `folder`)."""
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for shard in plan.weight_files:
        header = (headers[shard] if headers is not None
                  else read_header_from_file(folder / shard, where=shard))
        for name, info in header.tensors.items():
            if name in tensors:
                raise BadSource(f"tensor {name!r} appears in two shards")
            tensors[name] = (info.dtype, info.shape)
    return tensors


def _check(plan: "SourcePlan", folder: Path, headers: dict[str, Header] | None) -> None:
    tensors = source_tensors(plan, folder, headers)
    adapter = adapter_class(plan.architecture)
    adapter.check_tensors(plan.config, tensors, plan.model_id)
    files = {}
    for name in plan.other_files:
        if name in TOKENIZER_FILES:
            path = folder / name
            if path.stat().st_size > MAX_SIDE_FILE:
                raise BadSource(f"{name} is larger than {MAX_SIDE_FILE >> 20} MiB")
            files[name] = path.read_bytes()
    adapter.check_tokenizer(plan.config, files, tensors, plan.model_id)
