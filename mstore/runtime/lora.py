"""LoRA through peft: wrapping a base for training, the adapter child's tensors and config,
loading an adapter child onto its base, and merging it into a full child.

An adapter child's manifest (kind "adapter") holds only the adapter's tensors, under the
names peft writes to adapter_model.safetensors, and peft's adapter_config.json as a file
object; its `parent` is the base. Loading maps the base's objects (zero-copy on the CPU in
the stored dtype), then injects the adapter as `PeftModel.from_pretrained` does (same
config, same weight loading, adapter weights upcast to float32), so its logits are peft's.
The adapter stays wrapped (not merged) for generation: in `benchmarks/lora.py` (0.5B
shape, README "Performance") merging took the load from 7.8 s to 16.4 s (a copy of every
adapted weight) and decoding through the wrap was no slower; the wrap keeps the base's
pages shared with every other reader of the objects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.base import Adapter, adapter_class, adapter_for
from ..errors import AdapterOnAdapter, ConfigError, MStoreError, NotAnAdapter
from ..store import failpoints
from ..store.lora_names import adapter_summary
from ..store.manifest import Manifest
from ..store.repo import Store
from . import torch_io
from .checkpoint import CommitResult, commit_checkpoint, finetune_stem

ADAPTER_CONFIG = "adapter_config.json"
MERGED_FMT = "{stem}-merged-{n:03d}"
# loggers that chatter on `import peft` (torchao's optional kernels, torch's pytree notices)
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def import_peft():
    """peft, imported with the optional-kernel warnings of its dependencies silenced: a
    command's stderr carries its own lines only."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import peft
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return peft


# -- training ---------------------------------------------------------------------------
def check_base(store: Store, ref: str, commit: str) -> None:
    """Training (full or LoRA) starts from a full or quantized model, never an adapter."""
    m = store.read_manifest(commit)
    if m.kind == "adapter":
        raise AdapterOnAdapter(ref, m.describe())


def module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the modules LoRA can adapt (linear layers and
    embeddings), what a target_modules error lists."""
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                   if n and isinstance(mod, kinds)})


def check_targets(model: torch.nn.Module, targets: list[str], model_name: str) -> None:
    """Every target names at least one module (peft's rule: the module's name is the target
    or ends with "." + target); else one line naming it and listing what there is."""
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ConfigError(f"config key 'lora.target_modules': {t!r} matches no module "
                              f"of {model_name}; its adaptable modules are "
                              f"{', '.join(module_names(model))}")


def lora_config(adapter: Adapter, lora: dict[str, Any], base_model: str):
    """peft's LoraConfig for a training config's `lora:` block (defaults filled in)."""
    peft = import_peft()
    targets = lora.get("target_modules") or list(type(adapter).lora_targets)
    if not targets:
        raise ConfigError(f"config key 'lora.target_modules': the {type(adapter).__name__} "
                          "has no default; name the modules to adapt")
    return peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                           target_modules=list(targets), task_type=type(adapter).peft_task_type,
                           base_model_name_or_path=base_model)


def wrap_for_training(adapter: Adapter, model: torch.nn.Module, lora: dict[str, Any],
                      model_name: str) -> torch.nn.Module:
    """`model` (the frozen base) wrapped by `get_peft_model`: only the adapter trains, in
    float32 (peft's autocast_adapter_dtype), whatever the base's dtype."""
    peft = import_peft()
    config = lora_config(adapter, lora, adapter.manifest.model_id)
    check_targets(model, sorted(config.target_modules), model_name)
    model.train()
    with quiet_peft():
        return peft.get_peft_model(model, config)


def storage_dtype(manifest: Manifest) -> torch.dtype:
    """The floating dtype holding most of a model's elements: what an adapter child stores
    its tensors in (as a full fine-tune casts back to its parent's dtypes)."""
    counts: dict[str, int] = {}
    for t in manifest.tensors.values():
        if t.dtype in ("F32", "F16", "BF16", "F64"):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
    return torch_io.TORCH_DTYPES[max(counts, key=counts.get)] if counts else torch.float32


def frozen_base_dtype(manifest: Manifest, device: str) -> torch.dtype | None:
    """The dtype to train LoRA over the frozen base in: None (the stored dtype, the objects
    mapped, no copy) where the device computes it natively, else float32 (a copy: on a CPU
    without bf16 kernels a 4-step LoRA run over the bf16 base had not finished after 17
    minutes where a full fine-tune's float32 step took under a minute, README
    "Performance"; float32 weights still cost a quarter of a full fine-tune's memory)."""
    dtype = storage_dtype(manifest)
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    kind = torch.device(device).type
    if kind == "cuda":
        native = dtype == torch.float16 or torch.cuda.is_bf16_supported()
    elif kind == "cpu":
        check = "_is_mkldnn_bf16_supported" if dtype == torch.bfloat16 \
            else "_is_mkldnn_fp16_supported"
        native = bool(getattr(torch.ops.mkldnn, check)())
    else:
        native = True
    return None if native else torch.float32


@dataclass
class AdapterParts:
    """What an adapter child's manifest holds besides its base's config."""

    tensors: dict[str, torch.Tensor]  # peft's names (as in adapter_model.safetensors)
    config_json: bytes  # adapter_config.json as peft's save_pretrained writes it
    summary: dict[str, Any]  # the manifest's `adapter` field


def adapter_parts(peft_model, base: Manifest) -> AdapterParts:
    import_peft()
    from peft.utils import get_peft_model_state_dict

    dtype = storage_dtype(base)
    state = get_peft_model_state_dict(peft_model)
    tensors = {k: v.detach().to("cpu", dtype) for k, v in state.items()}
    config = peft_model.peft_config["default"]
    return AdapterParts(tensors, config_bytes(config, base.model_id),
                        adapter_summary(config.to_dict()))


def config_bytes(config, base_model: str) -> bytes:
    """adapter_config.json exactly as `PeftModel.save_pretrained` writes it."""
    import copy

    config = copy.copy(config)
    config.inference_mode = True
    config.base_model_name_or_path = base_model
    with tempfile.TemporaryDirectory(prefix="mstore-adapter-") as tmp:
        config.save_pretrained(tmp)
        return (Path(tmp) / ADAPTER_CONFIG).read_bytes()


# -- loading ----------------------------------------------------------------------------
@dataclass
class Loaded:
    """A model ready to run: `adapter` is the architecture's adapter (bound to the base for
    an adapter child: its tokenizer is the base's), `model` the module to call (the
    PeftModel for an adapter child), `manifest` the commit's own."""

    adapter: Adapter
    model: torch.nn.Module
    manifest: Manifest
    commit: str

    @property
    def runnable(self) -> torch.nn.Module:
        """The module the adapter's `generate_stream` drives: the base's own class with the
        LoRA layers injected (a PeftModel's `get_base_model()`)."""
        get = getattr(self.model, "get_base_model", None)
        return get() if get is not None else self.model


def load_model(store: Store, commit: str, device: str = "cpu", dtype: torch.dtype | None = None,
               verify: bool = False) -> Loaded:
    """Any commit as a runnable model: a full one through its adapter; an adapter child as
    its base (zero-copy) with the adapter injected, as peft's from_pretrained does."""
    manifest = store.read_manifest(commit)
    if manifest.kind != "adapter":
        adapter = adapter_for(store, commit)
        return Loaded(adapter, adapter.load_checkpoint(device=device, dtype=dtype,
                                                       verify=verify), manifest, commit)
    base = base_adapter(store, manifest)
    model = base.load_checkpoint(device=device, dtype=dtype, verify=verify)
    return Loaded(base, attach(store, manifest, model, device, verify), manifest, commit)


def base_adapter(store: Store, manifest: Manifest) -> Adapter:
    """The architecture adapter bound to an adapter child's base."""
    base = store.read_manifest(manifest.parent)
    if base.kind == "adapter":
        raise MStoreError(f"the base {manifest.parent[:12]} of an adapter is itself an "
                          "adapter (run `mstore fsck`)")
    return adapter_class(base.architecture)(store, base, manifest.parent)


def peft_config_of(store: Store, manifest: Manifest):
    peft = import_peft()
    raw = json.loads(store.objects.read_bytes(manifest.files[ADAPTER_CONFIG], verify=True))
    config = peft.PeftConfig.from_peft_type(**raw)
    config.inference_mode = True
    return config


def attach(store: Store, manifest: Manifest, model: torch.nn.Module, device: str = "cpu",
           verify: bool = False) -> torch.nn.Module:
    """`model` (the base) wrapped with the adapter child's LoRA weights (eval mode)."""
    peft = import_peft()
    from peft.utils import set_peft_model_state_dict

    config = peft_config_of(store, manifest)
    with quiet_peft():
        wrapped = peft.get_peft_model(model, config)
    state = {k: v.to(device) for k, v in
             torch_io.load_state_dict(store.objects, manifest.tensors, verify).items()}
    result = set_peft_model_state_dict(wrapped, state)
    if result.unexpected_keys:
        raise MStoreError(f"adapter {manifest.model_id}: tensors "
                          f"{', '.join(result.unexpected_keys[:3])} fit no module of the base")
    return wrapped.eval()


@contextlib.contextmanager
def quiet_peft():
    """peft's notices about its own bookkeeping (a base_model_name_or_path it renames,
    transformers' deprecations it calls): nothing a user of mstore can act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def merged_module(store: Store, commit: str) -> tuple[Adapter, torch.nn.Module, Manifest]:
    """The adapter child `commit` merged into its base (peft's `merge_and_unload`, in place:
    the base's objects are mapped privately, so the touched weights' pages are copied on
    write and the objects never change), in the base's stored dtype; with the base's
    adapter and the child's manifest."""
    manifest = store.read_manifest(commit)
    if manifest.kind != "adapter":
        raise NotAnAdapter(commit[:12], manifest.kind)
    loaded = load_model(store, commit)
    with quiet_peft():
        merged = loaded.model.merge_and_unload()
    return loaded.adapter, merged, manifest


def merged_weights(store: Store, commit: str) -> dict[str, tuple[str, list[int], bytes]]:
    """The base tensors the adapter child changes, merged: {checkpoint name: (safetensors
    dtype, shape, raw bytes)}, what `export` writes in place of the base's."""
    from ..store.lora_names import adapted_modules

    base, merged, manifest = merged_module(store, commit)
    changed = {a.base_weight for a in adapted_modules(manifest.tensors)[0].values()}
    out = {}
    for name, t in base.save_checkpoint(merged).tensors.items():
        if name in changed:
            t = t.detach().cpu().contiguous()
            out[name] = (torch_io.SAFETENSORS_DTYPES[t.dtype], list(t.shape),
                         t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


def merge(store: Store, ref: str, name: str | None = None) -> CommitResult:
    """`mstore merge`: a full child of the adapter child `ref` with the adapter merged into
    the weights. Untouched tensors are the base's very objects (same bytes, same ids)."""
    if name is not None and not store.name_is_free(name):
        from ..errors import NameTaken

        raise NameTaken(name, store.next_free_name(name))
    with store.writer_lock("merge", create=False):
        r = store.resolve(ref)
        manifest = store.read_manifest(r.commit)
        if manifest.kind != "adapter":
            raise NotAnAdapter(ref, manifest.kind)
        base, merged, _ = merged_module(store, r.commit)
        ckpt = base.save_checkpoint(merged)
        failpoints.hit("merge.merged")
        ref_name = r.name or next(iter(sorted(store.names_by_commit().get(r.commit, []))), None)
        dtypes = {n: torch_io.TORCH_DTYPES[t.dtype] for n, t in base.manifest.tensors.items()
                  if t.dtype in torch_io.TORCH_DTYPES}
        shown = ref_name or r.commit[:12]
        return commit_checkpoint(
            store, ckpt, architecture=base.manifest.architecture,
            model_id=base.manifest.model_id,
            source={"type": "merge", "parent": r.commit, "parent_name": ref_name},
            license=base.manifest.license, parent=r.commit, files=dict(base.manifest.files),
            message=f"merge {shown} ({manifest.describe()}) into its base",
            training=None, name=name,
            stem=finetune_stem(ref_name or base.manifest.model_id.split("/")[-1].lower()),
            name_fmt=MERGED_FMT, fine_tuned_from=ref_name, dtypes=dtypes)

