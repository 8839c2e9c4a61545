"""The store on disk: objects, manifests, refs, locks, gc, fsck and the read-side reports.

Torch-free and typer-free, and imports nothing from the layers above it (hub, remote,
runtime, train, adapters, cli): every other layer builds on this one.
"""

from .repo import DEFAULT_STORE, Resolved, Store, default_store_path

__all__ = ["DEFAULT_STORE", "Resolved", "Store", "default_store_path"]
