"""Weight-only quantization of linear layers through optimum-quanto, kept as plain tensors.

optimum-quanto does the arithmetic and the kernels: int8 per output channel (symmetric
absmax, `torch._weight_int8pack_mm` on CPU) and int4 in groups (affine, the tinygemm
`_weight_int4pack_mm_for_cpu` kernel when the model is bf16 and groups are 128). Why quanto
and not torchao: on this CPU torchao 0.18 has no int4 weight-only layout at all (its int4
needs mslk or CUDA; `IntxWeightOnlyConfig` keeps one byte per 4-bit value) and its int8
matmul was slower than bf16, while quanto's int4 ran ~2.5x faster than bf16
(benchmarks/README.md "Quantized children").

Quanto's tensors are not what the store keeps: each is taken apart into plain tensors
(`mstore.store.quant_layout`), so the objects stay mmappable single-tensor safetensors files,
and put together again (`assemble`) when a quantized child is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from . import torch_io
from ..adapters.quantizable import check_request, plan_weights
from ..errors import NameTaken, QuantizeError
from ..reporting import SILENT, Reporter
from ..store import failpoints
from ..store import quant_layout as layout
from ..store.manifest import Manifest, TensorEntry
from ..store.registry import validate_name
from ..store.repo import Store

LIBRARY = "optimum-quanto"


def library_version() -> str:
    from importlib.metadata import version

    return version(LIBRARY)


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int | None
                    ) -> dict[str, torch.Tensor]:
    """A full-precision weight [out, in] -> {"": data, "_scale": ..., "_shift": ...} (the
    suffixes of its tensor names, see quant_layout), each contiguous, on the CPU."""
    from optimum.quanto import MaxOptimizer, absmax_scale, qint4, qint8
    from optimum.quanto import quantize_weight as quanto_quantize

    w = w.detach().to("cpu")
    tiny = torch.finfo(w.dtype).tiny
    if scheme == "int8":
        scale = absmax_scale(w, qint8, axis=0).clamp_min(tiny)  # an all-zero row stays zero
        q = quanto_quantize(w, qint8, axis=0, scale=scale, optimized=False)
        return {"": q._data.contiguous(), layout.SCALE_SUFFIX: q._scale.reshape(-1).contiguous()}
    rows, cols = w.shape
    scale, shift = MaxOptimizer()(w, qint4, axis=0, group_size=group_size)
    scale = scale.clamp_min(tiny)
    q = quanto_quantize(w, qint4, axis=0, scale=scale, shift=shift, group_size=group_size,
                        optimized=False)
    # quanto packs the grouped [rows*cols/g, g] data in two row halves; seen as [rows/2, cols]
    # that is row i (low nibble) with row i + rows/2 (high nibble)
    packed = q._data._data.reshape(rows // 2, cols)
    return {"": packed.contiguous(),
            layout.SCALE_SUFFIX: q._scale.reshape(rows, cols // group_size).contiguous(),
            layout.SHIFT_SUFFIX: q._shift.reshape(rows, cols // group_size).contiguous()}


def assemble(state: dict[str, torch.Tensor], tensors: Mapping[str, "TensorEntry"],
             quantization: dict) -> dict[str, torch.Tensor]:
    """A quantized child's loaded tensors -> the state dict the model takes: each quantized
    weight becomes one quanto tensor of its full shape (which `F.linear` runs through
    quanto's kernels), its scale and shift are consumed."""
    from optimum.quanto import WeightQBitsTensor, WeightQBytesTensor, qint4, qint8
    from optimum.quanto.tensor.packed import PackedTensor

    scheme, g = quantization["scheme"], quantization.get("group_size")
    out = dict(state)
    for w in layout.quantized_weights(tensors, scheme):
        data, scale = out.pop(w), out.pop(layout.scale_name(w))
        if scheme == "int8":
            rows, cols = data.shape
            out[w] = WeightQBytesTensor.create(qint8, 0, torch.Size((rows, cols)), (cols, 1),
                                               data, scale.reshape(rows, 1), None)
            continue
        shift = out.pop(layout.shift_name(w))
        half, cols = data.shape
        rows, groups = 2 * half, 2 * half * cols // g
        packed = PackedTensor(data.reshape(groups // 2, g), 4, torch.Size((groups, g)), (g, 1))
        out[w] = WeightQBitsTensor.create(qint4, 0, g, torch.Size((rows, cols)), (cols, 1),
                                          packed, scale.reshape(groups, 1),
                                          shift.reshape(groups, 1))
        _release_freed_memory()
    return out


def _release_freed_memory() -> None:
    """Hand the heap's freed pages back to the kernel (glibc's `malloc_trim`). quanto's
    conversion of an int4 weight to the tinygemm layout goes through temporaries a few
    times the weight's size; once glibc has raised its mmap threshold they are freed into
    the heap, which keeps them resident, and a model's worth of them made the peak RSS of
    an int4 load larger than the bf16 model's. Elsewhere than glibc: nothing to do."""
    import ctypes
    import ctypes.util

    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def save_dequantized(store: Store, manifest: Manifest, path) -> None:
    """A quantized child's weights, every quantized one dequantized to its scales' dtype,
    as one safetensors file under the full-precision names (`export --dequantize`). The
    dequantized model is in memory once while it is written."""
    from optimum.quanto import QTensor
    from safetensors.torch import save_file

    state = assemble(torch_io.load_state_dict(store.objects, manifest.tensors, verify=False),
                     manifest.tensors, manifest.quantization)
    plain = {n: t.dequantize().contiguous() if isinstance(t, QTensor) else t.contiguous()
             for n, t in state.items()}
    save_file(plain, str(path), metadata={"format": "pt"})


def check_run_dtype(manifest, dtype: "torch.dtype | None") -> None:
    """A quantized child runs in the dtype its scales have (its activations' dtype)."""
    from .torch_io import TORCH_DTYPES

    if dtype is None:
        return
    stored = {TORCH_DTYPES.get(e.dtype) for n, e in manifest.tensors.items()
              if n.endswith(layout.SCALE_SUFFIX)}
    if stored and dtype not in stored:
        have = ", ".join(sorted(str(d).removeprefix("torch.") for d in stored if d))
        raise QuantizeError(f"a quantized model runs in the dtype it was quantized in ({have}), "
                            f"not {str(dtype).removeprefix('torch.')}")


def quantization_record(scheme: str, group_size: int | None) -> dict:
    """The manifest's `quantization` field (docs/format.md)."""
    return {"scheme": scheme, "group_size": group_size, "library": LIBRARY,
            "library_version": library_version()}


def put_quantized(batch, name: str, weight: torch.Tensor, scheme: str,
                  group_size: int | None) -> dict[str, TensorEntry]:
    """Quantize one weight and stage its tensors in `batch`: {stored name: entry}."""
    parts = quantize_weight(weight, scheme, group_size)
    entries = torch_io.put_tensors(batch, ((name + suffix, t) for suffix, t in parts.items()))
    failpoints.hit("quantize.tensor")
    return entries


@dataclass
class QuantizeResult:
    name: str
    commit: str
    parent: str
    scheme: str
    group_size: int | None
    quantized: int  # tensors quantized
    shared: int  # tensors kept as the parent's objects
    bytes_written: int
    bytes_shared: int
    run_bytes: int  # weights in memory to run the child
    parent_run_bytes: int

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def quantize_model(store: Store, ref: str, scheme: str, group_size: int | None = None,
                   name: str | None = None, reporter: Reporter = SILENT) -> QuantizeResult:
    """Commit a child of `ref` whose linear weights are quantized with `scheme` (int8 per
    output channel; int4 in groups of `group_size`, default 128); every other tensor is the
    parent's object. Objects, then the manifest, then the ref `name` (default
    `{stem}-{scheme}`, the parent's name without a trailing `-base`)."""
    g = check_request(scheme, group_size)
    if name is not None:
        validate_name(name)
    with store.writer_lock("quantize", create=False):
        r = store.resolve(ref)
        m = store.read_manifest(r.commit)
        if m.kind != "full":
            what = f"quantized ({m.describe()})" if m.kind == "quantized" else m.kind
            raise QuantizeError(f"{ref} is already a {what} child of {(m.parent or '?')[:12]}; "
                                "quantize a full-precision model (its parent) instead")
        if name is not None and not store.name_is_free(name):
            raise NameTaken(name, store.next_free_name(name))
        config = json.loads(store.objects.read_bytes(m.config, verify=True))
        targets = plan_weights(m.architecture, config,
                               {n: (e.dtype, e.shape) for n, e in m.tensors.items()},
                               scheme, g, f"commit {r.commit[:12]}")
        parent_name = r.name or next(iter(sorted(store.names_by_commit().get(r.commit, []))),
                                     None)
        stem = re.sub(r"-base$", "", parent_name or m.model_id.split("/")[-1].lower())
        default = validate_name(f"{stem[:120]}-{scheme}")
        tensors: dict[str, TensorEntry] = {}
        shared = 0
        with store.objects.batch() as batch, \
                reporter.progress(len(targets), "quantizing", unit="tensor") as bar:
            for n, e in sorted(m.tensors.items()):
                if n not in targets:
                    size = store.objects.size(e.object)
                    batch.reuse(e.object, size)
                    shared += size
                    tensors[n] = e
                    continue
                weight = torch_io.load_tensor(store.objects, e, name=n)
                tensors.update(put_quantized(batch, n, weight, scheme, g))
                del weight
                bar.update(1)
        manifest = Manifest(
            architecture=m.architecture, model_id=m.model_id,
            source={"type": "quantize", "parent": r.commit, "parent_name": parent_name},
            license=m.license, config=m.config, files=dict(m.files), tensors=tensors,
            parent=r.commit, tied_weights=dict(m.tied_weights), kind="quantized",
            quantization=quantization_record(scheme, g),
            message=f"quantize {parent_name or r.commit[:12]} to "
                    f"{layout.describe(quantization_record(scheme, g))}")
        commit = store.put_manifest(manifest)
        target = store.add_ref(commit, manifest, name,
                               lambda: default if store.name_is_free(default)
                               else store.next_free_name(default), parent_name)
    return QuantizeResult(target, commit, r.commit, scheme, g, len(targets),
                          len(m.tensors) - len(targets), batch.written, shared,
                          layout.data_bytes(tensors), layout.data_bytes(m.tensors))
