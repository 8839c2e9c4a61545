"""The custom-transformer adapter: mstore's own small Transformer with a character tokenizer.

A manifest of this architecture holds config.json (the `TransformerConfig` fields plus
`model_type`), `tokenizer.json` (the character vocabulary) and the module's tensors, with
`lm_head.weight` tied to `tok_emb.weight` and stored once.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .. import torch_io
from ..errors import ObjectCorrupt
from ..nn.char_tokenizer import CharTokenizer
from ..nn.transformer import Transformer, TransformerConfig
from .base import Adapter, Checkpoint, Tokenizer

ARCHITECTURE = "custom-transformer"
TOKENIZER_FILE = "tokenizer.json"


class CharTokenizerAdapter(Tokenizer):
    def __init__(self, tok: CharTokenizer):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, errors="replace")

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size


def config_bytes(cfg: TransformerConfig) -> bytes:
    return json.dumps({"model_type": ARCHITECTURE, **cfg.to_dict()}, sort_keys=True,
                      indent=2).encode() + b"\n"


def new_model(cfg: TransformerConfig, seed: int) -> Transformer:
    """A freshly initialised model (training from scratch), seeded for reproducibility."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Transformer(cfg)
    finally:
        torch.random.set_rng_state(gen_state)


class CustomTransformerAdapter(Adapter):
    architectures = (ARCHITECTURE,)

    def get_config(self) -> dict[str, Any]:
        return json.loads(self.store.objects.read_bytes(self.manifest.config))

    def transformer_config(self) -> TransformerConfig:
        d = self.get_config()
        d.pop("model_type", None)
        try:
            return TransformerConfig.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ObjectCorrupt(self.manifest.config, f"bad custom-transformer config: {e}",
                                "config") from None

    def load_checkpoint(self, device: str = "cpu", dtype: torch.dtype | None = None,
                        verify: bool = False) -> torch.nn.Module:
        cfg = self.transformer_config()
        with torch.device("meta"):
            model = Transformer(cfg, init_weights=False)
        state = torch_io.load_state_dict(self.store.objects, self.manifest.tensors, verify)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ObjectCorrupt(self.commit or "?", f"manifest lacks tensors {missing[:3]}",
                                "manifest")
        if dtype is not None:
            model = model.to(dtype=dtype)
        return model.to(device).eval()

    def forward(self, model, input_ids, labels=None):
        logits, _ = model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return logits, loss

    def save_checkpoint(self, model) -> Checkpoint:
        tied = model.tied_weights()
        tensors = {k: v for k, v in model.state_dict().items() if k not in tied}
        return Checkpoint(tensors=tensors, config=config_bytes(model.config),
                          tied_weights=tied)

    def tokenizer(self) -> Tokenizer:
        oid = self.manifest.files.get(TOKENIZER_FILE)
        if oid is None:
            raise ObjectCorrupt(self.commit or "?", "no tokenizer.json in the manifest",
                                "manifest")
        try:
            return CharTokenizerAdapter(CharTokenizer.from_json(self.store.objects.read_bytes(oid)))
        except ValueError as e:
            raise ObjectCorrupt(oid, f"bad character vocabulary: {e}", "file object") from None

    def tokenizer_from_files(self, files: dict[str, bytes]) -> Tokenizer:
        from ..errors import ConfigError

        try:
            return CharTokenizerAdapter(CharTokenizer.from_json(files[TOKENIZER_FILE]))
        except (KeyError, ValueError):
            raise ConfigError("config key 'tokenizer': the custom transformer takes a "
                              "character vocabulary (the tokenizer.json of a "
                              "custom-transformer model)") from None

    def vocab_rows(self, model) -> int:
        return model.config.vocab_size

    def generate_stream(self, model, input_ids, max_new_tokens, temperature, top_k, top_p,
                        generator, eos_token_ids) -> Iterator[int]:
        for tok in model.generate_stream(input_ids, max_new_tokens, temperature=temperature,
                                         top_k=top_k, top_p=top_p, generator=generator):
            yield int(tok[0])
