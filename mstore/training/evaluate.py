"""`mstore eval`: loss and perplexity of one or several models on a text, recorded as an
"eval" attachment on each commit (attachments never change a commit's id).

The text (a .txt or .jsonl file, as training reads it) is tokenized by each model's own
tokenizer, cut at `max_tokens`, and scored in consecutive windows of `seq_len` tokens: the
loss is the mean next-token cross-entropy over every predicted token, the perplexity its
exponential (every token but the first is predicted once). With several models sharing a tokenizer, `agreement` is the share of
positions where a model's greedy (argmax) token is the first model's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters.base import adapter_for
from ..errors import DatasetError, EvalError
from ..reporting import SILENT, Reporter
from ..store.objects import hash_file
from ..store.repo import Store
from .data import read_documents

DEFAULT_SEQ_LEN = 128
BATCH = 8  # windows per forward pass


@dataclass
class EvalResult:
    name: str | None
    commit: str
    kind: str
    describe: str
    dataset: str
    dataset_blake3: str
    tokens: int  # tokens predicted
    loss: float
    perplexity: float
    seq_len: int
    max_tokens: int | None
    agreement: float | None  # greedy tokens equal to the first model's (None for the first)
    seconds: float
    attachment: str  # the "eval" attachment's object id

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def payload(self) -> dict[str, Any]:
        """What the attachment records (its commit is the attachment's own field)."""
        keys = ("dataset", "dataset_blake3", "tokens", "loss", "perplexity", "seq_len",
                "max_tokens")
        return {k: getattr(self, k) for k in keys}


def evaluate(store: Store, refs: list[str], dataset: Path, seq_len: int | None = None,
             max_tokens: int | None = None, reporter: Reporter = SILENT) -> list[EvalResult]:
    """Score every model of `refs` on `dataset` and record each result on its commit."""
    if seq_len is not None and seq_len < 2:
        raise EvalError("seq_len must be at least 2 (one token to predict)")
    if max_tokens is not None and max_tokens < 2:
        raise EvalError("max_tokens must be at least 2 (one token to predict)")
    dataset = Path(dataset)
    if not dataset.is_file():
        raise DatasetError(f"dataset {dataset} not found")
    if not dataset.read_bytes().strip():
        raise EvalError(f"dataset {dataset} is empty: nothing to evaluate")
    docs = read_documents(dataset)
    digest = hash_file(dataset)
    store.require()
    resolved = [store.resolve(r) for r in refs]  # every name checked before any load
    results: list[EvalResult] = []
    first_greedy: torch.Tensor | None = None
    for ref, r in zip(refs, resolved):
        started = time.time()
        adapter = adapter_for(store, r.commit)
        model = adapter.load_checkpoint()
        tok = adapter.tokenizer()
        ids = _token_stream(tok, docs, max_tokens)
        n = _window(seq_len, adapter.context_length())
        loss, count, greedy = _score(adapter, model, ids, n)
        agreement = None
        if first_greedy is not None and first_greedy.shape == greedy.shape:
            agreement = float((greedy == first_greedy).float().mean())
        elif first_greedy is None:
            first_greedy = greedy
        del model
        m = adapter.manifest
        result = EvalResult(
            name=r.name or next(iter(sorted(store.names_by_commit().get(r.commit, []))), None),
            commit=r.commit, kind=m.kind, describe=m.describe(), dataset=str(dataset),
            dataset_blake3=digest, tokens=count, loss=loss, perplexity=math.exp(loss),
            seq_len=n, max_tokens=max_tokens, agreement=agreement,
            seconds=round(time.time() - started, 3), attachment="")
        reporter.message(f"{ref}: loss {loss:.4f} over {count} tokens")
        results.append(result)
    for result in results:  # each add is atomic and append-only (store.attachments)
        result.attachment = store.attachments.add(result.commit, "eval", result.payload())
    return results


def _token_stream(tok, docs: list[str], max_tokens: int | None) -> torch.Tensor:
    eos = tok.eos_token_ids[:1]
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d) + eos
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len(ids) < 2:
        raise EvalError(f"the dataset encodes to {len(ids)} token(s): nothing to predict")
    return torch.tensor(ids, dtype=torch.long)


def _window(seq_len: int | None, context: int | None) -> int:
    n = seq_len or (min(DEFAULT_SEQ_LEN, context) if context else DEFAULT_SEQ_LEN)
    if context is not None and n > context:
        raise EvalError(f"seq_len {n} is longer than the model's context ({context} tokens)")
    return n


@torch.no_grad()  # not inference_mode: quanto's tensors make tensors of their own
def _score(adapter, model, ids: torch.Tensor, n: int) -> tuple[float, int, torch.Tensor]:
    """(mean loss, tokens predicted, greedy token at each predicted position)."""
    # each window starts at the last token of the one before: every token but the first
    # is predicted exactly once
    windows = [ids[i:i + n] for i in range(0, len(ids) - 1, n - 1)]
    windows = [w for w in windows if len(w) >= 2]
    total, count, greedy = 0.0, 0, []
    full = [w for w in windows if len(w) == n]
    rest = [w for w in windows if len(w) != n]
    batches = [torch.stack(full[i:i + BATCH]) for i in range(0, len(full), BATCH)]
    batches += [w.unsqueeze(0) for w in rest]
    for batch in batches:
        logits, _ = adapter.forward(model, batch)
        logits = logits[:, :-1].float()
        targets = batch[:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
        greedy.append(logits.argmax(-1).reshape(-1))
    return total / count, count, torch.cat(greedy)
