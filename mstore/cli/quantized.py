"""`mstore quantize` and `mstore eval`: quantized children, and what a model's weights cost
in quality. Both load torch, inside their own functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..units import fmt_bytes
from .options import JsonOpt, NameArg, store_of
from .output import TerminalReporter, echo, print_json, print_table, safe_text


def register(app: typer.Typer) -> None:
    """Add quantize and eval to `app`."""
    app.command()(quantize)
    app.command("eval")(eval_)


def quantize(
    ctx: typer.Context, name: NameArg,
    scheme: Annotated[str, typer.Option("--scheme", help="int8 (per output channel) or "
                                        "int4 (grouped).")],
    group_size: Annotated[Optional[int], typer.Option(
        "--group-size", help="int4: inputs per scale (default 128; must divide each "
        "layer's width).")] = None,
    new_name: Annotated[Optional[str], typer.Option(
        "--name", help="Name of the child (default {stem}-int8 / {stem}-int4).")] = None,
    as_json: JsonOpt = False,
):
    """Commit a child whose linear-layer weights are quantized (weight-only)."""
    from ..runtime.quantize import quantize_model

    result = quantize_model(store_of(ctx, must_exist=True), name, scheme, group_size,
                            new_name, TerminalReporter(as_json))
    if as_json:
        return print_json(result.to_json())
    g = f" g{result.group_size}" if result.group_size else ""
    echo(f"committed {safe_text(result.name)}  commit {result.commit[:12]}  "
         f"({result.scheme}{g} of {result.parent[:12]})")
    echo(f"  {result.quantized} tensors quantized, {result.shared} shared with the parent "
         f"({fmt_bytes(result.bytes_shared)}); {fmt_bytes(result.bytes_written)} written")
    echo(f"  memory to run: ~{fmt_bytes(result.run_bytes)} "
         f"(parent ~{fmt_bytes(result.parent_run_bytes)})")


def eval_(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(help="One or more models.")],
    dataset: Annotated[Path, typer.Option("--dataset", help=".txt or .jsonl text to score.")],
    seq_len: Annotated[Optional[int], typer.Option(
        "--seq-len", help="Tokens per window (default 128, or the model's context).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        "--max-tokens", help="Score at most this many tokens.")] = None,
    as_json: JsonOpt = False,
):
    """Loss and perplexity on a text, side by side; recorded as a note on each commit."""
    from ..training.evaluate import evaluate

    results = evaluate(store_of(ctx, must_exist=True), names, dataset, seq_len, max_tokens,
                       TerminalReporter(as_json))
    if as_json:
        return print_json([r.to_json() for r in results])
    rows = [("NAME", "COMMIT", "KIND", "TOKENS", "LOSS", "PERPLEXITY", "AGREEMENT")]
    for r in results:
        rows.append((r.name or "-", r.commit[:12], r.describe or r.kind, f"{r.tokens:,}",
                     f"{r.loss:.4f}", f"{r.perplexity:.3f}",
                     "-" if r.agreement is None else f"{100 * r.agreement:.1f}%"))
    print_table(rows)
    echo(f"dataset {safe_text(results[0].dataset)} (blake3 {results[0].dataset_blake3[:12]}), "
         f"windows of {results[0].seq_len} tokens; recorded on each commit")
