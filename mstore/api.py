"""The public Python API's entry points that span layers: import, train, load.

`mstore.Store` (the store and its read side) lives in mstore.store; these three functions
tie it to the Hub side, the training loop and the runtime. They are loaded lazily from
`mstore/__init__.py`, and each imports what it needs only when called, so `import mstore`
stays torch-free. docs/api.md is the reference; the test suite runs its examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .store import Store

if TYPE_CHECKING:
    from .hub.importer import ImportResult
    from .training.config import TrainConfig
    from .training.loop import TrainResult

StoreLike = Store | Path | str | None


def as_store(store: StoreLike) -> Store:
    """A Store, a path, or None for the CLI's own default ($MSTORE_HOME, else ./models)."""
    return store if isinstance(store, Store) else Store(store)


def import_model(source: str | Path, *, store: StoreLike = None, name: str | None = None,
                 revision: str | None = None, accept_license: bool = False,
                 max_size: int | str | None = None, **options: Any) -> "ImportResult":
    """Import a Hub repo id, a Hub URL or a local Hugging Face folder (`mstore import`).

    The license must be accepted (`accept_license=True`): there is no prompt here.
    `max_size` is bytes or a size such as "10GB". Returns the ref, commit and byte counts.
    """
    from .hub.importer import import_model as run_import
    from .units import parse_size

    limit = parse_size(max_size) if isinstance(max_size, str) else max_size
    return run_import(as_store(store), str(source), name=name, revision=revision,
                      accept_license=accept_license, max_size=limit, **options)


def train(config_or_path: "TrainConfig | dict[str, Any] | Path | str", *,
          store: StoreLike = None, callbacks: list[Any] = (), **overrides: Any
          ) -> "TrainResult | None":
    """Fine-tune (or train the custom transformer from scratch) and commit the child
    (`mstore train`). `overrides` are config keys with Python values
    (`max_steps=10`, `learning_rate=1e-4`); `callbacks` get `on_step_end`, `on_eval`,
    `on_commit`. Under torchrun, ranks other than 0 return None."""
    from .training.config import config_from
    from .training.loop import train as run_training

    cfg = config_from(config_or_path, overrides)
    return run_training(as_store(store), cfg, callbacks=list(callbacks))


def load(name: str, *, store: StoreLike = None, device: str | None = None,
         dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a model in the store, loaded through its adapter.

    For the Qwen family `model` is the plain transformers `PreTrainedModel` and the
    tokenizer transformers' own, so `.generate()`, peft and the rest of transformers work
    on them. On the CPU in the stored dtype the weights are the mmapped objects (no copy).
    An adapter child (LoRA) is its base, loaded so, wrapped in peft's `PeftModel` with the
    adapter's weights (`merge_and_unload()` gives the merged plain model).
    `device` None picks cuda, then mps, then cpu; `dtype` None keeps the stored one
    (else "float32", "bfloat16", "float16" or a torch.dtype).
    """
    import torch

    from .runtime.generate import parse_dtype, pick_device
    from .runtime.lora import load_model

    s = as_store(store)
    s.require()
    loaded = load_model(s, s.resolve(name).commit, device=pick_device(device or "auto"),
                        dtype=dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype))
    return loaded.model, loaded.adapter.tokenizer().native


def merge(name: str, *, store: StoreLike = None, new_name: str | None = None) -> Any:
    """Commit the adapter child `name` merged into its base as a full child (`mstore
    merge`); tensors the adapter leaves alone stay the base's objects. Returns the
    CommitResult (name, commit, bytes_written, bytes_reused)."""
    from .runtime.lora import merge as run_merge

    return run_merge(as_store(store), name, new_name)
