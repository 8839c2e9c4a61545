"""Named failpoints: `MSTORE_FAILPOINT=<name>[:<nth>]` ends the process at that step.

Each write path calls `hit(name)` right after a step that changes the disk (an object
written, objects synced, the registry lock taken, registry.json replaced, an object
deleted, ...). When the variable names that point, the nth time it is reached (default
the first) the process ends with `os._exit(137)`, which like kill -9 skips every
`finally`: what is on disk then is exactly what a crash at that step leaves.
`MSTORE_FAILPOINT=<name>:<nth>:enospc` instead raises OSError(ENOSPC) there, as a full disk
would: what the command does with a failed write (clean up, keep what it must) is tested
the same way. `MSTORE_FAILPOINT_LOG=<file>` appends every point reached, so tests can
enumerate them.
With neither variable set, `hit` is one global lookup and a return.
"""

from __future__ import annotations

import errno
import os

from .. import env

_SPEC = env.failpoint()
_LOG = env.failpoint_log()
_ACTIVE = bool(_SPEC or _LOG)
_counts: dict[str, int] = {}

if _SPEC:
    _name, _, _rest = _SPEC.partition(":")
    _nth, _, _mode = _rest.partition(":")
    _TARGET, _NTH, _ENOSPC = _name, int(_nth or 1), _mode == "enospc"
else:
    _TARGET, _NTH, _ENOSPC = None, 0, False


def hit(name: str) -> None:
    if not _ACTIVE:
        return
    n = _counts[name] = _counts.get(name, 0) + 1
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(f"{name}\n")
    if name == _TARGET and n == _NTH:
        if _ENOSPC:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"failpoint {name}")
        os._exit(137)
