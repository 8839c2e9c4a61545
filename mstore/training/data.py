"""Training data: documents read from a .txt or .jsonl file, packed into token blocks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapters.base import Tokenizer
from ..errors import DatasetError


# -- data ------------------------------------------------------------------------------
def read_documents(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DatasetError(f"{path}:{i}: not a JSON line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DatasetError(f"{path}:{i}: expected {{\"text\": ...}}")
            docs.append(row["text"])
    else:
        docs = [path.read_text(encoding="utf-8", errors="replace")]
    docs = [d for d in docs if d]
    if not docs:
        raise DatasetError(f"config key 'dataset': {path} holds no text")
    return docs


def pack(tok: Tokenizer, docs: list[str], seq_len: int,
         eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Documents -> one token stream (eos between documents) -> (train, eval) blocks."""
    eos = tok.eos_token_ids[:1]
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d) + eos
    n = len(ids) // seq_len
    if n < 1:
        raise DatasetError(f"config key 'dataset': only {len(ids)} tokens, fewer than "
                           f"seq_len ({seq_len})")
    blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    n_eval = max(1, round(n * eval_fraction)) if eval_fraction > 0 and n >= 2 else 0
    if n_eval == 0:
        return blocks, None
    return blocks[: n - n_eval], blocks[n - n_eval:]
