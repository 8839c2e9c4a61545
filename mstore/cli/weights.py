"""The commands that load weights: generate, export, merge, train. The only ones that import
torch, inside their own functions, so every other command stays light."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import env

from ..units import fmt_bytes
from .options import JsonOpt, NameArg, store_of
from .output import TerminalReporter, echo, print_json, safe_lines, safe_text, shown_path


def register(app: typer.Typer) -> None:
    """Add generate, export, merge and train to `app`."""
    app.command()(generate)
    app.command()(export)
    app.command()(merge)
    app.command()(train)


def generate(
    ctx: typer.Context,
    name: Annotated[Optional[str], typer.Argument(help="Model (else the config's model_name).")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    config: Annotated[Optional[Path], typer.Option("--config", help="Training config whose "
                                                   "model_name to use.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=0)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t",
                                               help="0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option("--top-k")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Reproducible sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Re-hash every object loaded.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or "
                                                 "float16 (default: the model's own).")] = None,
):
    """Generate text with a model, streamed to stdout."""
    if name is None:
        if config is None:
            raise typer.BadParameter("name a model or pass --config", param_hint="NAME")
        from ..training.config import config_model_name

        name = config_model_name(config)
        if not name:
            raise typer.BadParameter(f"{config} has model_name: null; name a model",
                                     param_hint="NAME")
    from ..runtime.generate import GenerateOptions, generate_text

    opts = GenerateOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, chat=chat, verify=verify, device=device,
                           dtype=dtype)
    generate_text(store_of(ctx, must_exist=True), name, prompt, opts, on_text=_stream_text)
    sys.stdout.write("\n")


def _stream_text(text: str) -> None:
    """Generated text as it comes. To a terminal its newlines stay and any other control is
    shown escaped (a model's output must not drive the terminal); to a pipe or a file it is
    exact, as the tokenizer decoded it."""
    sys.stdout.write(safe_lines(text) if sys.stdout.isatty() else text)
    sys.stdout.flush()


def export(ctx: typer.Context, name: NameArg,
           dest: Annotated[Path, typer.Argument(help="New folder to write.")],
           adapter: Annotated[bool, typer.Option(
               "--adapter", help="A LoRA child as a PEFT adapter folder (adapter_config.json, "
               "adapter_model.safetensors) instead of the merged model.")] = False,
           sign: Annotated[Optional[Path], typer.Option(
               "--sign", help="Also write DIR/model.sig, an OpenSSF model-signing signature "
               "made with this PEM ECDSA P-256 private key.")] = None,
           fmt: Annotated[str, typer.Option(
               "--format", help="safetensors (a Hugging Face folder) or gguf (one file for "
               "llama.cpp and Ollama).")] = "safetensors",
           gguf_type: Annotated[str, typer.Option(
               "--type", help="GGUF tensor type: f16, bf16 or q8_0.")] = "f16",
           dequantize: Annotated[bool, typer.Option(
               "--dequantize", help="A quantized child: write full-precision weights.")] = False,
           as_json: JsonOpt = False):
    """Write a Hugging Face-format folder or a GGUF file, with a model card (README.md); a
    LoRA child is written merged into its base, or as its PEFT folder with --adapter."""
    from ..hub.export import InlineTensor, export_model

    def merge(commit: str) -> dict[str, InlineTensor]:
        from ..runtime.lora import merged_weights

        return {n: InlineTensor(*t) for n, t in merged_weights(store, commit).items()}

    if gguf_type != "f16" and fmt != "gguf":
        raise typer.BadParameter("--type applies to --format gguf", param_hint="--type")
    if sign is not None:
        from ..hub.export_signing import check_signing_key

        keyid = check_signing_key(sign)  # a bad key is refused before anything is written
    store = store_of(ctx, must_exist=True)
    doc = export_model(store, name, dest, fmt=fmt, gguf_type=gguf_type, adapter=adapter,
                       merge=merge, dequantize=dequantize)
    if sign is not None:
        from ..hub.export_signing import sign_folder

        signature = sign_folder(dest, sign)
        doc["files"] = sorted(doc["files"] + [signature.name])
        doc["signature"] = {"file": signature.name, "keyid": keyid}
    if as_json:
        return print_json(doc)
    what, where = safe_text(doc["name"] or doc["commit"][:12]), safe_text(shown_path(doc["dir"]))
    echo(f"exported {what} to {where}: "
         + ", ".join(safe_text(f) for f in doc["files"]))


def merge(ctx: typer.Context, name: NameArg,
          new_name: Annotated[Optional[str], typer.Option("--name", help="Name of the merged "
                                                          "model.")] = None,
          as_json: JsonOpt = False):
    """Commit a LoRA child merged into its base's weights, as a full child (tensors the
    adapter does not touch stay the base's objects)."""
    from ..runtime.lora import merge as run_merge

    result = run_merge(store_of(ctx, must_exist=True), name, new_name)
    if as_json:
        return print_json(result.__dict__)
    echo(f"merged {safe_text(name)} into {safe_text(result.name)}  commit {result.commit[:12]}; "
         f"{fmt_bytes(result.bytes_written)} written, "
         f"{fmt_bytes(result.bytes_reused)} shared with the base")


def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", "-c",
                                                   help="Training config (YAML).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the new model.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Override a config key: --set learning_rate=1e-4 (repeatable).")] = None,
    commit_on_interrupt: Annotated[bool, typer.Option(
        "--commit-on-interrupt", help="On Ctrl-C, commit the model as it is.")] = False,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, help="Processes on this node (launches torchrun).")] = 1,
    recovery_dir: Annotated[Optional[Path], typer.Option(
        "--recovery-dir", help="Where a model whose commit fails is kept (default: "
        "./mstore-train-recovery-<time>, else the temp folder).")] = None,
    resume_commit: Annotated[Optional[Path], typer.Option(
        "--resume-commit", help="Commit the model kept in this recovery folder "
        "instead of training.")] = None,
    pack: Annotated[bool, typer.Option(
        "--pack", help="Then store the child's new tensors as deltas against its parent's "
        "(as `mstore pack` does).")] = False,
    as_json: JsonOpt = False,
):
    """Fine-tune a model (or train the custom transformer from scratch) and commit it."""
    if resume_commit is not None:
        if config is not None or overrides:
            raise typer.BadParameter("--resume-commit commits a trained model: give no "
                                     "--config or --set", param_hint="--resume-commit")
        return _resume_commit(ctx, resume_commit, name, pack, as_json)
    if config is None:
        raise typer.BadParameter("give --config FILE (or --resume-commit DIR)",
                                 param_hint="--config")
    from ..training.config import load_config

    cfg = load_config(config, overrides or [], name)
    if nproc > 1 and not env.under_torchrun():
        from ..runtime.distributed import launch

        argv = ["--store", str(store_of(ctx).root), "train", "--config", str(config)]
        for item in overrides or []:
            argv += ["--set", item]
        argv += (["--name", name] if name else []) + (["--json"] if as_json else [])
        argv += ["--commit-on-interrupt"] if commit_on_interrupt else []
        argv += ["--recovery-dir", str(recovery_dir)] if recovery_dir else []
        argv += ["--pack"] if pack else []
        raise typer.Exit(launch(nproc, argv))
    from ..training.loop import train as run_training

    result = run_training(store_of(ctx), cfg, commit_on_interrupt=commit_on_interrupt,
                          reporter=TerminalReporter(as_json), recovery_dir=recovery_dir)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
    packed = _pack_child(ctx, result.commit, as_json) if pack else None
    if as_json:
        return print_json({**result.to_json(), **({"packed": packed} if pack else {})})
    ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
    echo(f"committed {safe_text(result.name)}  commit {result.commit[:12]}"
         + (f"  (parent {result.parent[:12]})" if result.parent else ""))
    echo(f"  {result.steps} steps, loss {result.train_loss:.4f}{ev}; "
         f"{fmt_bytes(result.bytes_written)} written, "
         f"{fmt_bytes(result.bytes_reused)} shared with existing objects"
         + (" [interrupted]" if result.interrupted else ""))
    _echo_packed(packed)


def _pack_child(ctx: typer.Context, commit: str, as_json: bool) -> dict:
    """`train --pack`: the child is committed (and its ref added) loose first, so a
    failure here loses nothing; packing is `mstore pack COMMIT`, crash-safe as that is."""
    from ..store.packing import pack as pack_objects

    return pack_objects(store_of(ctx), [commit], reporter=TerminalReporter(as_json)).to_json()


def _echo_packed(packed: dict | None) -> None:
    if packed is not None:
        echo(f"  packed {packed['packed']} objects ({packed['deltas']} as deltas), "
             f"{fmt_bytes(packed['loose_bytes'])} -> {fmt_bytes(packed['packed_bytes'])}")


def _resume_commit(ctx: typer.Context, folder: Path, name: Optional[str], pack: bool,
                   as_json: bool):
    from ..training.recovery import commit

    result = commit(store_of(ctx), folder, name)
    packed = _pack_child(ctx, result.commit, as_json) if pack else None
    if as_json:
        return print_json({**result.__dict__, "recovered_from": str(folder),
                           **({"packed": packed} if pack else {})})
    echo(f"committed {safe_text(result.name)}  commit {result.commit[:12]} from "
         f"{safe_text(shown_path(folder))}; {fmt_bytes(result.bytes_written)} written "
         "(the folder can now be deleted)")
    _echo_packed(packed)
