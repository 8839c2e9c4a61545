"""Which tensors of a model a quantization scheme takes, and what the result weighs
(torch-free: `import --quantize` plans with it before it reads a weight)."""

from __future__ import annotations

from typing import Mapping, Sequence

from ..errors import MStoreError, QuantizeError
from ..store import quant_layout as layout
from ..store.safetensors_io import DTYPE_SIZES
from .base import adapter_class

FLOAT_DTYPES = ("F32", "F16", "BF16")


def check_request(scheme: str, group_size: int | None) -> int | None:
    """The group size the scheme uses (None for int8), or QuantizeError."""
    if scheme not in layout.SCHEMES:
        raise QuantizeError(f"unknown quantization scheme {scheme!r} (int8 or int4)")
    if scheme == "int8":
        if group_size is not None:
            raise QuantizeError("int8 is quantized per output channel: a group size is for "
                                "int4 only")
        return None
    g = layout.DEFAULT_GROUP_SIZE if group_size is None else group_size
    if g < 2 or g % 2:
        raise QuantizeError(f"group size must be an even number >= 2, not {g}")
    return g


def plan_weights(architecture: str, config: dict,
                 tensors: Mapping[str, tuple[str, Sequence[int]]], scheme: str,
                 group_size: int | None, where: str) -> set[str]:
    """The checkpoint names to quantize: the adapter's linear weights that `tensors`
    ({name: (dtype, shape)}) holds as floating-point matrices. QuantizeError when there are
    none, or one cannot take the scheme (a group size that does not divide its width)."""
    linear = adapter_class(architecture).linear_weights(config)
    targets = {n for n in linear if n in tensors and tensors[n][0] in FLOAT_DTYPES}
    if not targets:
        raise QuantizeError(f"{where}: no linear layer to quantize (architecture "
                            f"{architecture!r})")
    for n in sorted(targets):
        problem = layout.check_shape(n, tensors[n][1], scheme, group_size)
        if problem:
            raise QuantizeError(f"{where}: {problem}")
    return targets


def run_bytes(architecture: str, config: dict, weight_bytes: int, dtype: str,
              scheme: str, group_size: int | None) -> int | None:
    """Memory the weights take to run once quantized with `scheme`, estimated from the
    config alone (no header read): `weight_bytes` less the linear weights' full bytes plus
    their quantized bytes. None if the architecture has no linear layer to quantize."""
    try:
        linear = adapter_class(architecture).linear_weights(config)
    except (MStoreError, ValueError, TypeError, KeyError):  # a config no model is built from
        return None
    if not linear:
        return None
    item = DTYPE_SIZES.get(dtype, 2)
    full = sum(r * c * item for r, c in linear.values())
    quant = sum(layout.quantized_bytes((r, c), dtype, scheme, group_size)
                for r, c in linear.values())
    return max(0, weight_bytes - full) + quant
