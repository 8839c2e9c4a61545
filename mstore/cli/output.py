"""How the CLI prints: escaping, lines, tables, JSON, the read commands' renderings, the
reporter the library talks to, and the wording of errors.

Output goes through `echo` (text) and `print_json` (--json), never print(). Nothing from a
card, a file name, a config, a remote or an error message may move the cursor, clear the
screen, retitle the window, reorder text (bidi overrides) or forge a line of output:
`safe_text` is applied to each VALUE where text output is built (a value is one line: a
newline in it is shown as `\\n`); `safe_lines` (inside `echo`) is the last pass over whole
output lines and keeps only their structural newlines. Both are idempotent: escaped text is
plain ASCII.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from collections import Counter
from typing import Any, Callable

import typer

from ..errors import (
    AdapterBaseAmbiguous, AdapterBaseMissing, CommitFailed, CommitNeedsRefName, InvalidSetting,
    LicenseNotAccepted, LocalRefWouldMove, MStoreError, NotFastForward, NothingToPack,
    QuantizedExport, RegistryCorrupt, RegistryMissing, SizeLimitExceeded, StoreNotFound,
    TrainingInterrupted, WorkersFailed,
)
from ..reporting import Progress, Reporter
from ..units import fmt_bytes, fmt_count

__all__ = [
    "CLI_WORDING", "TerminalReporter", "echo", "echo_line", "error_message", "json_text",
    "print_json", "print_table", "render_graph", "render_log", "render_show", "safe_lines",
    "safe_text", "shown_path",
]

# -- escaping ---------------------------------------------------------------------------
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control (Cc), format (Cf: bidi overrides and isolates, zero-width), line and paragraph
# separators (Zl, Zp), lone surrogates from undecodable file names (Cs).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _visible(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    cp = ord(ch)
    if cp < 0x100:
        return f"\\x{cp:02x}"
    return f"\\u{cp:04x}" if cp < 0x10000 else f"\\U{cp:08x}"


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES


def safe_text(value: Any) -> str:
    """`str(value)` with every control or format character in a visible escaped form."""
    s = value if isinstance(value, str) else str(value)
    if s.isprintable():  # the common case: nothing to do (printable excludes Cc/Cf/Zl/Zp/Cs)
        return s
    return "".join(_visible(c) if _unsafe(c) else c for c in s)


def safe_lines(text: str) -> str:
    """Whole output: like `safe_text`, but its own newlines stay line ends."""
    return "\n".join(safe_text(line) for line in text.split("\n"))


def json_text(obj: Any) -> str:
    """Exact JSON (it parses back to the same data) whose text holds no raw control or bidi
    character: json.dumps escapes C0 controls itself; the rest are written as \\uXXXX too."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str)
    if text.replace("\n", "").isprintable():
        return text
    return "".join(_json_escape(c) if c != "\n" and _unsafe(c) else c for c in text)


def _json_escape(c: str) -> str:
    cp = ord(c)
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    cp -= 0x10000  # outside the BMP: JSON's UTF-16 surrogate pair
    return f"\\u{0xD800 + (cp >> 10):04x}\\u{0xDC00 + (cp & 0x3FF):04x}"

# -- printing ---------------------------------------------------------------------------
def echo(text: str = "", err: bool = False) -> None:
    """Print output lines (newlines in `text` are line ends; every other control is escaped)."""
    typer.echo(safe_lines(text), err=err)


def echo_line(text: str, err: bool = True) -> None:
    """Print a message the library hands over (progress, warnings): one line, all escaped."""
    typer.echo(safe_text(text), err=err)


def print_json(obj: Any) -> None:
    typer.echo(json_text(obj))


TABLE_CHUNK = 256  # rows per write: well under a pipe's 64 KiB buffer


def print_table(rows: list[tuple]) -> None:
    """Aligned columns; every cell escaped first, so widths are those of what is shown."""
    try:  # the common case, all strings already: no copy of the table
        shown = "".join(map("".join, rows))
    except TypeError:  # a number or None among the cells
        rows = [tuple(map(str, r)) for r in rows]
        shown = "".join(map("".join, rows))
    if not shown.isprintable():  # one check for the whole table
        rows = [tuple(map(safe_text, r)) for r in rows]
    # one format call per row, not a ljust per cell: at 10,000 refs these loops were a
    # third of `mstore list`
    line = "  ".join(f"{{:<{max(map(len, column))}}}" for column in zip(*rows))
    lines = [line.format(*r).rstrip() for r in rows]
    # a write per TABLE_CHUNK rows, not per row: stdout may be unbuffered
    # (PYTHONUNBUFFERED), and a write per row of a 10,000-ref list cost more than everything
    # else the command does; not one write for all either, so that a reader who closes the
    # pipe early (`| head -1`) still ends the command with EPIPE -> 141, as git does
    for i in range(0, len(lines), TABLE_CHUNK):
        typer.echo("\n".join(lines[i:i + TABLE_CHUNK]))


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


# -- renderings of the read commands' data ---------------------------------------------
SPARKS = "▁▂▃▄▅▆▇█"


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


def eval_line(note: dict[str, Any]) -> str:
    """One `mstore eval` note: perplexity, loss, tokens, dataset, date."""
    return (f"perplexity {note.get('perplexity', float('nan')):.3f}, loss "
            f"{note.get('loss', float('nan')):.4f} over {note.get('tokens', '?')} tokens of "
            f"{shown_path(note.get('dataset', '?'))} "
            f"(blake3 {str(note.get('dataset_blake3', ''))[:12]}), {note.get('created_at', '')}")


def source_line(m: dict[str, Any]) -> str:
    src = m.get("source") or {}
    if src.get("type") == "huggingface":
        return f"huggingface {src.get('repo_id')}@{str(src.get('revision'))[:12]}"
    if src.get("type") == "local":
        return f"local folder {shown_path(src.get('path'))}"
    return src.get("type") or "-"


def license_text(license: str | None, note: str | None) -> str:
    """The license as list and show print it, with the note a child carries (see
    mstore.store.licenses)."""
    return (license or "unknown") + (f" ({note})" if note else "")


def render_show(doc: dict[str, Any], list_tensors: bool = False) -> str:
    m = doc["manifest"]
    dtypes = Counter(t["dtype"] for t in m["tensors"].values())
    rows = [
        ("name", ", ".join(doc["names"]) or "(no ref)"),
        ("commit", doc["commit"]),
        ("architecture", m["architecture"]),
        *([("variant", doc["variant"])] if doc.get("variant") else []),
        ("model_id", m["model_id"]),
        ("source", source_line(m)),
        ("license", license_text(m.get("license"), doc.get("license_note"))),
        ("parent", (m["parent"][:12] + (f" ({', '.join(doc['parent_names'])})"
                                         if doc["parent_names"] else "")) if m["parent"] else "-"),
        ("created", m["created_at"]),
        ("message", m["message"]),
        ("parameters", f"{fmt_count(doc['parameters'])} ({doc['parameters']:,}) in "
                       f"{len(m['tensors'])} tensors ("
                       + ", ".join(f"{n} {d}" for d, n in sorted(dtypes.items())) + ")"),
        ("size", fmt_bytes(doc["size_bytes"])
         + ("" if doc["weights_present"] else "  [weights collected or missing]")),
        ("memory", f"~{fmt_bytes(doc['run_bytes'])} to run (weights)"),
        ("config", m["config"][:12]),
        ("files", ", ".join(sorted(m["files"])) or "-"),
    ]
    a = m.get("adapter")
    if a:
        rows.append(("adapter", f"{a.get('method')} r={a.get('r')} alpha {a.get('alpha')} "
                                f"dropout {a.get('dropout')} on "
                                + ", ".join(a.get("target_modules") or [])))
    if m.get("tied_weights"):
        rows.append(("tied", ", ".join(f"{k} -> {v}" for k, v in m["tied_weights"].items())))
    t = m.get("training")
    if t:
        rows.append(("training", training_summary(t)))
        losses = [x[1] if isinstance(x, list) else x for x in t.get("train_loss", [])]
        if losses:
            rows.append(("loss curve", sparkline(losses)))
    rows += [("eval", eval_line(e)) for e in doc.get("evals") or []]
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
        if e.get("variant"):
            out.append(f"Kind:   {safe_text(e['variant'])}")
        out.append("")
        out.append(f"    {safe_text(e.get('message', ''))}")
        summary = training_summary(e.get("training"))
        if summary:
            out.append(f"    training: {safe_text(summary)}")
        for note in e.get("evals") or []:
            out.append(f"    eval: {safe_text(eval_line(note))}")
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
        if e.get("variant"):
            summary = f"[{e['variant']}] {summary}"
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


# -- what the library reports -----------------------------------------------------------
class TerminalReporter(Reporter):
    """Messages and warnings on stderr, one escaped line each; progress bars only when
    stderr is a terminal and the command prints no --json (a pipe or a log gets lines)."""

    def __init__(self, as_json: bool = False) -> None:
        self.progress_bars = not as_json and sys.stderr.isatty()

    def message(self, text: str) -> None:
        echo_line(text)

    def warning(self, text: str) -> None:
        echo_line(f"warning: {text}")

    def progress(self, total: int | None, desc: str, unit: str = "B") -> Progress:
        if not self.progress_bars:
            return Progress()
        from tqdm.auto import tqdm

        if unit == "B":
            return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024)
        return tqdm(total=total, desc=desc, unit=unit)


# -- errors -----------------------------------------------------------------------------
def _then(hint: str) -> Callable[[Any], str]:
    return lambda e: f"{e}{hint}"


def _commit_failed(e: CommitFailed) -> str:
    if e.folder is None:
        return str(e)
    where = shown_path(e.folder)
    return (f"{e.describe(where)}: once the store has room, commit it with "
            f"`mstore train --resume-commit {where}`")


# How the CLI words errors whose hint is one of its own flags or commands (the library's
# messages name none): looked up along the error's class hierarchy, most specific first.
CLI_WORDING: dict[type, Callable[[Any], str]] = {
    StoreNotFound: _then(" (run `mstore init` or set --store / MSTORE_HOME)"),
    RegistryMissing: _then("; `mstore fsck` lists its commits and `mstore fsck --lost-found` "
                           "names them again"),
    RegistryCorrupt: _then(". Restore it, or run `mstore fsck --lost-found` to set it aside "
                           "and name the commits that remain"),
    LicenseNotAccepted: lambda e: (f"license {e.license!r} not accepted: pass --accept-license "
                                   "(or answer yes at a terminal prompt); nothing was written"),
    SizeLimitExceeded: lambda e: (f"{e.model_id} is larger than --max-size: needs "
                                  f"{fmt_bytes(e.need)}, limit is {fmt_bytes(e.limit)}"),
    InvalidSetting: lambda e: f"--{e.setting.replace('_', '-')} must be {e.rule}",
    TrainingInterrupted: _then(" (--commit-on-interrupt keeps the partial model)"),
    CommitFailed: _commit_failed,
    WorkersFailed: _then("; rerun with --debug to see their output"),
    NotFastForward: _then("; pull with --as NEW_NAME to keep both, or --force to replace the "
                          "local ref"),
    LocalRefWouldMove: _then("; pull with --as NEW_NAME to keep both, or --force to move it"),
    QuantizedExport: _then("; `export --dequantize` writes full-precision weights"),
    NothingToPack: lambda e: f"nothing to {e.verb}: name one or more models, or pass --all",
    AdapterBaseMissing: _then(", or name a base in the store with --base REF"),
    AdapterBaseAmbiguous: _then(" with --base REF"),
    CommitNeedsRefName: lambda e: (f"{e.ref!r} is a commit, not a ref: name the remote ref "
                                   "with --as NAME"),
}


def error_message(e: BaseException) -> str:
    """The one line `error: ...` shows for `e`."""
    if isinstance(e, MStoreError):
        for cls in type(e).__mro__:
            if cls in CLI_WORDING:
                return CLI_WORDING[cls](e)
        return str(e)
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}"
    return f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback)"
