"""Text renderings of the read commands' data: show, log, the family graph, sparklines.

Every value that came from outside (names, card fields, messages, paths, tensor names) goes
through `safe_text` as its line is built, so none can drive the terminal or forge a line.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from .termtext import safe_text
from ..units import fmt_bytes, fmt_count

SPARKS = "▁▂▃▄▅▆▇█"


def shown_path(path: object) -> str:
    """A path as a reader can retype it: relative when it lies under the working folder
    (as git shows paths), else as recorded. Manifests keep the absolute path."""
    text = str(path)
    if not os.path.isabs(text):
        return text
    try:
        rel = os.path.relpath(text, os.getcwd())
    except (OSError, ValueError):  # no working folder, another drive
        return text
    return text if rel == ".." or rel.startswith(".." + os.sep) else rel


def sparkline(values: list[float], width: int = 60) -> str:
    """A loss curve in one line of block characters (downsampled to `width`)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return ""
    if len(vals) > width:
        step = len(vals) / width
        vals = [vals[int(i * step)] for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * (len(SPARKS) - 1)))]
                   for v in vals)


def training_summary(t: dict[str, Any] | None) -> str:
    if not t:
        return ""
    parts = [f"{t.get('steps', '?')} steps"]
    losses = [x[1] if isinstance(x, list) else x for x in t.get("train_loss", [])]
    if losses:
        parts.append(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    evals = [x[1] if isinstance(x, list) else x for x in t.get("eval_loss", [])]
    if evals:
        parts.append(f"eval {evals[-1]:.3f}")
    ds = t.get("dataset") or {}
    if ds.get("path"):
        parts.append(f"data {shown_path(ds['path'])}")
    return ", ".join(parts)


def source_line(m: dict[str, Any]) -> str:
    src = m.get("source") or {}
    if src.get("type") == "huggingface":
        return f"huggingface {src.get('repo_id')}@{str(src.get('revision'))[:12]}"
    if src.get("type") == "local":
        return f"local folder {shown_path(src.get('path'))}"
    return src.get("type") or "-"


def render_show(doc: dict[str, Any], list_tensors: bool = False) -> str:
    m = doc["manifest"]
    dtypes = Counter(t["dtype"] for t in m["tensors"].values())
    rows = [
        ("name", ", ".join(doc["names"]) or "(no ref)"),
        ("commit", doc["commit"]),
        ("architecture", m["architecture"]),
        ("model_id", m["model_id"]),
        ("source", source_line(m)),
        ("license", m.get("license") or "unknown"),
        ("parent", (m["parent"][:12] + (f" ({', '.join(doc['parent_names'])})"
                                         if doc["parent_names"] else "")) if m["parent"] else "-"),
        ("created", m["created_at"]),
        ("message", m["message"]),
        ("parameters", f"{fmt_count(doc['parameters'])} ({doc['parameters']:,}) in "
                       f"{len(m['tensors'])} tensors ("
                       + ", ".join(f"{n} {d}" for d, n in sorted(dtypes.items())) + ")"),
        ("size", fmt_bytes(doc["size_bytes"])
         + ("" if doc["weights_present"] else "  [weights collected or missing]")),
        ("config", m["config"][:12]),
        ("files", ", ".join(sorted(m["files"])) or "-"),
    ]
    if m.get("tied_weights"):
        rows.append(("tied", ", ".join(f"{k} -> {v}" for k, v in m["tied_weights"].items())))
    t = m.get("training")
    if t:
        rows.append(("training", training_summary(t)))
        losses = [x[1] if isinstance(x, list) else x for x in t.get("train_loss", [])]
        if losses:
            rows.append(("loss curve", sparkline(losses)))
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {safe_text(v)}" for k, v in rows]
    if list_tensors:
        out.append("tensors:")
        for name, te in sorted(m["tensors"].items()):
            out.append(f"  {safe_text(name)}  {safe_text(te['dtype'])}{safe_text(te['shape'])}  "
                       f"{safe_text(te['object'][:12])}")
    return "\n".join(out)


def _header(e: dict[str, Any]) -> str:
    names = f" ({safe_text(', '.join(e['names']))})" if e.get("names") else ""
    gone = "" if e.get("weights_present", True) else " [weights collected]"
    return f"commit {safe_text(e['commit'])}{names}{gone}"


def render_log(entries: list[dict[str, Any]]) -> str:
    out = []
    for e in entries:
        out.append(_header(e))
        if e.get("created_at"):
            out.append(f"Date:   {safe_text(e['created_at'])}")
        if e.get("source") and not e.get("parent"):
            out.append(f"Source: {safe_text(source_line(e))}")
        if e.get("parent"):
            out.append(f"Parent: {safe_text(e['parent'][:12])}")
        out.append("")
        out.append(f"    {safe_text(e.get('message', ''))}")
        summary = training_summary(e.get("training"))
        if summary:
            out.append(f"    training: {safe_text(summary)}")
        out.append("")
    return "\n".join(out).rstrip()


def render_graph(entries: list[dict[str, Any]]) -> str:
    """Every model as a family tree: bases at the left, fine-tunes below their parents."""
    by_id = {e["commit"]: e for e in entries}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for e in entries:
        parent = e.get("parent") if e.get("parent") in by_id else None
        children.setdefault(parent, []).append(e)
    for kids in children.values():
        kids.sort(key=lambda e: (e.get("created_at") or "", e["commit"]))
    out: list[str] = []

    def line(e: dict[str, Any]) -> str:
        names = ", ".join(e.get("names") or []) or "(no ref)"
        gone = "" if e.get("weights_present", True) else " [weights collected]"
        summary = training_summary(e.get("training")) or e.get("message", "")
        return (f"* {safe_text(e['commit'][:12])} {safe_text(names)}{gone}  "
                f"{safe_text((e.get('created_at') or '')[:10])}  {safe_text(summary)}")

    def walk(e: dict[str, Any], prefix: str, last: bool, root: bool) -> None:
        out.append(("" if root else prefix + ("└─" if last else "├─")) + line(e))
        kids = children.get(e["commit"], [])
        child_prefix = "" if root else prefix + ("  " if last else "│ ")
        for i, k in enumerate(kids):
            walk(k, child_prefix, i == len(kids) - 1, False)

    for root in children.get(None, []):
        walk(root, "", True, True)
    return "\n".join(out) if out else "no models"
