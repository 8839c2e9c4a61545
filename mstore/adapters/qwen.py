"""The Qwen family (Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE) through transformers' native classes.

Loading never allocates random weights and never runs remote code: the module is built on
the meta device from config.json (`AutoModelForCausalLM.from_config`, trust_remote_code
off), then the tensors, mmapped from their objects (`torch_io.load_state_dict`), are
attached through transformers' own loader (`convert_and_load_state_dict_in_model`, what
`from_pretrained` uses) with the model's weight-conversion mapping. A dense tensor is
attached as it is (assign, no copy: its storage is the object file's page cache); for the
MoE models the mapping fuses the per-expert checkpoint tensors (`experts.3.gate_proj.weight`)
into `experts.gate_up_proj` / `experts.down_proj`, which necessarily copies those.
Tied weights are re-tied, and the buffers no checkpoint holds (rotary `inv_freq`,
`original_inv_freq`) are recomputed in float32 exactly as transformers' init does, so the
logits are bit-identical to `from_pretrained`'s.

Saving goes the other way (`revert_weight_conversion`, what `save_pretrained` uses): the
checkpoint layout of the Hub, per-expert keys included, so that an untouched tensor of a
fine-tune hashes to its parent's object.

torch and transformers are imported inside the methods: this module is imported (through
the entry point) by commands that must stay light.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import ConfigMismatch, MStoreError
from .base import Adapter, Checkpoint, Tokenizer
from .checks import ConfigReader, Expected, check_hf_tokenizer, match_tensors

if TYPE_CHECKING:
    import torch

    from ..store.manifest import Manifest
    from ..store.repo import Store


class QwenAdapter(Adapter):
    architectures = ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe")

    def __init__(self, store: "Store", manifest: "Manifest", commit: str | None = None):
        super().__init__(store, manifest, commit)
        self._config_bytes: bytes | None = None
        self._tokenizer: HFTokenizer | None = None

    # -- checks (torch-free) ------------------------------------------------------------
    @classmethod
    def check_tensors(cls, config, tensors, where: str) -> None:
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type not in QwenAdapter.architectures:
            return  # a subclass's architecture (docs/adapters.md): its own check, if any
        match_tensors(expected_tensors(config, where), tensors, where, model_type)

    @classmethod
    def check_tokenizer(cls, config, files, tensors, where: str) -> None:
        embed = tensors.get("model.embed_tokens.weight")
        check_hf_tokenizer(files, embed[1][0] if embed else None, where)

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

        from ..runtime import torch_io

        # Objects first: a missing, truncated or (with verify) corrupt one fails before any
        # model code runs. config.json is small: always re-hashed. Then config and tensor
        # table must agree (a store from an older mstore was not checked at import).
        self.config_bytes()
        self.check_manifest()
        state = torch_io.load_state_dict(self.store.objects, self.manifest.tensors, verify)
        from transformers.initialization import no_init_weights

        config = self._hf_config()
        with torch.device("meta"), no_init_weights():  # no random init, even on meta
            model = AutoModelForCausalLM.from_config(
                config, dtype=_dominant_dtype(state), trust_remote_code=False)
        missing = _attach(model, state, set(self.manifest.tied_weights))
        del state
        _tie(model, self.manifest.tied_weights, missing)
        _rebuild_buffers(model)
        on_meta = [n for n, t in _named_tensors(model) if t.is_meta]
        if on_meta:
            raise MStoreError(f"model {self.manifest.model_id}: no value for {', '.join(on_meta[:5])}"
                              + (f" (and {len(on_meta) - 5} more)" if len(on_meta) > 5 else ""))
        _place(model, torch.device(device), dtype)
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
            if t is None or _same_tensor(t, s):
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
        runs under `torch.inference_mode()`; the caller's code between two tokens does not.
        """
        import torch

        _check_sampling(temperature, top_k, top_p)
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.size(0) != 1 or ids.size(1) == 0:
            raise ValueError(f"generate_stream takes one non-empty prompt, got shape {list(ids.shape)}")
        device = _model_device(model)
        ids = ids.to(device=device, dtype=torch.long)
        eos = {int(e) for e in (eos_token_ids or [])}
        # transformers 5.x renamed `past_key_values` to `cache` (the old name warns)
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"
        past = None
        for _step in range(max_new_tokens):
            with torch.inference_mode():
                if past is None:  # prefill: the whole prompt, logits of its last position only
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                else:
                    out = model(input_ids=ids, use_cache=True, **{cache_name: past})
                past = out[cache_name]
                logits = out.logits[:, -1, :].float()
                token = _next_token(logits, temperature, top_k, top_p, generator)
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


# -- loading helpers -------------------------------------------------------------------
def _named_tensors(model) -> Iterator[tuple[str, "torch.Tensor"]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _dominant_dtype(state: dict[str, "torch.Tensor"]):
    """The floating dtype holding most of the checkpoint's elements (the model's dtype)."""
    import torch

    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


@contextlib.contextmanager
def _quiet_loading_bar():
    """transformers' loader shows a "Loading weights" bar; loading from the store should not.

    `convert_and_load_state_dict_in_model` has no per-call switch for it: it makes the bar
    through `transformers.utils.logging.tqdm`, whose one public way in is the process-wide
    `set_tqdm_hook` (it returns the hook it replaces). So the hook is set around this one
    call and the previous hook put back, even on error; only a load in another thread at
    the same moment would lose its bar too. This is the one place mstore touches it."""
    from transformers.utils import logging as tf_logging

    def no_bar(factory, args, kwargs):
        return tf_logging.EmptyTqdm(*args, **kwargs)

    previous = tf_logging.set_tqdm_hook(no_bar)
    try:
        yield
    finally:
        tf_logging.set_tqdm_hook(previous)


def _attach(model, state: dict[str, "torch.Tensor"], tied: set[str]) -> set[str]:
    """Put the checkpoint tensors into the meta model the way `from_pretrained` does.

    When every checkpoint name is a name of the module (dense models), the tensors are
    assigned directly: the mmapped objects become the parameters, no copy, no per-tensor
    thread-pool job. Otherwise (MoE: per-expert tensors fused by the model's conversion
    mapping) transformers' own loader does it. Returns the model's keys the checkpoint did
    not hold (tied ones only, else it raises).
    """
    modules = dict(model.named_modules())
    slots = {}  # name -> (module, leaf, is_parameter)
    for mod_name, module in modules.items():
        prefix = f"{mod_name}." if mod_name else ""
        for leaf, p in module._parameters.items():
            if p is not None:
                slots[prefix + leaf] = (module, leaf, True)
        for leaf, b in module._buffers.items():
            if b is not None and leaf not in module._non_persistent_buffers_set:
                slots[prefix + leaf] = (module, leaf, False)
    if not all(k in slots for k in state):
        return _attach_converted(model, state, tied)
    missing = set(slots) - set(state)
    unknown = sorted(missing - tied - _tied_keys(model))
    if unknown:
        raise MStoreError("the manifest's tensors do not fit the architecture: missing "
                          + ", ".join(unknown[:5]))
    import torch

    # load_state_dict(assign=True) without its per-module machinery: the same checks
    # (shape), the same result (the object tensors become the parameters).
    for name, tensor in state.items():
        module, leaf, is_param = slots[name]
        old = module._parameters[leaf] if is_param else module._buffers[leaf]
        if old.shape != tensor.shape:
            raise MStoreError(f"the manifest's tensors do not fit the architecture: {name} "
                              f"has shape {list(tensor.shape)}, the model wants "
                              f"{list(old.shape)}")
        if is_param:
            module._parameters[leaf] = torch.nn.Parameter(tensor,
                                                          requires_grad=old.requires_grad)
        else:
            module._buffers[leaf] = tensor
    return missing


def _tied_keys(model) -> set[str]:
    return set(getattr(model, "all_tied_weights_keys", {}) or {})


def _attach_converted(model, state: dict[str, "torch.Tensor"], tied: set[str]) -> set[str]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    load_config = LoadStateDictConfig(device_map={"": "cpu"}, dtype=None,
                                      weight_mapping=get_model_conversion_mapping(model))
    with _quiet_loading_bar():
        info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
    tied_targets = tied | _tied_keys(model)
    problems = []
    missing = sorted(set(info.missing_keys) - tied_targets)
    if missing:
        problems.append(f"missing {', '.join(missing[:5])}")
    if info.unexpected_keys:
        problems.append(f"unexpected {', '.join(sorted(info.unexpected_keys)[:5])}")
    if info.mismatched_keys:
        k, got, want = sorted(info.mismatched_keys)[0]
        problems.append(f"{k} has shape {list(got)}, the model wants {list(want)}")
    for k, err in list(info.conversion_errors.items())[:3]:
        problems.append(f"cannot convert {k}: {err}")
    problems.extend(info.error_msgs[:3])
    if problems:
        raise MStoreError("the manifest's tensors do not fit the architecture: " + "; ".join(problems))
    return set(info.missing_keys)


def _tie(model, tied: dict[str, str], missing: set[str]) -> None:
    # As from_pretrained does: tie what the checkpoint left out; where it holds both sides
    # with different values (a tie broken by training), keep them apart.
    model.tie_weights(missing_keys=set(missing), recompute_mapping=False)
    for target, source in tied.items():  # whatever the config says, the manifest's ties hold
        if model.get_parameter(target).is_meta:
            _set_module_tensor(model, target, model.get_parameter(source))


def _set_module_tensor(model, name: str, value) -> None:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent) if parent else model
    setattr(module, leaf, value)


def _rebuild_buffers(model) -> None:
    """Rotary buffers are not in checkpoints: compute them in float32 as transformers' init
    does (`PreTrainedModel._init_weights`), with the module's own rope function."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for module in model.modules():
        if not any(b is not None and b.is_meta for b in module._buffers.values()):
            continue
        if "RotaryEmbedding" not in type(module).__name__ or not hasattr(module, "inv_freq"):
            continue  # left on meta: reported by the caller
        functions = {
            "axial": getattr(module, "compute_axial_rope_parameters", None),
            "ntk_alpha": getattr(module, "compute_ntk_alpha_rope_parameters", None),
            "default": getattr(module, "compute_default_rope_parameters", None),
            **ROPE_INIT_FUNCTIONS,
        }
        fn = functions.get(getattr(module, "rope_type", "default"))
        if fn is None:
            continue
        with torch.no_grad():
            inv_freq, _scaling = fn(module.config)
        inv_freq = inv_freq.to(device="cpu", dtype=torch.float32)
        module.inv_freq = inv_freq
        if "original_inv_freq" in module._buffers:
            module.original_inv_freq = inv_freq.clone()


def _place(model, device: "torch.device", dtype: "torch.dtype | None") -> None:
    """Move to `device` and cast floating parameters to `dtype`; buffers keep their dtype
    (a bf16 `inv_freq` would change the logits). A no-op (no copy) when nothing changes;
    a parameter shared by two modules (a tie) stays one parameter."""
    import torch

    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                want = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
                if p.device == device and p.dtype == want:
                    done[id(p)] = p
                else:
                    done[id(p)] = torch.nn.Parameter(p.detach().to(device=device, dtype=want),
                                                     requires_grad=p.requires_grad)
            module._parameters[name] = done[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)


def _same_tensor(a, b) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    import torch

    return bool(torch.equal(a, b))


def _model_device(model):
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


# -- sampling --------------------------------------------------------------------------
def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _next_token(logits: "torch.Tensor", temperature: float, top_k: int | None,
                top_p: float | None, generator: "torch.Generator | None") -> int:
    """One token from float32 logits (1, V): greedy at temperature 0, else temperature,
    top-k, top-p (the most likely token always survives) and a draw with `generator`."""
    import torch

    if temperature == 0:
        return int(logits.argmax(dim=-1)[0])
    logits = logits / temperature
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
            drop = (probs.cumsum(dim=-1) - probs) >= top_p  # the mass above already reaches top_p
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, num_samples=1, generator=generator)[0, 0])
