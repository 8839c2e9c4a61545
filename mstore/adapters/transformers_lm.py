"""Causal LMs through transformers' native classes: the base of the Hugging Face adapters.

Loading never allocates random weights and never runs remote code: the module is built on
the meta device from config.json (`AutoModelForCausalLM.from_config`, trust_remote_code
off), then the tensors, mmapped from their objects (`torch_io.load_state_dict`), are
attached as `from_pretrained` would (see `transformers_loading`), so the logits are
bit-identical to `from_pretrained`'s. Saving goes the other way (`revert_weight_conversion`,
what `save_pretrained` uses): the checkpoint layout of the Hub, so that an untouched tensor
of a fine-tune hashes to its parent's object.

A family adapter subclasses `TransformersAdapter` with its `architectures` (config.json
`model_type` values transformers knows) and its own `check_tensors` (the tensor layout its
config implies); everything else is shared. torch and transformers are imported inside the
methods: this module is imported (through the entry points) by commands that must stay
light.
"""

from __future__ import annotations

import inspect
import json
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import ConfigMismatch, MStoreError
from .base import Adapter, Checkpoint, Tokenizer
from .checks import check_hf_tokenizer
from .transformers_loading import (
    attach, dominant_dtype, model_device, named_tensors, place, rebuild_buffers, same_tensor,
    tie,
)

if TYPE_CHECKING:
    import torch

    from ..store.manifest import Manifest
    from ..store.repo import Store


class TransformersAdapter(Adapter):
    """A transformers causal LM (`AutoModelForCausalLM`) whose checkpoint is the Hub's."""

    #: the input embedding in the checkpoint layout (its rows bound the tokenizer's ids)
    input_embedding = "model.embed_tokens.weight"
    #: checkpoint names tied when config.json has `tie_word_embeddings` (target -> source)
    tied_pairs: dict[str, str] = {"lm_head.weight": "model.embed_tokens.weight"}
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    peft_task_type = "CAUSAL_LM"

    def __init__(self, store: "Store", manifest: "Manifest", commit: str | None = None):
        super().__init__(store, manifest, commit)
        self._config_bytes: bytes | None = None
        self._tokenizer: HFTokenizer | None = None

    # -- checks and import rules (torch-free) -------------------------------------------
    @classmethod
    def check_tokenizer(cls, config, files, tensors, where: str) -> None:
        embed = tensors.get(cls.input_embedding)
        check_hf_tokenizer(files, embed[1][0] if embed else None, where)

    @classmethod
    def tie_rules(cls, config) -> dict[str, str]:
        """`tied_pairs` when config.json says `tie_word_embeddings` (transformers' default:
        false), as `from_pretrained` ties them."""
        return dict(cls.tied_pairs) if config.get("tie_word_embeddings", False) else {}

    @classmethod
    def linear_weights(cls, config: dict) -> dict[str, tuple[int, ...]]:
        """The `nn.Linear` weights of the module transformers builds from config.json (on
        the meta device: nothing allocated), the output head left out. MoE experts fused
        into one parameter are no `nn.Linear`: they stay as they are."""
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        with torch.device("meta"), no_init_weights():
            model = AutoModelForCausalLM.from_config(cls._config_class(config),
                                                     trust_remote_code=False)
        head = model.get_output_embeddings()
        return {f"{name}.weight": tuple(m.weight.shape) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and m is not head}

    @staticmethod
    def _config_class(config: dict):
        from transformers import CONFIG_MAPPING

        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise MStoreError(f"transformers has no config class for {model_type!r}")
        return CONFIG_MAPPING[model_type].from_dict(config)

    # -- config -----------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        """config.json exactly as the manifest holds it (re-hashed on read)."""
        if self._config_bytes is None:
            self._config_bytes = self.store.objects.read_bytes(self.manifest.config, verify=True)
        return self._config_bytes

    def get_config(self) -> dict[str, Any]:
        return json.loads(self.config_bytes())

    def _hf_config(self):
        """transformers' config class for the model type, from the (re-hashed) config.json;
        the native class only, never code from the checkpoint."""
        from huggingface_hub.errors import StrictDataclassError
        from transformers import CONFIG_MAPPING

        config = self.get_config()
        model_type = config.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise MStoreError(f"transformers has no config class for {model_type!r}")
        try:
            return CONFIG_MAPPING[model_type].from_dict(config)
        except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ConfigMismatch(f"commit {(self.commit or '?')[:12]}",
                                 f"transformers refuses config.json ({type(e).__name__}: "
                                 f"{first})") from None

    # -- model ------------------------------------------------------------------------
    def load_checkpoint(self, device: "str | torch.device" = "cpu",
                        dtype: "torch.dtype | None" = None,
                        verify: bool = False) -> "torch.nn.Module":
        import torch
        from transformers import AutoModelForCausalLM

        # Objects first: a missing, truncated or (with verify) corrupt one fails before any
        # model code runs. config.json is small: always re-hashed. Then config and tensor
        # table must agree (a store from an older mstore was not checked at import).
        self.config_bytes()
        self.check_manifest()
        state = self.load_state(verify, dtype)
        from transformers.initialization import no_init_weights

        config = self._hf_config()
        with torch.device("meta"), no_init_weights():  # no random init, even on meta
            model = AutoModelForCausalLM.from_config(
                config, dtype=dominant_dtype(state), trust_remote_code=False)
        missing = attach(model, state, set(self.manifest.tied_weights))
        del state
        tie(model, self.manifest.tied_weights, missing)
        rebuild_buffers(model)
        on_meta = [n for n, t in named_tensors(model) if t.is_meta]
        if on_meta:
            raise MStoreError(f"model {self.manifest.model_id}: no value for {', '.join(on_meta[:5])}"
                              + (f" (and {len(on_meta) - 5} more)" if len(on_meta) > 5 else ""))
        place(model, torch.device(device), dtype)
        if dtype is not None:
            model.config.dtype = dtype  # as from_pretrained(dtype=...) leaves it
        model.eval()
        return model

    def forward(self, model: "torch.nn.Module", input_ids: "torch.Tensor",
                labels: "torch.Tensor | None" = None) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        out = model(input_ids=input_ids, labels=labels, use_cache=False)
        return out.logits, out.loss

    def save_checkpoint(self, model: "torch.nn.Module") -> Checkpoint:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, model.state_dict())
        tied: dict[str, str] = {}
        for target, source in self.manifest.tied_weights.items():
            t, s = state.get(target), state.get(source)
            if s is None:
                continue
            if t is None or same_tensor(t, s):
                state.pop(target, None)
                tied[target] = source
            # else: the tie was broken (both trained apart): keep both, record no tie
        tensors = {k: v.detach() for k, v in state.items()}
        return Checkpoint(tensors=tensors, config=self.config_bytes(), files={}, tied_weights=tied)

    # -- tokenizer --------------------------------------------------------------------
    def tokenizer(self) -> "HFTokenizer":
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            with self.materialised_files() as folder:
                # Fully loaded in memory here: nothing reads the (temporary) folder later.
                try:
                    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
                except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
                    from ..errors import BadTokenizer

                    first = (str(e).strip().splitlines() or [""])[0][:160]
                    raise BadTokenizer(f"commit {(self.commit or '?')[:12]}",
                                       f"transformers cannot load the tokenizer "
                                       f"({type(e).__name__}: {first})") from None
            self._tokenizer = HFTokenizer(tok, self._eos_token_ids(tok))
        return self._tokenizer

    def tokenizer_from_files(self, files: dict[str, bytes]) -> "HFTokenizer":
        import tempfile
        from pathlib import Path

        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory(prefix="mstore-tokenizer-") as tmp:
            folder = Path(tmp)
            (folder / "config.json").write_bytes(self.config_bytes())
            for name, data in files.items():
                (folder / name).write_bytes(data)
            try:
                tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
                from ..errors import ConfigError

                raise ConfigError(f"config key 'tokenizer': transformers cannot load it "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
                    from None
        return HFTokenizer(tok, self._eos_token_ids(tok))

    def vocab_rows(self, model: "torch.nn.Module") -> int:
        return model.get_input_embeddings().num_embeddings

    def _eos_token_ids(self, tok) -> list[int]:
        oid = self.manifest.files.get("generation_config.json")
        if oid is not None:
            try:
                eos = json.loads(self.store.objects.read_bytes(oid, verify=True)).get("eos_token_id")
            except (ValueError, AttributeError):
                eos = None
            if eos is not None:
                return _as_id_list(eos)
        if tok.eos_token_id is not None:
            return [int(tok.eos_token_id)]
        return _as_id_list(self.get_config().get("eos_token_id"))

    # -- generation -------------------------------------------------------------------
    def generate_stream(self, model: "torch.nn.Module", input_ids: "torch.Tensor",
                        max_new_tokens: int, temperature: float, top_k: int | None,
                        top_p: float | None, generator: "torch.Generator | None",
                        eos_token_ids: list[int]) -> Iterator[int]:
        """Incremental decode with the model's KV cache; yields each new token id.

        Stops after `max_new_tokens` or at an eos id (which is not yielded). Each step
        runs under `torch.inference_mode()` (no_grad for a quantized child); the caller's code
        between two tokens does not.
        """
        import torch

        from ..runtime.sampling import check_sampling_args, sample_next_token

        check_sampling_args(temperature, top_k, top_p)
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.size(0) != 1 or ids.size(1) == 0:
            raise ValueError(f"generate_stream takes one non-empty prompt, got shape {list(ids.shape)}")
        device = model_device(model)
        ids = ids.to(device=device, dtype=torch.long)
        eos = {int(e) for e in (eos_token_ids or [])}
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns)
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        # optimum-quanto's tensors (a quantized child) make new tensors of their own class in
        # some kernels, which inference mode forbids: no_grad for them
        quantized = any(type(p).__module__.startswith("optimum.quanto") for p in model.parameters())
        step_mode = torch.no_grad if quantized else torch.inference_mode
        past = None
        for _step in range(max_new_tokens):
            with step_mode():
                if past is None:  # prefill: the whole prompt, logits of its last position only
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                else:
                    out = model(input_ids=ids, use_cache=True, **{cache_name: past})
                past = out[cache_name]
                logits = out.logits[:, -1, :].float()
                token = int(sample_next_token(logits, temperature=temperature, top_k=top_k,
                                              top_p=top_p, generator=generator)[0])
            if token in eos:
                return
            yield token
            ids = torch.tensor([[token]], dtype=torch.long, device=device)


class HFTokenizer(Tokenizer):
    """transformers' tokenizer behind mstore's Tokenizer interface."""

    def __init__(self, tok, eos_token_ids: list[int]):
        self.hf = tok
        self._eos = list(eos_token_ids)

    def encode(self, text: str) -> list[int]:
        # Exactly `tokenizer(text)["input_ids"]` (what transformers' generate examples feed
        # the model); verbose=False: long training texts are not an error here.
        return list(self.hf(text, verbose=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # added/special tokens included: the largest id + 1

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    @property
    def native(self):
        return self.hf

    def apply_chat_template(self, prompt: str) -> str:
        if not getattr(self.hf, "chat_template", None):
            return prompt
        return self.hf.apply_chat_template([{"role": "user", "content": prompt}],
                                           add_generation_prompt=True, tokenize=False)


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]

