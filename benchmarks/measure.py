"""Timing primitives: whole processes (wall time and peak RSS), statistics, alternation."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .inputs import REPO_ROOT

PY = sys.executable


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every child runs with: offline, quiet, the repo importable."""
    env = dict(os.environ)
    env.pop("MSTORE_HOME", None)
    env.pop("MSTORE_DEBUG", None)
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])]),
    })
    env.update(extra or {})
    return env


GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
RSS_HOW = ("/usr/bin/time -f %M" if GNU_TIME else
           "a small python wrapper's getrusage(RUSAGE_CHILDREN).ru_maxrss")
_RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
                "open(sys.argv[1], 'w').write(str(resource.getrusage("
                "resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


@dataclass
class ProcResult:
    wall: float  # seconds, spawn to reap
    # bytes: peak RSS. With rss=True, measured by a small wrapper (GNU time), because a child
    # forked from this process counts this process's pages until it execs; else wait4's
    # figure, which has that flaw (good enough for big processes, not for small ones).
    maxrss: int
    returncode: int
    stdout: str
    stderr: str
    cpu: float = 0.0  # seconds: the child's user + sys time, from the same wait4


class CommandFailed(RuntimeError):
    pass


def run_process(argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 1800,
                env: dict[str, str] | None = None, check: bool = True,
                rss: bool = False) -> ProcResult:
    """Run argv, timing it from spawn to reap (a blocking wait4: nothing polls beside it).

    rss=True runs it under /usr/bin/time (or a python wrapper) for an exact peak RSS; the
    wrapper costs ~1 ms, so use it on both sides of a pair.
    """
    rss_file = None
    if rss:
        fd, rss_file = tempfile.mkstemp(prefix="bench-rss-")
        os.close(fd)
        argv = ([GNU_TIME, "-f", "%M", "-o", rss_file, *argv] if GNU_TIME else
                [PY, "-c", _RSS_WRAPPER, rss_file, *argv])
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(map(str, argv)), cwd=cwd or REPO_ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=env or child_env())
        timer = threading.Timer(timeout, proc.kill)  # blocking wait4: no polling beside the child
        timer.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode == -9 and time.perf_counter() - t0 >= timeout:
            raise CommandFailed(f"timed out after {timeout:.0f} s: {' '.join(map(str, argv))}")
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    maxrss = usage.ru_maxrss * 1024
    if rss_file:
        try:
            text = Path(rss_file).read_text().split()
            maxrss = int(text[-1]) * 1024 if text else maxrss
        except (OSError, ValueError):
            pass
        os.unlink(rss_file)
    res = ProcResult(wall, maxrss, proc.returncode, stdout, stderr,
                     usage.ru_utime + usage.ru_stime)
    if check and res.returncode != 0:
        raise CommandFailed(f"exit {res.returncode}: {' '.join(map(str, argv))}\n"
                            f"{stderr[-3000:]}")
    return res


def mstore_argv(store: Path, *args: str) -> list[str]:
    return [PY, "-m", "mstore", "--store", str(store), *map(str, args)]


def drop_dirty_pages() -> None:
    """Flush dirty pages left by set-up or by the other side, so neither pays for them."""
    os.sync()


# -- statistics ----------------------------------------------------------------------------
def summarize(samples: Sequence[float]) -> dict[str, Any]:
    xs = sorted(float(x) for x in samples)
    if not xs:
        return {"n": 0, "median": None, "min": None, "max": None, "q1": None, "q3": None,
                "samples": []}
    q1 = q3 = xs[0]
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"n": len(xs), "median": statistics.median(xs), "min": xs[0], "max": xs[-1],
            "q1": q1, "q3": q3, "samples": [float(x) for x in samples]}


# -- alternation ---------------------------------------------------------------------------
def alternate(repeats: int, sides: dict[str, Callable[[int], Any]],
              budget_s: float | None = None, min_rounds: int = 2) -> dict[str, list[Any]]:
    """Run each side `repeats` times in A B B A A B ... order; collects what each returns.

    With `budget_s`, no new round starts once that much time has gone, as long as
    `min_rounds` rounds are done (a machine under load can make a run 10x slower).
    """
    names = list(sides)
    out: dict[str, list[Any]] = {n: [] for n in names}
    t0 = time.perf_counter()
    for i in range(repeats):
        if budget_s is not None and i >= min_rounds and time.perf_counter() - t0 > budget_s:
            break
        for n in (names if i % 2 == 0 else names[::-1]):
            out[n].append(sides[n](i))
    return out


@dataclass
class Pair:
    """One line of the report."""

    name: str
    what: str  # what is measured, in words
    mstore_side: str
    baseline_side: str
    unit: str  # "s", "tok/s", "MB", "bytes"
    mstore: dict[str, Any]
    baseline: dict[str, Any] | None
    target: str  # e.g. "<= 1.5x"
    # how pass/fail is judged: ("ratio_le", x), ("ratio_ge", x), ("abs_lt", x), ("ratio_eq", x);
    # ("report", 0): a figure the issue asks to report, with no target
    rule: tuple[str, float]
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None  # median / median: what pass/fail is judged on
    best_ratio: float | None = None  # best / best (min times; max rates): the least-disturbed runs
    passed: bool | None = None
    error: str | None = None

    def judge(self) -> "Pair":
        m = self.mstore.get("median") if self.mstore else None
        b = self.baseline.get("median") if self.baseline else None
        kind, x = self.rule
        if m is not None and b:
            self.ratio = m / b
            best = "max" if kind == "ratio_ge" else "min"
            if self.baseline.get(best):
                self.best_ratio = self.mstore[best] / self.baseline[best]
        if m is None or kind == "report":
            self.passed = None
        elif kind == "abs_lt":
            self.passed = m < x
        elif self.ratio is None:
            self.passed = None
        elif kind == "ratio_le":
            self.passed = self.ratio <= x
        elif kind == "ratio_ge":
            self.passed = self.ratio >= x
        elif kind == "ratio_lt":
            self.passed = self.ratio < x
        elif kind == "ratio_eq":
            self.passed = abs(self.ratio - x) < 1e-9
        return self

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, rule=list(self.rule))
