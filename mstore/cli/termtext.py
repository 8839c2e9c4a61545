"""Escaping of outside strings for the terminal: nothing from a card, a file name, a config,
a remote or an error message may move the cursor, clear the screen, retitle the window,
reorder text (bidi overrides) or forge a line of output.

`safe_text` is applied to each VALUE where text output is built (a value is one line: a
newline in it is shown as `\\n`); `safe_lines` is the last pass over whole output lines and
keeps only their structural newlines. Both are idempotent: escaped text is plain ASCII.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

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
