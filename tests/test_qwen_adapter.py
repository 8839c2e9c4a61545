"""The Qwen adapter: parity with transformers' from_pretrained / generate, zero-copy loading,
checkpoint round trips (per-expert layout for MoE), sampling, tokenizer, damaged objects."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from mstore.runtime import torch_io
from mstore.adapters.base import adapter_for
from mstore.adapters.qwen import QwenAdapter
from mstore.errors import ObjectCorrupt, ObjectMissing
from mstore.hub.importer import import_model
from mstore.store.objects import hash_file
from mstore.store.repo import Store
from tests import tiny_models

BUILDERS = {
    "qwen2": tiny_models.build_qwen2,
    "qwen2-untied": functools.partial(tiny_models.build_qwen2, tie=False),
    "qwen3": tiny_models.build_qwen3,
    "qwen2-moe": tiny_models.build_qwen2_moe,
    "qwen3-moe": tiny_models.build_qwen3_moe,
}
DENSE = ["qwen2", "qwen2-untied", "qwen3"]
MOE = ["qwen2-moe", "qwen3-moe"]
ALL = DENSE + MOE
PROMPT = "Why do leaves fall in autumn?"


def _liven(folder: Path, seed: int, std: float = 0.3) -> None:
    """Re-randomise the matrices with a larger spread.

    At the builders' 0.02 init, greedy decoding repeats one token, which would let a broken
    KV cache (or a wrong expert order) pass; with std 0.3 every step picks a different token.
    Works on the checkpoint file itself, so the Hub layout (per-expert keys) is kept.
    """
    path = folder / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(tensors):
        t = tensors[name]
        if t.dim() >= 2:
            tensors[name] = (torch.randn(t.shape, generator=gen) * std).to(t.dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})


class Env:
    def __init__(self, root: Path):
        self.root = root
        self.store = Store(root / "store")
        self.sources: dict[str, Path] = {}
        self.commits: dict[str, str] = {}
        self._models: dict[str, torch.nn.Module] = {}
        self._refs: dict[str, torch.nn.Module] = {}

    def adapter(self, kind: str) -> QwenAdapter:
        return adapter_for(self.store, self.commits[kind])

    def model(self, kind: str) -> torch.nn.Module:
        """The adapter-loaded model (shared by tests that do not modify it)."""
        if kind not in self._models:
            self._models[kind] = self.adapter(kind).load_checkpoint()
        return self._models[kind]

    def reference(self, kind: str) -> torch.nn.Module:
        if kind not in self._refs:
            from transformers import AutoModelForCausalLM

            self._refs[kind] = AutoModelForCausalLM.from_pretrained(self.sources[kind]).eval()
        return self._refs[kind]

    def reference_tokenizer(self, kind: str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.sources[kind])

    def prompt_ids(self, kind: str) -> torch.Tensor:
        tok = self.adapter(kind).tokenizer()
        return torch.tensor([tok.encode(tok.apply_chat_template(PROMPT))])


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    # One intra-op thread: these models are tiny, and on a busy 2-core machine two torch
    # threads spin against each other (measured: the file took 50 s instead of 10 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    e = Env(tmp_path_factory.mktemp("qwen-adapter"))
    try:
        for seed, (kind, build) in enumerate(BUILDERS.items()):
            src = build(e.root / "src" / kind)
            _liven(src, seed)
            e.sources[kind] = src
            e.commits[kind] = import_model(e.store, str(src), name=kind,
                                           accept_license=True).commit
        yield e
    finally:
        torch.set_num_threads(threads)


def _mapping_of(ptr: int) -> str | None:
    """The file (or [heap], ...) that the address belongs to, from /proc/self/maps."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5].strip() if len(parts) > 5 else ""
    return None


# -- lookup and config -----------------------------------------------------------------
def test_entry_points_find_the_adapter_for_every_architecture(env):
    for kind in ALL:
        adapter = env.adapter(kind)
        assert type(adapter) is QwenAdapter
        assert adapter.manifest.architecture in QwenAdapter.architectures
        config = adapter.get_config()
        assert config["model_type"] == adapter.manifest.architecture
        assert config == json.loads((env.sources[kind] / "config.json").read_text())


# -- 1. parity -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL)
def test_logits_equal_from_pretrained(env, kind):
    adapter = env.adapter(kind)
    model = env.model(kind)
    ref = env.reference(kind)
    assert not model.training
    ids = env.prompt_ids(kind)
    with torch.no_grad():
        logits, loss = adapter.forward(model, ids)
        expected = ref(input_ids=ids).logits
    assert loss is None
    assert logits.dtype == expected.dtype == torch.bfloat16  # the checkpoint's dtype
    assert torch.equal(logits, expected)
    # nothing left on meta, rotary buffers in float32 like transformers' own
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not t.is_meta, name
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            assert buf.dtype == torch.float32
            assert torch.equal(buf, dict(ref.named_buffers())[name])
    tied = bool(adapter.manifest.tied_weights)
    assert tied == (kind != "qwen2-untied")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied  # re-tied


@pytest.mark.parametrize("kind", ["qwen2", "qwen3-moe"])
def test_loss_is_next_token_cross_entropy(env, kind):
    adapter, model = env.adapter(kind), env.model(kind)
    ids = env.prompt_ids(kind)
    with torch.no_grad():
        logits, loss = adapter.forward(model, ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    assert loss is not None and torch.allclose(loss.float(), manual, atol=1e-4)


# -- 2. greedy generation ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ALL)
def test_greedy_stream_equals_transformers_generate(env, kind):
    from transformers import GenerationConfig

    adapter, model, ref = env.adapter(kind), env.model(kind), env.reference(kind)
    tok = adapter.tokenizer()
    ids = env.prompt_ids(kind)
    ours = list(adapter.generate_stream(model, ids, 20, 0.0, None, None, None, []))
    gen = GenerationConfig(do_sample=False, max_new_tokens=20, eos_token_id=None,
                           pad_token_id=tok.eos_token_ids[-1])
    theirs = ref.generate(ids, generation_config=gen)[0, ids.shape[1]:].tolist()
    assert len(ours) == 20
    assert len(set(ours)) > 5  # a lively model: a broken cache would not pass by luck
    assert ours == theirs
    assert tok.decode(ours) == env.reference_tokenizer(kind).decode(theirs, skip_special_tokens=True)

    # an eos id stops the stream, without being yielded; generate stops at the same place
    stop = ours[4]
    cut = ours.index(stop)
    ours_eos = list(adapter.generate_stream(model, ids, 20, 0.0, None, None, None, [stop]))
    assert ours_eos == ours[:cut]
    gen_eos = GenerationConfig(do_sample=False, max_new_tokens=20, eos_token_id=[stop],
                               pad_token_id=tok.eos_token_ids[-1])
    theirs_eos = ref.generate(ids, generation_config=gen_eos)[0, ids.shape[1]:].tolist()
    assert theirs_eos[:cut + 1] == ours[:cut] + [stop]


def test_stream_leaves_grad_mode_alone_between_tokens(env):
    adapter, model = env.adapter("qwen2"), env.model("qwen2")
    for _ in adapter.generate_stream(model, env.prompt_ids("qwen2"), 3, 0.0, None, None, None, []):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert list(adapter.generate_stream(model, env.prompt_ids("qwen2"), 0, 0.0, None, None,
                                        None, [])) == []


# -- 3. zero copy ------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("kind", ["qwen2", "qwen3-moe"])
def test_dense_weights_are_the_mmapped_objects(env, kind):
    adapter = env.adapter(kind)
    model = adapter.load_checkpoint()
    params = dict(model.named_parameters())
    checked = 0
    for name, entry in adapter.manifest.tensors.items():
        if name not in params:
            assert ".experts." in name  # fused in memory: only those are copies
            continue
        p = params[name]
        assert p.dtype == torch_io.TORCH_DTYPES[entry.dtype]
        where = _mapping_of(p.untyped_storage().data_ptr())
        assert where == str(env.store.objects.path(entry.object).resolve()), name
        checked += 1
    assert checked >= 10
    if kind in MOE:
        fused = params["model.layers.0.mlp.experts.gate_up_proj"]
        assert not _mapping_of(fused.untyped_storage().data_ptr()).startswith(str(env.root))


def test_writing_a_loaded_weight_never_touches_the_object(env):
    adapter = env.adapter("qwen3")
    model = adapter.load_checkpoint()
    name = "model.layers.0.mlp.down_proj.weight"
    oid = adapter.manifest.tensors[name].object
    with torch.no_grad():
        model.get_parameter(name).add_(1.0)  # copy-on-write: private pages only
    assert hash_file(env.store.objects.path(oid)) == oid
    assert torch.equal(adapter.load_checkpoint().get_parameter(name),
                       load_file(env.sources["qwen3"] / "model.safetensors")[name])


def test_dtype_cast_keeps_ties_and_float32_rotary(env):
    adapter = env.adapter("qwen2")
    model = adapter.load_checkpoint(dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    from transformers import AutoModelForCausalLM

    ref32 = AutoModelForCausalLM.from_pretrained(env.sources["qwen2"], dtype=torch.float32)
    ids = env.prompt_ids("qwen2")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref32(ids).logits)


# -- 4. save_checkpoint round trip ---------------------------------------------------------
@pytest.mark.parametrize("kind", ALL)
def test_save_checkpoint_of_an_unmodified_model_gives_the_same_objects(env, kind):
    adapter = env.adapter(kind)
    ckpt = adapter.save_checkpoint(env.model(kind))
    assert ("lm_head.weight" in ckpt.tensors) == (kind == "qwen2-untied")
    assert ckpt.tied_weights == adapter.manifest.tied_weights == (
        {} if kind == "qwen2-untied" else {"lm_head.weight": "model.embed_tokens.weight"})
    assert ckpt.config == (env.sources[kind] / "config.json").read_bytes()
    assert ckpt.files == {}
    with env.store.objects.batch() as batch:
        entries = torch_io.put_tensors(batch, ckpt.tensors.items())
    assert entries == adapter.manifest.tensors
    assert batch.written == 0  # every object already present
    if kind in MOE:
        assert "model.layers.1.mlp.experts.3.up_proj.weight" in entries


def test_moe_change_to_one_expert_changes_only_its_object(env):
    adapter = env.adapter("qwen3-moe")
    model = adapter.load_checkpoint()
    inter = adapter.get_config()["moe_intermediate_size"]
    with torch.no_grad():  # expert 2's gate_proj is the first half of its gate_up_proj rows
        model.model.layers[1].mlp.experts.gate_up_proj[2, :inter].add_(1.0)
    with env.store.objects.batch() as batch:
        entries = torch_io.put_tensors(batch, adapter.save_checkpoint(model).tensors.items())
        batch.abort()
    changed = {k for k, e in entries.items() if e != adapter.manifest.tensors[k]}
    assert changed == {"model.layers.1.mlp.experts.2.gate_proj.weight"}


# -- 5. sampling -------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(env):
    adapter, model = env.adapter("qwen3-moe"), env.model("qwen3-moe")
    ids = env.prompt_ids("qwen3-moe")

    def sample(seed, **kw):
        args = dict(temperature=1.0, top_k=None, top_p=None) | kw
        gen = torch.Generator().manual_seed(seed)
        return list(adapter.generate_stream(model, ids, 12, args["temperature"], args["top_k"],
                                            args["top_p"], gen, []))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert sample(3, top_k=40, top_p=0.9, temperature=0.7) == sample(3, top_k=40, top_p=0.9,
                                                                     temperature=0.7)
    greedy = list(adapter.generate_stream(model, ids, 12, 0.0, None, None, None, []))
    assert sample(5, top_k=1) == greedy
    assert sample(6, top_p=1e-6) == greedy  # nucleus keeps at least the best token
    with pytest.raises(ValueError):
        list(adapter.generate_stream(model, ids, 3, -1.0, None, None, None, []))


# -- 6. tokenizer --------------------------------------------------------------------------
def test_tokenizer_matches_auto_tokenizer_and_outlives_the_temp_folder(env):
    adapter = env.adapter("qwen2")
    tok = adapter.tokenizer()  # the materialised folder is gone once this returns
    ref = env.reference_tokenizer("qwen2")
    text = "The old clockmaker lived above his shop.\n\tdef add(a, b): return a + b  # 3.14 ü 日本"
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    assert tok.vocab_size == len(ref) == adapter.get_config()["vocab_size"]
    im_end = ref.convert_tokens_to_ids("<|im_end|>")
    eot = ref.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_ids == [im_end, eot]  # from generation_config.json
    chat = tok.apply_chat_template("hello there")
    assert chat == ref.apply_chat_template([{"role": "user", "content": "hello there"}],
                                           add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>") and chat.endswith("<|im_start|>assistant\n")
    assert tok.decode([im_end] + tok.encode("hi")) == "hi"  # specials skipped


# -- 7. damaged objects -------------------------------------------------------------------
@pytest.fixture
def lone_store(env, tmp_path):
    """A store of its own (the shared one must stay intact): qwen2 only."""
    store = Store(tmp_path / "store")
    commit = import_model(store, str(env.sources["qwen2"]), name="victim", accept_license=True).commit
    adapter = adapter_for(store, commit)
    name = "model.layers.0.self_attn.q_proj.weight"
    oid = adapter.manifest.tensors[name].object
    return store, adapter, oid, store.objects.path(oid)


def test_flipped_byte_is_caught_by_verify_and_named(lone_store):
    _store, adapter, oid, path = lone_store
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a data byte: the header still parses
    path.write_bytes(bytes(data))
    path.chmod(0o444)
    adapter.load_checkpoint()  # without verify only the header and size are checked
    with pytest.raises(ObjectCorrupt) as err:
        adapter.load_checkpoint(verify=True)
    assert err.value.oid == oid and oid in str(err.value)


def test_truncated_object_is_caught_without_verify(lone_store):
    _store, adapter, oid, path = lone_store
    path.chmod(0o644)
    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(ObjectCorrupt) as err:
        adapter.load_checkpoint()
    assert oid in str(err.value)


def test_missing_object_is_named(lone_store):
    _store, adapter, oid, path = lone_store
    path.unlink()
    with pytest.raises(ObjectMissing) as err:
        adapter.load_checkpoint()
    assert err.value.oid == oid


def test_missing_tokenizer_file_is_named(lone_store):
    store, adapter, _oid, _path = lone_store
    tok_oid = adapter.manifest.files["tokenizer.json"]
    store.objects.path(tok_oid).unlink()
    with pytest.raises(ObjectMissing) as err:
        adapter.tokenizer()
    assert err.value.oid == tok_oid


def test_corrupt_config_is_named(lone_store):
    store, adapter, _oid, _path = lone_store
    cfg = store.objects.path(adapter.manifest.config)
    cfg.chmod(0o644)
    cfg.write_bytes(cfg.read_bytes().replace(b"64", b"65", 1))
    with pytest.raises(ObjectCorrupt) as err:
        adapter.load_checkpoint()
    assert err.value.oid == adapter.manifest.config
