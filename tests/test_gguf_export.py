"""`mstore export --format gguf`: the file read back with gguf.GGUFReader holds what
llama.cpp's loader asks for, with the source's values and tokenizer."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

import gguf
from mstore.hub.export import export_model
from mstore.hub.importer import import_model
from mstore.store.repo import Store
from tests import tiny_models
from tests.conftest import snapshot

# What llama.cpp's loader (llama-model.cpp, LLM_ARCH_QWEN2 / QWEN3) creates per block; the
# output matrix is optional there and absent when the embeddings are tied.
BLOCK = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
         "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
         "ffn_down.weight"]
EXTRA = {"qwen2": ["attn_q.bias", "attn_k.bias", "attn_v.bias"],
         "qwen3": ["attn_q_norm.weight", "attn_k_norm.weight"]}
HF_NAME = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
           "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    _, bid, rest = gguf_name.split(".", 2)
    stem, suffix = rest.rsplit(".", 1)
    return f"model.layers.{bid}.{HF_NAME[stem]}.{suffix}"


@pytest.fixture(scope="module")
def exported(model_dirs, tmp_path_factory):
    """qwen2 (tied), qwen2 untied, qwen3 and qwen3-moe, each exported as f16 and q8_0
    (qwen2 also as bf16): {(key, type): folder}."""
    root = tmp_path_factory.mktemp("gguf")
    untied = tiny_models.build_qwen2(root / "qwen2-untied", tie=False)
    store = Store(root / "store")
    sources = {"qwen2": model_dirs["qwen2"], "qwen2-untied": untied,
               "qwen3": model_dirs["qwen3"], "qwen3-moe": model_dirs["qwen3-moe"]}
    out = {}
    for key, folder in sources.items():
        import_model(store, str(folder), name=key, accept_license=True)
        types = ["f16", "q8_0"] + (["bf16"] if key == "qwen2" else [])
        for t in types if key != "qwen3-moe" else ["f16"]:
            dest = root / f"{key}-{t}"
            export_model(store, key, dest, fmt="gguf", gguf_type=t)
            out[(key, t)] = dest
    return {"dirs": out, "sources": sources}


def reader(folder) -> gguf.GGUFReader:
    return gguf.GGUFReader(folder / "model.gguf")


def field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


@pytest.mark.parametrize("key", ["qwen2", "qwen2-untied", "qwen3"])
@pytest.mark.parametrize("gtype", ["f16", "q8_0"])
def test_every_tensor_llama_cpp_expects_is_there_with_its_shape(exported, key, gtype):
    r = reader(exported["dirs"][(key, gtype)])
    arch = key.split("-")[0]
    config = json.loads((exported["sources"][key] / "config.json").read_text())
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{b}.{n}" for b in range(config["num_hidden_layers"])
                 for n in BLOCK + EXTRA[arch]}
    if not config["tie_word_embeddings"]:
        expected.add("output.weight")
    got = {t.name: t for t in r.tensors}
    assert set(got) == expected
    source = load_file(exported["sources"][key] / "model.safetensors")
    for name, t in got.items():
        # GGUF lists dimensions innermost first (ggml's ne): the reverse of torch's shape
        assert tuple(int(d) for d in t.shape) == tuple(reversed(source[hf_name(name)].shape))
        is_float_only = name.endswith(("_norm.weight", ".bias"))
        want = "F32" if is_float_only else gtype.upper()
        assert t.tensor_type.name == want, name


@pytest.mark.parametrize("key", ["qwen2", "qwen3"])
def test_metadata_and_tokenizer_are_the_sources(exported, key):
    r = reader(exported["dirs"][(key, "q8_0")])
    src = exported["sources"][key]
    config = json.loads((src / "config.json").read_text())
    arch = field(r, "general.architecture")
    assert arch == key
    assert field(r, f"{arch}.block_count") == config["num_hidden_layers"]
    assert field(r, f"{arch}.context_length") == config["max_position_embeddings"]
    assert field(r, f"{arch}.embedding_length") == config["hidden_size"]
    assert field(r, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert field(r, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert field(r, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    assert field(r, f"{arch}.rope.freq_base") == pytest.approx(rope_theta)
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == \
        pytest.approx(config["rms_norm_eps"], rel=1e-6)
    if key == "qwen3":
        assert field(r, f"{arch}.attention.key_length") == config["head_dim"]
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    tok = json.loads((src / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in tok["added_tokens"]})
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "qwen2"
    assert field(r, "tokenizer.ggml.tokens") == [by_id[i] for i in range(config["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert field(r, "tokenizer.ggml.merges") == merges
    specials = {a["id"] for a in tok["added_tokens"] if a["special"]}
    assert specials == {by_id_inv for by_id_inv, t in by_id.items()
                        if t in tiny_models.SPECIAL_TOKENS}
    types = field(r, "tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(specials)
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in specials)
    assert field(r, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert field(r, "tokenizer.chat_template") == (src / "chat_template.jinja").read_text()


@pytest.mark.parametrize("key", ["qwen2", "qwen3"])
def test_f16_tensors_are_the_source_converted_bit_for_bit(exported, key):
    r = reader(exported["dirs"][(key, "f16")])
    source = load_file(exported["sources"][key] / "model.safetensors")
    for t in r.tensors:
        want = source[hf_name(t.name)].float().numpy()
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            got = np.asarray(t.data, dtype=np.float32)
            assert got.reshape(want.shape).view(np.uint32).tolist() == \
                want.view(np.uint32).tolist(), t.name
        else:
            got = np.asarray(t.data).view(np.float16).reshape(want.shape)
            assert np.array_equal(got.view(np.uint16), want.astype(np.float16).view(np.uint16))


def test_bf16_tensors_are_the_source_bits(exported):
    r = reader(exported["dirs"][("qwen2", "bf16")])
    source = load_file(exported["sources"]["qwen2"] / "model.safetensors")
    bf16 = [t for t in r.tensors if t.tensor_type == gguf.GGMLQuantizationType.BF16]
    assert len(bf16) > 10
    for t in bf16:
        want = source[hf_name(t.name)].view(__import__("torch").int16).numpy()
        assert np.array_equal(np.asarray(t.data).view(np.int16).reshape(want.shape), want)


@pytest.mark.parametrize("key", ["qwen2", "qwen3"])
def test_q8_0_dequantizes_within_its_error(exported, key):
    r = reader(exported["dirs"][(key, "q8_0")])
    source = load_file(exported["sources"][key] / "model.safetensors")
    quantized = [t for t in r.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q8_0]
    assert len(quantized) > 10
    for t in quantized:
        want = source[hf_name(t.name)].float().numpy()
        got = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0)
        got = got.reshape(want.shape)
        d = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
        d16 = d.astype(np.float16).astype(np.float32)
        # Q8_0: 32 values share one scale d = amax / 127, stored as f16; each value rounds
        # to within d / 2 of q * d, and |q| <= 127 multiplies the scale's own rounding
        bound = d / 2 + 127 * np.abs(d16 - d) + 1e-7
        err = np.abs(got.reshape(-1, 32) - want.reshape(-1, 32))
        assert (err <= bound).all(), (t.name, float(err.max()))
        assert not np.array_equal(got, want)  # it was quantized, not copied


def test_moe_experts_stack_into_one_tensor_per_projection(exported):
    r = reader(exported["dirs"][("qwen3-moe", "f16")])
    source = load_file(exported["sources"]["qwen3-moe"] / "model.safetensors")
    config = json.loads((exported["sources"]["qwen3-moe"] / "config.json").read_text())
    got = {t.name: t for t in r.tensors}
    assert field(r, "general.architecture") == "qwen3moe"
    assert field(r, "qwen3moe.expert_count") == config["num_local_experts"]
    assert field(r, "qwen3moe.expert_used_count") == config["num_experts_per_tok"]
    assert field(r, "qwen3moe.expert_feed_forward_length") == config["moe_intermediate_size"]
    for proj, short in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        t = got[f"blk.1.ffn_{short}_exps.weight"]
        want = np.stack([source[f"model.layers.1.mlp.experts.{x}.{proj}.weight"].float().numpy()
                         for x in range(config["num_local_experts"])]).astype(np.float16)
        assert tuple(int(d) for d in t.shape) == tuple(reversed(want.shape))
        assert np.array_equal(np.asarray(t.data).view(np.float16).reshape(want.shape), want)
    assert got["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert not any("experts" in n for n in got)


def test_cli_export_gguf_writes_file_modelfile_and_card(cli, model_dirs, tmp_path):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q")
    dest = tmp_path / "out"
    doc = json.loads(cli("export", "q", dest, "--format", "gguf", "--type", "q8_0",
                         "--json").stdout)
    assert doc["format"] == "gguf" and doc["type"] == "q8_0"
    assert set(doc["files"]) == {"model.gguf", "Modelfile", "README.md", "metadata.json"}
    assert (dest / "Modelfile").read_text() == "FROM ./model.gguf\n"
    assert "gguf" in (dest / "README.md").read_text()
    assert field(reader(dest), "general.name") == "q"


@pytest.mark.parametrize("args, words", [
    (["--format", "gguf", "--type", "q4_k"], "GGUF tensor type 'q4_k': choose one of f16, bf16, q8_0"),
    (["--format", "onnx"], "export format 'onnx': choose one of safetensors, gguf"),
    (["--type", "q8_0"], "--type applies to --format gguf"),
])
def test_bad_format_or_type_is_one_line_and_writes_nothing(cli, model_dirs, tmp_path,
                                                           store_path, args, words):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q")
    before = snapshot(store_path)
    res = cli("export", "q", tmp_path / "out", *args, ok=False)
    assert res.exit_code != 0 and words in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists() and snapshot(store_path) == before


def test_architectures_llama_cpp_cannot_take_are_refused(cli, tmp_path, store):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abcdefgh " * 200)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"model_name: null\ndataset: {corpus}\nmax_steps: 1\nbatch_size: 2\n"
                   "seq_len: 8\nn_layers: 1\nd_model: 16\nn_heads: 2\ndevice: cpu\n")
    cli("train", "--config", cfg, "--name", "scratch")
    res = cli("export", "scratch", tmp_path / "out", "--format", "gguf", ok=False)
    assert res.exit_code == 1 and "GGUF export supports qwen2, qwen2_moe, qwen3, qwen3_moe" \
        in res.stderr and "export it as safetensors" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_quantized_child_is_refused_by_name(store, model_dirs):
    import dataclasses

    from mstore.errors import ExportError
    from mstore.hub.export_tensors import commit_tensors

    import_model(store, str(model_dirs["qwen2"]), name="q", accept_license=True)
    m = store.read_manifest(store.resolve("q").commit)
    with pytest.raises(ExportError, match="q is a quantized model: a GGUF of it"):
        next(commit_tensors(store, dataclasses.replace(m, kind="quantized",
                                                       quantization={"scheme": "int8"}), "q"))


def test_a_lora_child_exports_its_merged_weights(store, model_dirs, tmp_path):
    """W + (alpha / r) * B @ A for each adapted weight, the base's tensors elsewhere; the
    base's tokenizer and config (the adapter holds only its own tensors)."""
    from mstore.store.manifest import Manifest, TensorEntry

    import_model(store, str(model_dirs["qwen2"]), name="q", accept_license=True)
    base_commit = store.resolve("q").commit
    base = store.read_manifest(base_commit)
    w = base.tensors["model.layers.0.self_attn.q_proj.weight"]
    out_f, in_f, r = w.shape[0], w.shape[1], 4
    rng = np.random.default_rng(3)
    a = rng.standard_normal((r, in_f)).astype(np.float32)
    b = rng.standard_normal((out_f, r)).astype(np.float32)
    stem = "base_model.model.model.layers.0.self_attn.q_proj"
    with store.objects.batch() as batch:
        ea = batch.put_tensor_bytes("F32", [r, in_f], a.tobytes())
        eb = batch.put_tensor_bytes("F32", [out_f, r], b.tobytes())
        cfg = batch.put_bytes(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8,
                                          "target_modules": ["q_proj"]}).encode())
    child = Manifest(architecture=base.architecture, model_id=base.model_id,
                     source={"type": "finetune"}, license=base.license, config=base.config,
                     files={"adapter_config.json": cfg.oid},
                     tensors={f"{stem}.lora_A.weight": TensorEntry(ea.oid, "F32", [r, in_f]),
                              f"{stem}.lora_B.weight": TensorEntry(eb.oid, "F32", [out_f, r])},
                     parent=base_commit, message="lora", kind="adapter",
                     adapter={"method": "lora", "r": r, "alpha": 8, "dropout": 0.0,
                              "target_modules": ["q_proj"]})
    commit = store.put_manifest(child)
    store.registry.set_ref(store.registry_entry("kid", commit, child, "q"), expected=None)
    export_model(store, "kid", tmp_path / "kid", fmt="gguf", gguf_type="f16")
    export_model(store, "q", tmp_path / "q", fmt="gguf", gguf_type="f16")
    got = {t.name: np.asarray(t.data).copy() for t in reader(tmp_path / "kid").tensors}
    plain = {t.name: np.asarray(t.data).copy() for t in reader(tmp_path / "q").tensors}
    source = load_file(model_dirs["qwen2"] / "model.safetensors")
    want = source["model.layers.0.self_attn.q_proj.weight"].float().numpy() + 2.0 * (b @ a)
    assert np.array_equal(got["blk.0.attn_q.weight"].view(np.float16).reshape(want.shape)
                          .view(np.uint16), want.astype(np.float16).view(np.uint16))
    changed = {n for n in got if not np.array_equal(got[n], plain[n])}
    assert changed == {"blk.0.attn_q.weight"}
    assert field(reader(tmp_path / "kid"), "tokenizer.ggml.tokens") == \
        field(reader(tmp_path / "q"), "tokenizer.ggml.tokens")
