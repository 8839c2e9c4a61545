"""Every error a user can meet, as a typed exception that carries its fields.

The CLI turns these into one `error: ...` line (see `mstore.cli.app.MStoreGroup`); library callers can catch
them by type. Anything else that escapes is a bug and is shown as such. Messages name no
command-line flag: where the CLI has a flag to suggest, its error table (mstore.cli.output)
adds the hint.
"""

from __future__ import annotations

from .units import fmt_bytes


class MStoreError(Exception):
    """Base class: `str(err)` is the one-line message shown to the user.

    A subclass also derives from the stdlib type it is (FileNotFoundError, ValueError,
    LookupError, TimeoutError), so `except ValueError` and the like catch it too. The
    OSError ones are built with their message as their only argument: then `str(err)` is
    that message, and `errno`, `strerror` and `filename` are None."""

    exit_code = 1


class StoreNotFound(MStoreError, FileNotFoundError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(f"no store at {path}")


class StoreFormatError(MStoreError):
    def __init__(self, path: str, found: object, supported: int):
        self.path, self.found, self.supported = path, found, supported
        super().__init__(
            f"store at {path} has format {found!r}; this mstore reads format {supported} "
            "(upgrade mstore)"
        )


class UnknownModel(MStoreError, LookupError):
    def __init__(self, name: str, suggestion: str | None = None):
        self.name = name
        hint = f" (did you mean {suggestion!r}?)" if suggestion else " (see `mstore list`)"
        super().__init__(f"unknown model {name!r}{hint}")


class AmbiguousRef(MStoreError, LookupError):
    def __init__(self, prefix: str, matches: list[str]):
        self.prefix, self.matches = prefix, matches
        shown = ", ".join(m[:12] for m in matches[:5])
        super().__init__(f"commit prefix {prefix!r} is ambiguous: {shown}")


class BadName(MStoreError, ValueError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(
            f"bad model name {name!r}: use 1-128 characters of a-z 0-9 . _ - "
            "starting with a letter or digit (lowercase, no '/' or '..')"
        )


class NameTaken(MStoreError):
    def __init__(self, name: str, suggestion: str | None = None):
        self.name, self.suggestion = name, suggestion
        hint = f"; next free name: {suggestion}" if suggestion else ""
        super().__init__(f"model name {name!r} is already taken{hint}")


class RefChanged(MStoreError):
    """Compare-and-swap lost: someone else moved the ref between our read and our write."""

    def __init__(self, name: str, expected: str | None, found: str | None):
        self.name, self.expected, self.found = name, expected, found
        super().__init__(
            f"ref {name!r} changed while we worked (expected {_short(expected)}, "
            f"found {_short(found)}); nothing was written, try again"
        )


class RegistryCorrupt(MStoreError):
    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"registry {path} is damaged ({reason}); it was not modified"
        )


class AttachmentIndexCorrupt(MStoreError):
    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"attachment list {path} is damaged ({reason}); `mstore fsck` "
                         "names it")


class ObjectMissing(MStoreError, FileNotFoundError):
    def __init__(self, oid: str, what: str = "object"):
        self.oid, self.what = oid, what
        super().__init__(f"{what} {oid} is missing from the store (run `mstore fsck`)")


class ObjectCorrupt(MStoreError):
    def __init__(self, oid: str, reason: str, what: str = "object"):
        self.oid, self.reason, self.what = oid, reason, what
        super().__init__(f"corrupt {what} {oid}: {reason} (run `mstore fsck`; re-import to repair)")


class BadObjectId(MStoreError, ValueError):
    def __init__(self, oid: str):
        self.oid = oid
        super().__init__(f"not an object id: {oid!r} (expected 64 lowercase hex characters)")


class InvalidSafetensors(MStoreError, ValueError):
    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"invalid safetensors file {path}: {reason}")


class StoreBusy(MStoreError, TimeoutError):
    exit_code = 75  # EX_TEMPFAIL: try again later

    def __init__(self, holder: str, waited: float):
        self.holder, self.waited = holder, waited
        super().__init__(f"store is busy: {holder} (waited {waited:.0f}s; try again later)")


class ImportRefused(MStoreError):
    """The source can be read but mstore will not import it (format, architecture, size)."""


class UnsupportedArchitecture(ImportRefused):
    def __init__(self, model_type: str | None, supported: list[str], remote_code: bool = False):
        self.model_type, self.supported = model_type, supported
        why = " and needs trust_remote_code, which mstore never uses" if remote_code else ""
        super().__init__(
            f"unsupported architecture {model_type!r}{why}; supported: {', '.join(supported)}"
        )


class PickleOnly(ImportRefused):
    def __init__(self, source: str, files: list[str]):
        self.source, self.files = source, files
        super().__init__(
            f"{source} has only pickled weights ({', '.join(files[:3])}); mstore imports "
            "safetensors only (pickles can run code when loaded)"
        )


class TooLarge(ImportRefused):
    def __init__(self, what: str, need: int, limit: int):
        self.need, self.limit = need, limit
        super().__init__(f"{what}: needs {fmt_bytes(need)}, limit is {fmt_bytes(limit)}")


class SizeLimitExceeded(TooLarge):
    """The model is larger than the `max_size` its import was given."""

    def __init__(self, model_id: str, need: int, limit: int):
        self.model_id = model_id
        super().__init__(f"{model_id} is larger than max_size", need, limit)


class LicenseNotAccepted(MStoreError):
    def __init__(self, license: str):
        self.license = license
        super().__init__(
            f"license {license!r} not accepted (accept_license=True accepts it); nothing was "
            "written"
        )


class HubError(MStoreError):
    """Anything the Hub (or the way to it) answered instead of the model."""


class RepoNotFound(HubError):
    def __init__(self, repo_id: str, revision: str | None = None):
        self.repo_id, self.revision = repo_id, revision
        super().__init__(
            f"repository {repo_id!r} not found on the Hub (check the id; private repos need HF_TOKEN)"
        )


class RevisionNotFound(HubError):
    def __init__(self, repo_id: str, revision: str):
        self.repo_id, self.revision = repo_id, revision
        super().__init__(f"revision {revision!r} not found in {repo_id!r}")


class GatedRepo(HubError):
    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        super().__init__(
            f"{repo_id!r} is gated: accept its terms on the Hub, then set HF_TOKEN "
            "(or `hf auth login`) with a token that has access"
        )


class HubOffline(HubError):
    def __init__(self, repo_id: str, detail: str):
        self.repo_id = repo_id
        super().__init__(f"cannot reach the Hub for {repo_id!r} ({detail})")


class DownloadFailed(HubError):
    def __init__(self, repo_id: str, detail: str):
        self.repo_id = repo_id
        super().__init__(
            f"download of {repo_id!r} failed ({detail}); run the same import again to resume"
        )


class SourceNotFound(MStoreError, FileNotFoundError):
    def __init__(self, source: str):
        self.source = source
        super().__init__(
            f"{source!r} is neither a local model folder nor a Hub repo id like 'Qwen/Qwen2.5-0.5B'"
        )


class BadSource(MStoreError, ValueError):
    """A local folder or download that is not a usable Hugging Face model folder."""


class GcRefused(MStoreError):
    """gc cannot tell what is reachable, so it deletes nothing."""

    def __init__(self, reason: str):
        super().__init__(f"gc refused, nothing deleted: {reason}")


class NothingToPack(MStoreError, ValueError):
    def __init__(self, verb: str = "pack"):
        self.verb = verb
        super().__init__(f"nothing to {verb}: name one or more models, or all of them")


class ConfigError(MStoreError, ValueError):
    """A training config that cannot be used; the message names the key."""


class DatasetError(MStoreError, ValueError):
    pass


class UnknownAdapter(MStoreError, LookupError):
    def __init__(self, architecture: str, installed: list[str]):
        self.architecture, self.installed = architecture, installed
        super().__init__(
            f"no adapter for architecture {architecture!r}; installed adapters: "
            f"{', '.join(installed) or 'none'}"
        )


class ExportError(MStoreError):
    pass


class Interrupted(MStoreError):
    exit_code = 130


class TrainingInterrupted(Interrupted):
    """Ctrl-C during training, with nothing committed (commit_on_interrupt was not set)."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"interrupted at step {step}; nothing committed")


class InvalidSetting(MStoreError, ValueError):
    """A setting outside its range; `setting` is the parameter's name (`top_p`)."""

    def __init__(self, setting: str, rule: str):
        self.setting, self.rule = setting, rule
        super().__init__(f"{setting} must be {rule}")


class WorkersFailed(MStoreError):
    """The training processes torchrun started failed without an error line of their own."""

    def __init__(self, code: int):
        self.code = code
        super().__init__(f"the training processes failed (torchrun exited {code})")


def _short(oid: str | None) -> str:
    return oid[:12] if oid else "nothing"


# -- remotes (mstore/remote.py) -----------------------------------------------------
class RemoteError(MStoreError):
    """Anything about a remote: its configuration, reaching it, or what it holds."""


class BadRemoteName(RemoteError, ValueError):
    def __init__(self, name: str):
        self.name = name
        super().__init__(f"bad remote name {name!r}: use 1-128 characters of a-z 0-9 . _ - "
                         "starting with a letter or digit")


class BadRemoteURL(RemoteError, ValueError):
    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"bad remote URL {url!r}: {reason}")


class UnknownRemote(RemoteError, LookupError):
    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        have = ", ".join(known) if known else "none (add one with `mstore remote add NAME URL`)"
        super().__init__(f"unknown remote {name!r}; configured remotes: {have}")


class RemoteExists(RemoteError):
    def __init__(self, name: str, url: str):
        self.name, self.url = name, url
        super().__init__(f"remote {name!r} already exists ({url}); `mstore remote rm {name}` "
                         "first to change it")


class NoDefaultRemote(RemoteError):
    def __init__(self, known: list[str]):
        self.known = known
        if not known:
            msg = "no remote configured; add one with `mstore remote add origin URL`"
        else:
            msg = (f"which remote? several are configured ({', '.join(known)}) and none is "
                   "named 'origin'; name one")
        super().__init__(msg)


class RemoteUnavailable(RemoteError):
    def __init__(self, url: str, detail: str):
        self.url, self.detail = url, detail
        super().__init__(f"cannot use remote {url}: {detail}")


class RemoteNotAStore(RemoteError):
    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"{url} is not an mstore store ({reason})")


class RemoteRefMissing(RemoteError, LookupError):
    def __init__(self, name: str, remote: str, available: list[str]):
        self.name, self.remote = name, remote
        have = ", ".join(available[:10]) if available else "nothing"
        super().__init__(f"remote {remote!r} has no model {name!r} (it has: {have})")


class RemoteRefMoved(RemoteError):
    """A push would overwrite a remote ref that someone else moved since we last saw it."""

    def __init__(self, name: str, remote: str, found: str, known: str | None):
        self.name, self.remote, self.found, self.known = name, remote, found, known
        super().__init__(f"remote ref {name!r} on {remote!r} moved to {found[:12]} since your "
                         "last pull/push; pull first or use --force")


class NotFastForward(RemoteError):
    """A pull would replace a local ref whose commit the remote's does not descend from."""

    def __init__(self, name: str, local: str, remote_commit: str, remote: str):
        self.name, self.local, self.remote_commit = name, local, remote_commit
        super().__init__(f"local {name!r} ({local[:12]}) and {remote!r}'s ({remote_commit[:12]}) "
                         "have diverged")


class RemoteObjectMissing(RemoteError):
    def __init__(self, oid: str, remote: str, what: str = "object"):
        self.oid, self.remote = oid, remote
        super().__init__(f"{what} {oid} is missing on remote {remote!r} (its ref names it; "
                         "push it again from a store that has it)")


class RemoteObjectCorrupt(RemoteError):
    def __init__(self, oid: str, got: str, remote: str, reason: str | None = None):
        self.oid, self.got, self.remote = oid, got, remote
        why = reason or f"its bytes hash to {got[:12]}"
        super().__init__(f"object {oid} received from {remote!r} is corrupt ({why}); "
                         "refused, nothing was published locally. Delete it on "
                         "the remote and push it again from a good copy")


class RemoteLocked(RemoteError, TimeoutError):
    exit_code = 75

    def __init__(self, url: str, holder: str, waited: float):
        self.url, self.holder = url, holder
        super().__init__(f"remote registry {url} is locked by {holder} (waited {waited:.0f}s; "
                         f"try again later, or delete registry.json.lock there if that push died)")


class RemoteBusy(RemoteError, TimeoutError):
    exit_code = 75

    def __init__(self, url: str, tries: int):
        super().__init__(f"remote registry {url} kept changing under us ({tries} tries); "
                         "try again")


class DestinationNotEmpty(RemoteError):
    def __init__(self, path: str):
        super().__init__(f"destination {path} exists and is not empty (clone into a new or "
                         "empty folder)")


# -- hardening: remote
class LocalRefWouldMove(RemoteError):
    """A pull would move a local ref that is not this store's copy of the ref pulled."""

    def __init__(self, name: str, local: str, remote_name: str, remote_ref: str, commit: str):
        self.name, self.local, self.remote_ref, self.commit = name, local, remote_ref, commit
        super().__init__(f"local ref {name!r} already points at {local[:12]}; pulling "
                         f"{remote_ref!r} from {remote_name!r} would move it to {commit[:12]}")


class CommitNeedsRefName(RemoteError, ValueError):
    """A push of a commit id: the remote ref it should become needs a name (`as_name`)."""

    def __init__(self, ref: str):
        self.ref = ref
        super().__init__(f"{ref!r} is a commit, not a ref: name the remote ref (as_name)")


class RemoteRefInvalid(RemoteError, ValueError):
    """The remote's registry entry for the ref asked for cannot be used."""

    def __init__(self, name: str, remote: str, reason: str):
        self.name, self.remote, self.reason = name, remote, reason
        super().__init__(f"remote {remote!r} has an invalid entry {name!r} ({reason}); "
                         "it was not used")


# -- hardening: validate
class ConfigMismatch(ImportRefused, ValueError):
    """config.json and the tensors disagree, or config.json holds a size no model can have.

    `where` names the model (a source at import, a commit at load); the message names the
    first mismatch found.
    """

    def __init__(self, where: str, detail: str):
        self.where, self.detail = where, detail
        super().__init__(f"{where}: {detail}")


class BadTokenizer(ImportRefused, ValueError):
    """A tokenizer file that does not load, or whose ids do not fit the embedding."""

    def __init__(self, where: str, detail: str):
        self.where, self.detail = where, detail
        super().__init__(f"{where}: {detail}")


# -- hardening: train
class RecoveryError(MStoreError, ValueError):
    """A `train --resume-commit` folder that cannot be committed."""


class CommitFailed(MStoreError):
    """Training finished but its commit failed; the model was kept in a recovery folder
    (or, if even that failed, the message says so)."""

    def __init__(self, reason: str, folder: str | None, save_error: str | None = None):
        self.reason, self.folder, self.save_error = reason, folder, save_error
        super().__init__(self.describe(folder))

    def describe(self, folder: str | None) -> str:
        """The message, naming the recovery folder as `folder` (the CLI passes the folder
        as a user can retype it)."""
        if folder is not None:
            return (f"commit failed ({self.reason}); nothing was committed. The trained model "
                    f"is saved in {folder}")
        return (f"commit failed ({self.reason}), and the trained model could not be saved "
                f"either ({self.save_error}); nothing was committed")


# -- hardening: store
class RegistryMissing(RegistryCorrupt):
    """registry.json is gone but objects remain: the refs are lost, the store is not empty."""

    def __init__(self, path: str):
        self.path, self.reason = path, "missing"
        MStoreError.__init__(
            self, f"registry {path} is missing but the store holds objects: the store is "
            "damaged and nothing was changed")


class CommitLikeName(BadName):
    """7+ hex digits would be read as a commit id prefix and shadow (or be shadowed by) it."""

    def __init__(self, name: str):
        self.name = name
        MStoreError.__init__(
            self, f"bad model name {name!r}: 7 or more hex digits (0-9 a-f) read as a commit "
            "id prefix; put a character outside 0-9 a-f in it (e.g. a '-v1' suffix)")


class NotACommit(MStoreError, ValueError):
    def __init__(self, oid: str):
        self.oid = oid
        super().__init__(f"object {oid[:12]} is not a commit (it is not a manifest)")


class NameHeldByInvalidEntry(MStoreError):
    """registry.json holds an entry under this key that mstore cannot use (and keeps)."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(
            f"registry.json holds an invalid entry under {name!r} ({reason}); fix or remove "
            "it by hand first; nothing was written")


# -- hardening: import
class ChecksumMismatch(HubError):
    """A downloaded file differs from the size or sha256 the Hub published for it."""

    def __init__(self, repo_id: str, filename: str, detail: str):
        self.repo_id, self.filename, self.detail = repo_id, filename, detail
        super().__init__(
            f"{filename!r} downloaded from {repo_id!r} does not match its published checksum "
            f"({detail}); the bad copy was deleted and nothing was imported. If a new try "
            "fails the same way, the file on the Hub (or a proxy on the way) is damaged"
        )


class UnsafeRepoPath(BadSource):
    """A file name from a repo (or an index) that could escape the folder it lands in."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why
        super().__init__(f"refusing repo file name {name!r} ({why}); nothing was downloaded")


class InvalidRepoId(HubError, ValueError):
    def __init__(self, repo_id: str, detail: str):
        self.repo_id = repo_id
        super().__init__(f"{repo_id!r} is not a valid Hub repo id ({detail})")


class HubClientError(HubError):
    """huggingface_hub (or its HTTP stack) failed in a way it has no error class for."""

    def __init__(self, repo_id: str, detail: str):
        self.repo_id = repo_id
        super().__init__(f"the Hub client failed for {repo_id!r} ({detail})")


class AdapterError(MStoreError, ValueError):
    """A LoRA adapter that cannot be used as asked (trained on, merged, imported onto a base)."""


class NotAnAdapter(AdapterError):
    def __init__(self, ref: str, kind: str):
        self.ref, self.kind = ref, kind
        super().__init__(f"{ref} is a {kind} model, not a LoRA adapter: nothing to merge")


class AdapterOnAdapter(AdapterError):
    """Training on an adapter child: its weights are the base's plus a delta; merge first."""

    def __init__(self, ref: str, description: str):
        self.ref, self.description = ref, description
        super().__init__(f"config key 'model_name': {ref} is an adapter ({description}); "
                         f"merge it first (`mstore merge {ref}`) and train on the merged model")


class AdapterBaseMissing(AdapterError, LookupError):
    """`import` of a PEFT adapter whose base model is not in the store."""

    def __init__(self, base: str | None, source: str):
        self.base, self.source = base, source
        what = (f"its base model {base!r} is not in the store: import it first "
                f"(`mstore import {base}`)") if base else \
            "its adapter_config.json names no base model (base_model_name_or_path)"
        super().__init__(f"cannot import the LoRA adapter {source}: {what}")


class AdapterMismatch(AdapterError):
    """A PEFT adapter's tensors do not fit the base it would be committed on."""

    def __init__(self, source: str, base: str, reason: str):
        self.source, self.base, self.reason = source, base, reason
        super().__init__(f"the LoRA adapter {source} does not fit base {base}: {reason}")


class AdapterBaseAmbiguous(AdapterError, LookupError):
    def __init__(self, base: str, names: list[str]):
        self.base, self.names = base, names
        super().__init__(f"several models in the store are {base!r} ({', '.join(names)}); "
                         "name the adapter's base")


# -- provenance: signing, verifying, repair
class BadKeyFile(MStoreError, ValueError):
    """A key file that cannot be read as the key it should be."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"cannot use key file {path}: {reason}")


class VerificationFailed(MStoreError):
    """A signature, a statement or a signed object does not check out (`problem` says which
    generation and which object); `exit_code` 1 like fsck."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(problem)


class SignatureRequired(RemoteError):
    """A pull that requires a signature by a key, of a commit that has none by that key."""

    def __init__(self, name: str, remote: str, commit: str, keyid: str, found: list[str]):
        self.name, self.remote, self.commit, self.keyid, self.found = \
            name, remote, commit, keyid, found
        who = (f"signed only by unknown key(s) {', '.join(k[:16] for k in found)}" if found
               else "not signed")
        super().__init__(f"{name!r} on {remote!r} ({commit[:12]}) is {who}, not by key "
                         f"{keyid[:16]}; refused, nothing was written")


class NothingToRepairWith(MStoreError):
    """fsck found damaged objects but no source of good copies was given or usable."""

    def __init__(self, count: int, reason: str):
        self.count, self.reason = count, reason
        super().__init__(f"{count} object(s) need repair but {reason}; nothing was changed")
class NothingToPlot(MStoreError):
    """A model whose lineage holds no training record: there is no curve to draw."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"{name} has no training record (an import, or trained before "
                         "mstore kept one): nothing to plot; name a fine-tuned model")


class PlotError(MStoreError, ValueError):
    pass
# -- quantized children and eval
class QuantizeError(MStoreError, ValueError):
    """A quantization request that cannot be met (scheme, group size, what is quantized)."""


class QuantizedExport(ExportError):
    """transformers cannot load a quantized child's layout as a pre-quantized checkpoint
    (optimum-quanto's transformers integration does not load serialised weights)."""

    def __init__(self, name: str, scheme: str):
        self.name, self.scheme = name, scheme
        super().__init__(f"{name} is quantized ({scheme}): transformers cannot load that "
                         "layout as a quantized checkpoint (its quanto support loads no saved "
                         "weights), so nothing was exported")


class EvalError(MStoreError, ValueError):
    """An eval that cannot run (an empty dataset, no token to predict)."""
