"""How a quantized child stores its linear weights as plain tensor objects (torch-free).

A quantized weight `X.weight` of full shape [out, in] becomes two or three ordinary tensor
objects, so each stays an mmappable single-tensor safetensors file that dedups like any other
(docs/quantization.md is the reference):

- int8 (symmetric, one scale per output channel):
  `X.weight` I8 [out, in], `X.weight_scale` [out] (the parent weight's dtype);
  weight = data * scale[:, None].
- int4 (affine, groups of `group_size` inputs):
  `X.weight` U8 [out / 2, in], row i holding row i in its low nibble and row i + out/2 in
  its high nibble (optimum-quanto's packing), `X.weight_scale` and `X.weight_shift`
  [out, in / group_size] (the parent weight's dtype);
  weight[i, j] = q[i, j] * scale[i, j // g] - shift[i, j // g], q in 0..15.

Every other tensor (embeddings, norms, biases, the output head) is the parent's object.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from .safetensors_io import DTYPE_SIZES

SCHEMES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128
SCALE_SUFFIX = "_scale"
SHIFT_SUFFIX = "_shift"
DATA_DTYPES = {"int8": "I8", "int4": "U8"}


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def shift_name(weight: str) -> str:
    return weight + SHIFT_SUFFIX


def companions(weight: str, scheme: str) -> list[str]:
    """The tensors besides `weight` itself that hold its quantization parameters."""
    return [scale_name(weight)] + ([shift_name(weight)] if scheme == "int4" else [])


def quantized_weights(tensors: Mapping, scheme: str) -> list[str]:
    """The names in a quantized manifest's tensor table that are quantized weights (those
    with a scale beside them)."""
    return sorted(n for n in tensors if scale_name(n) in tensors
                  and tensors[n].dtype == DATA_DTYPES[scheme])


def logical_tensors(tensors: Mapping, quantization: dict | None
                    ) -> dict[str, tuple[str, Sequence[int]]]:
    """{name: (dtype, shape)} as the full-precision model has them: a quantized weight
    takes its scale's dtype and its full shape, its scale and shift are left out. For a
    manifest that is not quantized, its own table."""
    table = {n: (e.dtype, e.shape) for n, e in tensors.items()}
    if not quantization:
        return table
    scheme = quantization["scheme"]
    for w in quantized_weights(tensors, scheme):
        rows, cols = tensors[w].shape
        full = [rows, cols] if scheme == "int8" else [2 * rows, cols]
        table[w] = (tensors[scale_name(w)].dtype, full)
        for c in companions(w, scheme):
            table.pop(c, None)
    return table


def data_bytes(tensors: Mapping) -> int:
    """Bytes of tensor data a manifest's table holds (tied weights are stored once): what
    its weights take in memory when run, quantized or not."""
    return sum(math.prod(e.shape) * DTYPE_SIZES.get(e.dtype, 0) for e in tensors.values())


def quantized_bytes(shape: Sequence[int], dtype: str, scheme: str,
                    group_size: int | None) -> int:
    """Bytes a weight of full `shape` and `dtype` takes once quantized (data + parameters):
    what the pre-import check counts for `import --quantize`."""
    rows, cols = shape
    item = DTYPE_SIZES.get(dtype, 2)
    if scheme == "int8":
        return rows * cols + rows * item
    return rows * cols // 2 + 2 * rows * (cols // (group_size or DEFAULT_GROUP_SIZE)) * item


def check_shape(name: str, shape: Sequence[int], scheme: str, group_size: int | None) -> str | None:
    """Why a weight of `shape` cannot take `scheme` (None: it can)."""
    if len(shape) != 2:
        return f"{name} has shape {list(shape)}, not a matrix"
    if scheme == "int4":
        rows, cols = shape
        if cols % group_size:
            return (f"group size {group_size} does not divide the width of {name} "
                    f"({cols}); pick a divisor of {cols}")
        if rows % 2:
            return f"{name} has an odd number of rows ({rows}); int4 packs rows in pairs"
    return None


def describe(quantization: dict | None) -> str:
    """`int8`, `int4 g128`: the scheme in a few characters."""
    if not quantization:
        return ""
    g = quantization.get("group_size")
    return quantization["scheme"] + (f" g{g}" if g else "")
