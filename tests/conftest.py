"""Shared fixtures: a local Hub (started before anything imports huggingface_hub), tiny
model folders built once per session, a fresh store per test, and a CLI runner."""

import os  # noqa: I001

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread each, not two fighting two

from tests.hub_server import reserve_server, start_hub_server  # noqa: E402  (must run first)

HUB = reserve_server()

import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mstore.cli.app import app  # noqa: E402
from mstore.store.repo import Store  # noqa: E402
from tests import tiny_models  # noqa: E402
from tests.hub_server import clean_environ, hub_env  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MSTORE_LOCK_TIMEOUT", "5")


@pytest.fixture(scope="session")
def hub_server():
    return start_hub_server()


@pytest.fixture(autouse=True)
def _clean_hub(hub_server):
    yield
    hub_server.reset()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny HF folders, built once: qwen2, qwen2 sharded, qwen2 with one tensor changed,
    qwen3, both MoEs, pickle-only and an unsupported (remote-code) architecture."""
    root = tmp_path_factory.mktemp("models")
    return {
        "qwen2": tiny_models.build_qwen2(root / "qwen2"),
        "qwen2-sharded": tiny_models.build_qwen2(root / "qwen2-sharded", sharded=True),
        "qwen2-changed": tiny_models.build_qwen2(root / "qwen2-changed", change_one_tensor=True),
        "qwen3": tiny_models.build_qwen3(root / "qwen3"),
        "qwen2-moe": tiny_models.build_qwen2_moe(root / "qwen2-moe"),
        "qwen3-moe": tiny_models.build_qwen3_moe(root / "qwen3-moe"),
        "pickle": tiny_models.build_pickle_only(root / "pickle"),
        "remote-code": tiny_models.build_unsupported_arch(root / "remote-code"),
    }


@pytest.fixture(scope="session")
def hub_repos(hub_server, model_dirs):
    """The tiny models served by the local Hub under Qwen-like repo ids."""
    repos = {
        "tiny/Qwen2-Tiny": ("qwen2", {}),
        "tiny/Qwen2-Sharded": ("qwen2-sharded", {}),
        "tiny/Qwen3-Tiny": ("qwen3", {"license": "mit"}),
        "tiny/Qwen3-MoE-Tiny": ("qwen3-moe", {}),
        "tiny/Pickle-Only": ("pickle", {}),
        "tiny/Remote-Code": ("remote-code", {}),
        "tiny/Gated-Tiny": ("qwen2", {"gated": True}),
        "tiny/Evolving": ("qwen2", {}),
    }
    shas = {}
    for repo_id, (key, kw) in repos.items():
        shas[repo_id] = hub_server.add_repo(repo_id, model_dirs[key], **kw)
    return shas


@pytest.fixture
def store_path(tmp_path, monkeypatch):
    path = tmp_path / "store"
    monkeypatch.setenv("MSTORE_HOME", str(path))
    return path


@pytest.fixture
def store(store_path):
    return Store(store_path)


class Cli:
    """Runs the CLI in-process against the test's store, as a user would type it."""

    def __init__(self, store_path: Path):
        self.store_path = store_path
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True, input: str | None = None):
        result = self.runner.invoke(app, ["--store", str(self.store_path), *map(str, args)],
                                    input=input)
        if ok and result.exit_code != 0:
            raise AssertionError(f"mstore {' '.join(map(str, args))} exited "
                                 f"{result.exit_code}:\n{result.stdout}\n{result.stderr}"
                                 + (f"\n{result.exception!r}" if result.exception else ""))
        return result


@pytest.fixture
def cli(store_path):
    return Cli(store_path)


def run_mstore(*args: str, store: Path, env_extra: dict | None = None, hf_home=None,
               timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
    """The CLI as a separate process (`python -m mstore`), with the test Hub's settings."""
    env = clean_environ()
    env.update(hub_env(HUB, hf_home=hf_home or os.environ.get("HF_HOME")))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "mstore", "--store", str(store), *args],
                          capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=REPO_ROOT, input=input)


def snapshot(path: Path) -> dict[str, str]:
    """Every file under `path` with a hash of its bytes: to assert a store is untouched."""
    out = {}
    if path.exists():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p.relative_to(path)) + "/"] = ""
    return out
