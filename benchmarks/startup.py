"""Start-up of the everyday commands against `python -c "import typer"` (issue 16, target 6).

Each pair runs a whole `mstore` process and the baseline (the CLI framework's own import,
what no typer CLI can go below) alternated, and is judged on the ratio of median wall
times; the ratio of median CPU times (user + sys of the child, from the same wait4) stands
beside it, because on a shared machine CPU time is what other load disturbs least.

- startup-import: `mstore import` of the tests' tiny Qwen2 folder (~330 KB) into a fresh
  store (created by the import; removed after each run, untimed);
- startup-list, startup-show, startup-log: the command on a one-ref store holding that model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .measure import PY, Pair, alternate, drop_dirty_pages, mstore_argv, run_process, summarize

TYPER = [PY, "-c", "import typer"]
IMPORT_LIMIT, METADATA_LIMIT = 1.6, 1.5


def _startup_pair(b, name: str, what: str, mstore_side: str, run_mstore, limit: float) -> Pair:
    """Alternate `run_mstore(i)` (returns a ProcResult) with the typer import; judge wall,
    report CPU beside it."""
    def baseline(_i):
        drop_dirty_pages()
        return run_process(TYPER)

    res = alternate(b.opts.fast_repeats, {"mstore": run_mstore, "baseline": baseline})
    wall = {k: summarize([r.wall for r in v]) for k, v in res.items()}
    cpu = {k: summarize([r.cpu for r in v]) for k, v in res.items()}
    cpu_ratio = (cpu["mstore"]["median"] / cpu["baseline"]["median"]
                 if cpu["baseline"]["median"] else None)
    notes = [f"CPU time (user + sys): {cpu['mstore']['median'] * 1000:.0f} ms vs "
             f"{cpu['baseline']['median'] * 1000:.0f} ms"
             + (f", {cpu_ratio:.2f}x (target {limit}x)" if cpu_ratio else "")]
    return Pair(name, what, mstore_side, 'python -c "import typer"', "s", wall["mstore"],
                wall["baseline"], f"<= {limit}x", ("ratio_le", limit), notes=notes,
                extra={"cpu": cpu, "cpu_ratio": cpu_ratio})


def _one_ref_store(b) -> Path:
    """A store holding the tiny model as TINY_REF (built once per run, untimed)."""
    if "startup_store" not in b.__dict__:
        from .growth import build_refs

        b.startup_store = build_refs(b, b.fresh_dir("stores", "startup"), 1)
    return b.startup_store


def pair_startup_import(b) -> Pair:
    src = b.tiny_dir

    def mstore(i):
        store = b.fresh_dir("runs", f"startup-import-{i}")
        drop_dirty_pages()
        r = run_process(mstore_argv(store, "import", src, "--accept-license"))
        shutil.rmtree(store)
        return r

    return _startup_pair(b, "startup-import", "`mstore import` of the tests' tiny Qwen2 folder "
                         "into a fresh store, whole process",
                         "mstore import DIR --accept-license (fresh store)", mstore,
                         IMPORT_LIMIT)


def _metadata_pair(b, command: str, *args: str) -> Pair:
    from .pairs import TINY_REF

    argv = mstore_argv(_one_ref_store(b), command, *(a.format(ref=TINY_REF) for a in args))

    def mstore(_i):
        drop_dirty_pages()
        return run_process(argv)

    shown = " ".join(["mstore", command, *(a.format(ref="M") for a in args)])
    return _startup_pair(b, f"startup-{command}", f"`{shown}` on a one-ref store (the tests' "
                         "tiny Qwen2), whole process", shown, mstore, METADATA_LIMIT)


def pair_startup_list(b) -> Pair:
    return _metadata_pair(b, "list")


def pair_startup_show(b) -> Pair:
    return _metadata_pair(b, "show", "{ref}")


def pair_startup_log(b) -> Pair:
    return _metadata_pair(b, "log", "{ref}")
