"""The import contract between the layers (README "Layout"): what each may load.

Two checks, because each catches what the other cannot: a fresh interpreter shows what an
import really pulls in (through every transitive import), and a walk over the source finds
imports inside functions that a plain `import` never runs.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "mstore"
HEAVY = ("torch", "transformers")


def loaded_after(code: str) -> set[str]:
    """Top-level module names loaded by running `code` in a fresh interpreter."""
    probe = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


@pytest.mark.parametrize("module", ["mstore", "mstore.store", "mstore.remote",
                                    "mstore.remote.sync", "mstore.store.gc",
                                    "mstore.store.fsck", "mstore.store.report",
                                    "mstore.training.config", "mstore.cli"])
def test_light_modules_load_neither_torch_nor_transformers(module):
    loaded = loaded_after(f"import {module}")
    assert not loaded & set(HEAVY), f"{module} loads {sorted(loaded & set(HEAVY))}"


@pytest.mark.parametrize("module", ["mstore.store", "mstore.store.repo", "mstore.store.gc",
                                    "mstore.store.fsck", "mstore.store.report",
                                    "mstore.store.lost_found", "mstore.remote.sync"])
def test_store_and_remote_layers_load_no_typer(module):
    assert "typer" not in loaded_after(f"import {module}")
    assert "click" not in loaded_after(f"import {module}")


def imports_of(path: Path) -> set[str]:
    """Every mstore module a source file imports, at top level or inside a function."""
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mstore")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("mstore"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


ABOVE_STORE = ("mstore.runtime", "mstore.training", "mstore.adapters", "mstore.cli",
               "mstore.hub", "mstore.remote", "mstore.nn")


@pytest.mark.parametrize("path", sorted((PACKAGE / "store").glob("*.py")), ids=lambda p: p.name)
def test_store_layer_imports_nothing_above_it(path):
    above = sorted(m for m in imports_of(path) if m.startswith(ABOVE_STORE))
    assert not above, f"mstore/store/{path.name} imports {above}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "remote").glob("*.py")), ids=lambda p: p.name)
def test_remote_layer_builds_on_the_store_only(path):
    above = sorted(m for m in imports_of(path) if m.startswith(
        ("mstore.runtime", "mstore.training", "mstore.adapters", "mstore.cli", "mstore.hub")))
    assert not above, f"mstore/remote/{path.name} imports {above}"


def test_only_the_cli_and_runtime_know_typer_and_torch_at_top_level():
    """A module-level `import torch` outside runtime/, training/, adapters/ and nn/ would
    load torch for every command that imports it."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for n in names:
                top = n.split(".")[0]
                if top in HEAVY and rel.parts[0] not in ("runtime", "training", "adapters", "nn"):
                    offenders.append(f"{rel}: {n}")
                if top == "typer" and rel.parts[0] != "cli":
                    offenders.append(f"{rel}: {n}")
    assert not offenders, offenders


# -- start-up: what a command line loads (issue 16, target 6) ------------------------------
NOT_AT_START = ("yaml", "importlib.metadata", "huggingface_hub", "numpy", "tokenizers")


def loaded_by_command(store: Path, *args: str) -> set[str]:
    """Every module (full dotted names) loaded once `mstore --store STORE ARGS` has run."""
    code = ("import sys\nfrom mstore.cli.app import app\n"
            f"sys.argv = ['mstore', '--store', {str(store)!r}, *{list(args)!r}]\n"
            "try:\n    app(prog_name='mstore')\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(' '.join(sorted(sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert res.returncode == 0, res.stderr
    return set(res.stdout.splitlines()[-1].split())


@pytest.fixture(scope="module")
def imported_store(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("startup") / "store"
    loaded = loaded_by_command(root, "import", str(model_dirs["qwen2"]), "--accept-license",
                               "--name", "tiny")
    return root, loaded


def test_import_of_a_folder_reads_no_entry_points_and_no_yaml(imported_store):
    """A built-in architecture is found without scanning every installed distribution
    (tokenizers is loaded: import checks that tokenizer.json parses)."""
    _root, loaded = imported_store
    assert "mstore.hub.importer" in loaded
    refused = set(NOT_AT_START) - {"tokenizers"}
    assert not loaded & refused, sorted(loaded & refused)
    assert not loaded & set(HEAVY)


@pytest.mark.parametrize("args", [["list"], ["show", "tiny"], ["log", "tiny"], ["du"],
                                  ["gc", "--dry-run"], ["fsck"]], ids=lambda a: a[0])
def test_metadata_commands_load_no_importer_adapter_or_hub(imported_store, args):
    root, _ = imported_store
    loaded = loaded_by_command(root, *args)
    unexpected = {m for m in loaded if m.startswith(("mstore.hub", "mstore.adapters",
                                                      "mstore.training", "mstore.runtime"))}
    assert not unexpected, sorted(unexpected)
    assert not loaded & set(NOT_AT_START + HEAVY), sorted(loaded & set(NOT_AT_START + HEAVY))


# what list, show and log do not need: a thread pool (which pulls in logging) and syncfs
# through ctypes are for writers; LoRA names for diff and export; attachment lists only
# where the store has some; OpenSSL (hashlib) for nothing (the store hashes with blake3)
NOT_FOR_READING = ("concurrent.futures", "logging", "ctypes", "hashlib",
                   "mstore.store.lora_names", "mstore.store.attachments")


@pytest.mark.parametrize("args", [["list"], ["show", "tiny"], ["log", "tiny"]],
                         ids=lambda a: a[0])
def test_reading_commands_load_only_what_they_read(imported_store, args):
    root, _ = imported_store
    loaded = loaded_by_command(root, *args)
    assert not loaded & set(NOT_FOR_READING), sorted(loaded & set(NOT_FOR_READING))


def test_import_of_a_folder_loads_no_openssl(imported_store):
    """The per-source import lock is named by blake3, which the store has loaded anyway."""
    _root, loaded = imported_store
    assert "hashlib" not in loaded and "_hashlib" not in loaded


def test_the_builtin_adapter_table_is_what_pyproject_registers():
    """BUILTIN_ADAPTERS lets the built-in names skip the entry-point scan; it must say what
    the package's own entry points say."""
    import tomllib

    from mstore.adapters.base import BUILTIN_ADAPTERS, ENTRY_POINT_GROUP

    doc = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert doc["project"]["entry-points"][ENTRY_POINT_GROUP] == BUILTIN_ADAPTERS
