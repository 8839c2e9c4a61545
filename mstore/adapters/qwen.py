"""The Qwen family (Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE) through transformers' native classes.

Loading, saving, tokenizer and generation are `TransformersAdapter`'s (transformers_lm.py):
what is Qwen's own is the tensor layout each config.json implies, checked before import
writes anything and before loading maps any tensor. For the MoE models the checkpoint keeps
one tensor per expert (`experts.3.gate_proj.weight`), which transformers' conversion
mapping fuses on load and splits again on save.
"""

from __future__ import annotations

from ..errors import ConfigMismatch
from .checks import ConfigReader, Expected, match_tensors
from .transformers_lm import HFTokenizer, TransformersAdapter

__all__ = ["QwenAdapter", "HFTokenizer", "expected_tensors"]


class QwenAdapter(TransformersAdapter):
    architectures = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")

    @classmethod
    def check_tensors(cls, config, tensors, where: str) -> None:
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type not in QwenAdapter.architectures:
            return  # a subclass's architecture (docs/adapters.md): its own check, if any
        match_tensors(expected_tensors(config, where), tensors, where, model_type)

    @classmethod
    def linear_weights(cls, config) -> dict[str, tuple[int, ...]]:
        """Attention and dense-MLP projections (and MoE shared experts), from the layout
        the config implies (no torch): the embedding, the head, the routers and the
        per-expert weights (fused into one parameter on load) stay as they are."""
        if config.get("model_type") not in QwenAdapter.architectures:
            return super().linear_weights(config)
        keep = (cls.input_embedding, "lm_head.weight")
        return {e.name: tuple(e.shape) for e in expected_tensors(config, "config.json")
                if len(e.shape) == 2 and e.name not in keep and ".experts." not in e.name
                and e.name.endswith("_proj.weight")}


# -- what a config implies -------------------------------------------------------------
def expected_tensors(config: dict, where: str):
    """The checkpoint tensors transformers' Qwen2/Qwen3(-MoE) classes build from `config`,
    in checkpoint order and layout (per-expert MoE keys, as the Hub and save_pretrained
    have them), with the defaults of transformers' config classes. Sizes are validated
    first, so nothing absurd reaches transformers; a generator, so a config claiming
    100000 layers stops at the first missing one."""
    r = ConfigReader(config, where)
    mt = config["model_type"]
    qwen3 = mt in ("qwen3", "qwen3_moe")
    moe = mt in ("qwen2_moe", "qwen3_moe")
    vocab, hidden = r.size("vocab_size"), r.size("hidden_size")
    layers, heads = r.size("num_hidden_layers"), r.size("num_attention_heads")
    inter = r.size("intermediate_size")
    if "head_dim" in config or mt == "qwen3":
        head_dim = r.size("head_dim", 128)
    else:
        r.divides("num_attention_heads", heads, "hidden_size", hidden)
        head_dim = hidden // heads
    kv = r.size("num_key_value_heads", heads)
    r.divides("num_key_value_heads", kv, "num_attention_heads", heads)
    tie = r.flag("tie_word_embeddings", False)
    if mt == "qwen2":
        bias, o_bias = True, False
    elif mt == "qwen2_moe":
        bias, o_bias = r.flag("qkv_bias", True), False
    else:
        bias = o_bias = r.flag("attention_bias", False)
    for key in ("rms_norm_eps", "rope_theta"):
        r.number(key, positive=True)
    r.size("max_position_embeddings", 32768)
    if moe:
        experts_key = "num_local_experts" if "num_local_experts" in config else "num_experts"
        experts = r.size(experts_key, 60 if mt == "qwen2_moe" else 128, minimum=0)
        moe_inter = r.size("moe_intermediate_size", 1408 if mt == "qwen2_moe" else 768)
        top_k = r.size("num_experts_per_tok", 4 if mt == "qwen2_moe" else 8)
        if experts and top_k > experts:
            raise ConfigMismatch(where, f"config.json num_experts_per_tok ({top_k}) is more "
                                 f"than {experts_key} ({experts})")
        step = r.size("decoder_sparse_step", 1)
        dense_layers = set(r.int_list("mlp_only_layers", layers))
        shared = r.size("shared_expert_intermediate_size", 5632) if mt == "qwen2_moe" else 0

    H = f"hidden_size={hidden}"
    yield Expected("model.embed_tokens.weight", (vocab, hidden), f"vocab_size={vocab}, {H}")
    q, k = heads * head_dim, kv * head_dim
    qw = f"num_attention_heads={heads}, head_dim={head_dim}"
    kw = f"num_key_value_heads={kv}, head_dim={head_dim}"
    for i in range(layers):
        p = f"model.layers.{i}."
        L = f"layer {i} of num_hidden_layers={layers}"
        yield Expected(p + "input_layernorm.weight", (hidden,), f"{L}, {H}")
        a = p + "self_attn."
        yield Expected(a + "q_proj.weight", (q, hidden), f"{qw}, {H}")
        yield Expected(a + "k_proj.weight", (k, hidden), f"{kw}, {H}")
        yield Expected(a + "v_proj.weight", (k, hidden), f"{kw}, {H}")
        yield Expected(a + "o_proj.weight", (hidden, q), f"{H}, {qw}")
        if bias:
            yield Expected(a + "q_proj.bias", (q,), qw)
            yield Expected(a + "k_proj.bias", (k,), kw)
            yield Expected(a + "v_proj.bias", (k,), kw)
        if o_bias:
            yield Expected(a + "o_proj.bias", (hidden,), H)
        if qwen3:
            yield Expected(a + "q_norm.weight", (head_dim,), f"head_dim={head_dim}")
            yield Expected(a + "k_norm.weight", (head_dim,), f"head_dim={head_dim}")
        yield Expected(p + "post_attention_layernorm.weight", (hidden,), H)
        m = p + "mlp."
        if moe and i not in dense_layers and experts > 0 and (i + 1) % step == 0:
            yield Expected(m + "gate.weight", (experts, hidden), f"{experts_key}={experts}, {H}")
            ew = f"moe_intermediate_size={moe_inter}, {H}"
            for e in range(experts):
                x = f"{m}experts.{e}."
                yield Expected(x + "gate_proj.weight", (moe_inter, hidden), ew)
                yield Expected(x + "up_proj.weight", (moe_inter, hidden), ew)
                yield Expected(x + "down_proj.weight", (hidden, moe_inter), ew)
            if shared:
                sw = f"shared_expert_intermediate_size={shared}, {H}"
                yield Expected(m + "shared_expert.gate_proj.weight", (shared, hidden), sw)
                yield Expected(m + "shared_expert.up_proj.weight", (shared, hidden), sw)
                yield Expected(m + "shared_expert.down_proj.weight", (hidden, shared), sw)
                yield Expected(m + "shared_expert_gate.weight", (1, hidden), H)
        else:
            iw = f"intermediate_size={inter}, {H}"
            yield Expected(m + "gate_proj.weight", (inter, hidden), iw)
            yield Expected(m + "up_proj.weight", (inter, hidden), iw)
            yield Expected(m + "down_proj.weight", (hidden, inter), iw)
    yield Expected("model.norm.weight", (hidden,), H)
    yield Expected("lm_head.weight", (vocab, hidden),
                   f"vocab_size={vocab}, {H}, tie_word_embeddings={str(tie).lower()}",
                   required=not tie)
    r.layer_types(layers)  # after the tensors: a wrong layer count is named by its tensors

