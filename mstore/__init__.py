"""mstore: a Git-style, content-addressed store for model weights.

The public Python API (docs/api.md): `Store`, `import_model`, `train`, `load`,
`merge`. Each is
loaded on first use, so `import mstore` imports neither torch nor transformers.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Store", "import_model", "load", "merge", "train", "__version__"]

_WHERE = {"Store": "mstore.store", "import_model": "mstore.api", "train": "mstore.api",
          "load": "mstore.api", "merge": "mstore.api"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        from importlib import import_module

        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
