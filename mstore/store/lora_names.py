"""The tensor names of an adapter child (kind "adapter"): peft's, as in adapter_model.safetensors.

`base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]) adapt
the base's linear layer `<module>`, whose weight is the base's tensor `<module>.weight`
([out, in]). What diff, import and export need to know of them, without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "base_model.model."
_LORA = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")


@dataclass
class AdaptedModule:
    module: str  # the base's module name (model.layers.0.self_attn.q_proj)
    lora_a: str | None = None  # the adapter's tensor names
    lora_b: str | None = None

    @property
    def base_weight(self) -> str:
        """The base's tensor this pair changes."""
        return f"{self.module}.weight"


def adapted_modules(names) -> tuple[dict[str, AdaptedModule], list[str]]:
    """The modules a set of adapter tensor names adapts (sorted by module), and the names
    that are no plain LoRA pair (a DoRA magnitude, an embedding adapter, a saved module)."""
    modules: dict[str, AdaptedModule] = {}
    other = []
    for name in sorted(names):
        m = _LORA.fullmatch(name)
        if m is None:
            other.append(name)
            continue
        entry = modules.setdefault(m["module"], AdaptedModule(m["module"]))
        if m["part"] == "lora_A":
            entry.lora_a = name
        else:
            entry.lora_b = name
    return dict(sorted(modules.items())), other


def adapter_summary(config: dict) -> dict:
    """The manifest's `adapter` field from peft's adapter_config.json (as a dict)."""
    targets = config.get("target_modules")
    targets = [targets] if isinstance(targets, str) else sorted(targets or [])
    alpha = config.get("lora_alpha")
    return {"method": "lora", "r": int(config.get("r") or 0),
            "alpha": alpha if isinstance(alpha, (int, float)) else None,
            "dropout": float(config.get("lora_dropout") or 0.0), "target_modules": targets}
