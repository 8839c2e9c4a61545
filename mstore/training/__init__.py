"""Training: the config (torch-free), the loop, and the recovery folder of a failed commit.

`mstore.training.train` is the loop's entry point, loaded on first use so that reading a
config (`mstore.training.config`) does not import torch.
"""

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(name)
