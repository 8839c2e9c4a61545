"""The custom-transformer adapter: mstore's own small Transformer with a character tokenizer.

A manifest of this architecture holds config.json (the `TransformerConfig` fields plus
`model_type`), `tokenizer.json` (the character vocabulary) and the module's tensors, with
`lm_head.weight` tied to `tok_emb.weight` and stored once. It is what `model_name: null`
trains from scratch (`from_scratch`), and only mstore creates it: import refuses it.

torch is imported inside the functions: import and export ask this class questions
(`importable`, `default_generation_config`) without loading torch.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ..errors import BadTokenizer, ConfigError, ConfigMismatch, ObjectCorrupt
from ..nn.char_tokenizer import CharTokenizer
from .base import Adapter, Checkpoint, ScratchModel, Tokenizer
from .checks import Expected, match_tensors

if TYPE_CHECKING:
    import torch

    from ..nn.transformer import Transformer, TransformerConfig

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


def config_bytes(cfg: "TransformerConfig") -> bytes:
    return json.dumps({"model_type": ARCHITECTURE, **cfg.to_dict()}, sort_keys=True,
                      indent=2).encode() + b"\n"


def new_model(cfg: "TransformerConfig", seed: int) -> "Transformer":
    """A freshly initialised model (training from scratch), seeded for reproducibility."""
    import torch

    from ..nn.transformer import Transformer

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Transformer(cfg)
    finally:
        torch.random.set_rng_state(gen_state)


def expected_tensors(cfg: "TransformerConfig"):
    """The module's state dict without the tied lm_head, as `save_checkpoint` stores it."""
    d, v = cfg.d_model, cfg.vocab_size
    D = f"d_model={d}"
    yield Expected("tok_emb.weight", (v, d), f"vocab_size={v}, {D}")
    yield Expected("pos_emb.weight", (cfg.block_size, d), f"block_size={cfg.block_size}, {D}")
    for i in range(cfg.n_layers):
        b, L = f"blocks.{i}.", f"block {i} of n_layers={cfg.n_layers}, {D}"
        for name, shape in (("ln1.weight", (d,)), ("ln1.bias", (d,)),
                            ("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
                            ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                            ("ln2.weight", (d,)), ("ln2.bias", (d,)),
                            ("mlp.fc.weight", (4 * d, d)), ("mlp.fc.bias", (4 * d,)),
                            ("mlp.proj.weight", (d, 4 * d)), ("mlp.proj.bias", (d,))):
            yield Expected(b + name, shape, L)
    yield Expected("ln_f.weight", (d,), D)
    yield Expected("ln_f.bias", (d,), D)
    yield Expected("lm_head.weight", (v, d), f"vocab_size={v}, {D}", required=False)


def _config_of(config: dict, where: str) -> "TransformerConfig":
    from ..nn.transformer import TransformerConfig

    d = dict(config) if isinstance(config, dict) else config
    if isinstance(d, dict):
        d.pop("model_type", None)
    try:
        return TransformerConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ConfigMismatch(where, f"config.json: {e}") from None


class CustomTransformerAdapter(Adapter):
    architectures = (ARCHITECTURE,)
    importable = False
    scratch_stem = ARCHITECTURE
    scratch_model_id = "custom"
    scratch_title = "custom transformer"
    lora_targets = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")

    @classmethod
    def from_scratch(cls, store, arch: Mapping[str, Any], seed: int, texts: Sequence[str],
                     tokenizer_files: Mapping[str, bytes]) -> ScratchModel:
        """A character vocabulary of the texts (or the override's tokenizer.json), and a
        Transformer of `arch` (n_layers, d_model, n_heads, dropout, block_size) over it."""
        from ..nn.transformer import TransformerConfig

        adapter = cls(store, None)  # no manifest yet: a new root
        if tokenizer_files:
            tok = adapter.tokenizer_from_files(dict(tokenizer_files))
            files = {TOKENIZER_FILE: tokenizer_files[TOKENIZER_FILE]}
        else:
            tok = CharTokenizerAdapter(CharTokenizer.from_text("".join(texts)))
            files = {TOKENIZER_FILE: tok.tok.to_json()}
        cfg = TransformerConfig(vocab_size=tok.vocab_size, **arch)
        return ScratchModel(adapter, new_model(cfg, seed), tok, files,
                            rebuild=lambda: new_model(cfg, seed))

    @classmethod
    def default_generation_config(cls, config: dict) -> dict | None:
        return None  # transformers cannot load this model: no generation_config.json

    @classmethod
    def check_tensors(cls, config, tensors, where: str) -> None:
        match_tensors(expected_tensors(_config_of(config, where)), tensors, where, ARCHITECTURE)

    @classmethod
    def check_tokenizer(cls, config, files, tensors, where: str) -> None:
        """The character vocabulary loads and has no more ids than the embedding rows."""
        embed = tensors.get("tok_emb.weight")
        vocab_rows = embed[1][0] if embed else None
        data = files.get(TOKENIZER_FILE)
        if data is None:
            raise BadTokenizer(where, f"no {TOKENIZER_FILE} (the character vocabulary)")
        try:
            tok = CharTokenizer.from_json(data)
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError included
            raise BadTokenizer(where, f"{TOKENIZER_FILE} is not a character vocabulary "
                               f"({str(e).splitlines()[0][:120]})") from None
        if vocab_rows is not None and tok.vocab_size > vocab_rows:
            raise BadTokenizer(where, f"{TOKENIZER_FILE} has {tok.vocab_size} characters but "
                               f"the embedding has {vocab_rows} rows: the vocabulary does not fit")

    @classmethod
    def linear_weights(cls, config: dict) -> dict[str, tuple[int, ...]]:
        """Every block's qkv, attention output and MLP weights (the tied lm_head is the
        embedding, kept as it is)."""
        cfg = _config_of(config, "config.json")
        return {e.name: tuple(e.shape) for e in expected_tensors(cfg)
                if e.name.startswith("blocks.") and len(e.shape) == 2}

    def get_config(self) -> dict[str, Any]:
        return json.loads(self.store.objects.read_bytes(self.manifest.config))

    def context_length(self) -> int | None:
        return self.transformer_config().block_size

    def transformer_config(self) -> "TransformerConfig":
        from ..nn.transformer import TransformerConfig

        d = self.get_config()
        d.pop("model_type", None)
        try:
            return TransformerConfig.from_dict(d)
        except (ValueError, TypeError) as e:
            raise ObjectCorrupt(self.manifest.config, f"bad custom-transformer config: {e}",
                                "config") from None

    def load_checkpoint(self, device: str = "cpu", dtype: "torch.dtype | None" = None,
                        verify: bool = False) -> "torch.nn.Module":
        import torch

        from ..nn.transformer import Transformer

        cfg = self.transformer_config()
        self.check_manifest()
        with torch.device("meta"):
            model = Transformer(cfg, init_weights=False)
        state = self.load_state(verify, dtype)
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
        import torch.nn.functional as F

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
            tok = CharTokenizer.from_json(self.store.objects.read_bytes(oid))
        except ValueError as e:
            raise ObjectCorrupt(oid, f"bad character vocabulary: {e}", "file object") from None
        rows = self.transformer_config().vocab_size
        if tok.vocab_size > rows:
            raise BadTokenizer(f"commit {(self.commit or '?')[:12]}",
                               f"{TOKENIZER_FILE} has {tok.vocab_size} characters but the "
                               f"embedding has {rows} rows: the vocabulary does not fit")
        return CharTokenizerAdapter(tok)

    def tokenizer_from_files(self, files: dict[str, bytes]) -> Tokenizer:
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
