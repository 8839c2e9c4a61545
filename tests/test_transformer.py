"""Tests for mstore.nn: the small Transformer and the character tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from mstore.nn.char_tokenizer import CharTokenizer
from mstore.nn.transformer import KVCache, Transformer, TransformerConfig, sample_next_token

VOCAB = 40


def tiny_config(**overrides) -> TransformerConfig:
    kw = dict(vocab_size=VOCAB, n_layers=2, d_model=32, n_heads=4, block_size=64)
    kw.update(overrides)
    return TransformerConfig(**kw)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides)).eval()


def lively_model(seed: int = 0, **overrides) -> Transformer:
    """A model whose greedy output varies from step to step.

    At the 0.02 init the tied head makes greedy decoding repeat one token, which would
    let a broken cache pass; larger random weights give context-dependent choices.
    """
    model = tiny_model(seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def prompt(batch: int = 1, length: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


# --- config -----------------------------------------------------------------------


def test_config_round_trips_through_dict():
    cfg = tiny_config(dropout=0.1)
    d = cfg.to_dict()
    assert d == {
        "vocab_size": VOCAB,
        "n_layers": 2,
        "d_model": 32,
        "n_heads": 4,
        "block_size": 64,
        "dropout": 0.1,
    }
    assert TransformerConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_config_from_dict_rejects_unknown_key_by_name():
    with pytest.raises(ValueError, match="n_embd"):
        TransformerConfig.from_dict({"vocab_size": 10, "n_embd": 32})


def test_config_from_dict_names_missing_required_key():
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerConfig.from_dict({"n_layers": 2})


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"d_model": 30, "n_heads": 4}, "d_model"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layers": -1}, "n_layers"),
        ({"n_heads": 0}, "n_heads"),
        ({"block_size": 0}, "block_size"),
        ({"d_model": 32.0}, "d_model"),
        ({"n_layers": True}, "n_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


# --- forward ----------------------------------------------------------------------


def test_forward_shapes_and_loss():
    model = tiny_model()
    idx = prompt(batch=3, length=7)
    logits, loss = model(idx)
    assert logits.shape == (3, 7, VOCAB)
    assert loss is None
    targets = prompt(batch=3, length=7, seed=2)
    targets[0, :3] = -100  # ignored positions
    logits, loss = model(idx, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    # Near-uniform predictions at init: loss close to ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5


def test_forward_rejects_positions_beyond_block_size():
    model = tiny_model(block_size=8)
    model(prompt(length=8))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size"):
        model(prompt(length=9))
    with pytest.raises(ValueError, match="block_size"):
        model(prompt(length=2), start_pos=7)


def test_loss_decreases_when_overfitting_one_batch():
    model = tiny_model()
    model.train()
    idx = prompt(batch=4, length=16)
    targets = torch.roll(idx, shifts=-1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tied_weight_is_one_parameter():
    model = tiny_model()
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.tied_weights() == {"lm_head.weight": "tok_emb.weight"}
    sd = model.state_dict()
    for alias, source in model.tied_weights().items():
        assert sd[alias].data_ptr() == sd[source].data_ptr()
    params = list(model.parameters())
    assert sum(p is model.tok_emb.weight for p in params) == 1
    assert model.num_parameters() == sum(p.numel() for p in params)
    # A step on the tied weight moves both names.
    _, loss = model(prompt(length=6), prompt(length=6, seed=3))
    loss.backward()
    assert model.lm_head.weight.grad is model.tok_emb.weight.grad


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layers=8, d_model=64))
    proj = model.blocks[0].mlp.proj.weight.std().item()
    fc = model.blocks[0].mlp.fc.weight.std().item()
    assert fc == pytest.approx(0.02, rel=0.1)
    assert proj == pytest.approx(0.02 / 4, rel=0.1)  # 0.02 / sqrt(2 * 8)


def test_meta_build_then_assign_load_gives_identical_logits():
    model = tiny_model()
    sd = model.state_dict()
    with torch.device("meta"):
        restored = Transformer(model.config, init_weights=False)
    assert restored.tok_emb.weight.is_meta
    restored.load_state_dict(sd, assign=True)
    restored.tie_weights()
    restored.eval()
    assert restored.lm_head.weight is restored.tok_emb.weight
    assert not any(p.is_meta for p in restored.parameters())
    idx = prompt(batch=2, length=9)
    torch.testing.assert_close(restored(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_dropout_in_eval_mode_is_deterministic():
    model = tiny_model(dropout=0.3)
    idx = prompt(batch=2, length=10)
    a, _ = model(idx)
    b, _ = model(idx)
    assert torch.equal(a, b)
    model.train()
    c, _ = model(idx)
    d, _ = model(idx)
    assert not torch.equal(c, d)  # dropout really is active in training mode


# --- KV cache ---------------------------------------------------------------------


def test_cached_forward_matches_full_forward():
    model = lively_model()
    idx = prompt(batch=2, length=12)
    full, _ = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    # Prefill 5, then a chunk of 4 (exercises the explicit offset mask), then 3 singles.
    parts = [model(idx[:, :5], kv_cache=cache, start_pos=0)[0]]
    parts.append(model(idx[:, 5:9], kv_cache=cache, start_pos=5)[0])
    for t in range(9, 12):
        parts.append(model(idx[:, t : t + 1], kv_cache=cache, start_pos=t)[0])
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_rejects_holes_and_wrong_batch():
    model = tiny_model()
    cache = model.new_kv_cache(batch_size=1)
    model(prompt(length=3), kv_cache=cache, start_pos=0)
    with pytest.raises(ValueError, match="past the end"):
        model(prompt(length=1), kv_cache=cache, start_pos=5)
    with pytest.raises(ValueError, match="batch size"):
        model(prompt(batch=2, length=1), kv_cache=cache, start_pos=3)
    assert isinstance(cache, KVCache)
    assert cache.k[0].shape == (1, 4, 64, 8)


def test_greedy_generation_with_cache_equals_full_recompute():
    model = lively_model()
    idx = prompt(batch=4, length=5)
    cached = model.generate(idx, 30, temperature=0)
    recomputed = model.generate(idx, 30, temperature=0, use_cache=False)
    assert cached.shape == (4, 30)
    assert len(set(cached.flatten().tolist())) > 8  # not a degenerate repeat
    assert torch.equal(cached, recomputed)
    assert cached.dtype == torch.long


def test_generation_past_block_size_slides_the_window_identically():
    # block_size 16, prompt 10, 20 new tokens: the last 14 steps run past block_size,
    # where the cached path must fall back to recomputing the last 16 tokens.
    model = lively_model(block_size=16)
    idx = prompt(batch=2, length=10)
    cached = model.generate(idx, 20, temperature=0)
    recomputed = model.generate(idx, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert len(set(cached.flatten().tolist())) > 8
    # Reference: nanoGPT's crop loop, written out by hand.
    seq = idx
    for _ in range(20):
        logits, _ = model(seq[:, -16:])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq[:, 10:], cached)
    # A prompt longer than block_size is cropped, not rejected.
    long_prompt = prompt(length=40)
    out = model.generate(long_prompt, 3, temperature=0)
    assert torch.equal(out, model.generate(long_prompt[:, -16:], 3, temperature=0))


def test_sampling_with_seeded_generator_is_reproducible():
    model = tiny_model()
    idx = prompt(batch=2, length=4)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate(idx, 25, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(idx, 25, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(idx, 25, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The cache does not change what is sampled either.
    d = model.generate(idx, 25, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, d)


def test_top_k_one_equals_greedy():
    model = lively_model()
    idx = prompt(batch=2, length=6)
    greedy = model.generate(idx, 20, temperature=0)
    g = torch.Generator().manual_seed(0)
    top1 = model.generate(idx, 20, temperature=1.5, top_k=1, generator=g)
    assert torch.equal(greedy, top1)


def test_top_k_and_top_p_only_sample_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    seen_k = {int(sample_next_token(logits, top_k=2, generator=g)) for _ in range(200)}
    assert seen_k == {0, 1}
    # Probabilities ~ [0.64, 0.23, 0.09, ...]: top_p 0.8 keeps the first two only.
    seen_p = {int(sample_next_token(logits, top_p=0.8, generator=g)) for _ in range(200)}
    assert seen_p == {0, 1}
    # A tiny top_p still keeps the most likely token.
    assert {int(sample_next_token(logits, top_p=1e-6, generator=g)) for _ in range(20)} == {0}


def test_generate_stream_yields_the_same_tokens_lazily():
    model = tiny_model()
    idx = prompt(length=3)
    stream = model.generate_stream(idx, 8, temperature=0)
    first = next(stream)
    assert first.shape == (1,)
    rest = list(stream)
    streamed = torch.stack([first, *rest], dim=1)
    assert torch.equal(streamed, model.generate(idx, 8, temperature=0))
    assert model.generate(idx, 0).shape == (1, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"max_new_tokens": -1},
    ],
)
def test_generate_rejects_bad_arguments_at_call_time(kwargs):
    model = tiny_model()
    kw = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError):
        model.generate_stream(prompt(length=2), **kw)  # raises before the first next()


# --- char tokenizer ---------------------------------------------------------------


TEXT = "hello, world!\nthe quick brown fox — ünïcödé 🙂"


def test_char_tokenizer_round_trip():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.vocab_size == len(set(TEXT))
    assert list(tok.chars) == sorted(set(TEXT))
    ids = tok.encode(TEXT)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.decode(torch.tensor(ids)) == TEXT  # tensors of ids work too


def test_char_tokenizer_json_is_canonical_and_deterministic():
    a = CharTokenizer.from_text(TEXT).to_json()
    b = CharTokenizer.from_text("".join(reversed(TEXT)) + TEXT).to_json()
    assert a == b
    assert a.startswith(b'{"chars":[')
    assert a.endswith(b'],"type":"char","version":1}')
    assert b" " not in a.replace(b'" "', b"")  # compact: only the space character itself
    assert "🙂".encode() in a  # UTF-8, not \u escapes
    back = CharTokenizer.from_json(a)
    assert back == CharTokenizer.from_text(TEXT)
    assert back.to_json() == a


def test_char_tokenizer_unknown_character():
    tok = CharTokenizer.from_text("ab c")
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("abxyc")
    assert tok.encode("axb", errors="replace") == tok.encode("a b")
    no_space = CharTokenizer.from_text("abc")
    assert no_space.encode("aZ", errors="replace") == [0, 0]
    with pytest.raises(ValueError, match="errors"):
        tok.encode("a", errors="ignore")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 99])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"chars":["a"],"type":"char"}',
        b'{"chars":["a"],"type":"char","version":1,"extra":0}',
        b'{"chars":["a"],"type":"bpe","version":1}',
        b'{"chars":["a"],"type":"char","version":2}',
        b'{"chars":["a"],"type":"char","version":true}',
        b'{"chars":"ab","type":"char","version":1}',
        b'{"chars":[],"type":"char","version":1}',
        b'{"chars":["ab"],"type":"char","version":1}',
        b'{"chars":[1],"type":"char","version":1}',
        b'{"chars":["a","a"],"type":"char","version":1}',
    ],
)
def test_char_tokenizer_from_json_rejects_bad_input(data):
    with pytest.raises(ValueError):
        CharTokenizer.from_json(data)
