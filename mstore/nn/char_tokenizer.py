"""A character-level tokenizer with a canonical JSON form.

The vocabulary is a list of distinct characters (Python code points); a character's id is
its index.  ``from_text`` sorts the characters, so the same text always gives the same
vocabulary, and ``to_json`` writes sorted keys, no whitespace and UTF-8, so the same
vocabulary always gives the same bytes (and so the same content address).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["CharTokenizer"]

_TYPE = "char"
_VERSION = 1


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index and back."""

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if not chars:
            raise ValueError("chars must not be empty")
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"chars[{i}] must be a single character, got {c!r}")
            try:
                c.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate cannot be written as UTF-8 JSON, so it cannot be stored.
                raise ValueError(f"chars[{i}] is not encodable as UTF-8: {c!r}") from None
        seen: set[str] = set()
        for c in chars:
            if c in seen:
                raise ValueError(f"chars must be distinct; {c!r} occurs more than once")
            seen.add(c)
        self._chars: tuple[str, ...] = tuple(chars)
        self._ids: dict[str, int] = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Vocabulary = the sorted set of characters in ``text``."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text must not be empty: the vocabulary would be empty")
        return cls(sorted(set(text)))

    @property
    def chars(self) -> tuple[str, ...]:
        return self._chars

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    @property
    def replacement_id(self) -> int:
        """Id used for unknown characters by ``encode(errors="replace")``: space, else 0."""
        return self._ids.get(" ", 0)

    def encode(self, text: str, errors: str = "strict") -> list[int]:
        """Ids of the characters of ``text``.

        ``errors="strict"`` raises ValueError naming the first character not in the
        vocabulary; ``errors="replace"`` maps such characters to :attr:`replacement_id`.
        """
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
        ids = self._ids
        if errors == "replace":
            rep = self.replacement_id
            return [ids.get(c, rep) for c in text]
        try:
            return [ids[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise ValueError(
                f"character {c!r} (U+{ord(c):04X}) at index {text.index(c)} is not in the "
                f"vocabulary"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text for ``ids`` (ints, or anything with ``__index__`` such as 0-d tensors)."""
        chars = self._chars
        out = []
        for i in ids:
            if isinstance(i, bool):
                raise ValueError(f"token id must be an int, got {i!r}")
            try:
                j = operator.index(i)
            except TypeError:
                raise ValueError(f"token id must be an int, got {i!r}") from None
            if not 0 <= j < len(chars):
                raise ValueError(f"token id {j} is out of range for vocab_size {len(chars)}")
            out.append(chars[j])
        return "".join(out)

    def to_json(self) -> bytes:
        """Canonical bytes: ``{"chars":[...],"type":"char","version":1}``, compact UTF-8."""
        doc = {"type": _TYPE, "version": _VERSION, "chars": list(self._chars)}
        return json.dumps(
            doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str) -> CharTokenizer:
        """Parse what :meth:`to_json` wrote; anything else raises ValueError."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"char tokenizer JSON is not valid UTF-8: {e}") from None
        elif isinstance(data, str):
            text = data
        else:
            raise ValueError(f"expected bytes or str, got {type(data).__name__}")
        try:
            doc: Any = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"char tokenizer JSON does not parse: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"char tokenizer JSON must be an object, got {type(doc).__name__}")
        expected = {"type", "version", "chars"}
        if set(doc) != expected:
            extra = sorted(set(doc) - expected)
            missing = sorted(expected - set(doc))
            raise ValueError(
                f"char tokenizer JSON has unexpected keys {extra} / missing keys {missing}"
            )
        if doc["type"] != _TYPE:
            raise ValueError(f"char tokenizer JSON has type {doc['type']!r}, expected {_TYPE!r}")
        version = doc["version"]
        if isinstance(version, bool) or version != _VERSION or not isinstance(version, int):
            raise ValueError(f"unsupported char tokenizer version {version!r}")
        if not isinstance(doc["chars"], list):
            raise ValueError("char tokenizer JSON 'chars' must be a list")
        return cls(doc["chars"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self._chars == other._chars

    def __hash__(self) -> int:
        return hash(self._chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
