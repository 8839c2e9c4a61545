"""Building a transformers causal LM from a manifest without random init, and back.

The module is built on the meta device from config.json; the tensors, mmapped from their
objects, are attached as they are (assign, no copy) when the checkpoint names are the
module's (dense models), or through transformers' own loader with the model's
weight-conversion mapping otherwise (MoE: per-expert tensors fused, which copies those).
Tied weights are re-tied and the buffers no checkpoint holds (rotary `inv_freq`) are
recomputed in float32 as transformers' init does, so the logits are bit-identical to
`from_pretrained`'s. Used by `transformers_lm.TransformersAdapter`; torch and transformers
are imported inside the functions.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

from ..errors import MStoreError

if TYPE_CHECKING:
    import torch


def named_tensors(model) -> Iterator[tuple[str, "torch.Tensor"]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def dominant_dtype(state: dict[str, "torch.Tensor"]):
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


def attach(model, state: dict[str, "torch.Tensor"], tied: set[str]) -> set[str]:
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


def tie(model, tied: dict[str, str], missing: set[str]) -> None:
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


def rebuild_buffers(model) -> None:
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


def place(model, device: "torch.device", dtype: "torch.dtype | None") -> None:
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


def same_tensor(a, b) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    import torch

    return bool(torch.equal(a, b))


def model_device(model):
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")

