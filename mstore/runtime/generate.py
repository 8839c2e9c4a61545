"""`mstore generate`: resolve a ref, load it through its adapter (an adapter child: its base
with the LoRA layers injected), stream text as it comes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InvalidSetting, MStoreError
from ..store.repo import Store
from .lora import load_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str = "auto") -> str:
    """cuda if available, else mps, else cpu (an explicit request must be available)."""
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise MStoreError("device 'cuda' requested but torch sees no CUDA device")
    if requested == "mps" and not (getattr(torch.backends, "mps", None)
                                   and torch.backends.mps.is_available()):
        raise MStoreError("device 'mps' requested but it is not available")
    if requested not in ("cpu", "cuda", "mps"):
        raise MStoreError(f"unknown device {requested!r} (auto, cpu, cuda, mps)")
    return requested


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise MStoreError(f"unknown dtype {name!r} (float32, bfloat16, float16)")
    return DTYPES[name]


@dataclass
class GenerateOptions:
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    chat: bool = False
    verify: bool = False
    device: str = "auto"
    dtype: str | None = None


def generate_text(store: Store, ref: str, prompt: str, opts: GenerateOptions,
                  on_text: Callable[[str], None] = lambda s: None) -> str:
    """Generate and return the completion; `on_text` receives it piece by piece."""
    if opts.temperature < 0:
        raise InvalidSetting("temperature", ">= 0")
    if opts.top_p is not None and not 0 < opts.top_p <= 1:
        raise InvalidSetting("top_p", "in (0, 1]")
    if opts.top_k is not None and opts.top_k < 1:
        raise InvalidSetting("top_k", ">= 1")
    resolved = store.resolve(ref)
    device = pick_device(opts.device)
    loaded = load_model(store, resolved.commit, device=device, dtype=parse_dtype(opts.dtype),
                        verify=opts.verify)
    adapter, model = loaded.adapter, loaded.runnable
    tok = adapter.tokenizer()
    text = tok.apply_chat_template(prompt) if opts.chat else prompt
    ids = tok.encode(text)
    if not ids:
        raise MStoreError("the prompt encodes to no tokens")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    generator = None
    if opts.seed is not None:
        generator = torch.Generator(device=device).manual_seed(opts.seed)
    new: list[int] = []
    printed = ""
    for token in adapter.generate_stream(model, input_ids, opts.max_new_tokens,
                                         opts.temperature, opts.top_k, opts.top_p, generator,
                                         tok.eos_token_ids):
        new.append(token)
        full = tok.decode(new)
        if full.endswith("\ufffd") or not full.startswith(printed):
            continue  # half a character, or decoding rewrote the tail: wait for more
        on_text(full[len(printed):])
        printed = full
    final = tok.decode(new)
    if final.startswith(printed) and final != printed:
        on_text(final[len(printed):])
    return final
