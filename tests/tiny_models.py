"""Tiny, deterministic Hugging Face-format model folders for the tests.

Every builder writes a folder laid out like a Hub repo and returns its path. Builds are
deterministic: the same arguments give byte-identical files, in this process or another
one (fixed seeds, a fixed training text, no timestamps in any file).

    train_bpe_tokenizer(out_dir)                      tokenizer.json, tokenizer_config.json,
                                                      chat_template.jinja
    build_qwen2(dir, seed=0, sharded=False, tie=True, change_one_tensor=False)
    build_qwen3(dir, seed=0)
    build_qwen2_moe(dir)
    build_qwen3_moe(dir)
    build_pickle_only(dir)                            config.json + pytorch_model.bin
    build_unsupported_arch(dir)                       model_type "qwen" + auto_map

Model folders hold config.json, generation_config.json, the tokenizer files and bf16
safetensors weights written by ``save_pretrained`` (hidden 64, intermediate 128, 2 layers,
4 heads, 2 KV heads, head_dim 16, vocab = tokenizer size, tied embeddings by default).

torch, transformers and tokenizers are imported inside the functions, never at module
import: transformers imports huggingface_hub, which reads ``HF_ENDPOINT`` once, at import
time. Importing this module is therefore safe before the Hub test server is started (see
``tests/hub_server.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "CORPUS",
    "DOWN_PROJ_CHANGED",
    "tokenizer_files",
    "train_bpe_tokenizer",
    "vocab_size",
    "build_qwen2",
    "build_qwen3",
    "build_qwen2_moe",
    "build_qwen3_moe",
    "build_pickle_only",
    "build_unsupported_arch",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# The tensor that build_qwen2(change_one_tensor=True) re-randomises; everything else stays
# bit-identical to the plain build with the same seed.
DOWN_PROJ_CHANGED = "model.layers.1.mlp.down_proj.weight"

# The Qwen2.5 chat template without the tool-calling branches.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen's pre-tokenizer split (the same regex transformers' Qwen2Tokenizer uses).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Fixed training text, a few KB. Changing it changes every tokenizer and model file.
CORPUS = """\
The lighthouse keeper climbed the stairs every evening before the sun went down. There were
one hundred and twelve steps, and he counted each of them, because counting kept his mind
from wandering. At the top he cleaned the glass, trimmed the wick, and wrote the time in a
small book with a green cover. The book was full of numbers: the hour, the wind, the height
of the waves, and the names of the ships that passed in the night.

On calm days the sea was flat and grey, and the gulls sat on the rocks without a sound. On
stormy days the water rose against the cliff and the whole tower seemed to shake. The keeper
was not afraid. He had seen worse weather, and he trusted the stone more than he trusted
most people. Still, he kept a lantern and a loaf of bread by the door, just in case.

A model store keeps the weights of a network the way a library keeps its books. Each tensor
is written once, named by the hash of its bytes, and never changed again. When a new version
of a model arrives, only the tensors that differ are stored; the rest are shared with the
version that came before. A small manifest lists the names, shapes and types of the tensors,
and a reference points at the manifest, much like a branch points at a commit in git.

Training a language model begins with text. The text is split into tokens, the tokens are
turned into numbers, and the numbers are fed to the network one batch at a time. The network
predicts the next token, the loss measures how wrong it was, and the optimizer nudges the
weights in a better direction. After many steps the loss goes down, and the model starts to
produce sentences that look almost like the ones it was trained on.

Recipe for a simple soup: chop two onions, three carrots and a stick of celery. Warm a spoon
of olive oil in a large pot, add the vegetables and cook them slowly for ten minutes. Pour in
a litre of stock, add a bay leaf, salt and pepper, and let it simmer for half an hour. Blend
it if you like it smooth, or leave it as it is. Serve it hot with bread and a little butter.

The train left the station at seven minutes past nine. It was a slow train, stopping at every
village along the river, and the passengers knew each other by name. A woman with a basket of
apples offered one to the conductor, who thanked her and put it in his pocket for later. The
children pressed their faces to the window and counted the cows in the fields: four, nine,
fifteen, twenty, until they lost count and started again from the beginning.

Questions and answers. What is the capital of France? Paris. How many days are there in a
week? Seven. What colour is the sky on a clear day? Blue. Which is larger, an elephant or a
mouse? An elephant. Why do leaves fall in autumn? Because the days grow shorter and the trees
stop making food, so they let their leaves go to save water through the winter months.

def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i * 2))

Numbers and dates: 2024-01-15, 3.14159, 42, 1000, 65536, 0.001, 12:30, 99%, $19.99, #7.
Punctuation: commas, full stops. Questions? Exclamations! "Quotes" and 'apostrophes' -- dashes;
colons: semicolons; (brackets) [square] {curly} <angle> / slash \\ backslash | pipe & and.

The old clockmaker lived above his shop on a narrow street near the market. He repaired
watches for the baker, the teacher and the mayor, and he never charged more than a fair price.
In the evenings he played the violin, badly but happily, and the neighbours pretended not to
hear. When he retired he gave his tools to his apprentice, a quiet girl who had learned to
listen to the ticking of a clock the way a doctor listens to the beating of a heart.
"""

_lock = threading.Lock()
_tokenizer_files: dict[str, bytes] | None = None


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def tokenizer_files() -> dict[str, bytes]:
    """The tokenizer folder's files as {name: bytes}; trained once per process, then cached."""
    global _tokenizer_files
    with _lock:
        if _tokenizer_files is None:
            _tokenizer_files = _train_tokenizer_files()
        return dict(_tokenizer_files)


def _train_tokenizer_files() -> dict[str, bytes]:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        min_frequency=1,
        show_progress=False,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as tmp:
        fast.save_pretrained(tmp)
        return {name: (Path(tmp) / name).read_bytes() for name in sorted(os.listdir(tmp))}


def train_bpe_tokenizer(out_dir) -> Path:
    """Write the tiny byte-level BPE tokenizer (Qwen-style chat template) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer_files().items():
        _write_bytes(out / name, data)
    return out


def vocab_size() -> int:
    """Number of tokens of the tiny tokenizer, specials included (= the models' vocab_size)."""
    data = json.loads(tokenizer_files()["tokenizer.json"])
    ids = set(data["model"]["vocab"].values()) | {t["id"] for t in data["added_tokens"]}
    return max(ids) + 1


def _token_id(token: str) -> int:
    data = json.loads(tokenizer_files()["tokenizer.json"])
    return data["model"]["vocab"][token]


def _common_config_kwargs(tie: bool) -> dict:
    eot = _token_id("<|endoftext|>")
    return dict(
        vocab_size=vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=eot,
        eos_token_id=eot,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


@contextlib.contextmanager
def _quiet_transformers_progress():
    """Hide save_pretrained's "Writing model shards" bar without touching huggingface_hub's
    progress-bar switch (transformers' public disable/enable toggles both)."""
    from transformers.utils import logging as tf_logging

    previous = getattr(tf_logging, "_tqdm_active", None)
    if previous is not None:
        tf_logging._tqdm_active = False
    try:
        yield
    finally:
        if previous is not None:
            tf_logging._tqdm_active = previous


def _save_model(model_cls, config, out_dir, seed: int, *, max_shard_size=None, mutate=None) -> Path:
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.bfloat16).eval()
    if mutate is not None:
        with torch.no_grad():
            mutate(model)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    with _quiet_transformers_progress():
        model.save_pretrained(out, **kwargs)

    from transformers import GenerationConfig

    gen = GenerationConfig(
        bos_token_id=_token_id("<|endoftext|>"),
        eos_token_id=[_token_id("<|im_end|>"), _token_id("<|endoftext|>")],
        pad_token_id=_token_id("<|endoftext|>"),
        do_sample=False,
        max_new_tokens=16,
    )
    gen.save_pretrained(out)
    train_bpe_tokenizer(out)
    # safetensors creates files with mode 0600 whatever the umask; give the repo folder
    # ordinary permissions so that copies of it behave like a checkout.
    for p in out.iterdir():
        if p.is_file():
            p.chmod(0o644)
    return out


def build_qwen2(dir, seed: int = 0, sharded: bool = False, tie: bool = True, change_one_tensor: bool = False) -> Path:
    """Tiny Qwen2ForCausalLM in bf16.

    sharded: model.safetensors.index.json + several shards (max_shard_size 100 kB).
    tie=False: a separate lm_head.weight is saved.
    change_one_tensor: the same model as with change_one_tensor=False (same seed, tie,
    sharded) except DOWN_PROJ_CHANGED, which is re-randomised; all other files and tensors
    are bit-identical, so a store should dedup everything but that one tensor.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**_common_config_kwargs(tie))

    def mutate(model):
        import torch

        param = dict(model.named_parameters())[DOWN_PROJ_CHANGED]
        gen = torch.Generator().manual_seed(1_000_003 + seed)
        param.copy_((torch.randn(param.shape, generator=gen) * 0.02).to(param.dtype))

    return _save_model(
        Qwen2ForCausalLM,
        config,
        dir,
        seed,
        max_shard_size="100KB" if sharded else None,
        mutate=mutate if change_one_tensor else None,
    )


def build_qwen3(dir, seed: int = 0) -> Path:
    """Tiny Qwen3ForCausalLM in bf16 (q/k norms, no attention bias)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(head_dim=16, **_common_config_kwargs(True))
    return _save_model(Qwen3ForCausalLM, config, dir, seed)


def build_qwen2_moe(dir, seed: int = 0) -> Path:
    """Tiny Qwen2MoeForCausalLM in bf16: 4 experts, 2 per token, a shared expert.

    The checkpoint keeps one tensor per expert (model.layers.0.mlp.experts.3.gate_proj.weight),
    the Hub layout; transformers 5 fuses them only in memory.
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        **_common_config_kwargs(True),
    )
    return _save_model(Qwen2MoeForCausalLM, config, dir, seed)


def build_qwen3_moe(dir, seed: int = 0) -> Path:
    """Tiny Qwen3MoeForCausalLM in bf16: 4 experts, 2 per token."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        **_common_config_kwargs(True),
    )
    return _save_model(Qwen3MoeForCausalLM, config, dir, seed)


def build_pickle_only(dir, seed: int = 0) -> Path:
    """A qwen2 repo whose only weights are a pickled pytorch_model.bin (no safetensors)."""
    import torch

    out = build_qwen2(dir, seed=seed)
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    torch.save(dict(sorted(state.items())), out / "pytorch_model.bin")
    (out / "pytorch_model.bin").chmod(0o644)
    return out


_QWEN1_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "model_type": "qwen",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 1,
    "kv_channels": 16,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 512,
    "seq_length": 512,
    "no_bias": True,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "tie_word_embeddings": False,
    "bf16": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 256,
}

_REMOTE_CODE_STUB = (
    "# Stand-in for a repo's remote code. mstore never runs trust_remote_code;\n"
    "# importing this file is a test failure.\n"
    "raise RuntimeError('remote code from a test repo was executed')\n"
)


def build_unsupported_arch(dir, seed: int = 0) -> Path:
    """A repo like the original Qwen/Qwen-7B: model_type "qwen", auto_map, remote code files.

    Loading it needs trust_remote_code; its .py files raise if ever executed.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _QWEN1_CONFIG
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {
        "transformer.wte.weight": rnd(v, h),
        "transformer.h.0.ln_1.weight": torch.ones(h, dtype=torch.bfloat16),
        "transformer.h.0.attn.c_attn.weight": rnd(3 * h, h),
        "transformer.h.0.attn.c_attn.bias": rnd(3 * h),
        "transformer.h.0.attn.c_proj.weight": rnd(h, h),
        "transformer.h.0.ln_2.weight": torch.ones(h, dtype=torch.bfloat16),
        "transformer.h.0.mlp.w1.weight": rnd(inter // 2, h),
        "transformer.h.0.mlp.w2.weight": rnd(inter // 2, h),
        "transformer.h.0.mlp.c_proj.weight": rnd(h, inter // 2),
        "transformer.ln_f.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": rnd(v, h),
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "max_new_tokens": 16}, indent=2) + "\n"
    )
    (out / "configuration_qwen.py").write_text(_REMOTE_CODE_STUB)
    (out / "modeling_qwen.py").write_text(_REMOTE_CODE_STUB)
    return out
