"""The tensors of a commit as an export sees them: one function, `commit_tensors`, that
every export format reads from.

Each tensor comes as a `LazyTensor`: its name, shape and source dtype up front (a GGUF
header lists every tensor before the first byte of data), its values only when `load()`
is called, one tensor at a time, so an export's memory stays at the size of the largest
tensor. Full models read their tensor objects (bf16 widened to float32 exactly);
adapter children (merged into their base) and quantized children (dequantized) plug in
here, and until they do they are refused in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import ExportError
from ..store.manifest import Manifest
from ..store.repo import Store

if TYPE_CHECKING:
    import numpy as np

# numpy is imported where tensors are converted: a plain safetensors export (which copies
# objects and converts nothing) would otherwise pay ~60-170 ms of start-up for it
_FLOATS = ("F64", "F32", "F16")


@dataclass(frozen=True)
class LazyTensor:
    """One tensor of an export: shape and dtype now, values (float32 numpy, or the source's
    own float16/float64) when `load()` is called."""

    shape: tuple[int, ...]
    dtype: str  # the stored dtype (safetensors spelling: "BF16", "F32", ...)
    load: Callable[[], np.ndarray]


def kind_of(m: Manifest) -> str:
    """The manifest's kind (format-1 manifests read as "full")."""
    return m.kind


def check_exportable(m: Manifest, what: str) -> None:
    """Refuse kinds whose weights `commit_tensors` does not materialise (a LoRA child's are
    its base's with the adapter merged in)."""
    kind = kind_of(m)
    if kind == "quantized":
        raise ExportError(f"{what} is a quantized model: a GGUF of it would quantize twice; "
                          "export the model it was quantized from, or export it dequantized "
                          "as safetensors")
    if kind not in ("full", "adapter"):
        raise ExportError(f"{what} has kind {kind!r}, which this mstore cannot export; "
                          "upgrade mstore")


def commit_tensors(store: Store, m: Manifest, what: str = "the model"
                   ) -> Iterator[tuple[str, LazyTensor]]:
    """(name, LazyTensor) for every stored tensor of `m`, in name order (tied names are not
    repeated: the manifest's `tied_weights` says which names share)."""
    check_exportable(m, what)
    if m.kind == "adapter":  # the base's weights, each adapted one as W + scaling * B @ A
        from ..store.report import effective_tensors

        eff = effective_tensors(store, m)
        for name, t in sorted(eff.tensors.items()):
            lazy = _object_tensor(store, t.object, t.dtype, tuple(t.shape), name)
            delta = eff.lora.get(name)
            yield name, lazy if delta is None else _merged(store, lazy, delta, name)
        return
    for name, t in sorted(m.tensors.items()):
        yield name, _object_tensor(store, t.object, t.dtype, tuple(t.shape), name)


def weights_manifest(store: Store, m: Manifest) -> Manifest:
    """The manifest whose config, files and tied weights the exported model has: a LoRA
    child's base's (the adapter holds only its own tensors and adapter_config.json)."""
    return store.read_manifest(m.parent) if m.kind == "adapter" else m


def _merged(store: Store, base: LazyTensor, delta, name: str) -> LazyTensor:
    a = _object_tensor(store, delta.a.object, delta.a.dtype, tuple(delta.a.shape), name)
    b = _object_tensor(store, delta.b.object, delta.b.dtype, tuple(delta.b.shape), name)

    def load() -> np.ndarray:
        import numpy as np

        w = base.load().astype(np.float32)
        return w + np.float32(delta.scaling) * (b.load().astype(np.float32)
                                                @ a.load().astype(np.float32))

    return LazyTensor(base.shape, base.dtype, load)


def _object_tensor(store: Store, oid: str, dtype: str, shape: tuple[int, ...],
                   name: str) -> LazyTensor:
    if dtype != "BF16" and dtype not in _FLOATS:
        raise ExportError(f"tensor {name} is {dtype}, which export cannot convert; "
                          "only float tensors (BF16, F16, F32, F64) export")

    def load() -> np.ndarray:
        from ..store.tensor_numpy import load_native  # numpy: only when converting

        values = load_native(store, oid)
        if values is None or values.size != math.prod(shape):
            raise ExportError(f"object {oid} ({name}) is truncated; nothing exported")
        return values.reshape(shape)

    return LazyTensor(shape, dtype, load)
