"""A small decoder-only Transformer, in the style of nanoGPT's ``model.py``.

The model is deliberately plain: token and learned position embeddings, a stack of
pre-norm blocks (causal self-attention and a 4x GELU MLP), a final LayerNorm and a
language-model head whose weight *is* the token-embedding weight.

Context length.  Positions are learned, so the model never sees a position at or beyond
``config.block_size``: ``forward`` raises ``ValueError`` when ``start_pos + T`` would
exceed it.  Generation slides a window instead, as nanoGPT does: once the running
sequence is longer than ``block_size`` every step is a full recompute over the last
``block_size`` tokens.  A KV cache cannot help there, because dropping the oldest token
shifts every position (and so every cached key and value), so the cached path falls back
to exactly that recompute and produces the same tokens as ``use_cache=False``.

Sampling is mstore's one sampler (``mstore.runtime.sampling``, re-exported here); nothing
else here depends on the rest of mstore.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from ..runtime.sampling import check_sampling_args, sample_next_token

__all__ = [
    "TransformerConfig",
    "KVCache",
    "CausalSelfAttention",
    "MLP",
    "Block",
    "Transformer",
    "sample_next_token",
]


@dataclass
class TransformerConfig:
    """Shape of a :class:`Transformer`; serialisable with :meth:`to_dict`/:meth:`from_dict`."""

    vocab_size: int  # number of token ids: rows of the embedding, width of the logits
    n_layers: int = 4  # number of Transformer blocks
    d_model: int = 128  # width of the residual stream; must be divisible by n_heads
    n_heads: int = 4  # attention heads per block; each has d_model // n_heads dims
    block_size: int = 256  # longest context (learned positions 0..block_size-1)
    dropout: float = 0.0  # dropout probability, applied only in training mode

    def __post_init__(self) -> None:
        # The one place a config is checked; every message names the offending field.
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"dropout must be a float, got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransformerConfig:
        if not isinstance(d, Mapping):
            raise ValueError(f"TransformerConfig must be a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown TransformerConfig key {key!r}")
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.name not in d:
                raise ValueError(f"TransformerConfig is missing required key {f.name!r}")
        return cls(**d)


class KVCache:
    """Keys and values of every layer, preallocated for ``block_size`` positions.

    ``k[layer]`` and ``v[layer]`` have shape ``(B, n_heads, max_len, head_dim)``; the
    first ``length`` positions are valid.  A forward pass with ``start_pos=p`` over ``T``
    new tokens writes positions ``p..p+T-1`` and sets ``length = p + T``.  ``p`` may be
    less than ``length`` (rewinding overwrites; attention never looks past ``p + T``) but
    not more, since that would leave a hole of unwritten positions.

    The cache is for inference (use it under ``torch.no_grad()``).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_config(
        cls,
        config: TransformerConfig,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        return cls(
            config.n_layers,
            batch_size,
            config.n_heads,
            config.block_size,
            config.head_dim,
            device=device,
            dtype=dtype,
        )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, nh, T, hd) at ``start_pos``; return keys/values 0..start_pos+T."""
        end = start_pos + k.size(2)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.d_model = config.d_model
        self.dropout = config.dropout
        # q, k and v for all heads in one matmul
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
    ) -> torch.Tensor:
        B, T, C = x.size()  # batch, new tokens, d_model
        hd = C // self.n_heads
        q, k, v = self.qkv(x).split(self.d_model, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v, start_pos)  # (B, nh, S, hd), S = start_pos + T

        S = k.size(2)
        # Query i sits at absolute position start_pos + i (when cached, keys start at 0).
        # SDPA's is_causal aligns the mask top-left, which is only right when S == T; a
        # single new token may see every key; otherwise the mask is spelled out.
        attn_mask = None
        is_causal = False
        if S == T:
            is_causal = T > 1
        elif T > 1:
            attn_mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(
                diagonal=S - T
            )  # (T, S): query i sees keys 0..S-T+i
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), kv_cache=kv_cache, layer=layer, start_pos=start_pos)
        x = x + self.mlp(self.ln2(x))
        return x


class Transformer(nn.Module):
    """Decoder-only language model.

    ``init_weights=False`` skips the nanoGPT initialisation pass; it is meant for building
    on the meta device (``with torch.device("meta"): Transformer(cfg, init_weights=False)``)
    before ``load_state_dict(sd, assign=True)`` and :meth:`tie_weights`.  (PyTorch's own
    module constructors still run, which costs nothing on meta.)
    """

    def __init__(self, config: TransformerConfig, init_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        if init_weights:
            self.apply(self._init_weights)
            # Residual projections get a smaller std so that the residual stream's
            # variance does not grow with depth (GPT-2 paper, nanoGPT).
            std = 0.02 / math.sqrt(2 * config.n_layers)
            for name, p in self.named_parameters():
                if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self) -> None:
        """Make ``lm_head.weight`` the very Parameter of ``tok_emb.weight``.

        Call again after ``load_state_dict(..., assign=True)``, which replaces both
        Parameters by separate objects.
        """
        self.lm_head.weight = self.tok_emb.weight

    def tied_weights(self) -> dict[str, str]:
        """State-dict names that alias another entry: ``{alias: source}``."""
        return {"lm_head.weight": "tok_emb.weight"}

    def num_parameters(self) -> int:
        """Distinct parameters (the tied head is counted once)."""
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self, batch_size: int) -> KVCache:
        """An empty cache on this model's device and dtype."""
        w = self.tok_emb.weight
        return KVCache.for_config(self.config, batch_size, device=w.device, dtype=w.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for ``idx`` (B, T) at positions ``start_pos..``.

        ``loss`` is the mean cross-entropy against ``targets`` (B, T), ignoring -100, or
        None.  With ``kv_cache`` only the new tokens are processed and attend to the
        cached positions ``0..start_pos-1`` as well.
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.size()
        if T == 0:
            raise ValueError("idx must hold at least one token")
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if start_pos + T > self.config.block_size:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} exceed block_size "
                f"{self.config.block_size}"
            )
        if kv_cache is not None:
            if kv_cache.batch_size != B:
                raise ValueError(f"kv_cache holds batch size {kv_cache.batch_size}, idx has {B}")
            if start_pos > kv_cache.length:
                raise ValueError(
                    f"start_pos {start_pos} is past the end of the kv_cache ({kv_cache.length})"
                )

        pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=kv_cache, layer=i, start_pos=start_pos)  # (B, T, C)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        if kv_cache is not None:
            kv_cache.length = start_pos + T

        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    def generate_stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Iterator[torch.Tensor]:
        """Yield ``max_new_tokens`` new token ids, each a (B,) int64 tensor, as they come.

        ``idx`` (B, T) is the prompt.  The model is used in whatever mode it is in; call
        ``eval()`` first unless dropout noise is wanted.  See the module docstring for what
        happens past ``block_size``.
        """
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        n_new = max_new_tokens
        if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_sampling_args(temperature, top_k, top_p)
        # Arguments are checked above, at call time; the loop runs lazily, under no_grad.
        return self._stream(idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache)

    @torch.no_grad()
    def _stream(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        generator: torch.Generator | None,
        use_cache: bool,
    ) -> Iterator[torch.Tensor]:
        block_size = self.config.block_size
        seq = idx
        cache: KVCache | None = None
        for _ in range(max_new_tokens):
            n = seq.size(1)
            if use_cache and n <= block_size:
                if cache is None:  # prefill with the whole prompt
                    cache = self.new_kv_cache(seq.size(0))
                    logits, _ = self(seq, kv_cache=cache, start_pos=0)
                else:  # decode: only the newest token; the rest is in the cache
                    logits, _ = self(seq[:, -1:], kv_cache=cache, start_pos=n - 1)
            else:
                # Full recompute over the last block_size tokens (nanoGPT's crop).
                logits, _ = self(seq[:, -block_size:])
            next_id = sample_next_token(
                logits[:, -1, :],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
            )  # (B,)
            seq = torch.cat((seq, next_id.unsqueeze(1)), dim=1)  # (B, n + 1)
            yield next_id

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """New token ids (B, max_new_tokens), prompt excluded; see :meth:`generate_stream`."""
        steps = list(
            self.generate_stream(
                idx,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                use_cache=use_cache,
            )
        )
        if not steps:
            return torch.empty((idx.size(0), 0), dtype=torch.long, device=idx.device)
        return torch.stack(steps, dim=1)
