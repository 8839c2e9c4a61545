"""Picking the next token from logits: the one sampler every adapter's `generate_stream` uses.

Greedy at temperature 0; otherwise temperature, then top-k, then top-p (nucleus), then one
draw with the caller's `torch.Generator`, so a seed gives the same tokens on every run. One
implementation, so `--temperature/--top-k/--top-p/--seed` mean the same for every
architecture.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_sampling_args", "sample_next_token"]


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError unless temperature is a finite number >= 0, top_k a positive int or None
    and top_p in (0, 1] or None."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1
    ):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` (B, V); returns (B,) int64 on the logits' device.

    ``temperature == 0`` is greedy (argmax; top_k/top_p are then irrelevant). Otherwise the
    float32 logits are divided by the temperature, cut to the ``top_k`` largest and to the
    smallest set whose probability reaches ``top_p`` (the most likely token always
    survives), and one token is drawn with ``generator`` (on its own device if that differs).
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature  # (B, V); a new tensor
    cut_k = top_k is not None and top_k < logits.size(-1)
    cut_p = top_p is not None and top_p < 1.0
    if cut_k or cut_p:
        # A stable sort ranks equal logits (common: bf16 logits tie) by index, as argmax
        # does, so top_k=1 keeps exactly the greedy token.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        if cut_k:
            sorted_logits[:, top_k:] = -math.inf
        if cut_p:
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass.
            drop = (probs.cumsum(dim=-1) - probs) >= top_p  # column 0 is never dropped
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    device = probs.device
    if generator is not None and generator.device != device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1).to(device)
