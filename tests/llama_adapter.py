"""A third adapter that mstore does not ship: Llama through transformers' LlamaForCausalLM.

It lives only in the test suite and is registered the way an outside package would be
(an `mstore.adapters` entry point, see tests/test_third_adapter.py). Everything but the
tensor layout comes from `TransformersAdapter`; mstore's own modules know nothing of it.
"""

from __future__ import annotations

from mstore.adapters.checks import ConfigReader, Expected, match_tensors
from mstore.adapters.transformers_lm import TransformersAdapter


class LlamaAdapter(TransformersAdapter):
    architectures = ("llama",)

    @classmethod
    def check_tensors(cls, config, tensors, where: str) -> None:
        match_tensors(expected_tensors(config, where), tensors, where, "llama")


def expected_tensors(config: dict, where: str):
    """What LlamaForCausalLM builds from `config`, with LlamaConfig's defaults."""
    r = ConfigReader(config, where)
    vocab, hidden = r.size("vocab_size", 32000), r.size("hidden_size", 4096)
    layers, heads = r.size("num_hidden_layers", 32), r.size("num_attention_heads", 32)
    inter = r.size("intermediate_size", 11008)
    if config.get("head_dim") is not None:
        head_dim = r.size("head_dim")
    else:
        r.divides("num_attention_heads", heads, "hidden_size", hidden)
        head_dim = hidden // heads
    kv = r.size("num_key_value_heads", heads)
    r.divides("num_key_value_heads", kv, "num_attention_heads", heads)
    tie = r.flag("tie_word_embeddings", False)
    attn_bias, mlp_bias = r.flag("attention_bias", False), r.flag("mlp_bias", False)
    r.number("rms_norm_eps", positive=True)

    H = f"hidden_size={hidden}"
    q, k = heads * head_dim, kv * head_dim
    qw = f"num_attention_heads={heads}, head_dim={head_dim}"
    kw = f"num_key_value_heads={kv}, head_dim={head_dim}"
    iw = f"intermediate_size={inter}, {H}"
    yield Expected("model.embed_tokens.weight", (vocab, hidden), f"vocab_size={vocab}, {H}")
    for i in range(layers):
        p = f"model.layers.{i}."
        yield Expected(p + "input_layernorm.weight", (hidden,),
                       f"layer {i} of num_hidden_layers={layers}, {H}")
        a = p + "self_attn."
        for name, shape, why in (("q_proj", (q, hidden), qw), ("k_proj", (k, hidden), kw),
                                 ("v_proj", (k, hidden), kw), ("o_proj", (hidden, q), qw)):
            yield Expected(f"{a}{name}.weight", shape, f"{why}, {H}")
            if attn_bias:
                yield Expected(f"{a}{name}.bias", shape[:1], why)
        yield Expected(p + "post_attention_layernorm.weight", (hidden,), H)
        m = p + "mlp."
        for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                            ("down_proj", (hidden, inter))):
            yield Expected(f"{m}{name}.weight", shape, iw)
            if mlp_bias:
                yield Expected(f"{m}{name}.bias", shape[:1], iw)
    yield Expected("model.norm.weight", (hidden,), H)
    yield Expected("lm_head.weight", (vocab, hidden),
                   f"vocab_size={vocab}, {H}, tie_word_embeddings={str(tie).lower()}",
                   required=not tie)
