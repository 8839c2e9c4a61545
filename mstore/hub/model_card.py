"""The model card (`README.md`) every export writes: Hub front matter and a body that
carries the model's lineage, training record and license with it.

Front matter follows huggingface_hub's `ModelCardData` (written by it, so every outside
string is YAML-safe): `license` (+ `license_name` / `license_link` for a license the Hub
has no id for), `base_model` (the Hub id the lineage starts from), `base_model_relation`
(`finetune`, `adapter`, `quantized` as the Hub defines them: a GGUF conversion of a Hub
model is `quantized`), `library_name`, `tags`.

An imported model exported as it was imported keeps its own card byte for byte. Every
other export gets a generated card, and the card the lineage's root came with is kept
unchanged beside it as `BASE_MODEL_CARD.md`, with its attribution and citation sections
copied into the new card's body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..store.licenses import HUB_IDS, is_permissive
from ..store.manifest import LightManifest, Manifest
from ..store.repo import Store
from .export_tensors import kind_of

CARD = "README.md"
BASE_CARD = "BASE_MODEL_CARD.md"
_ATTRIBUTION = re.compile(r"citation|cite|attribution|acknowledg|credit|notice", re.I)
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#|!~])")


@dataclass(frozen=True)
class Generation:
    """One commit of the lineage, oldest first in `Card.lineage`."""

    commit: str
    names: list[str]
    manifest: LightManifest | None


def card_files(store: Store, m: Manifest, commit: str, name: str | None,
               fmt: str) -> dict[str, bytes]:
    """{file name: bytes} of the card (and the base model's own card) for this export."""
    upstream = m.files.get(CARD)
    upstream_bytes = store.objects.read_bytes(upstream) if upstream else None
    if upstream_bytes is not None and _is_plain_import(m) and fmt == "safetensors":
        return {CARD: upstream_bytes}
    lineage = lineage_of(store, commit)
    text = render_card(store, m, commit, name, fmt, lineage, upstream_bytes)
    out = {CARD: text.encode("utf-8")}
    if upstream_bytes is not None:
        out[BASE_CARD] = upstream_bytes
    return out


def _is_plain_import(m: Manifest) -> bool:
    return m.parent is None and kind_of(m) == "full" \
        and m.source.get("type") in ("huggingface", "local")


def lineage_of(store: Store, commit: str) -> list[Generation]:
    names = store.names_by_commit()
    gens = [Generation(oid, sorted(names.get(oid, [])), lm) for oid, lm in store.lineage(commit)]
    return gens[::-1]


def hub_base_model(lineage: list[Generation]) -> str | None:
    """The Hub id the lineage starts from (its root's source), when it came from the Hub."""
    root = lineage[0].manifest
    if root is not None and root.source.get("type") == "huggingface":
        return root.source.get("repo_id")
    return None


def relation(m: Manifest, fmt: str) -> str | None:
    """The Hub's base_model_relation of the exported model to its base model."""
    kind = kind_of(m)
    if kind in ("adapter", "quantized"):
        return kind
    if m.parent is not None:
        return "finetune"
    return "quantized" if fmt == "gguf" else None  # an import as it was: no relation


def front_matter(m: Manifest, fmt: str, base_model: str | None,
                 upstream_meta: dict[str, Any], legal_files: list[str]) -> dict[str, Any]:
    from huggingface_hub import ModelCardData

    license = m.license if m.license and m.license != "unknown" else None
    fields: dict[str, Any] = {}
    if license is not None and license.lower() in HUB_IDS:
        fields["license"] = license.lower()
    elif license is not None:
        fields["license"] = "other"
        fields["license_name"] = re.sub(r"[^a-z0-9.-]+", "-", license.lower()).strip("-")
    link = upstream_meta.get("license_link")
    if isinstance(link, str) and link:
        fields["license_link"] = link
    elif license is not None and legal_files:
        fields["license_link"] = legal_files[0]
    tags = ["mstore", m.architecture, "text-generation"]
    if fmt == "gguf":
        tags.append("gguf")
    if m.parent is not None:
        tags.append("fine-tuned" if kind_of(m) == "full" else kind_of(m))
    data = ModelCardData(
        base_model=base_model, library_name="transformers" if fmt == "safetensors" else "gguf",
        pipeline_tag="text-generation", tags=tags, **fields)
    rel = relation(m, fmt)
    if base_model is not None and rel is not None:
        data.base_model_relation = rel
    return data.to_dict()


def render_card(store: Store, m: Manifest, commit: str, name: str | None, fmt: str,
                lineage: list[Generation], upstream: bytes | None) -> str:
    from huggingface_hub import ModelCardData

    upstream_text = upstream.decode("utf-8", errors="replace") if upstream else ""
    upstream_meta, upstream_body = split_front_matter(upstream_text)
    legal = sorted(n for n in m.files if "/" not in n and n.upper().startswith(
        ("LICENSE", "NOTICE", "COPYING")))
    base_model = hub_base_model(lineage)
    meta = front_matter(m, fmt, base_model, upstream_meta, legal)
    title = name or commit[:12]
    body = [f"# {md(title)}", ""]
    body.append(_summary(m, fmt, base_model, lineage))
    body += ["", "## License", "", _license_paragraph(m, lineage)]
    body += ["", "## Lineage", "", "Oldest first; one line per generation (name, commit, "
             "message):", ""]
    for g in lineage:
        names = ", ".join(g.names) or "(no ref)"
        message = g.manifest.message if g.manifest is not None else "(manifest missing)"
        body.append(f"- **{md(names)}** `{g.commit[:12]}`: {md(message)}")
    trained = [g for g in lineage if g.manifest is not None and g.manifest.training]
    if trained:
        body += ["", "## Training", ""]
        for g in trained:
            body += _training_section(store, g)
    sections = attribution_sections(upstream_body)
    if upstream:
        body += ["", "## Attribution", "",
                 f"The card the base model came with is kept unchanged in `{BASE_CARD}`."]
        if sections:
            body += ["It asks for the following, copied from it as written:", ""]
            body += sections
    if fmt == "gguf":
        body += ["", "## Use", "", "With llama.cpp: `llama-cli -m model.gguf`. With Ollama:",
                 "", "```sh", "ollama create my-model -f Modelfile   # FROM ./model.gguf",
                 "ollama run my-model", "```"]
    body += ["", f"Exported by mstore from commit `{commit}`.", ""]
    card = ModelCardData(**meta)
    return f"---\n{card.to_yaml()}\n---\n\n" + "\n".join(body)


def _summary(m: Manifest, fmt: str, base_model: str | None,
             lineage: list[Generation]) -> str:
    rel = relation(m, fmt) if base_model is not None or m.parent is not None else None
    what = {"finetune": "A fine-tune", "adapter": "An adapter", "quantized":
            "A quantized version"}.get(rel or "", "A model")
    of = f" of [{md(base_model)}](https://huggingface.co/{base_model})" if base_model else ""
    steps = len(lineage) - 1
    gens = f", {steps} generation{'s' if steps != 1 else ''} after its root" if steps else ""
    form = "a GGUF file for llama.cpp and Ollama" if fmt == "gguf" else \
        "Hugging Face transformers format"
    return f"{what}{of} ({md(m.architecture)}{gens}), exported as {form}."


def _license_paragraph(m: Manifest, lineage: list[Generation]) -> str:
    license = m.license or "unknown"
    text = f"License: **{md(license)}**"
    if license == "unknown":
        return text + ". The license is not known: check it before you share this model."
    restricted = [g for g in lineage if g.manifest is not None and g.manifest.license
                  and g.manifest.license != "unknown" and not is_permissive(g.manifest.license)]
    if m.parent is not None and restricted:
        root = restricted[0]
        who = ", ".join(root.names) or root.commit[:12]
        text += (f", carried down from {md(who)}: it is not a permissive license, and its "
                 "terms apply to this model too")
    return text + "."


def _training_section(store: Store, g: Generation) -> list[str]:
    t = g.manifest.training or {}
    names = ", ".join(g.names) or g.commit[:12]
    out = [f"### {md(names)} (`{g.commit[:12]}`)", ""]
    steps = t.get("steps")
    out.append(f"- steps: {steps if steps is not None else 'unknown'}"
               + (f" ({t['tokens_seen']:,} tokens)" if isinstance(t.get("tokens_seen"), int)
                  else ""))
    data = t.get("dataset") or {}
    if data:
        path = str(data.get("path") or "")
        out.append(f"- data: {md(path.rsplit('/', 1)[-1]) or '?'}, blake3 "
                   f"`{md(str(data.get('blake3') or '?'))}`")
    final_train, final_eval = last_value(t.get("train_loss")), last_value(t.get("eval_loss"))
    if final_train is not None:
        out.append(f"- final train loss: {final_train:.4f}")
    if final_eval is not None:
        out.append(f"- final eval loss: {final_eval:.4f}")
    notes = eval_notes(store, g.commit)
    if notes:
        for n in notes:
            out.append("- eval note: " + md(describe_eval(n)))
    else:
        out.append("- eval notes: none recorded")
    out.append("")
    return out


def last_value(history: Any) -> float | None:
    """The last loss of a `[[step, loss], ...]` history (None when empty or absent)."""
    if not isinstance(history, list) or not history:
        return None
    last = history[-1]
    value = last[1] if isinstance(last, list) and len(last) == 2 else last
    return float(value) if isinstance(value, (int, float)) else None


def eval_notes(store: Store, commit: str) -> list[dict[str, Any]]:
    """The eval attachments' payloads of `commit`, oldest first."""
    return [a.payload for a in store.attachments.list(commit, "eval")]


def describe_eval(payload: dict[str, Any]) -> str:
    parts = [str(payload.get("dataset") or payload.get("dataset_blake3", "?")[:12])]
    for key in ("loss", "perplexity"):
        if isinstance(payload.get(key), (int, float)):
            parts.append(f"{key} {payload[key]:.4f}")
    if isinstance(payload.get("tokens"), int):
        parts.append(f"{payload['tokens']:,} tokens")
    return ", ".join(parts)


def md(text: Any) -> str:
    """An outside string as inert Markdown: one line, its markup characters escaped."""
    one_line = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", one_line)


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(front matter as a dict, body) of a card; a card without valid YAML front matter
    has an empty dict and is all body."""
    import yaml

    if not text.startswith("---"):
        return {}, text
    end = text.find("\n---", 3)
    if end < 0:
        return {}, text
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}, text
    body = text[end + 4:].lstrip("\n")
    return (meta if isinstance(meta, dict) else {}), body


def attribution_sections(body: str) -> list[str]:
    """The sections of a card whose heading asks for attribution or citation, as written
    (each runs to the next heading of the same or a higher level)."""
    out: list[str] = []
    level = None  # the heading level of the section being copied, None between them
    in_fence = False
    for line in body.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.match(line)
        if heading and level is not None and len(heading[1]) <= level:
            out.append("")
            level = None
        if heading and level is None and _ATTRIBUTION.search(heading[2]):
            level = len(heading[1])
        if level is not None:
            out.append(line)
    if level is not None:
        out.append("")
    return out
