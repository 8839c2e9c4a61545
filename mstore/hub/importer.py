"""`mstore import`: a Hub repo or a local Hugging Face folder -> objects -> manifest -> ref.

Everything that can refuse an import (a damaged registry, name, architecture, pickles, unsafe
file names, size, disk, license) is checked before the first byte is written to the store
(objects or tmp/). A Hub revision the store already holds is recognised from the manifests'
`source` before anything is downloaded. Two imports of one source take turns (import_lock):
the second finds the first's result instead of racing it for the download folder.

Conversion streams each tensor's bytes from the mmapped shard into its own object (kernel
copy, no torch round trip); the objects are made durable together, then the manifest, then
the ref.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

from ..adapters.base import adapter_class
from ..store import failpoints
from . import client as hub
from ..errors import (
    MStoreError, BadSource, InvalidSafetensors, LicenseNotAccepted, NameTaken, ObjectCorrupt,
    ObjectMissing, QuantizeError, RefChanged, SizeLimitExceeded, TooLarge,
)
from .import_cache import ImportCache
from .import_checks import check_source, source_tensors
from ..adapters.quantizable import check_request, run_bytes as quant_run_bytes
from ..store.quant_layout import DEFAULT_GROUP_SIZE, SCHEMES
from ..store.quant_layout import describe as describe_quantization
from .. import env
from .import_lock import ImportLock
from .plan import SourcePlan, check_architecture, held_by_source, plan_source
from ..store.manifest import Manifest, TensorEntry
from ..store.objects import ObjectBatch, PutResult, hash_file, hash_tensor_range
from ..store.refs import RefEntry
from ..store.registry import COMMIT_LIKE_RE, validate_name
from ..store.safetensors_io import DTYPE_SIZES, object_data_start, parse_header
from ..reporting import SILENT, Reporter
from ..store.repo import Store
from ..units import fmt_bytes, fmt_count

if TYPE_CHECKING:
    from .import_quantize import ImportQuantizer

TRAIN_BYTES_PER_PARAM = 16  # fp32 weights + grads + AdamW's two moments
HF_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


class ImportResult(NamedTuple):
    name: str
    commit: str
    parameters: int
    bytes_written: int
    bytes_present: int
    source: dict
    license: str | None
    already: bool = False  # identical content was already in the store
    held_by: str | None = None  # the ref that held it

    def to_json(self) -> dict:
        return self._asdict()


def import_model(store: Store, source: str, *, name: str | None = None,
                 revision: str | None = None, accept_license: bool = False,
                 max_size: int | None = None, confirm: Callable[[str], bool] | None = None,
                 quantize: str | None = None, group_size: int | None = None,
                 reporter: Reporter = SILENT, base: str | None = None) -> ImportResult:
    """Import `source` (a Hub repo id or URL, or a local folder) into `store`. `confirm`
    asks the user about the license when `accept_license` is not given (None: refuse);
    `reporter` gets what is happening and the progress bars. `quantize` ("int8", "int4",
    with `group_size` for int4) quantizes the linear weights while importing: the commit
    is a quantized root (its `source` the import's) and no full-precision linear weight is
    written. A PEFT LoRA adapter (adapter_config.json) becomes an adapter child of `base`
    (a ref; None: the model its base_model_name_or_path names)."""
    store.refs()  # a damaged registry refuses now, before anything is downloaded or written
    if name is not None:
        validate_name(name)
    if quantize is not None:
        check_request(quantize, group_size)
    plan = plan_source(source, revision, store, reporter)
    if plan.adapter_config is not None:
        if quantize is not None:
            raise QuantizeError("a LoRA adapter is imported as it is: it has no linear "
                                "weights of its own to quantize")
        return _import_adapter(store, plan, name, base, accept_license, max_size, confirm,
                               reporter)
    if quantize is not None:
        plan.held = None  # a revision held in full precision is no quantized copy of it
    unchanged = cache = None
    if plan.held is None:
        check_architecture(plan.config)
        if plan.folder is not None and quantize is None:
            cache = ImportCache(store.root)  # read once: it may hold 1,000 shards' tensors
            unchanged = _unchanged_content(store, plan, cache)
    elif name is not None:
        plan.held = held_by_source(store, plan.source, name) or plan.held
    if name is not None:
        _check_name(store, plan, name, unchanged)
    _describe(plan, reporter, quantize, group_size)
    _check_space(store, plan, max_size, unchanged)
    license = plan.license or "unknown"
    reporter.message(f"  license: {license}")
    if not accept_license and not (confirm and confirm(f"Accept the license {license!r}?")):
        raise LicenseNotAccepted(license)
    if plan.held is not None:
        return _already(store, plan, plan.held, name)
    if unchanged is not None and unchanged.holders:
        result = _already_unchanged(store, plan, unchanged, name)
        if result is not None:
            return result
        _check_space(store, plan, max_size)  # the ref moved meanwhile: bytes may be written
    quantizer = None
    if plan.folder is not None:  # local or HF cache: refused before the store is touched
        check_source(plan, plan.folder)
        quantizer = _quantizer(plan, plan.folder, quantize, group_size)

    with store.writer_lock("import"):
        store.refs()
        wait_note = f"  waiting for another import of {plan.model_id} to finish"
        with ImportLock(store.objects.tmp_dir, _lock_key(plan), lambda: reporter.message(wait_note)):
            held = held_by_source(store, plan.source, name)
            if held is not None:  # a concurrent import of this revision finished first
                return _already(store, plan, held, name, locked=True)
            if plan.folder is None:
                return _import_streamed(store, plan, name, reporter, quantize, group_size)
            if cache is None:
                cache = ImportCache(store.root)
            manifest, batch = _convert(store, plan, plan.folder, reporter, cache,
                                       quantizer=quantizer)
            result = _commit(store, plan, manifest, batch, name)
            if quantizer is None:  # files that stay: worth remembering
                cache.save()
    return result


def _import_streamed(store: Store, plan: SourcePlan, name: str | None, reporter: Reporter,
                     quantize: str | None, group_size: int | None) -> ImportResult:
    """A Hub revision not complete in the HF cache: each shard is converted while it
    downloads (stream_import); the checks run on the headers and small files before the
    first object is staged, and nothing is published before every file is verified."""
    from .stream_import import HubStream

    folder = _download_folder(store, plan)
    stream = HubStream(folder, plan.remote, plan.weight_files, plan.other_files,
                       reporter.tqdm_class())

    def weights(batch: ObjectBatch, tensors: dict, bar) -> ImportQuantizer | None:
        headers = stream.headers()
        check_source(plan, folder, on_refusal=stream.remove, headers=headers)
        quantizer = _quantizer(plan, folder, quantize, group_size, on_refusal=stream.remove,
                               headers=headers)
        stream.convert(batch, tensors, bar, quantizer)
        return quantizer

    with stream:
        manifest, batch = _convert(store, plan, folder, reporter, ImportCache(store.root),
                                   weights=weights, before_commit=stream.remove)
    return _commit(store, plan, manifest, batch, name)


def _quantizer(plan: SourcePlan, folder: Path, scheme: str | None, group_size: int | None,
               on_refusal: Callable[[], None] | None = None,
               headers: dict | None = None) -> ImportQuantizer | None:
    if scheme is None:
        return None
    from .import_quantize import ImportQuantizer  # here: a plain import never quantizes

    try:
        return ImportQuantizer.plan(plan.architecture, plan.config,
                                    source_tensors(plan, folder, headers), scheme, group_size,
                                    plan.model_id)
    except MStoreError:
        if on_refusal is not None:
            on_refusal()
        raise


def _import_adapter(store: Store, plan: SourcePlan, name: str | None, base: str | None,
                    accept_license: bool, max_size: int | None,
                    confirm: Callable[[str], bool] | None, reporter: Reporter) -> ImportResult:
    from .adapter_import import import_adapter

    if name is not None and not store.name_is_free(name):
        raise NameTaken(name, store.next_free_name(name))
    _check_space(store, plan, max_size)

    def accepted() -> None:
        license = plan.license or "unknown"
        reporter.message(f"  license: {license}")
        if not accept_license and not (confirm and confirm(f"Accept the license {license!r}?")):
            raise LicenseNotAccepted(license)

    return import_adapter(store, plan, name=name, base=base, reporter=reporter,
                          accepted=accepted, materialise=lambda: _materialise(store, plan,
                                                                              reporter))


def _describe(plan: SourcePlan, reporter: Reporter, quantize: str | None = None,
              group_size: int | None = None) -> None:
    echo = reporter.message
    if plan.held is not None:
        echo(f"{plan.model_id}@{plan.source.get('revision', '')[:12]} is already imported "
             f"({plan.held}): nothing to download")
        return
    params, dtype = plan.estimate_params()
    quantized = {}
    for scheme in ([quantize] if quantize else SCHEMES):
        g = group_size if scheme == "int4" else None
        if scheme == "int4":
            g = g or DEFAULT_GROUP_SIZE
        n = quant_run_bytes(plan.architecture, plan.config, plan.weight_bytes,
                            HF_DTYPES.get(dtype, "BF16"), scheme, g)
        if n is not None:
            quantized[f"{scheme} g{g}" if g else scheme] = n
    echo(f"{plan.model_id} ({plan.architecture}): {fmt_bytes(plan.total_bytes)} in "
         f"{len(plan.weight_files) + len(plan.other_files)} files, ~{fmt_count(params)} "
         f"parameters ({dtype})")
    echo(f"  memory to run: ~{fmt_bytes(plan.weight_bytes)}"
         + "".join(f", {s} ~{fmt_bytes(n)}" for s, n in quantized.items())
         + f"; to fine-tune (fp32 AdamW): ~{fmt_bytes(params * TRAIN_BYTES_PER_PARAM)}")
    ram = available_memory()
    if ram is not None and plan.weight_bytes > ram:
        hint = (f"it is quantized while importing ({quantize})" if quantize else
                "quantize it while importing (int8 or int4)" if quantized else
                "it cannot be quantized either")
        echo(f"  unquantized it does not fit in RAM (~{fmt_bytes(ram)} available): {hint}")
    for note in plan.notes:
        echo(f"  {note}")

def available_memory() -> int | None:
    """RAM free for a model: MSTORE_MEMORY_AVAILABLE, else the kernel's MemAvailable."""
    forced = env.memory_available()
    if forced is not None:
        return forced
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _lock_key(plan: SourcePlan) -> str:
    return json.dumps(plan.source, sort_keys=True)


def _check_space(store: Store, plan: SourcePlan, max_size: int | None,
                 unchanged: _Unchanged | None = None) -> None:
    if max_size is not None and plan.total_bytes > max_size:
        raise SizeLimitExceeded(plan.model_id, plan.total_bytes, max_size)
    if plan.held is not None or (unchanged is not None and unchanged.holders):
        return  # nothing will be written
    need = plan.total_bytes if plan.folder else 2 * plan.total_bytes
    probe = store.root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise TooLarge("not enough free disk for the download and the objects", need, free)


# -- download and conversion -----------------------------------------------------------
def _materialise(store: Store, plan: SourcePlan,
                 reporter: Reporter) -> tuple[Path, Path | None]:
    """The folder to read from, and the tmp/ download folder to remove afterwards (if any)."""
    if plan.folder is not None:
        return plan.folder, None
    info = plan.remote
    assert info is not None
    dest = _download_folder(store, plan)
    wanted = plan.weight_files + plan.other_files
    folder = hub.download_snapshot(info.repo_id, info.sha, wanted, dest,
                                  tqdm_class=reporter.tqdm_class())
    hub.verify_download(folder, info, wanted)
    failpoints.hit("import.downloaded")
    return folder, dest


def _download_folder(store: Store, plan: SourcePlan) -> Path:
    """tmp/download-<repo>-<commit>: named by revision, so a retry finds what a cut run left."""
    info = plan.remote
    assert info is not None
    slug = re.sub(r"[^A-Za-z0-9._-]", "--", info.repo_id)
    return store.objects.tmp_dir / f"download-{slug}-{info.sha[:16]}"


WeightsFn = Callable[[ObjectBatch, dict, object], "ImportQuantizer | None"]


def _convert(store: Store, plan: SourcePlan, folder: Path, reporter: Reporter,
             cache: ImportCache, batch: "ObjectBatch | _HashOnly | None" = None,
             quantizer: ImportQuantizer | None = None,
             weights: WeightsFn | None = None,
             before_commit: Callable[[], None] | None = None) -> tuple[Manifest, ObjectBatch]:
    """The manifest and the objects it names; with a `_HashOnly` batch, only their ids.
    With a `quantizer`, its target weights are quantized on the way (see import_quantize).
    `weights(batch, tensors, bar)`, when given, fills `tensors` instead of reading the
    shards in `folder` (a download in flight) and returns the quantizer it chose.
    `before_commit` runs once every object is staged, before the batch is made durable."""
    tensors: dict = {}
    with reporter.progress(plan.weight_bytes, "converting") as bar, \
            batch or store.objects.batch() as batch:
        if weights is not None:
            quantizer = weights(batch, tensors, bar)
        for shard in plan.weight_files if weights is None else []:
            _convert_shard(batch, folder / shard, tensors, bar, cache, quantizer)
        files = {n: batch.put_file(folder / n).oid for n in plan.other_files}
        config_oid = batch.put_file(folder / "config.json").oid
        files.pop("config.json", None)
        if before_commit is not None:
            before_commit()
    rules = adapter_class(plan.architecture).tie_rules(plan.config)
    tied = {k: v for k, v in rules.items() if k not in tensors and v in tensors}
    rev = plan.source.get("revision")
    quantized = {} if quantizer is None else {"kind": "quantized",
                                              "quantization": quantizer.record()}
    manifest = Manifest(
        architecture=plan.architecture, model_id=plan.model_id, source=plan.source,
        license=plan.license, config=config_oid, files=files, tensors=tensors,
        tied_weights=tied,
        message=f"import {plan.model_id}" + (f"@{rev[:12]}" if rev else "")
        + (f" quantized to {describe_quantization(quantized['quantization'])}"
           if quantized else ""),
        **quantized,
    )
    return manifest, batch


def _convert_shard(batch: ObjectBatch, path: Path, tensors: dict, bar,
                   cache: ImportCache, quantizer: ImportQuantizer | None = None) -> None:
    """Every tensor of one shard into its own object.

    A helper thread hashes tensor i+1 while tensor i is copied by the kernel (both release
    the GIL; two copies at once were slower); a copy whose hash is not ready yet (the first
    tensor, always) starts anyway. A shard the stat cache knows, whose objects
    are all present, is not read at all (unless quantizing: the cache knows full-precision
    objects). A tensor the `quantizer` targets is quantized instead of copied.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        known = cache.lookup(path, st) if quantizer is None else None
        if known is not None and _reuse(batch, known, tensors, bar):
            cache.record(path, st, known)
            return
        if st.st_size < 8:
            raise BadSource(f"{path.name} is not a safetensors file (too short)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                header = parse_header(
                    mm[: min(st.st_size, 8 + int.from_bytes(mm[:8], "little"))],
                    st.st_size, path.name)
            except InvalidSafetensors as e:
                raise BadSource(str(e)) from None
            infos = sorted(header.tensors.values(), key=lambda t: t.start)
            targets = quantizer.targets if quantizer is not None else set()
            with _hashing_ahead(st.st_size) as submit:
                oids = [None if i.name in targets else
                        submit(hash_tensor_range, i.dtype, i.shape, mm, i.start, i.end)
                        for i in infos]
                for info, oid in zip(infos, oids):
                    if info.name in tensors:
                        raise BadSource(f"tensor {info.name!r} appears in two shards")
                    if oid is None:
                        tensors.update(quantizer.put(batch, info.name, info.dtype, info.shape,
                                                     mm, info.start, info.end))
                        bar.update(info.nbytes)
                        continue
                    put = batch.put_tensor(oid, info.dtype, info.shape, f.fileno(),
                                           info.start, info.end)
                    tensors[info.name] = TensorEntry(put.oid, info.dtype, list(info.shape))
                    bar.update(info.nbytes)
        if quantizer is None:
            cache.record(path, st, [[i.name, tensors[i.name].object, i.dtype, list(i.shape)]
                                    for i in infos])


LOOKAHEAD_MIN = 16 * 1024 * 1024  # a smaller shard is hashed where it is copied


@contextlib.contextmanager
def _hashing_ahead(shard_bytes: int):
    """`submit(fn, *args)` for the tensors' hashes: on one helper thread for a shard large
    enough that hashing beside the copy pays, else a call made at once: for a small shard
    the thread and concurrent.futures (which loads logging) cost more than its hashing
    (with ObjectBatch's writeback thread, 20 M of a tiny import's 445 M instructions)."""
    if shard_bytes < LOOKAHEAD_MIN:
        yield lambda fn, *args: fn(*args)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="mstore-hash") as pool:
        yield pool.submit


def _reuse(batch: ObjectBatch, known: list[list], tensors: dict, bar) -> bool:
    entries = {}
    for name, oid, dtype, shape in known:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        size = object_data_start(dtype, tuple(shape), nbytes) + nbytes
        if name in tensors or not batch.reuse(oid, size):
            return False
        entries[name] = TensorEntry(oid, dtype, list(shape))
        bar.update(nbytes)
    tensors.update(entries)
    return True


# -- commit ----------------------------------------------------------------------------
def _commit(store: Store, plan: SourcePlan, manifest: Manifest, batch: ObjectBatch,
            name: str | None) -> ImportResult:
    refs = store.refs()
    holders = _holders(store, refs, manifest)
    if holders:
        held = name if name in holders else holders[0]
        commit = refs[held].commit
        if name and name not in holders:  # same content under a new name: a second ref
            store.registry.set_ref(refs[held].renamed(name), expected=None)
        return ImportResult(name or held, commit, manifest.parameters, batch.written,
                            batch.reused, plan.source, plan.license, already=True,
                            held_by=held)
    stem = _default_stem(plan.default_stem)
    commit = store.put_manifest(manifest)
    target = store.add_ref(commit, manifest, name, lambda: stem if store.name_is_free(stem)
                           else store.next_free_name(stem))
    return ImportResult(target, commit, manifest.parameters, batch.written, batch.reused,
                        plan.source, plan.license)


def _holders(store: Store, refs: dict[str, RefEntry], manifest: Manifest) -> list[str]:
    """The refs whose commit holds exactly this content. Each distinct commit is parsed
    only if its manifest's bytes name a few of this content's object ids (a substring test,
    ~µs): parsing and re-keying every ref's full manifest made a re-import cost O(refs x
    tensors), most of a re-import's CPU time with a handful of fine-tunes in the store."""
    key = manifest.content_key()
    needles = [oid.encode() for oid in
               [manifest.config, *sorted(t.object for t in manifest.tensors.values())[:4]]]
    keys: dict[str, bytes | None] = {}
    for name, e in sorted(refs.items()):
        if e.commit not in keys:
            keys[e.commit] = (_content_key(store, e.commit)
                              if _names_all(store, e.commit, needles) else None)
    return [name for name, e in sorted(refs.items()) if keys[e.commit] == key]


def _names_all(store: Store, commit: str, needles: list[bytes]) -> bool:
    try:
        data = store.objects.path(commit).read_bytes()
    except OSError:
        return True  # let _content_key say what is wrong with it
    return all(n in data for n in needles)


def _content_key(store: Store, commit: str) -> bytes | None:
    try:
        return store.read_manifest(commit).content_key()
    except (ObjectMissing, ObjectCorrupt):
        return None


def _same_source(store: Store, entry: RefEntry, plan: SourcePlan) -> bool:
    try:
        return store.read_light_manifest(entry.commit).source == plan.source
    except (ObjectMissing, ObjectCorrupt):
        return False


def _check_name(store: Store, plan: SourcePlan, name: str,
                unchanged: _Unchanged | None = None) -> None:
    """A taken --name refuses now, before anything is written. It is not taken when it
    already holds this very content (a retry, or a re-import of an unchanged folder)."""
    refs = store.refs()
    entry = refs.get(name)
    if entry is None:
        return
    if plan.held is not None:
        if entry.commit == refs[plan.held].commit:
            return
    elif _same_source(store, entry, plan):
        if plan.source.get("type") == "huggingface":
            return  # a Hub revision names its content
        if plan.folder is not None and _content_key(store, entry.commit) == \
                (unchanged.key if unchanged is not None else _dry_content_key(store, plan)):
            return
    raise NameTaken(name, store.next_free_name(name))


def _dry_content_key(store: Store, plan: SourcePlan) -> bytes:
    """What a local folder's manifest would hold, hashed without writing a byte (the stat
    cache makes it cheap for an unchanged folder)."""
    manifest, _ = _convert(store, plan, plan.folder, SILENT, ImportCache(store.root),
                           batch=_HashOnly())
    return manifest.content_key()


class _Unchanged(NamedTuple):
    """A local folder the stat cache knows unchanged: its manifest's content key, the refs
    that hold that content (name -> commit), and the bytes of its objects (all present, if
    any ref holds it)."""

    key: bytes
    holders: dict[str, str]
    parameters: int
    present: int


def _unchanged_content(store: Store, plan: SourcePlan, cache: ImportCache) -> _Unchanged | None:
    """What an unchanged folder holds, named without reading a weight byte: None unless the
    stat cache knows every shard. `holders` is empty unless every object is in the store.

    A folder whose content a ref holds needs none of check_source's checks (the headers, and
    the tokenizer loaded by tokenizers): they are a function of that content, which passed
    them when it was imported. So a re-import writes nothing and reads only the small files."""
    assert plan.folder is not None
    for shard in plan.weight_files:
        try:
            if cache.lookup(plan.folder / shard, os.stat(plan.folder / shard)) is None:
                return None
        except OSError:
            return None  # the full path says what is wrong with it
    presence = _PresenceOnly(store)
    try:
        manifest, _ = _convert(store, plan, plan.folder, SILENT, cache, batch=presence)
    except OSError:
        return None  # a file gone meanwhile: the full path says so, after the description
    refs = store.refs()
    holders = {} if presence.missing else {n: refs[n].commit
                                           for n in _holders(store, refs, manifest)}
    return _Unchanged(manifest.content_key(), holders, manifest.parameters, presence.reused)


def _already_unchanged(store: Store, plan: SourcePlan, unchanged: _Unchanged,
                       name: str | None) -> ImportResult | None:
    """The result _commit gives for held content, without converting; None when the ref
    holding it moved meanwhile (the full import then runs)."""
    held = name if name in unchanged.holders else next(iter(unchanged.holders))
    adding = name is not None and name != held
    with store.writer_lock("import") if adding else contextlib.nullcontext():
        entry = store.refs().get(held)
        if entry is None or entry.commit != unchanged.holders[held]:
            return None
        if adding:
            _add_name(store, entry, name)
    return ImportResult(name or held, entry.commit, unchanged.parameters, 0, unchanged.present,
                        plan.source, plan.license, already=True, held_by=held)


class _HashOnly:
    """An ObjectBatch look-alike that names objects and stores none (nor checks presence)."""

    written = reused = 0

    def __enter__(self) -> "_HashOnly":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def put_tensor(self, oid, dtype, shape, src_fd, start, end) -> PutResult:
        return PutResult(oid if isinstance(oid, str) else oid.result(), end - start, False)

    def put_file(self, path: Path) -> PutResult:
        return PutResult(hash_file(path), os.path.getsize(path), False)

    def reuse(self, oid: str, size: int) -> bool:
        return True


class _PresenceOnly(_HashOnly):
    """Names objects, stores none, and counts those present as ObjectBatch does (touching
    them for gc's grace period); `missing` once one is not."""

    def __init__(self, store: Store):
        self.objects = store.objects
        self.reused = 0
        self.missing = False

    def _count(self, put: PutResult) -> PutResult:
        if self.objects._hit(put.oid):
            self.reused += put.size
        else:
            self.missing = True
        return put

    def put_tensor(self, oid, dtype, shape, src_fd, start, end) -> PutResult:
        put = super().put_tensor(oid, dtype, shape, src_fd, start, end)
        return self._count(PutResult(put.oid, object_data_start(dtype, tuple(shape),
                                                                end - start) + end - start,
                                     False))

    def put_file(self, path: Path) -> PutResult:
        return self._count(super().put_file(path))

    def reuse(self, oid: str, size: int) -> bool:
        self._count(PutResult(oid, size, False))
        return True


def _already(store: Store, plan: SourcePlan, held: str, name: str | None,
             locked: bool = False) -> ImportResult:
    """The result for a Hub revision the store holds; a new --name becomes a second ref."""
    entry = store.refs()[held]
    commit = entry.commit
    if name is not None and name != held:
        if locked:
            _add_name(store, entry, name)
        else:
            with store.writer_lock("import"):
                _add_name(store, entry, name)
    m = store.read_manifest(commit)
    return ImportResult(name or held, commit, m.parameters, 0,
                        int(entry.size_bytes or 0), plan.source, m.license,
                        already=True, held_by=held)


def _add_name(store: Store, entry: RefEntry, name: str) -> None:
    try:
        store.registry.set_ref(entry.renamed(name), expected=None)
    except RefChanged as e:
        if e.found != entry.commit:
            raise NameTaken(name, store.next_free_name(name)) from None


def _default_stem(text: str) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._") or "model"
    if COMMIT_LIKE_RE.fullmatch(stem[:120]):  # e.g. a snapshot folder named by its sha
        stem = "model-" + stem
    return validate_name(stem[:120])
