"""`import --quantize`: each linear weight quantized as it is read from its shard, so the
full-precision model is never in memory and its linear weights are never written to the
store. One weight at a time is viewed straight from the mmapped shard (no copy), quantized
through `mstore.runtime.quantize`, and its pages dropped from the process; every other
tensor takes the plain import's kernel copy.
"""

from __future__ import annotations

import math
import mmap
import warnings
from dataclasses import dataclass

from ..adapters.quantizable import check_request, plan_weights
from ..store.manifest import TensorEntry
from ..store.objects import ObjectBatch
from ..store.safetensors_io import DTYPE_SIZES


@dataclass
class ImportQuantizer:
    scheme: str
    group_size: int | None
    targets: set[str]

    @classmethod
    def plan(cls, architecture: str, config: dict, tensors: dict, scheme: str,
             group_size: int | None, where: str) -> "ImportQuantizer":
        """Refuses (QuantizeError) before anything is written: an unknown scheme, a group
        size that does not divide a width, an architecture with nothing to quantize."""
        g = check_request(scheme, group_size)
        return cls(scheme, g, plan_weights(architecture, config, tensors, scheme, g, where))

    def record(self) -> dict:
        from ..runtime.quantize import quantization_record

        return quantization_record(self.scheme, self.group_size)

    def put(self, batch: ObjectBatch, name: str, dtype: str, shape, mm: mmap.mmap,
            start: int, end: int) -> dict[str, TensorEntry]:
        """Quantize bytes [start, end) of the mapped shard (tensor `name`) into `batch`."""
        import torch

        from ..runtime.quantize import put_quantized
        from ..runtime.torch_io import TORCH_DTYPES

        count = math.prod(shape)
        assert count * DTYPE_SIZES[dtype] == end - start
        with warnings.catch_warnings():  # a read-only map: the view is only ever read
            warnings.simplefilter("ignore", UserWarning)
            weight = torch.frombuffer(mm, dtype=TORCH_DTYPES[dtype], count=count,
                                      offset=start).reshape(shape)
        entries = put_quantized(batch, name, weight, self.scheme, self.group_size)
        del weight
        lo = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        return entries
