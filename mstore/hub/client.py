"""The Hugging Face Hub side of import, through the real huggingface_hub client.

Everything goes through `HfApi.model_info`, `hf_hub_download` and `snapshot_download`, so
HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE and the HF cache behave as users of `hf` expect.
huggingface_hub is imported lazily: it costs ~0.15 s and only import needs it.

A snapshot already complete in the HF cache is read from there (no second copy); otherwise
it is downloaded into the store's tmp/ (same filesystem as objects/), in a folder named by
repo and commit so that an interrupted download resumes on retry, and removed once converted.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, NamedTuple

from ..store import fsio
from ..errors import (
    ChecksumMismatch, DownloadFailed, GatedRepo, HubClientError, HubError, HubOffline,
    InvalidRepoId, MStoreError, RepoNotFound, RevisionNotFound, UnsafeRepoPath,
)

HUB_URL_RE = re.compile(
    r"https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([^/\s]+/[^/\s]+?)(?:/tree/([^/\s]+))?/?$"
)
REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
# Files an import keeps besides the weights: config, tokenizer, chat template, card, license.
KEEP_PATTERNS = ["*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken", "README.md", "LICENSE*"]
WEIGHT_PATTERNS = ["*.safetensors"]


class HubSpec(NamedTuple):
    repo_id: str
    revision: str | None


def parse_hub_source(source: str, revision: str | None) -> HubSpec | None:
    """A Hub URL (`/tree/REV` honoured) or a repo id; None if it is neither."""
    m = HUB_URL_RE.match(source.strip())
    if m:
        return HubSpec(m.group(1), revision or m.group(2))
    if REPO_ID_RE.fullmatch(source) and "/" in source:
        return HubSpec(source, revision)
    return None


class RemoteInfo(NamedTuple):
    repo_id: str
    sha: str
    files: dict[str, int]  # rfilename -> size (bytes)
    lfs_sha256: dict[str, str]
    license: str | None
    gated: bool
    offline: bool = False
    blob_ids: dict[str, str] = {}  # git blob id of each file (never shared: see remote_info)


def _hub():
    import huggingface_hub

    return huggingface_hub


def is_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, downloading: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's and httpx's exceptions into mstore's, one message each.

    Whatever else the client raises (a ValueError on a response it cannot parse, an OSError
    without an errno for a failed consistency check) is still the Hub's side, not an mstore
    bug: it becomes a one-line HubError too. OSErrors with an errno (disk full, permissions)
    pass through, since they name a local file the user can act on."""
    from huggingface_hub import errors as e

    try:
        yield
    except e.GatedRepoError:  # a subclass of RepositoryNotFoundError: first
        raise GatedRepo(repo_id) from None
    except e.RepositoryNotFoundError:
        raise RepoNotFound(repo_id, revision) from None
    except e.RevisionNotFoundError:
        raise RevisionNotFound(repo_id, revision or "main") from None
    except e.OfflineModeIsEnabled:
        raise HubOffline(repo_id, "HF_HUB_OFFLINE is set and it is not in the HF cache") from None
    except e.LocalEntryNotFoundError as err:
        if downloading:
            raise DownloadFailed(repo_id, _first_line(err)) from None
        raise HubOffline(repo_id, "no connection and not in the HF cache") from None
    except e.EntryNotFoundError as err:
        raise DownloadFailed(repo_id, f"a file went missing on the Hub: {_first_line(err)}") \
            from None
    except e.HFValidationError as err:
        raise InvalidRepoId(repo_id, _first_line(err)) from None
    except e.HfHubHTTPError as err:
        raise HubError(f"the Hub refused {repo_id!r}: {_first_line(err)}") from None
    except MStoreError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised unless the client's own modules raised it
        if not _from_client(err):
            raise
        if isinstance(err, OSError) and err.errno is not None:
            raise
        detail = f"{type(err).__name__}: {_first_line(err)}"
        if _module_root(type(err)).startswith(NETWORK_MODULES):
            if downloading:
                raise DownloadFailed(repo_id, detail) from None
            raise HubOffline(repo_id, detail) from None
        raise HubClientError(repo_id, detail) from None


# Prefixes, not names: the HTTP stack may be httpx or a renamed fork (httpx2, httpcore2).
NETWORK_MODULES = ("httpx", "httpcore", "h11", "h2", "anyio", "requests", "urllib3", "aiohttp")
CLIENT_MODULES = ("huggingface_hub", "filelock", "tqdm", "hf_xet", *NETWORK_MODULES)


def _module_root(obj) -> str:
    return (getattr(obj, "__module__", None) or "").split(".")[0]


def _from_client(err: BaseException) -> bool:
    """Raised by the Hub client or its HTTP stack: its class or a frame on its way is theirs."""
    if _module_root(type(err)).startswith(CLIENT_MODULES):
        return True
    tb = err.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]
        if module.startswith(CLIENT_MODULES):
            return True
        tb = tb.tb_next
    return False


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def remote_info(spec: HubSpec) -> RemoteInfo:
    """Files, sizes, commit and license of a Hub repo, before anything is downloaded."""
    hf = _hub()
    with hub_errors(spec.repo_id, spec.revision):
        info = hf.HfApi().model_info(spec.repo_id, revision=spec.revision, files_metadata=True)
    files, lfs, blobs = {}, {}, {}
    for s in info.siblings or []:
        files[s.rfilename] = s.size or 0
        if s.lfs is not None:
            lfs[s.rfilename] = s.lfs.sha256
        if s.blob_id:
            blobs[s.rfilename] = s.blob_id
    license = None
    if info.card_data is not None:
        license = getattr(info.card_data, "license", None)
        if license == "other":
            license = getattr(info.card_data, "license_name", None) or "other"
    return RemoteInfo(spec.repo_id, info.sha, files, lfs, license, bool(info.gated),
                      blob_ids=blobs)


def fetch_file(repo_id: str, filename: str, revision: str, tqdm_class: type) -> Path:
    """One small file (config.json, LICENSE) into the HF cache, where `hf` would put it;
    `tqdm_class` (a Reporter's) shows or hides its progress bar."""
    hf = _hub()
    with hub_errors(repo_id, revision):
        return Path(hf.hf_hub_download(repo_id, filename, revision=revision,
                                       tqdm_class=tqdm_class))


def cached_snapshot(repo_id: str, revision: str | None,
                    names: list[str] | None = None) -> Path | None:
    """The HF cache's snapshot folder if it holds every file in `names` (all it has when
    `names` is None), else None. snapshot_download alone does not check completeness."""
    hf = _hub()
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        path = Path(hf.snapshot_download(repo_id, revision=revision,
                                         allow_patterns=_exact(names),
                                         local_files_only=True))
    except (OSError, ValueError, CachedRepoTreeNotFoundError):
        return None  # not cached (LocalEntryNotFoundError, an incomplete snapshot), a bad id
    if names is not None and not all((path / n).is_file() for n in names):
        return None
    return path


def download_snapshot(repo_id: str, sha: str, patterns: list[str], dest: Path, *,
                      tqdm_class: type) -> Path:
    """Download into `dest` (the store's tmp/), resuming whatever an earlier try left there.
    `tqdm_class` (a Reporter's) shows or hides the progress bars of this call only."""
    hf = _hub()
    with hub_errors(repo_id, sha, downloading=True):
        return Path(hf.snapshot_download(repo_id, revision=sha, allow_patterns=_exact(patterns),
                                         local_dir=dest, tqdm_class=tqdm_class))


def _exact(names: list[str] | None) -> list[str] | None:
    """allow_patterns are fnmatch patterns: escape `*?[` so a name matches only itself."""
    import glob

    return None if names is None else [glob.escape(n) for n in names]


def verify_download(folder: Path, info: RemoteInfo, names: list[str]) -> None:
    """Sizes, LFS sha256s and git blob ids as the Hub published them: a file that differs
    is deleted (so that a retry downloads it again) and refused as not matching."""
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DownloadFailed(info.repo_id, f"{name!r} did not arrive")
        size = path.stat().st_size
        if name in info.files and info.files[name] and size != info.files[name]:
            fsio.unlink(path)
            raise ChecksumMismatch(info.repo_id, name,
                                   f"{size} bytes, published {info.files[name]}")
        want = info.lfs_sha256.get(name)
        if want and _sha256(path) != want:
            fsio.unlink(path)
            raise ChecksumMismatch(info.repo_id, name, "sha256 differs")
        blob = info.blob_ids.get(name)
        if not want and blob and _git_blob_sha1(path) != blob:
            fsio.unlink(path)
            raise ChecksumMismatch(info.repo_id, name, "git blob id differs")


def _sha256(path: Path) -> str:
    import hashlib  # here: loading OpenSSL costs ~10 ms, and local imports need no sha256

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    """The id git gives a file's bytes (what the Hub publishes for files outside LFS)."""
    import hashlib

    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def card_license(folder: Path) -> str | None:
    """License from a model card's YAML front matter, else a LICENSE file's presence."""
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(errors="replace")
        m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
        if m:
            import yaml

            try:
                meta = yaml.safe_load(m.group(1)) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and meta.get("license"):
                lic = str(meta["license"])
                return str(meta.get("license_name") or lic) if lic == "other" else lic
    for f in sorted(folder.glob("LICENSE*")):
        first = f.read_text(errors="replace").strip().splitlines()
        return f"see {f.name}: {first[0][:60]}" if first else f"see {f.name}"
    return None


_DRIVE_RE = re.compile(r"[A-Za-z]:")


def validate_repo_path(name: str) -> str:
    """Repo file names come from the network (or an index file): refuse any name that is not
    a plain relative path of ordinary components, since it becomes a path on this disk."""
    if not isinstance(name, str) or not name:
        raise UnsafeRepoPath(str(name), "empty")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise UnsafeRepoPath(name, "control characters")
    if "\\" in name:
        raise UnsafeRepoPath(name, "a backslash")
    if name.startswith("/") or _DRIVE_RE.match(name):
        raise UnsafeRepoPath(name, "an absolute path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise UnsafeRepoPath(name, "an empty, '.' or '..' component")
    return name
