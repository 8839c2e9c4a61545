"""Training configs: the YAML of SPEC "Training config", loaded into one checked dataclass.

Validation lives here and nowhere else; every message names the key. Command-line
overrides (`--set key=value`) are typed by the field they set.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, DatasetError

ARCH_KEYS = ("n_layers", "d_model", "n_heads", "dropout", "block_size")
ARCH_DEFAULTS = {"n_layers": 4, "d_model": 128, "n_heads": 4, "dropout": 0.0, "block_size": None}
MAX_CONFIG_BYTES = 1024 * 1024
METHODS = ("full", "lora")
# the `lora:` block (method: lora); target_modules None: the architecture's own default
# (`Adapter.lora_targets`: every attention and MLP projection)
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": None}


@dataclass
class TrainConfig:
    dataset: str  # .txt (one document) or .jsonl ({"text": ...} per line)
    model_name: str | None = None  # a ref to fine-tune; None trains a model from scratch
    learning_rate: float = 3.0e-4  # peak learning rate (after warmup)
    batch_size: int = 8  # sequences per micro-batch, over all processes together
    max_steps: int = 200  # optimizer steps
    seq_len: int = 128  # tokens per training sequence
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 10  # linear warmup, then cosine decay to min_lr_ratio * lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    eval_interval: int = 50  # steps between eval-loss measurements (and at the end)
    seed: int = 0  # seeds init, batch order and dropout
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "float32"  # float32 | bfloat16 | float16 (autocast; weights stay float32)
    freeze: list[str] = field(default_factory=list)  # regexes (re.search) of frozen params
    output_name: str | None = None  # default: {stem}-finetuned-NNN
    tokenizer: str | None = None  # a ref, or a folder / tokenizer.json, instead of the model's
    strategy: str = "ddp"  # with several processes (torchrun): ddp | fsdp (FSDP2 fully_shard)
    eval_fraction: float = 0.1  # share of the packed data held out for eval loss
    max_grad_norm: float = 1.0  # gradient clipping (0 disables)
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of learning_rate
    method: str = "full"  # full: train every (unfrozen) weight; lora: a LoRA adapter (peft)
    lora: dict[str, Any] | None = None  # r, alpha, dropout, target_modules (method: lora)
    # architecture parameters of the from-scratch model (adapters.base.SCRATCH_ARCHITECTURE)
    n_layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    dropout: float | None = None
    block_size: int | None = None  # context length of the from-scratch model (default seq_len)

    def arch_params(self) -> dict[str, Any]:
        """Architecture of a from-scratch model, defaults filled in."""
        out = {k: (getattr(self, k) if getattr(self, k) is not None else ARCH_DEFAULTS[k])
               for k in ARCH_KEYS}
        if out["block_size"] is None:
            out["block_size"] = self.seq_len
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TYPES: dict[str, tuple] = {}
for _f in fields(TrainConfig):
    t = str(_f.type)
    if "list" in t:
        _TYPES[_f.name] = (list,)
    elif t.startswith("dict"):
        _TYPES[_f.name] = (dict,)
    elif t.startswith("int"):
        _TYPES[_f.name] = (int,)
    elif t.startswith("float"):
        _TYPES[_f.name] = (float,)
    else:
        _TYPES[_f.name] = (str,)
_OPTIONAL = {f.name for f in fields(TrainConfig) if "None" in str(f.type)}
_CHOICES = {"device": ("auto", "cpu", "cuda", "mps"), "strategy": ("ddp", "fsdp"),
            "dtype": ("float32", "bfloat16", "float16"), "method": METHODS}
_INT_RE = re.compile(r"[-+]?[0-9][0-9_]*")
_POSITIVE = ("batch_size", "max_steps", "seq_len", "grad_accum_steps", "eval_interval",
             "n_layers", "d_model", "n_heads", "block_size")


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = (),
                name: str | None = None) -> TrainConfig:
    """Read, override, check. Raises ConfigError / DatasetError naming the key."""
    path = Path(path)
    doc = _read_doc(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key = key.strip()
        block, dot, sub = key.partition(".")
        if dot and block == "lora":
            lora = doc.get("lora")
            doc["lora"] = {**(lora if isinstance(lora, dict) else {}),
                           sub: _parse_lora_override(key, sub, value)}
        else:
            doc[key] = _parse_override(key, value)
    if name is not None:
        doc["output_name"] = name
    cfg = from_mapping(doc)
    cfg.dataset = str(resolve_dataset(cfg.dataset, path.parent))
    return cfg


def config_model_name(path: Path | str) -> str | None:
    """The `model_name` of a training config, for `generate --config`: generation uses no
    dataset, so only this key is read and checked."""
    doc = _read_doc(Path(path))
    value = doc.get("model_name")
    _check_type("model_name", value)
    return value


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is larger than 1 MiB")
    try:
        doc = yaml.safe_load(raw.decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config {path} is not valid YAML{where}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path} must be a mapping of key: value")
    return doc


def from_mapping(doc: dict[str, Any]) -> TrainConfig:
    valid = [f.name for f in fields(TrainConfig)]
    for key in doc:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
    doc = {key: _number(key, value) for key, value in doc.items()}
    for key, value in doc.items():
        _check_type(key, value)
    if not doc.get("dataset"):
        raise ConfigError("config key 'dataset' is missing: name a .txt or .jsonl file")
    cfg = TrainConfig(**doc)
    for key in _POSITIVE:
        v = getattr(cfg, key)
        if v is not None and v <= 0:
            raise ConfigError(f"config key {key!r} must be positive, got {v}")
    for key in ("learning_rate",):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"config key {key!r} must be positive")
    for key in ("warmup_steps",):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0")
    if not 0 <= cfg.eval_fraction < 1:
        raise ConfigError("config key 'eval_fraction' must be in [0, 1)")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise ConfigError("config key 'dropout' must be in [0, 1)")
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}, "
                              f"got {getattr(cfg, key)!r}")
    for pattern in cfg.freeze:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"config key 'freeze': bad regex {pattern!r} ({e})") from None
    _check_method(cfg)
    return cfg


def _check_method(cfg: TrainConfig) -> None:
    """`lora:` only with method: lora, and then filled in with its defaults (what the
    training record keeps); keys that LoRA cannot honour are refused by name."""
    if cfg.method != "lora":
        if cfg.lora is not None:
            raise ConfigError("config key 'lora' is for method: lora (this config trains "
                              "method: full); set method: lora or remove the key")
        return
    given = dict(cfg.lora or {})
    for key in given:
        if key not in LORA_DEFAULTS:
            close = difflib.get_close_matches(str(key), list(LORA_DEFAULTS), n=1)
            hint = f" (did you mean 'lora.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key 'lora.{key}'{hint}")
    lora = {**LORA_DEFAULTS, **given}
    r, alpha, dropout, targets = (lora[k] for k in ("r", "alpha", "dropout", "target_modules"))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"config key 'lora.r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"config key 'lora.alpha' must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0 <= dropout < 1:
        raise ConfigError(f"config key 'lora.dropout' must be a number in [0, 1), "
                          f"got {dropout!r}")
    if targets is not None and not (isinstance(targets, list) and targets
                                    and all(isinstance(t, str) and t for t in targets)):
        raise ConfigError("config key 'lora.target_modules' must be a non-empty list of "
                          f"module names, got {targets!r}")
    if cfg.model_name is None:
        raise ConfigError("config key 'method': lora fine-tunes a model; set model_name "
                          "(a model from scratch trains with method: full)")
    for key, value, why in (("freeze", cfg.freeze, "LoRA trains only the adapter"),
                            ("tokenizer", cfg.tokenizer, "an adapter uses its base's tokenizer")):
        if value:
            raise ConfigError(f"config key {key!r} is for method: full ({why}); remove it")
    if cfg.strategy == "fsdp":
        raise ConfigError("config key 'strategy': method: lora trains with ddp (the frozen "
                          "base is whole on every process); set strategy: ddp")
    cfg.lora = {**lora, "alpha": float(alpha) if isinstance(alpha, float) else alpha,
                "dropout": float(dropout)}


def _number(key: str, value: Any) -> Any:
    """A numeric key's value as the number it spells. YAML 1.1 reads `1e-4`, `-2e3` and
    `+1e-4` as strings (its floats need a dot and a signed exponent), and people quote
    numbers; those are numbers. An int key takes an integral spelling (`1e3`, `1_000`).
    Anything else is returned as is, for `_check_type` to refuse with the usual message."""
    typ = _TYPES.get(key, (None,))[0]
    if typ not in (int, float) or isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if typ is int and _INT_RE.fullmatch(text) else float(text)
        except ValueError:
            return value
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_type(key: str, value: Any) -> None:
    if value is None:
        if key in _OPTIONAL:
            return
        raise ConfigError(f"config key {key!r} cannot be null")
    (typ,) = _TYPES[key]
    ok = isinstance(value, typ) and not isinstance(value, bool)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if typ is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if typ is float and ok and not math.isfinite(float(value)):
        ok = False
    if not ok:
        want = {int: "an integer", float: "a number", str: "a string",
                list: "a list of strings", dict: "a mapping of key: value"}[typ]
        raise ConfigError(f"config key {key!r} must be {want}, got {value!r}")


def _parse_lora_override(key: str, sub: str, value: str) -> Any:
    """`--set lora.r=8`: the value as YAML reads it (`_check_method` checks it)."""
    if sub not in LORA_DEFAULTS:
        return value  # _check_method names the unknown key
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: cannot read {value!r}") from None
    if sub == "target_modules" and isinstance(parsed, str):
        return [parsed]
    return parsed


def _parse_override(key: str, value: str) -> Any:
    if key not in _TYPES:
        return value  # from_mapping names the unknown key
    (typ,) = _TYPES[key]
    if value.strip().lower() in ("null", "none", "~") and key in _OPTIONAL:
        return None
    try:
        if typ in (int, float):
            number = _number(key, value)
            if isinstance(number, str) or (typ is int and not isinstance(number, int)):
                raise ValueError(value)
            return number
        if typ is list:
            parsed = yaml.safe_load(value)
            return parsed if isinstance(parsed, list) else [value]
    except (ValueError, yaml.YAMLError):
        want = {int: "an integer", float: "a number"}.get(typ, "a list")
        raise ConfigError(f"--set {key}: expected {want}, got {value!r}") from None
    return value


def resolve_dataset(dataset: str, config_dir: Path) -> Path:
    """The dataset path as given (relative to the working folder), else next to the config."""
    p = Path(dataset).expanduser()
    candidates = [p] if p.is_absolute() else [p, config_dir / p]
    for c in candidates:
        if c.is_file():
            if c.stat().st_size == 0:
                raise DatasetError(f"config key 'dataset': {dataset} is empty")
            if c.suffix not in (".txt", ".jsonl"):
                raise DatasetError(f"config key 'dataset': {dataset} must be .txt or .jsonl")
            return c.resolve()
    raise DatasetError(f"config key 'dataset': {dataset} not found")


def config_from(source: "TrainConfig | dict[str, Any] | Path | str",
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A checked config from a YAML file, a mapping or a TrainConfig, with `overrides`
    (typed values, as a Python caller writes them) applied on top: the Python API's
    `mstore.train`. A relative dataset is found as `load_config` finds it."""
    if isinstance(source, TrainConfig):
        doc, config_dir = asdict(source), Path.cwd()
    elif isinstance(source, dict):
        doc, config_dir = dict(source), Path.cwd()
    else:
        path = Path(source)
        doc, config_dir = _read_doc(path), path.parent
    doc.update(overrides or {})
    cfg = from_mapping(doc)
    cfg.dataset = str(resolve_dataset(cfg.dataset, config_dir))
    return cfg
