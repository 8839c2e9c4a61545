"""`mstore export`: a manifest back into a Hugging Face-format folder, without torch, or
into a GGUF file for llama.cpp and Ollama (`--format gguf`, hub/gguf_export.py).

The weights file is assembled from the tensor objects by copying their data ranges (kernel
copy), sharded past 5 GB with an index like `save_pretrained`. Every object is re-hashed,
and a corrupt one is refused by name: the small ones (config, files) before anything is
written, each tensor object as it is copied, from the bytes the copy wrote (its header
from the object, its data read back from the new file, which is still in the page cache):
each object's bytes are read from disk once, not once to verify and again to copy. The
folder is written next to its destination and renamed into place only once every hash
matched, so a failed export leaves nothing half-written. A packed object is rebuilt
(and re-hashed) by the object store. Both formats write a model card (hub/model_card.py).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..adapters.base import Adapter, adapter_class
from ..store import failpoints, fsio
from ..errors import ExportError, ObjectCorrupt, QuantizedExport, UnknownAdapter
from ..store.manifest import Manifest, TensorEntry
from ..store.objects import copy_range, hasher
from ..store.report import log_entries
from ..store.repo import Store
from .export_tensors import check_exportable, weights_manifest
from .model_card import BASE_CARD, CARD, card_files

FORMATS = ("safetensors", "gguf")
SHARD_BYTES = 5 * 1000**3  # save_pretrained's default max_shard_size
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class InlineTensor:
    """A tensor computed for this export (an adapter merged into its base's weight), not
    an object: its safetensors dtype, shape and raw little-endian bytes."""

    dtype: str
    shape: list[int]
    data: bytes


def export_model(store: Store, ref: str, dest: Path, shard_bytes: int = SHARD_BYTES,
                 fmt: str = "safetensors", gguf_type: str = "f16", adapter: bool = False,
                 merge: Callable[[str], dict[str, InlineTensor]] | None = None,
                 dequantize: bool = False) -> dict:
    """`ref` as a Hugging Face folder or a GGUF file. `adapter`: a LoRA child's PEFT folder
    (adapter_config.json, adapter_model.safetensors). A LoRA child without it is written
    merged: its base's folder with `merge(commit)` (the base's tensors the adapter changes,
    merged by the caller: this layer has no torch) in place of theirs. `dequantize`: a
    quantized child as full-precision weights (its quantized layout has no
    `quantization_config` transformers loads; without it, QuantizedExport)."""
    dest = Path(dest)
    if fmt not in FORMATS:
        raise ExportError(f"export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        from .gguf_export import TYPES as GGUF_TYPES  # numpy: only a GGUF export needs it

        if gguf_type not in GGUF_TYPES:
            raise ExportError(f"GGUF tensor type {gguf_type!r}: choose one of "
                              f"{', '.join(GGUF_TYPES)}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not empty; choose a new folder")
    r = store.resolve(ref)
    m = store.read_manifest(r.commit)
    what = r.name or r.commit[:12]
    if adapter and m.kind != "adapter":
        raise ExportError(f"{what} is a {m.kind} model, not a LoRA adapter: export it "
                          "as it is")
    if adapter and fmt != "safetensors":
        raise ExportError("a PEFT adapter folder is safetensors; it has no other format")
    base, merged = None, {}
    if m.kind == "adapter" and not adapter and fmt == "safetensors" and merge is not None:
        base = store.read_manifest(m.parent)
        _verify_objects(store, base, tensors_too=False)
    elif m.kind == "quantized" and fmt == "safetensors":
        if not dequantize:
            raise QuantizedExport(what, m.describe())
    elif not adapter:
        check_exportable(m, what)
        if m.kind == "adapter":  # a GGUF of the merged weights: the base's are read too
            _verify_objects(store, store.read_manifest(m.parent), tensors_too=True)
    _verify_objects(store, m, tensors_too=fmt != "safetensors" or m.kind == "quantized")
    if base is not None:
        merged = merge(r.commit)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = dest.parent / f".{dest.name}.mstore-export-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    finished = False
    try:
        if adapter:
            written = _write_adapter_folder(store, m, r, work)
        elif fmt == "gguf":
            written = _write_gguf_folder(store, m, r, work, gguf_type)
        elif base is not None:  # a LoRA child, merged into its base's folder
            written = _write_folder(store, base, r, work, shard_bytes, merged, described=m)
        else:
            written = _write_folder(store, m, r, work, shard_bytes, dequantize=dequantize)
        for f in work.iterdir():
            with open(f, "rb") as fh:
                fsio.fsync_file(fh, f)
        fsio.fsync_dir(work)
        failpoints.hit("export.files-written")
        if dest.exists():
            dest.rmdir()
        fsio.replace(work, dest)
        fsio.fsync_dir(dest.parent)
        failpoints.hit("export.renamed")
        finished = True
    finally:
        if not finished:  # whatever stopped it (Ctrl-C included): no half-written folder
            shutil.rmtree(work, ignore_errors=True)
    return {"name": r.name, "commit": r.commit, "dir": str(dest), "format": fmt,
            "type": gguf_type if fmt == "gguf" else None, "files": sorted(written)}


def _verify_objects(store: Store, m: Manifest, tensors_too: bool) -> None:
    """Before anything is written: every object is present, the small ones intact. The
    tensor objects are re-hashed as they are copied (`_write_shard`); `tensors_too` for the
    writers that convert them instead of copying (GGUF, dequantize): re-hashed here."""
    for oid, name in {t.object: n for n, t in m.tensors.items()}.items():
        if not store.objects.exists(oid):
            raise ExportError(f"object {oid} ({name}) is missing; nothing exported")
    small = {m.config: "config.json", **{o: n for n, o in m.files.items()}}
    if tensors_too:
        small.update({t.object: n for n, t in m.tensors.items()})
    for oid, name in small.items():
        problem = store.objects.verify(oid)
        if problem == "missing":
            raise ExportError(f"object {oid} ({name}) is missing; nothing exported")
        if problem:
            raise ObjectCorrupt(oid, f"{problem} ({name}); nothing exported")


def _write_adapter_folder(store: Store, m: Manifest, r, work: Path) -> list[str]:
    """PEFT's own layout: what `PeftModel.from_pretrained(base, folder)` loads."""
    (work / ADAPTER_CONFIG).write_bytes(store.objects.read_bytes(m.files[ADAPTER_CONFIG]))
    infos = {name: _info(store, t.object) for name, t in m.tensors.items()}
    _write_shard(store, m.tensors, infos, sorted(m.tensors), work / ADAPTER_WEIGHTS, {})
    (work / "metadata.json").write_text(json.dumps(_metadata(store, m, r), indent=2,
                                                   ensure_ascii=False) + "\n")
    for f in work.iterdir():
        os.chmod(f, fsio.FILE_MODE)
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "metadata.json"]


def _info(store: Store, oid: str):
    (info,) = store.objects.tensor_header(oid).tensors.values()
    return info


def _write_folder(store: Store, m: Manifest, r, work: Path, shard_bytes: int,
                  merged: dict[str, InlineTensor] | None = None,
                  described: Manifest | None = None, dequantize: bool = False) -> list[str]:
    """`m`'s folder; `merged` replaces some of its tensors; `described` is the manifest the
    card and metadata.json describe (a LoRA child written merged: the child, not its base)."""
    written = []
    (work / "config.json").write_bytes(store.objects.read_bytes(m.config))
    written.append("config.json")
    for name, oid in m.files.items():
        if "/" in name or name.startswith(".") or name in (WEIGHTS, INDEX, "metadata.json",
                                                           CARD, BASE_CARD):
            continue
        (work / name).write_bytes(store.objects.read_bytes(oid))
        written.append(name)
    if "generation_config.json" not in m.files:
        gen = _default_generation_config(m.architecture,
                                         json.loads(store.objects.read_bytes(m.config)))
        if gen is not None:
            (work / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            written.append("generation_config.json")
    if m.kind == "quantized" and dequantize:
        from ..runtime.quantize import save_dequantized

        save_dequantized(store, m, work / WEIGHTS)
        written.append(WEIGHTS)
    else:
        written += _write_weights(store, m, work, shard_bytes, merged or {})
    return written + _write_card_and_metadata(store, described or m, r, work, "safetensors",
                                              dequantize)


def _write_gguf_folder(store: Store, m: Manifest, r, work: Path, gguf_type: str) -> list[str]:
    """model.gguf, its Ollama Modelfile, the license files, the card and metadata.json."""
    from .gguf_export import write_gguf
    from .model_card import hub_base_model, lineage_of

    base = hub_base_model(lineage_of(store, r.commit))
    written = write_gguf(store, m, r.name or r.commit[:12], work, gguf_type,
                         {"license": m.license if m.license != "unknown" else None,
                          "base_model": base})
    for name, oid in weights_manifest(store, m).files.items():
        if "/" not in name and name.upper().startswith(("LICENSE", "NOTICE", "COPYING")):
            (work / name).write_bytes(store.objects.read_bytes(oid))
            written.append(name)
    return written + _write_card_and_metadata(store, m, r, work, "gguf")


def _write_card_and_metadata(store: Store, m: Manifest, r, work: Path, fmt: str,
                             dequantize: bool = False) -> list[str]:
    written = []
    for name, data in card_files(store, m, r.commit, r.name, fmt).items():
        (work / name).write_bytes(data)
        written.append(name)
    meta = _metadata(store, m, r)
    if m.kind == "quantized" and dequantize:
        meta["dequantized_from"] = m.quantization
    (work / "metadata.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    written.append("metadata.json")
    for f in work.iterdir():
        os.chmod(f, fsio.FILE_MODE)
    return written


def _default_generation_config(architecture: str, config: dict) -> dict | None:
    """The adapter's default; with no adapter installed for the architecture, the
    interface's own (what transformers derives from config.json)."""
    try:
        cls = adapter_class(architecture)
    except UnknownAdapter:
        cls = Adapter
    return cls.default_generation_config(config)


def _write_weights(store: Store, m: Manifest, work: Path, shard_bytes: int,
                   merged: dict[str, InlineTensor]) -> list[str]:
    """Tensors in manifest order, grouped into shards of at most `shard_bytes` each."""
    items = sorted(m.tensors.items())
    infos = {name: _info(store, t.object) for name, t in items if name not in merged}
    sizes = {name: len(merged[name].data) if name in merged else infos[name].nbytes
             for name, _ in items}
    shards: list[list[str]] = [[]]
    size = 0
    for name, _ in items:
        n = sizes[name]
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    if len(shards) == 1:
        _write_shard(store, m.tensors, infos, shards[0], work / WEIGHTS, merged)
        return [WEIGHTS]
    files, weight_map = [], {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(store, m.tensors, infos, names, work / fname, merged)
        files.append(fname)
        weight_map.update({n: fname for n in names})
    total = sum(sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (work / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX]


def _write_shard(store: Store, tensors: dict[str, TensorEntry], infos, names: list[str],
                 path: Path, merged: dict[str, InlineTensor]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = merged.get(name) or tensors[name]
        n = len(t.data) if name in merged else infos[name].nbytes
        header[name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    with open(path, "wb") as out, open(path, "rb") as written, \
            ThreadPoolExecutor(1, thread_name_prefix="mstore-export-hash") as hashing:
        out.write(struct.pack("<Q", len(body)) + body)
        out.flush()
        at = out.tell()
        checks = []
        for name in names:  # copy tensor i + 1 while tensor i is hashed (blake3 frees the GIL)
            if name in merged:
                out.write(merged[name].data)
                out.flush()
                at += len(merged[name].data)
                continue
            info, oid = infos[name], tensors[name].object
            try:
                src = open(store.objects.path(oid), "rb")
            except FileNotFoundError:  # packed: rebuilt and re-hashed by the object store
                store.objects.write_data(oid, out.fileno())
                at += info.nbytes
                continue
            with src:
                head = os.pread(src.fileno(), info.start, 0)
                copy_range(src.fileno(), out.fileno(), info.start, info.nbytes)
            checks.append((name, oid, hashing.submit(_check_copy, head, written.fileno(),
                                                     at, info.nbytes)))
            at += info.nbytes
        for name, oid, check in checks:
            got = check.result()
            if got != oid:
                raise ObjectCorrupt(oid, f"content hashes to {got[:12]} ({name}); "
                                         "nothing exported")


def _check_copy(head: bytes, fd: int, offset: int, count: int) -> str:
    """The id of the object whose header is `head` and whose data is what was just written
    at [offset, offset + count) of `fd`; then that range's writeback is started, so the
    disk works while the next tensors are copied (the final fsync still makes it durable).
    One hashing thread: the other core is the copy's (1 GB export 1.13 -> 1.06 s)."""
    h = hasher(1).update(head)
    _hash_range(h, fd, offset, count)
    try:
        os.posix_fadvise(fd, offset, count, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    return h.hexdigest()


def _hash_range(h, fd: int, offset: int, count: int) -> None:
    """Feed bytes [offset, offset + count) of an open file to `h`, through mmap."""
    if not count:
        return
    lead = offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, lead + count, access=mmap.ACCESS_READ, offset=offset - lead) as mm:
        with memoryview(mm) as view:
            h.update(view[lead:])


def _metadata(store: Store, m: Manifest, r) -> dict:
    lineage = [{"commit": e["commit"], "names": e["names"], "message": e["message"],
                "created_at": e["created_at"], "source": e.get("source"),
                "training": e.get("training")} for e in log_entries(store, r.commit)]
    return {"name": r.name, "commit": r.commit, "architecture": m.architecture,
            "model_id": m.model_id, "source": m.source, "license": m.license,
            "parent": m.parent, "created_at": m.created_at, "tied_weights": m.tied_weights,
            "lineage": lineage, "exported_by": "mstore"}
