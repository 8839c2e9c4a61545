"""The parsers that read untrusted bytes, fuzzed with hypothesis: every input either parses
or raises mstore's own error, never anything else."""

import json
import math
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mstore.errors import InvalidSafetensors, ObjectCorrupt, RegistryCorrupt
from mstore.store.manifest import Manifest
from mstore.store.registry import parse_registry
from mstore.store.safetensors_io import DTYPE_SIZES, parse_header

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=20,
)
tensor_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(sorted(DTYPE_SIZES) + ["X", ""]),
    "shape": st.lists(st.integers(-2, 6), max_size=3),
    "data_offsets": st.lists(st.integers(-5, 80), min_size=0, max_size=3),
})


@FUZZ
@given(st.binary(max_size=200))
def test_safetensors_reader_on_random_bytes(data):
    try:
        parse_header(data, len(data), "fuzz")
    except InvalidSafetensors:
        pass


@FUZZ
@given(st.dictionaries(st.text(max_size=8), tensor_entries | json_values, max_size=4),
       st.integers(0, 64))
def test_safetensors_reader_on_plausible_headers(header, data_len):
    body = json.dumps(header).encode()
    blob = struct.pack("<Q", len(body)) + body + b"\0" * data_len
    try:
        parsed = parse_header(blob, len(blob), "fuzz")
    except InvalidSafetensors:
        return
    for t in parsed.tensors.values():  # whatever parses is consistent with the file
        assert parsed.data_start <= t.start <= t.end <= len(blob)
        assert t.nbytes == t.numel * DTYPE_SIZES[t.dtype]
    covered = sum(t.nbytes for t in parsed.tensors.values())  # and tiles the data exactly
    assert covered == len(blob) - parsed.data_start


# A well-formed layout: tensors laid out back to back in some order, keys in another.
layouts = st.lists(
    st.tuples(st.sampled_from(sorted(DTYPE_SIZES)), st.lists(st.integers(0, 3), max_size=3)),
    min_size=1, max_size=5,
).flatmap(lambda ts: st.tuples(st.just(ts), st.permutations(range(len(ts))),
                               st.permutations(range(len(ts)))))


def _layout_header(tensors, data_order) -> tuple[dict, int]:
    header, pos = {}, 0
    for i in data_order:
        dtype, shape = tensors[i]
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, pos


def _blob(header: dict, key_order, data_len: int, body: str | None = None) -> bytes:
    if body is None:
        body = json.dumps({f"t{i}": header[f"t{i}"] for i in key_order})
    raw = body.encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_len


@FUZZ
@given(layouts)
def test_safetensors_reader_accepts_every_well_formed_layout(layout):
    tensors, data_order, key_order = layout
    header, data_len = _layout_header(tensors, data_order)
    blob = _blob(header, key_order, data_len)
    parsed = parse_header(blob, len(blob), "fuzz")
    assert {n: (t.dtype, list(t.shape)) for n, t in parsed.tensors.items()} == \
        {n: (e["dtype"], e["shape"]) for n, e in header.items()}


@FUZZ
@given(layouts, st.sampled_from(["gap", "overlap", "trailing", "duplicate", "short"]),
       st.integers(1, 8), st.data())
def test_safetensors_reader_refuses_every_broken_layout(layout, defect, k, data):
    """One defect of the kind the safetensors spec forbids, anywhere: always refused."""
    tensors, data_order, key_order = layout
    header, data_len = _layout_header(tensors, data_order)
    names = [f"t{i}" for i in data_order]
    body = None
    if defect == "gap":  # every tensor from the j-th on moves k bytes up
        j = data.draw(st.integers(0, len(names) - 1))
        for n in names[j:]:
            header[n]["data_offsets"] = [o + k for o in header[n]["data_offsets"]]
        data_len += k
    elif defect == "overlap":  # a tensor with bytes starts k bytes before the previous one ends
        sized = [n for n in names[1:] if header[n]["data_offsets"][0] >= k
                 and header[n]["data_offsets"][1] > header[n]["data_offsets"][0]]
        if not sized:
            return
        n = data.draw(st.sampled_from(sized))
        header[n]["data_offsets"] = [o - k for o in header[n]["data_offsets"]]
    elif defect == "trailing":
        data_len += k
    elif defect == "short":
        if data_len == 0:
            return
        data_len -= min(k, data_len)
    else:  # the same key twice (json.loads alone would silently keep the last)
        n = data.draw(st.sampled_from(names))
        body = json.dumps({f"t{i}": header[f"t{i}"] for i in key_order})
        body = body[:-1] + f", {json.dumps(n)}: {json.dumps(header[n])}}}"
    blob = _blob(header, key_order, data_len, body)
    try:
        parse_header(blob, len(blob), "fuzz")
    except InvalidSafetensors as e:
        assert "\n" not in str(e)
        return
    raise AssertionError(f"{defect} accepted: {blob[:200]!r}")


@FUZZ
@given(json_values)
def test_manifest_parser(doc):
    try:
        Manifest.from_bytes(json.dumps(doc).encode(), "f" * 64)
    except ObjectCorrupt:
        pass


@FUZZ
@given(st.fixed_dictionaries({"format": st.just(1), "architecture": json_values,
                              "model_id": json_values, "source": json_values,
                              "config": json_values, "files": json_values,
                              "tensors": json_values | st.dictionaries(
                                  st.text(max_size=5), tensor_entries, max_size=2),
                              "created_at": json_values, "message": json_values}))
def test_manifest_parser_on_plausible_manifests(doc):
    try:
        Manifest.from_bytes(json.dumps(doc).encode(), "f" * 64)
    except ObjectCorrupt:
        pass


@FUZZ
@given(json_values | st.fixed_dictionaries({"version": st.just(1), "models": json_values}))
def test_registry_parser(doc):
    try:
        parse_registry(json.dumps(doc).encode(), "registry.json")
    except RegistryCorrupt:
        pass


@FUZZ
@given(st.binary(max_size=100))
def test_registry_parser_on_bytes(data):
    try:
        parse_registry(data, "registry.json")
    except RegistryCorrupt:
        pass
