"""Issue 11, items 6-8: import checks config.json against the tensors, the tokenizer files,
and every safetensors header, and refuses the first defect in one line with the store
byte-identical; loading applies the same tensor check to manifests written without it."""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import pytest

from mstore.adapters.custom import CustomTransformerAdapter
from mstore.errors import BadTokenizer, ConfigMismatch, InvalidSafetensors
from mstore.store.safetensors_io import DTYPE_SIZES, parse_header, read_header_from_file
from tests.conftest import snapshot


# -- helpers ----------------------------------------------------------------------------
def read_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    header = read_header_from_file(path)
    data = path.read_bytes()
    return {n: (t.dtype, list(t.shape), data[t.start:t.end]) for n, t in header.tensors.items()}


def write_tensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header, blobs, pos = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"".join(blobs))


def copy_model(src: Path, dst: Path, config=None, tensors=None, files=None) -> Path:
    """A copy of a tiny model folder with config.json updated by `config` (None values
    delete keys), its tensors passed through `tensors(dict) -> dict`, files replaced."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in config.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors:
        (shard,) = dst.glob("*.safetensors")
        write_tensors(shard, tensors(read_tensors(shard)))
    for name, data in (files or {}).items():
        (dst / name).write_bytes(data)
    return dst


def refused(cli, store_path, folder: Path, *needles: str) -> str:
    """Import of `folder` fails with one `error:` line holding every needle; store unchanged."""
    before = snapshot(store_path)
    result = cli("import", str(folder), "--accept-license", ok=False)
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    # import first prints what it found (size, memory, license), then the one error line
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    assert "unexpected" not in errors[0], errors[0]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert snapshot(store_path) == before
    return errors[0]


@pytest.fixture
def initialised(cli, store_path):
    cli("init")
    return store_path


def zeros(dtype: str, shape: list[int]) -> tuple[str, list[int], bytes]:
    return dtype, shape, b"\0" * (math.prod(shape) * DTYPE_SIZES[dtype])


# -- item 6: config.json against the tensors --------------------------------------------
CONFIG_CASES = {
    "intermediate_size": ({"intermediate_size": 96}, "model.layers.0.mlp.gate_proj.weight",
                          "[128, 64]", "[96, 64]", "intermediate_size=96"),
    "heads": ({"num_attention_heads": 8}, "model.layers.0.self_attn.k_proj.weight",
              "[32, 64]", "[16, 64]"),
    "kv_heads": ({"num_key_value_heads": 1}, "k_proj.weight", "[32, 64]", "[16, 64]"),
    "vocab": ({"vocab_size": 1024}, "model.embed_tokens.weight", "[1000, 64]"),
    "untied": ({"tie_word_embeddings": False}, "lm_head.weight is missing"),
    "layers": ({"num_hidden_layers": 3}, "model.layers.2.input_layernorm.weight is missing",
               "num_hidden_layers=3"),
    "head_dim": ({"head_dim": 8}, "q_proj.weight", "[64, 64]", "[32, 64]"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_that_does_not_match_the_tensors_is_refused(cli, initialised, model_dirs,
                                                           tmp_path, case):
    change, *needles = CONFIG_CASES[case]
    folder = copy_model(model_dirs["qwen2"], tmp_path / "m", config=change)
    refused(cli, initialised, folder, *needles)


def test_absurd_layer_count_is_refused_at_once(cli, initialised, model_dirs, tmp_path):
    folder = copy_model(model_dirs["qwen3"], tmp_path / "m",
                        config={"num_hidden_layers": 100000})
    t0 = time.monotonic()
    refused(cli, initialised, folder, "model.layers.2.input_layernorm.weight is missing",
            "num_hidden_layers=100000")
    assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_size", -1, "hidden_size must be a positive integer, got -1"),
    ("vocab_size", 0, "vocab_size must be a positive integer, got 0"),
    ("num_hidden_layers", "abc", "num_hidden_layers must be a positive integer, got 'abc'"),
    ("intermediate_size", 127.5, "intermediate_size must be a positive integer, got 127.5"),
    ("num_attention_heads", True, "num_attention_heads must be a positive integer, got True"),
    ("hidden_size", 2**40, "at most"),
    ("num_attention_heads", 3, "hidden_size (64) is not a multiple of num_attention_heads (3)"),
    ("num_key_value_heads", 3, "num_attention_heads (4) is not a multiple of num_key_value_heads"),
    ("layer_types", ["full_attention"], "layer_types must be a list of 2 strings"),
    ("rms_norm_eps", "tiny", "rms_norm_eps must be a positive number"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
])
def test_unusable_sizes_are_refused_in_one_line(cli, initialised, model_dirs, tmp_path, key,
                                                value, needle):
    folder = copy_model(model_dirs["qwen2"], tmp_path / "m", config={key: value})
    refused(cli, initialised, folder, "config.json", needle)


def test_extra_missing_and_wrongly_typed_tensors_are_refused(cli, initialised, model_dirs,
                                                             tmp_path):
    src = model_dirs["qwen2"]
    extra = copy_model(src, tmp_path / "extra",
                       tensors=lambda t: {**t, "model.layers.0.mlp.extra.weight": zeros("BF16", [4])})
    refused(cli, initialised, extra, "model.layers.0.mlp.extra.weight", "is not part of a qwen2")
    gone = copy_model(src, tmp_path / "gone", tensors=lambda t: {
        k: v for k, v in t.items() if not k.startswith("model.layers.1.")})
    refused(cli, initialised, gone, "model.layers.1.input_layernorm.weight is missing")
    no_bias = copy_model(src, tmp_path / "nobias", tensors=lambda t: {
        k: v for k, v in t.items() if k != "model.layers.0.self_attn.v_proj.bias"})
    refused(cli, initialised, no_bias, "model.layers.0.self_attn.v_proj.bias is missing")
    ints = copy_model(src, tmp_path / "ints", tensors=lambda t: {
        **t, "model.norm.weight": zeros("I16", [64])})
    refused(cli, initialised, ints, "model.norm.weight has dtype I16")


def test_qwen3_without_q_norm_is_refused(cli, initialised, model_dirs, tmp_path):
    folder = copy_model(model_dirs["qwen3"], tmp_path / "m", tensors=lambda t: {
        k: v for k, v in t.items() if not k.endswith("layers.1.self_attn.q_norm.weight")})
    refused(cli, initialised, folder, "model.layers.1.self_attn.q_norm.weight is missing",
            "head_dim=16")
    with_bias = copy_model(model_dirs["qwen3"], tmp_path / "bias", config={"attention_bias": True})
    refused(cli, initialised, with_bias, "model.layers.0.self_attn.q_proj.bias is missing")


def test_moe_experts_and_router_are_checked(cli, initialised, model_dirs, tmp_path):
    more = copy_model(model_dirs["qwen2-moe"], tmp_path / "more", config={"num_experts": 6})
    refused(cli, initialised, more, "model.layers.0.mlp.gate.weight has shape [4, 64]",
            "[6, 64]")
    shared = copy_model(model_dirs["qwen2-moe"], tmp_path / "shared",
                        config={"shared_expert_intermediate_size": 48})
    refused(cli, initialised, shared, "shared_expert.gate_proj.weight", "[48, 64]")
    no_bias = copy_model(model_dirs["qwen2-moe"], tmp_path / "nobias", config={"qkv_bias": False})
    refused(cli, initialised, no_bias, "self_attn.k_proj.bias", "is not part of a qwen2_moe")
    expert = copy_model(model_dirs["qwen3-moe"], tmp_path / "expert", tensors=lambda t: {
        k: v for k, v in t.items() if ".mlp.experts.3.up_proj" not in k or ".layers.1." not in k})
    refused(cli, initialised, expert, "model.layers.1.mlp.experts.3.up_proj.weight is missing")
    inter = copy_model(model_dirs["qwen3-moe"], tmp_path / "inter",
                       config={"moe_intermediate_size": 16})
    refused(cli, initialised, inter, "experts.0.gate_proj.weight has shape [32, 64]", "[16, 64]")
    dense = copy_model(model_dirs["qwen3-moe"], tmp_path / "dense", config={"mlp_only_layers": [1]})
    refused(cli, initialised, dense, "model.layers.1.mlp.gate_proj.weight is missing")
    topk = copy_model(model_dirs["qwen3-moe"], tmp_path / "topk", config={"num_experts_per_tok": 9})
    refused(cli, initialised, topk, "num_experts_per_tok (9) is more than")


def test_every_tiny_model_passes_its_own_check(model_dirs):
    from mstore.adapters.qwen import QwenAdapter

    for key in ("qwen2", "qwen2-sharded", "qwen3", "qwen2-moe", "qwen3-moe"):
        folder = model_dirs[key]
        tensors = {}
        for shard in folder.glob("*.safetensors"):
            tensors.update({n: (t.dtype, t.shape)
                            for n, t in read_header_from_file(shard).tensors.items()})
        QwenAdapter.check_tensors(json.loads((folder / "config.json").read_text()), tensors, key)


def _custom_manifest_config(cfg) -> dict:
    return {"model_type": "custom-transformer", **cfg.to_dict()}


def test_custom_transformer_check_matches_its_module_and_refuses_mismatches():
    from mstore.nn.transformer import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=13, n_layers=2, d_model=16, n_heads=4, block_size=32)
    model = Transformer(cfg)
    tied = model.tied_weights()
    tensors = {k: ("F32", list(v.shape)) for k, v in model.state_dict().items() if k not in tied}
    config = _custom_manifest_config(cfg)
    CustomTransformerAdapter.check_tensors(config, tensors, "commit x")  # exactly the module
    with pytest.raises(ConfigMismatch, match=r"tok_emb\.weight has shape \[13, 16\], "
                       r"config\.json \(vocab_size=13, d_model=8\) implies \[13, 8\]"):
        CustomTransformerAdapter.check_tensors({**config, "d_model": 8, "n_heads": 2}, tensors,
                                               "c")
    with pytest.raises(ConfigMismatch, match=r"blocks\.1\.mlp\.fc\.weight has shape \[8, 16\]"):
        CustomTransformerAdapter.check_tensors(
            config, {**tensors, "blocks.1.mlp.fc.weight": ("F32", [8, 16])}, "c")
    with pytest.raises(ConfigMismatch, match=r"blocks\.2\.ln1\.weight is missing"):
        CustomTransformerAdapter.check_tensors({**config, "n_layers": 3}, tensors, "c")
    with pytest.raises(ConfigMismatch, match="n_heads"):
        CustomTransformerAdapter.check_tensors({**config, "n_heads": 5}, tensors, "c")
    with pytest.raises(ConfigMismatch, match="is not part of a custom-transformer"):
        CustomTransformerAdapter.check_tensors(config, {**tensors, "x.weight": ("F32", [1])}, "c")


def _rewrite_config(store, name: str, change: dict) -> str:
    """A manifest like `name`'s with config.json changed: what a store written before the
    import check (or by hand) can hold. Returns the new ref."""
    from dataclasses import replace

    commit = store.refs()[name].commit
    manifest = store.read_manifest(commit)
    config = json.loads(store.objects.read_bytes(manifest.config))
    config.update(change)
    oid = store.objects.put_bytes(json.dumps(config).encode()).oid
    new = replace(manifest, config=oid, message="config edited")
    new_commit = store.put_manifest(new)
    store.add_ref(new_commit, new, "edited", lambda: "edited")
    return new_commit


@pytest.mark.slow
def test_loading_a_manifest_whose_config_does_not_match_fails_in_one_line(cli, store,
                                                                          model_dirs):
    cli("import", str(model_dirs["qwen2"]), "--name", "base", "--accept-license")
    commit = _rewrite_config(store, "base", {"num_hidden_layers": 100000})
    t0 = time.monotonic()
    result = cli("generate", "edited", "--prompt", "The", "--max-new-tokens", "2", ok=False)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0] == (f"error: commit {commit[:12]}: tensor model.layers.2.input_layernorm."
                        "weight is missing: config.json (layer 2 of num_hidden_layers=100000, "
                        "hidden_size=64) implies it, with shape [64]")
    assert time.monotonic() - t0 < 30
    cli("rm", "edited")
    _rewrite_config(store, "base", {"hidden_act": 5})
    result = cli("generate", "edited", "--prompt", "The", "--max-new-tokens", "2", ok=False)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "transformers refuses config.json" in lines[0], result.stderr
    assert "unexpected" not in lines[0]


# -- item 7: tokenizer files ------------------------------------------------------------
def _tokenizer_json(model_dirs, mutate) -> bytes:
    doc = json.loads((model_dirs["qwen2"] / "tokenizer.json").read_text())
    mutate(doc)
    return json.dumps(doc).encode()


def _add_token(doc, token_id):
    doc["added_tokens"].append({"id": token_id, "content": "<|extra|>", "single_word": False,
                                "lstrip": False, "rstrip": False, "normalized": False,
                                "special": True})


TOKENIZER_CASES = {
    "garbage": (lambda d: b"\x89PNG\r\n\x1a\n\xff\xfe garbage", "tokenizer.json is not valid UTF-8"),
    "not-json": (lambda d: b"{\"version\": \"1.0\", ", "tokenizer.json is not JSON"),
    "a-list": (lambda d: b"[1, 2, 3]", "tokenizer.json is not a JSON object"),
    "no-added-tokens": (lambda d: _tokenizer_json(d, lambda j: j.pop("added_tokens")),
                        'tokenizer.json has no "added_tokens" list'),
    "no-model": (lambda d: _tokenizer_json(d, lambda j: j.pop("model")),
                 'tokenizer.json has no "model" object'),
    "bad-model": (lambda d: _tokenizer_json(d, lambda j: j["model"].update(type="Nope")),
                  "tokenizer.json does not load"),
    "bad-merges": (lambda d: _tokenizer_json(d, lambda j: j["model"].update(merges=[7])),
                   "tokenizer.json does not load"),
    "too-big": (lambda d: _tokenizer_json(d, lambda j: _add_token(j, 1000)),
                "token id 1000 ('<|extra|>') but the embedding has 1000 rows"),
    "far-too-big": (lambda d: _tokenizer_json(d, lambda j: _add_token(j, 151643)),
                    "tokenizer.json has token id 151643"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_bad_tokenizer_json_is_refused(cli, initialised, model_dirs, tmp_path, case):
    make, needle = TOKENIZER_CASES[case]
    folder = copy_model(model_dirs["qwen2"], tmp_path / "m",
                        files={"tokenizer.json": make(model_dirs)})
    refused(cli, initialised, folder, needle)


@pytest.mark.parametrize("name,data,needle", [
    ("tokenizer_config.json", b"[\"a list\"]", "tokenizer_config.json is not a JSON object"),
    ("tokenizer_config.json", b"{\"model_max_length\": ", "tokenizer_config.json is not JSON"),
    ("special_tokens_map.json", b"\xff", "special_tokens_map.json is not valid UTF-8"),
])
def test_bad_tokenizer_side_files_are_refused(cli, initialised, model_dirs, tmp_path, name,
                                             data, needle):
    folder = copy_model(model_dirs["qwen3"], tmp_path / "m", files={name: data})
    refused(cli, initialised, folder, needle)


def test_added_tokens_decoder_beyond_the_embedding_is_refused(cli, initialised, model_dirs,
                                                              tmp_path):
    cfg = json.loads((model_dirs["qwen2"] / "tokenizer_config.json").read_text())
    cfg.setdefault("added_tokens_decoder", {})["4096"] = {"content": "<|pad9|>", "special": True}
    folder = copy_model(model_dirs["qwen2"], tmp_path / "m",
                        files={"tokenizer_config.json": json.dumps(cfg).encode()})
    refused(cli, initialised, folder, "tokenizer_config.json has token id 4096 ('<|pad9|>')",
            "embedding has 1000 rows")


def test_custom_char_tokenizer_is_checked():
    from mstore.nn.char_tokenizer import CharTokenizer

    ok = CharTokenizer.from_text("hello world").to_json()
    tensors = {"tok_emb.weight": ("F32", [8, 16])}
    CustomTransformerAdapter.check_tokenizer({}, {"tokenizer.json": ok}, tensors, "c")
    with pytest.raises(BadTokenizer, match="has 8 characters but the embedding has 7 rows"):
        CustomTransformerAdapter.check_tokenizer(
            {}, {"tokenizer.json": ok}, {"tok_emb.weight": ("F32", [7, 16])}, "c")
    for bad in (b"\xff\xfe", b"{}", b"[]", b'{"type": "char", "version": 1, "chars": ["ab"]}'):
        with pytest.raises(BadTokenizer, match="tokenizer.json is not a character vocabulary"):
            CustomTransformerAdapter.check_tokenizer({}, {"tokenizer.json": bad}, tensors, "c")
    with pytest.raises(BadTokenizer, match="no tokenizer.json"):
        CustomTransformerAdapter.check_tokenizer({}, {}, tensors, "c")


# -- item 8: safetensors headers --------------------------------------------------------
def _raw(body: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(body)) + body + data


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


HEADER_CASES = {
    "duplicate key": (_raw(b'{"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, '
                           b'"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}',
                           b"\0" * 4), "the key 'a' twice"),
    "duplicate field": (_raw(b'{"a": {"dtype": "U8", "dtype": "I8", "shape": [2], '
                             b'"data_offsets": [0, 2]}}', b"\0" * 2), "the key 'dtype' twice"),
    "gap": (_raw(json.dumps({"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 3, 5)})
                 .encode(), b"\0" * 5), "data bytes 2..3 after 'a' belong to no tensor"),
    "leading gap": (_raw(json.dumps({"a": _entry("F32", [1], 4, 8)}).encode(), b"\0" * 8),
                    "data bytes 0..4 belong to no tensor"),
    "overlap": (_raw(json.dumps({"a": _entry("U8", [4], 0, 4), "b": _entry("U8", [4], 2, 6)})
                     .encode(), b"\0" * 6), "tensors 'a' and 'b' overlap"),
    "begin after end": (_raw(json.dumps({"a": _entry("U8", [0], 4, 0)}).encode(), b"\0" * 4),
                        "out of order"),
    "past the end": (_raw(json.dumps({"a": _entry("U8", [8], 0, 8)}).encode(), b"\0" * 4),
                     "past the end of the data (4 bytes)"),
    "trailing bytes": (_raw(json.dumps({"a": _entry("U8", [4], 0, 4)}).encode(), b"\0" * 9),
                       "tensors end at data byte 4 but the file holds 9 data bytes"),
    "bytes for nothing": (_raw(b"{}", b"\0" * 3), "tensors end at data byte 0"),
    "wrong length": (_raw(json.dumps({"a": _entry("BF16", [3], 0, 4)}).encode(), b"\0" * 4),
                     "BF16[3] needs 6 bytes, header gives 4"),
    "unknown dtype": (_raw(json.dumps({"a": _entry("F12", [1], 0, 2)}).encode(), b"\0" * 2),
                      "unknown dtype 'F12'"),
    "negative dim": (_raw(json.dumps({"a": _entry("U8", [-1, 2], 0, 0)}).encode()),
                     "bad shape [-1, 2]"),
    "float dim": (_raw(json.dumps({"a": _entry("U8", [2.0], 0, 2)}).encode(), b"\0" * 2),
                  "bad shape [2.0]"),
    "negative offset": (_raw(json.dumps({"a": _entry("U8", [0], -1, -1)}).encode()),
                        "bad data_offsets [-1, -1]"),
    "huge header": (struct.pack("<Q", 2**62) + b"{}", "over the 104857600 byte limit"),
    "header past file": (struct.pack("<Q", 64) + b"{}", "exceeds the file"),
    "not an object": (_raw(b"[1, 2]"), "does not start with '{'"),
    "leading space": (_raw(b' {"a": 1}'), "does not start with '{'"),
    "empty header": (_raw(b""), "does not start with '{'"),
    "bad utf-8": (_raw(b'{"\xff": 1}'), "not valid UTF-8"),
    "not json": (_raw(b'{"a": '), "not JSON"),
    "metadata not strings": (_raw(b'{"__metadata__": {"format": 1}}'),
                             "__metadata__ is not a map of strings to strings"),
    "metadata a list": (_raw(b'{"__metadata__": ["pt"]}'), "__metadata__ is not a map"),
    "entry not object": (_raw(b'{"a": 3}'), "entry 'a' is not an object"),
    "short file": (b"\x01\x00", "shorter than 8 bytes"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_headers_are_refused(case):
    raw, needle = HEADER_CASES[case]
    with pytest.raises(InvalidSafetensors) as err:
        parse_header(raw, len(raw), "w.safetensors")
    msg = str(err.value)
    assert msg.startswith("invalid safetensors file w.safetensors: ") and needle in msg, msg
    assert "\n" not in msg


def test_well_formed_headers_still_parse():
    body = json.dumps({"__metadata__": {"format": "pt"}, "z": _entry("U8", [0], 0, 0),
                       "b": _entry("F32", [2], 4, 12), "a": _entry("U8", [4], 0, 4)}).encode()
    body += b" " * 5  # space padding after the JSON, as writers align the data
    raw = _raw(body, b"\0" * 12)
    header = parse_header(raw, len(raw), "ok")
    assert sorted(header.tensors) == ["a", "b", "z"] and header.metadata == {"format": "pt"}
    raw = _raw(b'{"__metadata__": null}')
    assert parse_header(raw, len(raw), "ok").tensors == {}


@pytest.mark.parametrize("defect", ["duplicate", "gap", "overlap", "trailing"])
def test_import_refuses_a_malformed_shard(cli, initialised, model_dirs, tmp_path, defect):
    folder = tmp_path / "m"
    shutil.copytree(model_dirs["qwen2"], folder)
    path = folder / "model.safetensors"
    header = read_header_from_file(path)
    data = path.read_bytes()
    entries = {n: {"dtype": t.dtype, "shape": list(t.shape),
                   "data_offsets": [t.start - header.data_start, t.end - header.data_start]}
               for n, t in header.tensors.items()}
    body_tail = data[header.data_start:]
    text = json.dumps(entries)
    if defect == "duplicate":  # a second entry for the norm: json.loads would keep only it
        norm = json.dumps(entries["model.norm.weight"])
        text = text[:-1] + f', "model.norm.weight": {norm}}}'
    elif defect == "gap":
        body_tail = b"\0" * 8 + body_tail
        for e in entries.values():
            e["data_offsets"] = [o + 8 for o in e["data_offsets"]]
        text = json.dumps(entries)
    elif defect == "overlap":
        e = entries["model.norm.weight"]
        e["data_offsets"] = [e["data_offsets"][0] - 2, e["data_offsets"][1] - 2]
        text = json.dumps(entries)
    else:
        body_tail += b"\0" * 16
    path.write_bytes(_raw(text.encode(), body_tail))
    refused(cli, initialised, folder, "invalid safetensors file model.safetensors")


def test_hub_import_of_a_mismatched_model_leaves_no_download_behind(cli, initialised,
                                                                     model_dirs, hub_server,
                                                                     tmp_path):
    folder = copy_model(model_dirs["qwen3"], tmp_path / "m", config={"intermediate_size": 64})
    hub_server.add_repo("tiny/Mismatched", folder)
    before = snapshot(initialised)
    result = cli("import", "tiny/Mismatched", "--accept-license", ok=False)
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tiny/Mismatched: tensor model.layers.0.mlp.gate_proj.weight "
                           "has shape [128, 64]"), result.stderr
    after = snapshot(initialised)
    after.pop(".lock", None)  # the writer lock's (empty) file: a download needs the lock
    assert after == before
