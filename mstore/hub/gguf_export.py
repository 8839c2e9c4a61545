"""`mstore export --format gguf`: one GGUF file that llama.cpp and Ollama load.

Written with the `gguf` package (llama.cpp's own writer, quantizer and name tables), and
following llama.cpp's `convert_hf_to_gguf.py` (ggml-org/llama.cpp at commit 0024aa74,
classes TextModel, Qwen2Model, Qwen3Model, Qwen2MoeModel, Qwen3MoeModel) for what it
writes:

- tensor names from `gguf.get_tensor_name_map(arch, n_blocks)`; with tied embeddings
  there is no `lm_head.weight` and so no `output.weight` (llama.cpp then uses
  `token_embd.weight`); MoE experts are stacked into one 3-D tensor per layer and
  projection (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`);
- tensor types as its `prepare_tensors`: 1-D tensors, `*_norm.weight` (Qwen3's
  `attn_q_norm`/`attn_k_norm` included), biases and MoE router gates stay F32; the
  rest takes the file type (F16, BF16 or Q8_0), and a row that Q8_0 cannot split into
  32-value blocks falls back to F16;
- hyper-parameters as `TextModel.set_gguf_parameters` (+ the expert lengths of
  `Qwen2MoeModel`), read through transformers' config class as the converter does;
- the tokenizer as `_set_vocab_gpt2`: tokens, token types, the `qwen2` pre-tokenizer
  (checked against the tokenizer's own split regex, since llama.cpp hard-codes it),
  then merges, special ids and the chat template through `gguf.SpecialVocab`.

The header lists every tensor before any data, so tensor infos are added first (shapes
from the manifest) and each tensor is then read, converted and written on its own:
memory stays at the largest tensor, not the model.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import ExportError
from ..store import failpoints
from ..store.manifest import Manifest
from ..store.repo import Store
from .export_tensors import LazyTensor, commit_tensors, weights_manifest

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
TYPES = ("f16", "bf16", "q8_0")
CONVERTER_COMMIT = "0024aa7417efd50a7c2a79e049dfbbbceb0beaaf"

# The split regex of Qwen's byte-level BPE, which llama.cpp implements as the "qwen2"
# pre-tokenizer (the same for Qwen1.5, Qwen2, Qwen2.5 and Qwen3).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)"
                     r"\.weight")


@dataclass(frozen=True)
class _Planned:
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]


def _arch(architecture: str):
    import gguf

    arches = {"qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
              "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE, "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE}
    if architecture not in arches:
        raise ExportError(f"GGUF export supports {', '.join(sorted(arches))}, not "
                          f"{architecture!r}; export it as safetensors")
    return arches[architecture]


def write_gguf(store: Store, m: Manifest, name: str, work: Path, gguf_type: str,
               extra_meta: dict[str, Any]) -> list[str]:
    """Write `work/model.gguf` (and an Ollama Modelfile next to it); returns the names."""
    import gguf

    if gguf_type not in TYPES:
        raise ExportError(f"GGUF tensor type {gguf_type!r}: choose one of {', '.join(TYPES)}")
    arch = _arch(m.architecture)
    with tempfile.TemporaryDirectory(prefix="mstore-gguf-") as tmp:
        src = Path(tmp)
        model = weights_manifest(store, m)
        (src / "config.json").write_bytes(store.objects.read_bytes(model.config))
        for fname, oid in model.files.items():
            if "/" not in fname and not fname.startswith("."):
                (src / fname).write_bytes(store.objects.read_bytes(oid))
        hparams = _hparams(src)
        ftype, qtype = _file_type(gguf_type)
        writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
        try:
            planned = list(_plan(commit_tensors(store, m, name), arch, hparams, qtype))
            for p in planned:
                _add_info(writer, p)
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name)
            _add_provenance(writer, extra_meta)
            _set_parameters(writer, hparams, arch, ftype)
            _set_vocab(writer, src, hparams)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.write_header_to_file(path=work / GGUF_FILE)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p in planned:
                writer.write_tensor_data(gguf.quants.quantize(_as_float(p.load()), p.qtype))
                failpoints.hit("export.gguf-tensor")
        finally:
            writer.close()
    (work / MODELFILE).write_text(f"FROM ./{GGUF_FILE}\n")
    return [GGUF_FILE, MODELFILE]


def _file_type(gguf_type: str):
    import gguf

    return {"f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
            "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
            "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
            }[gguf_type]


def _as_float(a: np.ndarray) -> np.ndarray:
    """What the converter hands the quantizer: float16 and float32 as they are, the rest
    as float32."""
    return a if a.dtype in (np.float16, np.float32) else a.astype(np.float32)


def _hparams(src: Path) -> dict[str, Any]:
    """config.json through transformers' config class (its defaults filled in), as
    `ModelBase.load_hparams` reads it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=False).to_dict()
    except (ValueError, OSError, KeyError) as e:
        raise ExportError(f"config.json cannot be read by transformers ({e}); "
                          "nothing exported") from None


# -- tensors ---------------------------------------------------------------------------
def _plan(tensors: Iterable[tuple[str, LazyTensor]], arch, hparams: dict[str, Any],
          qtype) -> Iterator[_Planned]:
    """The GGUF tensors in write order: names mapped, experts stacked, types chosen."""
    import gguf

    n_blocks = hparams["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, n_blocks)
    experts: dict[tuple[int, str], dict[int, LazyTensor]] = {}
    n_experts = hparams.get("num_local_experts") or hparams.get("num_experts") or 0
    for hf_name, t in tensors:
        if hf_name.endswith((".rotary_emb.inv_freq", ".attention.masked_bias")):
            continue
        match = _EXPERT.fullmatch(hf_name)
        if match:
            bid, xid, proj = int(match[1]), int(match[2]), match[3]
            group = experts.setdefault((bid, proj), {})
            group[xid] = t
            if len(group) == n_experts:
                stacked = _stack([group.pop(i) for i in range(n_experts)])
                del experts[(bid, proj)]
                yield _planned(names, arch, f"model.layers.{bid}.mlp.experts.{proj}.weight",
                               stacked, qtype)
            continue
        yield _planned(names, arch, hf_name, t, qtype)
    if experts:
        left = ", ".join(f"layer {b} {p}" for b, p in sorted(experts))
        raise ExportError(f"experts incomplete ({left}): the model holds fewer than "
                          f"num_experts={n_experts}; nothing exported")


def _stack(parts: list[LazyTensor]) -> LazyTensor:
    """The experts of one layer and projection as one (n_expert, rows, cols) tensor."""
    shape = (len(parts), *parts[0].shape)
    return LazyTensor(shape, parts[0].dtype, lambda: np.stack([p.load() for p in parts]))


def _planned(names, arch, hf_name: str, t: LazyTensor, file_qtype) -> _Planned:
    import gguf

    new = names.get_name(key=hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ExportError(f"tensor {hf_name} has no llama.cpp name for "
                          f"{gguf.MODEL_ARCH_NAMES[arch]}; nothing exported")
    f32 = gguf.GGMLQuantizationType.F32
    force_f32 = {gguf.TENSOR_NAMES[k] for k in (gguf.MODEL_TENSOR.FFN_GATE_INP,
                                                gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)}
    base = new.rsplit(".", 1)[0]
    if len(t.shape) <= 1 or new.endswith("_norm.weight") or not new.endswith(".weight") \
            or re.sub(r"\.\d+\.", ".{bid}.", base) in force_f32:
        qtype = f32
    else:
        qtype = file_qtype
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if block > 1 and t.shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16  # the converter's QuantError fallback
    return _Planned(new, t.shape, qtype, t.load)


def _add_info(writer, p: _Planned) -> None:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[p.qtype]
    numel = int(np.prod(p.shape)) if p.shape else 1
    nbytes = numel // block * type_size
    if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16
        writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), nbytes, raw_dtype=p.qtype)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(p.shape, p.qtype)
        writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), nbytes,
                               raw_dtype=p.qtype)


# -- metadata --------------------------------------------------------------------------
def _find(hparams: dict[str, Any], keys: Iterable[str]) -> Any:
    return next((hparams[k] for k in keys if hparams.get(k) is not None), None)


def _set_parameters(writer, hparams: dict[str, Any], arch, ftype) -> None:
    """`TextModel.set_gguf_parameters` for the keys a Qwen config has, then
    `Qwen2MoeModel`'s expert lengths."""
    import gguf

    writer.add_block_count(hparams["num_hidden_layers"])
    for add, keys in ((writer.add_context_length, ("max_position_embeddings", "n_ctx")),
                      (writer.add_embedding_length, ("hidden_size", "n_embd")),
                      (writer.add_feed_forward_length, ("intermediate_size", "n_inner")),
                      (writer.add_head_count, ("num_attention_heads", "n_head")),
                      (writer.add_head_count_kv, ("num_key_value_heads", "n_kv_heads"))):
        if (value := _find(hparams, keys)) is not None:
            add(value)
    rope = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    if "rope_theta" not in rope and hparams.get("rope_theta") is not None:
        rope["rope_theta"] = hparams["rope_theta"]
    rope_type, factor = rope.get("rope_type", rope.get("type")), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif rope_type not in (None, "default"):
        raise ExportError(f"rope type {rope_type!r} has no GGUF equivalent here; "
                          "nothing exported")
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    if (eps := _find(hparams, ("rms_norm_eps", "norm_eps"))) is not None:
        writer.add_layer_norm_rms_eps(eps)
    if (n := _find(hparams, ("num_local_experts", "num_experts"))) is not None:
        writer.add_expert_count(n)
    if (n := _find(hparams, ("num_experts_per_tok",))) is not None:
        writer.add_expert_used_count(n)
    if hparams.get("head_dim") is not None:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])
    if arch in (gguf.MODEL_ARCH.QWEN2MOE, gguf.MODEL_ARCH.QWEN3MOE):
        if hparams.get("moe_intermediate_size") is not None:
            writer.add_expert_feed_forward_length(hparams["moe_intermediate_size"])
        if hparams.get("shared_expert_intermediate_size") is not None:
            writer.add_expert_shared_feed_forward_length(
                hparams["shared_expert_intermediate_size"])
    writer.add_file_type(ftype)


def _add_provenance(writer, meta: dict[str, Any]) -> None:
    """general.* keys: license and the Hub model this one derives from, when known."""
    if meta.get("license"):
        writer.add_license(meta["license"])
    if meta.get("base_model"):
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, meta["base_model"])
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{meta['base_model']}")


def _set_vocab(writer, src: Path, hparams: dict[str, Any]) -> None:
    """`TextModel._set_vocab_gpt2`, with the pre-tokenizer named from the architecture
    (and checked) instead of from a hash of known Hub tokenizers."""
    import gguf

    if not (src / "tokenizer.json").is_file():
        raise ExportError("the model has no tokenizer.json; GGUF export needs Qwen's BPE "
                          "tokenizer")
    _check_pretokenizer(json.loads((src / "tokenizer.json").read_text(encoding="utf-8")))
    tokens, toktypes = _vocab(src, hparams)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(toktypes)
    gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


def _check_pretokenizer(doc: dict[str, Any]) -> None:
    model = doc.get("model") or {}
    pre = doc.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [((s.get("pattern") or {}).get("Regex")) for s in steps if s.get("type") == "Split"]
    if model.get("type") != "BPE" or QWEN2_SPLIT not in regexes:
        raise ExportError("the tokenizer is not Qwen's byte-level BPE (its pre-tokenizer "
                          "split differs), so llama.cpp's 'qwen2' tokenizer would not match "
                          "it; nothing exported")


def _vocab(src: Path, hparams: dict[str, Any]) -> tuple[list[str], list[int]]:
    """`TextModel.get_vocab_base`: one token per id up to vocab_size ([PADn] where the
    tokenizer has none), added tokens CONTROL when special, USER_DEFINED otherwise."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    vocab = tokenizer.get_vocab()
    vocab_size = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids past vocab_size={vocab_size}; "
                          "nothing exported")
    reverse = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or (token.startswith("<|") and token.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types
