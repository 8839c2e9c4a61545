"""Torch-free checks an adapter runs on a model before anything is written or allocated.

`mstore import` knows config.json, the safetensors headers and the tokenizer files before
it writes an object; loading knows the manifest's tensor table before it maps a tensor.
These helpers let an adapter say what its architecture expects of them (sizes that are
positive integers, tensors with the shapes the config implies, a tokenizer that loads and
fits the embedding) and refuse the first thing that disagrees, in one line.
"""

from __future__ import annotations

import json
import re
from typing import Iterable, Mapping, NamedTuple, Sequence

from ..errors import BadTokenizer, ConfigMismatch

#: name -> (safetensors dtype, shape): what a header or a manifest says of each tensor
TensorSpecs = Mapping[str, tuple[str, Sequence[int]]]

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_SIZE = 2**31 - 1  # no dimension of a real model comes near; keeps products sane


class Expected(NamedTuple):
    """One tensor an architecture expects: its name, its shape, and the config keys that
    imply that shape (named in the refusal)."""

    name: str
    shape: tuple[int, ...]
    why: str
    required: bool = True


def match_tensors(expected: Iterable[Expected], tensors: TensorSpecs, where: str,
                  architecture: str) -> None:
    """Refuse (ConfigMismatch) at the first expected tensor that is missing, has another
    shape or is not floating point, then at the first tensor nothing explains."""
    seen: set[str] = set()
    for exp in expected:
        got = tensors.get(exp.name)
        if got is None:
            if exp.required:
                raise ConfigMismatch(where, f"tensor {exp.name} is missing: config.json "
                                     f"({exp.why}) implies it, with shape {list(exp.shape)}")
            continue
        seen.add(exp.name)
        dtype, shape = got
        if tuple(shape) != exp.shape:
            raise ConfigMismatch(where, f"tensor {exp.name} has shape {list(shape)}, config.json "
                                 f"({exp.why}) implies {list(exp.shape)}")
        if dtype not in FLOAT_DTYPES:
            raise ConfigMismatch(where, f"tensor {exp.name} has dtype {dtype}; weights must be "
                                 f"one of {', '.join(FLOAT_DTYPES)}")
    extra = sorted(set(tensors) - seen, key=_natural)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConfigMismatch(where, f"tensor {extra[0]}{more} is not part of a {architecture} "
                             "model as config.json describes it")


def _natural(name: str) -> list:
    """Layer 2 before layer 10 in messages."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class ConfigReader:
    """Typed reads of config.json values, each refused in one line when unusable."""

    def __init__(self, config: Mapping, where: str):
        if not isinstance(config, Mapping):
            raise ConfigMismatch(where, "config.json is not a JSON object")
        self.config, self.where = config, where

    def _bad(self, key: str, want: str, value) -> ConfigMismatch:
        return ConfigMismatch(self.where, f"config.json {key} must be {want}, got {value!r}")

    def size(self, key: str, default: int | None = None, *, minimum: int = 1) -> int:
        """A positive (or >= `minimum`) integer no larger than MAX_SIZE; bools are not."""
        value = self.config.get(key, default)
        if value is None and default is not None:
            value = default
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._bad(key, want, value)
        if value > MAX_SIZE:
            raise self._bad(key, f"at most {MAX_SIZE}", value)
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def number(self, key: str, *, positive: bool = False) -> None:
        """A number when present (null allowed): what transformers' config classes demand."""
        value = self.config.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (positive and not value > 0):
            raise self._bad(key, "a positive number" if positive else "a number", value)

    def int_list(self, key: str, upper: int) -> list[int]:
        value = self.config.get(key) or []
        if not (isinstance(value, list) and all(type(v) is int and 0 <= v < upper
                                                for v in value)):
            raise self._bad(key, f"a list of layer numbers 0..{upper - 1}", value)
        return value

    def layer_types(self, layers: int) -> None:
        value = self.config.get("layer_types")
        if value is None:
            return
        if not (isinstance(value, list) and len(value) == layers
                and all(isinstance(v, str) for v in value)):
            raise self._bad("layer_types", f"a list of {layers} strings (num_hidden_layers)",
                            value if not isinstance(value, list) else f"{len(value)} entries")

    def divides(self, small_key: str, small: int, big_key: str, big: int) -> None:
        if big % small:
            raise ConfigMismatch(self.where, f"config.json {big_key} ({big}) is not a multiple "
                                 f"of {small_key} ({small})")


# -- tokenizers ----------------------------------------------------------------------
def json_object(data: bytes, name: str, where: str) -> dict:
    """A tokenizer-side JSON file (tokenizer_config.json, ...) that must be a JSON object."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadTokenizer(where, f"{name} is not valid UTF-8") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise BadTokenizer(where, f"{name} is not JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise BadTokenizer(where, f"{name} is not a JSON object")
    return doc


def check_hf_tokenizer(files: Mapping[str, bytes], vocab_rows: int | None, where: str) -> None:
    """A Hugging Face tokenizer's files load (tokenizers' `Tokenizer.from_str`, torch-free)
    and every token id fits the embedding's `vocab_rows` rows.

    transformers reads tokenizer.json's `model` and `added_tokens` itself (a file without
    `added_tokens` loads in tokenizers but gives a KeyError in transformers): both must be
    there. The JSON side files transformers reads must be JSON objects.
    """
    ids: list[tuple[int, str, str]] = []  # (token id, token, the file that gives it)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if name in files:
            side = json_object(files[name], name, where)
            if name == "tokenizer_config.json":
                ids += _declared_ids(side.get("added_tokens_decoder"), name, where)
    data = files.get("tokenizer.json")
    if data is not None:
        doc = json_object(data, "tokenizer.json", where)
        if not isinstance(doc.get("model"), dict):
            raise BadTokenizer(where, "tokenizer.json has no \"model\" object")
        if not isinstance(doc.get("added_tokens"), list):
            raise BadTokenizer(where, "tokenizer.json has no \"added_tokens\" list")
        from tokenizers import Tokenizer as RustTokenizer

        try:
            tok = RustTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for all
            raise BadTokenizer(where, f"tokenizer.json does not load ({_first_line(e)})") \
                from None
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise BadTokenizer(where, "tokenizer.json has an empty vocabulary")
        ids += [(i, t, "tokenizer.json") for t, i in vocab.items()]
        ids += [(t["id"], t.get("content"), "tokenizer.json") for t in doc["added_tokens"]
                if isinstance(t, dict) and type(t.get("id")) is int]
    if ids and vocab_rows is not None:
        top_id, top_token, name = max(ids, key=lambda x: x[0])
        if top_id >= vocab_rows:
            raise BadTokenizer(where, f"{name} has token id {top_id} ({top_token!r}) but the "
                               f"embedding has {vocab_rows} rows: the vocabulary does not fit")


def _declared_ids(decoder, name: str, where: str) -> list[tuple[int, str, str]]:
    """tokenizer_config.json's `added_tokens_decoder` ({"151643": {...}}): transformers
    gives these tokens exactly these ids."""
    if decoder is None:
        return []
    if not isinstance(decoder, dict):
        raise BadTokenizer(where, f"{name} added_tokens_decoder is not an object")
    out = []
    for key, value in decoder.items():
        if not key.isdigit():
            raise BadTokenizer(where, f"{name} added_tokens_decoder has a non-numeric id {key!r}")
        content = value.get("content") if isinstance(value, dict) else value
        out.append((int(key), content, name))
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]
