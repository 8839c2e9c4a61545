"""What an architecture family provides to the rest of mstore, and how adapters are found.

An adapter turns a manifest into a runnable torch module (without allocating random
weights first), gives its tokenizer, and turns a trained module back into tensors and files
for a new manifest. It also answers, without torch, what import, export and train need to
know about its architecture (may it be imported, which weights are tied, the default
generation config, how to build a model from scratch). Import, training, `generate` and
`export` only talk to this interface: no module outside `mstore/adapters/` names an
architecture.

Adapters are found through the Python entry-point group `mstore.adapters` (name = the
manifest's `architecture`), so the built-in ones register exactly like an outside package.
The built-in names are also known here (BUILTIN_ADAPTERS), so the common case never pays
for the scan of every installed distribution (importlib.metadata, ~30 ms a process): the
group is read only for a name that is not built in, or to list them all. See
docs/adapters.md.
"""

from __future__ import annotations

import abc
import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Sequence

from ..errors import ConfigError, ObjectCorrupt, ObjectMissing, UnknownAdapter
from ..store.quant_layout import logical_tensors

if TYPE_CHECKING:
    import torch

    from ..store.manifest import Manifest
    from ..store.repo import Store

ENTRY_POINT_GROUP = "mstore.adapters"
# mstore's own entries of that group (pyproject.toml declares the same; a test checks it)
BUILTIN_ADAPTERS = {
    "qwen2": "mstore.adapters.qwen:QwenAdapter",
    "qwen2_moe": "mstore.adapters.qwen:QwenAdapter",
    "qwen3": "mstore.adapters.qwen:QwenAdapter",
    "qwen3_moe": "mstore.adapters.qwen:QwenAdapter",
    "custom-transformer": "mstore.adapters.custom:CustomTransformerAdapter",
}
# What `model_name: null` in a training config trains (the config has no architecture key)
SCRATCH_ARCHITECTURE = "custom-transformer"
# The files a tokenizer is made of (what a `tokenizer:` override replaces in a fine-tune)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "tokenizer.model")


class Tokenizer(abc.ABC):
    """The slice of a tokenizer that mstore uses."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> list[int]:
        return []

    @property
    def native(self) -> Any:
        """The tokenizer its own library gives (transformers' for the Qwen family): what
        `mstore.load` returns. This object itself where there is no other."""
        return self

    def apply_chat_template(self, prompt: str) -> str:
        """The prompt wrapped as a single user turn; plain text if the model has no template."""
        return prompt


class Checkpoint(NamedTuple):
    """A module turned back into what a manifest holds (see `Adapter.save_checkpoint`);
    read, never changed (so the empty defaults can be shared)."""

    tensors: dict[str, "torch.Tensor"]  # checkpoint layout names -> tensors (ties omitted)
    config: bytes  # config.json
    files: dict[str, bytes] = {}  # new or changed files only
    tied_weights: dict[str, str] = {}


class ScratchModel(NamedTuple):
    """A new model with no parent, as `Adapter.from_scratch` builds it for `train`."""

    adapter: "Adapter"  # bound to no manifest (manifest None)
    model: "torch.nn.Module"  # freshly initialised (seeded), on the CPU
    tokenizer: "Tokenizer"
    files: dict[str, bytes]  # what the new manifest holds besides config.json (the tokenizer)
    rebuild: Callable[[], "torch.nn.Module"]  # another fresh module of the same shape


class Adapter(abc.ABC):
    """One architecture family. Instances are bound to one manifest."""

    #: manifest `architecture` values this adapter serves
    architectures: tuple[str, ...] = ()
    #: whether `mstore import` takes these architectures from a Hub repo or a local folder
    #: (config.json `model_type`); False for models that only mstore itself creates
    importable: bool = True
    #: training from scratch (`model_name: null`, see `from_scratch`): the name stem of the
    #: new refs (`{stem}-001`), the manifest's model_id, and what messages call the model
    scratch_stem: str | None = None
    scratch_model_id: str | None = None
    scratch_title: str | None = None
    #: LoRA (`method: lora`): the default `target_modules` (peft's rule: a module whose
    #: name is one of these or ends with "." + one), every attention and MLP projection;
    #: empty means the training config must name them
    lora_targets: tuple[str, ...] = ()
    #: the peft `task_type` of this family's adapters ("CAUSAL_LM" wraps a transformers
    #: model in `PeftModelForCausalLM`); None: a plain `PeftModel`
    peft_task_type: str | None = None

    def __init__(self, store: "Store", manifest: "Manifest | None", commit: str | None = None):
        """`manifest` is None only for a model being created from scratch."""
        self.store = store
        self.manifest = manifest
        self.commit = commit

    # -- model ----------------------------------------------------------------------------
    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """The architecture's own config (config.json as a dict)."""

    @abc.abstractmethod
    def load_checkpoint(self, device: str = "cpu", dtype: "torch.dtype | None" = None,
                        verify: bool = False) -> "torch.nn.Module":
        """Build the module on the meta device and attach the tensors from the objects.

        With dtype None (the model's own) on CPU, tensors are the mmapped objects: no copy.
        """

    @abc.abstractmethod
    def forward(self, model: "torch.nn.Module", input_ids: "torch.Tensor",
                labels: "torch.Tensor | None" = None) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        """(logits, loss) for a batch of token ids; loss is next-token cross-entropy."""

    @abc.abstractmethod
    def save_checkpoint(self, model: "torch.nn.Module") -> Checkpoint:
        """The module's tensors in the checkpoint layout the manifest uses."""

    def tied_weights(self) -> dict[str, str]:
        return dict(self.manifest.tied_weights)

    @classmethod
    def from_scratch(cls, store: "Store", arch: Mapping[str, Any], seed: int,
                     texts: Sequence[str], tokenizer_files: Mapping[str, bytes]) -> ScratchModel:
        """A new, seeded model for `train` with `model_name: null`. `arch` holds the
        training config's architecture keys (`train.config.ARCH_KEYS`, defaults filled
        in); `texts` are the training documents (to build a vocabulary from) and
        `tokenizer_files` the config's `tokenizer:` override (name -> bytes, may be empty).
        The torch RNG state is left as it was. The default refuses (`ConfigError`)."""
        raise ConfigError(f"config key 'model_name': the {cls.__name__} cannot train a "
                          "model from scratch")

    # -- what import and export need to know (torch-free classmethods) -------------------
    @classmethod
    def tie_rules(cls, config: dict) -> dict[str, str]:
        """Checkpoint names tied to another (target -> source) for a model with this
        config.json. Import records a pair as a tie of the manifest when the source holds
        the source tensor and not the target. The default: no ties."""
        return {}

    @classmethod
    def default_generation_config(cls, config: dict) -> dict | None:
        """The generation_config.json `export` writes for a manifest that has none, or None
        to write none. The default is what transformers derives from config.json: its
        bos/eos/pad token ids and transformers_version."""
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if config.get(k) is not None}
        return {**gen, "transformers_version": config.get("transformers_version", "")}

    # -- checks before anything is written or allocated (torch-free) ----------------------
    @classmethod
    def check_tensors(cls, config: dict, tensors: Mapping[str, tuple[str, Sequence[int]]],
                      where: str) -> None:
        """Refuse (`ConfigMismatch`, one line naming the first mismatch) unless config.json's
        sizes are usable and `tensors` ({name: (dtype, shape)}, tied weights left out) are
        exactly what the architecture builds from them. `where` names the model in the
        message. Import calls it on the safetensors headers before writing any object;
        loading on the manifest's tensor table before mapping any tensor. The default
        accepts everything (an adapter that checks nothing keeps working)."""

    @classmethod
    def check_tokenizer(cls, config: dict, files: Mapping[str, bytes],
                        tensors: Mapping[str, tuple[str, Sequence[int]]], where: str) -> None:
        """Refuse (`BadTokenizer`) tokenizer files (`files`: name -> bytes, the model's
        non-weight files) that do not load, or whose ids do not fit the input embedding
        (found in `tensors`, already checked by `check_tensors`). Called by import before
        writing any object. The default accepts everything."""

    def check_manifest(self) -> None:
        """`check_tensors` on the bound manifest: a store written by an older mstore, or
        a config.json that does not match, fails in one line before any allocation. A
        quantized child is checked as the full-precision model it stands for."""
        where = f"commit {self.commit[:12]}" if self.commit else f"model {self.manifest.model_id}"
        tensors = logical_tensors(self.manifest.tensors, self.manifest.quantization)
        type(self).check_tensors(self.get_config(), tensors, where)

    def load_state(self, verify: bool = False,
                   dtype: "torch.dtype | None" = None) -> dict[str, "torch.Tensor"]:
        """The bound manifest's tensors, mmapped, as the module takes them: what
        `load_checkpoint` attaches. For a quantized child each quantized weight is one
        optimum-quanto tensor (its scale and shift folded in), which runs in the child's
        stored dtype only."""
        from ..runtime import torch_io

        state = torch_io.load_state_dict(self.store.objects, self.manifest.tensors, verify)
        if not self.manifest.quantization:
            return state
        from ..runtime.quantize import assemble, check_run_dtype

        check_run_dtype(self.manifest, dtype)
        return assemble(state, self.manifest.tensors, self.manifest.quantization)

    def context_length(self) -> int | None:
        """The longest sequence the model takes in one forward pass (None: unknown). The
        default: config.json's `max_position_embeddings`."""
        n = self.get_config().get("max_position_embeddings")
        return n if isinstance(n, int) and n > 0 else None

    @classmethod
    def linear_weights(cls, config: dict) -> dict[str, tuple[int, ...]]:
        """{checkpoint name: shape} of the weights of the model's linear layers, the output
        head left out: what `quantize` and `import --quantize` quantize (embeddings, norms
        and biases are kept as they are), and what the pre-import check counts. The
        default: none (the architecture cannot be quantized)."""
        return {}

    # -- tokenizer ------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenizer(self) -> Tokenizer:
        """The bound manifest's tokenizer, from its file objects."""

    def tokenizer_from_files(self, files: dict[str, bytes]) -> Tokenizer:
        """A tokenizer made of other files (a config's `tokenizer:` override)."""
        raise ConfigError(f"config key 'tokenizer': the {type(self).__name__} cannot take "
                          "another tokenizer")

    @abc.abstractmethod
    def vocab_rows(self, model: "torch.nn.Module") -> int:
        """Rows of the input embedding: the largest vocabulary the model can take."""

    # -- generation ----------------------------------------------------------------------
    @abc.abstractmethod
    def generate_stream(self, model: "torch.nn.Module", input_ids: "torch.Tensor",
                        max_new_tokens: int, temperature: float, top_k: int | None,
                        top_p: float | None, generator: "torch.Generator | None",
                        eos_token_ids: list[int]) -> Iterator[int]:
        """Yield new token ids one at a time (so the CLI can stream them), stopping after
        `max_new_tokens` or at an id of `eos_token_ids` (not yielded). Each token is picked
        with `mstore.runtime.sampling.sample_next_token` (temperature 0 is greedy), so the
        sampling flags and `--seed` mean the same for every architecture."""

    # -- helpers for subclasses -----------------------------------------------------------
    @contextlib.contextmanager
    def materialised_files(self) -> Iterator[Path]:
        """A temp folder where config.json and the file objects appear under their names.

        Symlinks to the objects, not copies: libraries that want a folder (transformers'
        AutoTokenizer, AutoConfig) get one for free. File objects are small, so each is
        re-hashed first: a corrupt tokenizer is named, never silently used.
        """
        import tempfile

        objects = self.store.objects
        with tempfile.TemporaryDirectory(prefix="mstore-files-") as tmp:
            root = Path(tmp)
            for name, oid in {**self.manifest.files, "config.json": self.manifest.config}.items():
                if "/" in name or name.startswith("."):
                    continue
                problem = objects.verify(oid)
                if problem == "missing":
                    raise ObjectMissing(oid, f"file object ({name})")
                if problem:
                    raise ObjectCorrupt(oid, problem, f"file object ({name})")
                objects.link_or_copy(oid, root / name)
            yield root


@functools.cache
def installed_adapters() -> dict[str, Any]:
    """architecture -> entry point, from the `mstore.adapters` group (scanned once), with
    the built-in names whatever the group holds (a built-in name is never overridden)."""
    from importlib.metadata import EntryPoint, entry_points

    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    builtin = {name: EntryPoint(name, value, ENTRY_POINT_GROUP)
               for name, value in BUILTIN_ADAPTERS.items()}
    return {**found, **builtin}


def adapter_class(architecture: str) -> type[Adapter]:
    if architecture in BUILTIN_ADAPTERS:
        module, _, attr = BUILTIN_ADAPTERS[architecture].partition(":")
        from importlib import import_module

        return getattr(import_module(module), attr)
    eps = installed_adapters()
    if architecture not in eps:
        raise UnknownAdapter(architecture, sorted(eps))
    return eps[architecture].load()


def adapter_for(store: "Store", commit: str) -> Adapter:
    manifest = store.read_manifest(commit)
    return adapter_class(manifest.architecture)(store, manifest, commit)


def is_importable(architecture: str | None) -> bool:
    """Whether an installed adapter serves `architecture` and lets import take it (loads
    that one adapter's module only)."""
    if not isinstance(architecture, str) or (architecture not in BUILTIN_ADAPTERS
                                             and architecture not in installed_adapters()):
        return False
    return adapter_class(architecture).importable


def importable_architectures() -> list[str]:
    """Every architecture `mstore import` takes, sorted (loads every adapter's module)."""
    return sorted(a for a in installed_adapters() if adapter_class(a).importable)


def scratch_adapter_class() -> type[Adapter]:
    """The adapter that `model_name: null` trains from scratch."""
    return adapter_class(SCRATCH_ARCHITECTURE)
