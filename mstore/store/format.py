"""The store format and the migrations that bring an older store up to it.

registry.json's `version` is the store's format: the newest kind of thing that may be in
it. A write command calls `migrate` before it writes anything, so an older mstore, which
refuses a registry version it does not know, can never misread a newer store (an old gc
would free an adapter child's base weights). Manifests keep the format they were written
in: their bytes are their ids. Each step runs under the exclusive store lock, is
crash-safe (it ends with one atomic registry rewrite, and running it again is harmless),
and leaves `fsck` clean; docs/format.md describes every format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from . import failpoints
from .locks import StoreLock
from .registry import VERSION

if TYPE_CHECKING:
    from .repo import Store

STORE_FORMAT = VERSION


def _to_2(store: "Store") -> None:
    """Format 2 adds manifest kinds (adapter, quantized) and commit attachments: new
    things a store may hold, nothing existing changes; the version alone says so."""


# MIGRATIONS[n] takes a store of format n + 1 to format n + 2.
MIGRATIONS: list[Callable[["Store"], None]] = [_to_2]
assert len(MIGRATIONS) == STORE_FORMAT - 1


def needs_migration(store: "Store") -> bool:
    return store.registry.exists() and store.registry.version() < STORE_FORMAT


def migrate(store: "Store") -> list[int]:
    """Bring `store` to STORE_FORMAT; returns the formats it went through ([] if current).
    Waits for other writers and gc like gc does (the exclusive store lock)."""
    if not needs_migration(store):
        return []
    with StoreLock(store.lock_path, shared=False, purpose="format upgrade"):
        start = store.registry.version()  # again: another process may have done it
        for version in range(start, STORE_FORMAT):
            MIGRATIONS[version - 1](store)
            failpoints.hit(f"migrate.to-{version + 1}")
        if start < STORE_FORMAT:
            store.registry.update(lambda models: None, version=STORE_FORMAT)
        return list(range(start + 1, STORE_FORMAT + 1))
