"""Sharing models between stores: remotes.json, transports over fsspec URLs, push, pull and
clone. Torch-free and typer-free; builds on mstore.store only.

- config: remotes.json (name -> URL) and remote-refs.json (what this store last saw).
- transports: one class per kind of backend; each moves a ref by one compare-and-swap.
- sync: push, pull and clone, built on the two.
"""

from .config import add_remote, list_remotes, remove_remote, tracking_refs
from .sync import CloneResult, TransferResult, clone, pull, push

__all__ = ["CloneResult", "TransferResult", "add_remote", "clone", "list_remotes", "pull",
           "push", "remove_remote", "tracking_refs"]
