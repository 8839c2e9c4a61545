"""`mstore import` of a PEFT LoRA adapter (a folder or Hub repo holding adapter_config.json):
an adapter child committed on a base the store already holds.

The base is `--base REF`, else the model whose source (Hub repo id, model id or local path)
is the adapter's `base_model_name_or_path`. Before any object is written, the adapter's
config must be plain LoRA and every tensor of adapter_model.safetensors a LoRA pair whose
shapes fit the base's weight ([r, in] and [out, r] for an [out, in] weight). Torch-free:
the tensors are copied into objects as the weights of a model import are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import (
    AdapterBaseAmbiguous, AdapterBaseMissing, AdapterError, AdapterMismatch, BadSource, InvalidSafetensors, MStoreError,
)
from ..reporting import Reporter
from ..store import failpoints
from ..store.lora_names import adapted_modules, adapter_summary
from ..store.manifest import Manifest
from ..store.repo import Store
from ..store.safetensors_io import read_header_from_file
from ..units import fmt_bytes
from .import_cache import ImportCache
from .plan import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SourcePlan

if TYPE_CHECKING:
    from .importer import ImportResult

# adapter_config.json settings that change what the tensors mean beyond plain LoRA
_UNSUPPORTED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "trainable_token_indices")


def find_base(store: Store, plan: SourcePlan, base: str | None) -> tuple[str, Manifest, str]:
    """(commit, manifest, shown name) of the base: `base` if given, else the one root model
    (an import or a model from scratch) whose Hub repo id, model id or local path is the
    adapter's base_model_name_or_path. Fine-tunes and merges keep their root's model_id:
    they are no candidates."""
    if base is not None:
        r = store.resolve(base)
        m = store.read_manifest(r.commit)
        if m.kind == "adapter":
            raise AdapterError(f"the base {base} is itself a LoRA adapter; merge it first "
                               f"(`mstore merge {base}`) or name a full model")
        return r.commit, m, base
    wanted = plan.adapter_config.get("base_model_name_or_path")
    if not isinstance(wanted, str) or not wanted:
        raise AdapterBaseMissing(None, plan.model_id)
    found: dict[str, str] = {}
    for name, entry in sorted(store.refs().items()):
        try:
            m = store.read_light_manifest(entry.commit)
        except MStoreError:
            continue
        src = m.source or {}
        if m.kind != "adapter" and m.parent is None and \
                wanted in (src.get("repo_id"), m.model_id, src.get("path")):
            found.setdefault(entry.commit, name)
    if not found:
        raise AdapterBaseMissing(wanted, plan.model_id)
    if len(found) > 1:
        raise AdapterBaseAmbiguous(wanted, sorted(found.values()))
    ((commit, name),) = found.items()
    return commit, store.read_manifest(commit), name


def check_config(plan: SourcePlan) -> None:
    config = plan.adapter_config
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise BadSource(f"{plan.model_id}: {ADAPTER_CONFIG} is a {config.get('peft_type')!r} "
                        "adapter; mstore imports LoRA adapters")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise BadSource(f"{plan.model_id}: {ADAPTER_CONFIG} sets {key!r}; mstore imports "
                            "plain LoRA adapters (merge it into its base with peft and import "
                            "the merged model)")


def check_tensors(folder: Path, plan: SourcePlan, base: Manifest, base_name: str) -> None:
    """Every tensor a LoRA pair on a weight of the base, with fitting shapes."""
    try:
        tensors = read_header_from_file(folder / ADAPTER_WEIGHTS, where=ADAPTER_WEIGHTS).tensors
    except InvalidSafetensors as e:
        raise BadSource(str(e)) from None
    modules, other = adapted_modules(tensors)
    fail = lambda reason: AdapterMismatch(plan.model_id, base_name, reason)  # noqa: E731
    if other:
        raise fail(f"{other[0]} is no LoRA tensor (lora_A / lora_B of a linear layer)")
    if not modules:
        raise fail(f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
    for mod in modules.values():
        if mod.lora_a is None or mod.lora_b is None:
            raise fail(f"module {mod.module} has only one of lora_A and lora_B")
        weight = base.tensors.get(mod.base_weight)
        if weight is None:
            raise fail(f"the base has no weight {mod.base_weight} (for {mod.lora_a})")
        if len(weight.shape) != 2:
            raise fail(f"{mod.base_weight} is {weight.shape}, not a linear layer's weight")
        a, b = tensors[mod.lora_a].shape, tensors[mod.lora_b].shape
        out_f, in_f = weight.shape
        if len(a) != 2 or len(b) != 2 or a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise fail(f"{mod.module}: lora_A {list(a)} and lora_B {list(b)} do not fit "
                       f"its weight {weight.shape}")


def import_adapter(store: Store, plan: SourcePlan, *, name: str | None, base: str | None,
                   materialise: Callable[[], tuple[Path, Path | None]], reporter: Reporter,
                   accepted: Callable[[], None]) -> "ImportResult":
    """Commit the adapter `plan` describes on its base. `materialise()` gives (folder,
    download folder to remove or None); `accepted()` raises unless the license is."""
    from .importer import ImportResult, _convert_shard, _default_stem

    check_config(plan)
    base_commit, base_m, base_name = find_base(store, plan, base)
    if plan.folder is not None:
        check_tensors(plan.folder, plan, base_m, base_name)
    reporter.message(f"{plan.model_id}: a LoRA adapter ({fmt_bytes(plan.total_bytes)}) on "
                     f"{base_name} ({base_commit[:12]})")
    accepted()
    with store.writer_lock("import"):
        folder, downloaded = materialise()
        try:
            if downloaded:
                check_tensors(folder, plan, base_m, base_name)
            failpoints.hit("import.adapter-checked")
            tensors: dict = {}
            with reporter.progress(plan.weight_bytes, "converting") as bar, \
                    store.objects.batch() as batch:
                _convert_shard(batch, folder / ADAPTER_WEIGHTS, tensors, bar,
                               ImportCache(store.root))
                files = {n: batch.put_file(folder / n).oid for n in plan.other_files}
            summary = adapter_summary(plan.adapter_config)
            rev = plan.source.get("revision")
            manifest = Manifest(
                architecture=base_m.architecture, model_id=plan.model_id, source=plan.source,
                license=plan.license, config=base_m.config, files=files, tensors=tensors,
                parent=base_commit, kind="adapter", adapter=summary,
                message=f"import LoRA adapter {plan.model_id}" + (f"@{rev[:12]}" if rev else "")
                + f" on {base_name}")
            commit = store.put_manifest(manifest)
            stem = _default_stem(plan.default_stem)
            target = store.add_ref(commit, manifest, name,
                                   lambda: stem if store.name_is_free(stem)
                                   else store.next_free_name(stem), base_name)
        finally:
            if downloaded:
                shutil.rmtree(downloaded, ignore_errors=True)
    return ImportResult(target, commit, manifest.parameters, batch.written, batch.reused,
                        plan.source, plan.license)


def read_adapter_config(path: Path, where: str) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSource(f"{where}: cannot read {ADAPTER_CONFIG}: {e}") from None
    if not isinstance(config, dict):
        raise BadSource(f"{where}: {ADAPTER_CONFIG} is not a JSON object")
    return config
