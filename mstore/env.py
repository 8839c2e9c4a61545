"""Every environment variable mstore reads, one function each; no other module reads os.environ.

Each is read when its function is called (so an export in a parent process, or a test's
monkeypatch, takes effect), except the failpoints, which store/failpoints.py reads once at
import. Torch-free; imports nothing.

| variable                  | function            | what it does                                   |
|---------------------------|---------------------|------------------------------------------------|
| MSTORE_HOME               | store_home          | the store when --store is not given (./models) |
| MSTORE_DEBUG              | debug / set_debug   | any non-empty value: tracebacks, not one line  |
| MSTORE_LOCK_TIMEOUT       | lock_timeout        | seconds to wait for a store lock (60)          |
| MSTORE_FAILPOINT          | failpoint           | tests: end (or ENOSPC) at a named write step   |
| MSTORE_FAILPOINT_LOG      | failpoint_log       | tests: append every failpoint reached here     |
| MSTORE_REMOTE_JOBS        | remote_jobs         | parallel object transfers of push/pull         |
| MSTORE_REMOTE_LOCK_STALE  | remote_lock_stale   | seconds before a remote's lock object is stale |
| MSTORE_REMOTE_CAS         | remote_cas          | "lock": s3 uses a lock object, not If-Match    |
| MSTORE_MEMORY_AVAILABLE   | memory_available    | bytes of RAM import's check counts as free     |
|                           |                     | (default: the kernel's MemAvailable)           |
| WORLD_SIZE, RANK,         | world_size, rank,   | set by torchrun: this process's place in a     |
| LOCAL_RANK                | local_rank          | `train --nproc N` run                          |
| OMP_NUM_THREADS           | child_environment   | passed to torchrun's workers (1 unless set)    |

huggingface_hub reads its own (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME, ...): mstore
passes them on untouched and reads none of them itself.
"""

from __future__ import annotations

import os

HOME = "MSTORE_HOME"
DEBUG = "MSTORE_DEBUG"


def store_home() -> str | None:
    return os.environ.get(HOME) or None


def debug() -> bool:
    return bool(os.environ.get(DEBUG))


def set_debug() -> None:
    """--debug: set for this process and every process it starts (torchrun's workers)."""
    os.environ[DEBUG] = "1"


def lock_timeout(default: float) -> float:
    """A value that is not a number is ignored (`default`)."""
    try:
        return float(os.environ.get("MSTORE_LOCK_TIMEOUT", default))
    except ValueError:
        return default


def failpoint() -> str | None:
    return os.environ.get("MSTORE_FAILPOINT") or None


def failpoint_log() -> str | None:
    return os.environ.get("MSTORE_FAILPOINT_LOG") or None


def remote_jobs(default: int) -> int:
    """At least 1; a value that is not an integer is ignored (`default`)."""
    try:
        return max(1, int(os.environ.get("MSTORE_REMOTE_JOBS", default)))
    except ValueError:
        return default


def remote_lock_stale(default: float = 600.0) -> float:
    return float(os.environ.get("MSTORE_REMOTE_LOCK_STALE", default))


def remote_cas() -> str:
    return os.environ.get("MSTORE_REMOTE_CAS", "")


def memory_available() -> int | None:
    """A size in bytes (a value that is not an integer is ignored: None)."""
    try:
        return int(os.environ["MSTORE_MEMORY_AVAILABLE"])
    except (KeyError, ValueError):
        return None


def under_torchrun() -> bool:
    """This process is one of torchrun's workers (it sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def child_environment() -> dict[str, str]:
    """The environment torchrun's workers get: this one, with one OpenMP thread each
    unless OMP_NUM_THREADS says otherwise."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
