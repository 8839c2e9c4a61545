"""Machine description, the printed table and the JSON report."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .inputs import REPO_ROOT
from .measure import Pair


def machine_info(workdir: Path | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_bytes": _meminfo("MemTotal"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {},
        "git": _git(),
    }
    for pkg in ("torch", "transformers", "safetensors", "blake3", "typer", "huggingface_hub",
                "tokenizers", "numpy"):
        try:
            info["versions"][pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if workdir is not None:
        info["workdir_filesystem"] = _filesystem(Path(workdir))
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _git() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=20, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "mstore")
    return {"commit": git("rev-parse", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "mstore_dirty": bool(status) if status is not None else None,
            "mstore_changes": status.splitlines() if status else []}


def _filesystem(path: Path) -> str | None:
    path = path.resolve()
    best, fstype = "", None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        return None
    return fstype


# -- formatting -----------------------------------------------------------------------------
def fmt_value(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"
    if unit == "tok/s":
        return f"{x:.1f} tok/s"
    if unit == "MB":
        return f"{x:.0f} MB"
    if unit == "bytes":
        return f"{x / 1e6:.2f} MB" if x >= 1e6 else f"{x:,.0f} B"
    return f"{x:.3g} {unit}"


def fmt_side(s: dict[str, Any] | None, unit: str) -> str:
    if not s or s.get("median") is None:
        return "-"
    text = fmt_value(s["median"], unit)
    if s["n"] > 1:
        text += f" [{fmt_value(s['min'], unit)}..{fmt_value(s['max'], unit)}] n={s['n']}"
    return text


def table(pairs: list[Pair]) -> str:
    rows = [("pair", "mstore median [min..max]", "baseline median [min..max]", "ratio",
             "best", "target", "result")]
    for p in pairs:
        if p.error:
            rows.append((p.name, "ERROR", p.error.splitlines()[0][:60], "-", "-", p.target,
                         "error"))
            continue
        ratio = "-" if p.ratio is None else f"{p.ratio:.2f}x"
        best = "-" if p.best_ratio is None or p.mstore.get("n", 0) < 2 else f"{p.best_ratio:.2f}x"
        result = {True: "pass", False: "FAIL", None: "-"}[p.passed]
        rows.append((p.name, fmt_side(p.mstore, p.unit), fmt_side(p.baseline, p.unit), ratio,
                     best, p.target, result))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


LEGEND = ("ratio = mstore median / baseline median (tokens/s: mstore / transformers); pass/fail "
          "is judged on it. best = best mstore run / best baseline run (fastest times, highest "
          "rates): on a shared machine, the runs least disturbed by other load.")


def notes(pairs: list[Pair]) -> str:
    out = [LEGEND]
    for p in pairs:
        out.append(f"- {p.name}: {p.what}. mstore: {p.mstore_side}; baseline: {p.baseline_side}.")
        for n in p.notes:
            out.append(f"    {n}")
    return "\n".join(out)


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def results_path(tag: str | None) -> Path:
    date = datetime.now().strftime("%Y-%m-%d")
    return REPO_ROOT / "benchmarks" / "results" / f"{date}-{tag or socket.gethostname()}.json"


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
