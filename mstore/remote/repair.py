"""A remote store as a source of good copies for `fsck --repair` (store/repair.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..store.repair import Copy
from .transports import Transport, backend_errors, open_transport


class RemoteCopies:
    """Objects as the remote holds them, fetched with the transport pull uses; the remote
    is opened for reading (a local remote must be a store) for as long as the repair runs."""

    def __init__(self, remote_name: str, url: str, transport: Transport | None = None):
        self.label = f"remote {remote_name!r}"
        self.url = url
        self.transport = transport or open_transport(url)
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "RemoteCopies":
        stack = contextlib.ExitStack()
        stack.enter_context(backend_errors(self.url))
        stack.enter_context(self.transport.session(writing=False))
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.__exit__(*exc)
            self._stack = None

    def covers(self, oid: str) -> bool:
        return True  # a remote may hold any object; asking tells

    def get(self, oid: str, tmp_dir: Path) -> Copy | None:
        with backend_errors(self.url):
            size = self.transport.present([oid]).get(oid)
            if size is None:
                return None
            data, path, temp = self.transport.fetch(oid, size, tmp_dir)
        return Copy(data, path, temp)
