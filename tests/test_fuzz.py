"""The parsers that read untrusted bytes, fuzzed with hypothesis: every input either parses
or raises mstore's own error, never anything else."""

import json
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mstore.errors import InvalidSafetensors, ObjectCorrupt, RegistryCorrupt
from mstore.manifest import Manifest
from mstore.registry import parse_registry
from mstore.safetensors_io import DTYPE_SIZES, parse_header

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
