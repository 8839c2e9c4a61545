"""Crash anywhere, race anything, corrupt everything: lose nothing.

Failpoints end a real process at every step that changes the disk; a seeded campaign
SIGKILLs processes at random times; a power-loss model rebuilds every prefix of the
store's writes with unsynced data dropped; writers race gc. After each: registry.json
parses, every ref holds its old or new value, fsck finds nothing missing or corrupt.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mstore.training.config import load_config
from mstore.hub.importer import import_model
from mstore.store.repo import Store
from mstore.training.loop import train
from tests.conftest import REPO_ROOT, snapshot
from tests.reliability import (
    PowerLoss, assert_consistent, copy_store, env_without_failpoints, fsck_errors, refs_of,
)

KILLS = int(os.environ.get("MSTORE_TORTURE_KILLS", "12"))
LOADS_WEIGHTS = ("train", "train-lora", "merge", "quantize", "import-quantize")  # slow to start: each point's first hit only
# the LoRA write paths (issue 13) and the failpoints of their own code
NEW_WRITE_PATHS = {"train-lora": {"train.trained", "train.adapter-built"},
                   "merge": {"merge.merged"}, "import-adapter": {"import.adapter-checked"},
                   "quantize": {"quantize.tensor"}, "import-quantize": {"import.downloaded"},
                   "import-hub": {"import.streamed-tensor", "import.downloaded"}}
HUB_REPO = "tiny/Qwen2-Sharded"  # three shards, streamed while they download
SEED = int(os.environ.get("MSTORE_TORTURE_SEED", "20261125"))


def mstore(store: Path, *args, failpoint: str | None = None, log: Path | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    env = env_without_failpoints()
    env["MSTORE_LOCK_TIMEOUT"] = "20"
    env["HF_HUB_OFFLINE"] = "1"
    if HUB_REPO in map(str, args):  # the tests' Hub, and an HF cache of its own
        env = online_env(store.parent / "hf-home", env)
    if failpoint:
        env["MSTORE_FAILPOINT"] = failpoint
    if log:
        env["MSTORE_FAILPOINT_LOG"] = str(log)
    return subprocess.run([sys.executable, "-m", "mstore", "--store", str(store), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def online_env(hf_home: Path, base: dict | None = None) -> dict[str, str]:
    """`base` (default os.environ) pointed at the tests' Hub with an empty HF cache, so an
    import downloads (and streams) instead of reading a snapshot another test cached."""
    from tests.conftest import HUB
    from tests.hub_server import hub_env

    env = dict(os.environ if base is None else base)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(hub_env(HUB, hf_home=hf_home))
    return env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(("mstore keeps every tensor once. " * 8 + "\n") * 30)
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory, model_dirs, corpus) -> Path:
    """A store holding `base` (qwen3), `extra` (a tag), `lora` (a LoRA child of base) and
    an unreachable old model."""
    root = tmp_path_factory.mktemp("template") / "store"
    s = Store(root)
    import_model(s, str(model_dirs["qwen3"]), name="base", accept_license=True)
    s.tag("base", "extra")
    train(s, load_config(lora_config(root.parent, corpus), name="lora"))
    import_model(s, str(model_dirs["qwen2-moe"]), name="gone", accept_license=True)
    s.remove("gone")
    old = time.time() - 7200
    for oid, _ in s.objects.iter_objects():
        os.utime(s.objects.path(oid), (old, old))
    return root


@pytest.fixture(scope="module")
def pack_template(tmp_path_factory, template) -> Path:
    """`template` plus `kid` (a nudged child of base, packed), `kid2` (its child, loose)
    and an unreachable packed pair (`dp` and its child `dc`, removed) for gc to take."""
    from mstore.store import packing
    from tests.packs_helpers import dtype_model, make_child

    root = copy_store(template, tmp_path_factory.mktemp("packs") / "store")
    s = Store(root)
    make_child(s, "base", "kid", seed=1)
    make_child(s, "kid", "kid2", seed=2)
    dtype_model(s, "dp")
    dtype_model(s, "dc", parent="dp", seed=3)
    packing.pack(s, ["kid", "dp", "dc"])
    s.remove("dc")
    s.remove("dp")
    old = time.time() - 7200
    for st in s.objects.iter_stored():
        for path in (s.objects.path(st.oid), s.objects.pack_path(st.oid)):
            if path.exists():
                os.utime(path, (old, old))
    return root


PACK_COMMANDS = {
    "pack": (["pack", "kid2"], None, False),
    "unpack": (["unpack", "kid"], None, False),
    "gc-packs": (["gc", "--grace", "0"], None, False),
}


def scratch_config(tmp: Path, corpus: Path) -> Path:
    cfg = tmp / "scratch.yaml"
    cfg.write_text(f"model_name: null\ndataset: {corpus}\nmax_steps: 3\nbatch_size: 4\n"
                   "seq_len: 16\nn_layers: 1\nd_model: 16\nn_heads: 2\ndevice: cpu\n"
                   "eval_interval: 3\n")
    return cfg


def lora_config(tmp: Path, corpus: Path) -> Path:
    cfg = tmp / "lora.yaml"
    cfg.write_text(f"model_name: base\ndataset: {corpus}\nmethod: lora\nmax_steps: 2\n"
                   "batch_size: 2\nseq_len: 16\ndevice: cpu\neval_interval: 2\n"
                   "lora: {r: 4}\n")
    return cfg


def peft_adapter_folder(template: Path, tmp: Path) -> Path:
    """The template's LoRA child as a PEFT folder (what `import` of an adapter reads)."""
    from mstore.hub.export import export_model

    folder = tmp / "peft-adapter"
    if not folder.exists():
        export_model(Store(template), "lora", folder, adapter=True)
    return folder


def commands(model_dirs, tmp: Path, corpus: Path, template: Path | None = None):
    """(name, args, target ref, rerun_may_fail_if_done) for every write command."""
    return {
        "train-lora": (["train", "--config", lora_config(tmp, corpus)], "base-lora-001", False),
        "merge": (["merge", "lora"], "lora-merged-001", False),
        "import-adapter": ((["import", peft_adapter_folder(template, tmp), "--accept-license"]
                            if template else []), "peft-adapter", False),
        "import": (["import", model_dirs["qwen2"], "--name", "q", "--accept-license"], "q", False),
        "import-hub": (["import", HUB_REPO, "--name", "h", "--accept-license"], "h", False),
        "tag": (["tag", "base", "t"], "t", False),
        "rm": (["rm", "extra"], "extra", True),
        "gc": (["gc", "--grace", "0"], None, False),
        "export": (["export", "base", tmp / "exported"], None, True),
        "export-gguf": (["export", "base", tmp / "exported", "--format", "gguf"], None, True),
        "train": (["train", "--config", scratch_config(tmp, corpus)],
                  "custom-transformer-001", False),
        "push": (["push", "base", "origin"], None, False),
        **PACK_COMMANDS,
        "upgrade": (["tag", "base", "t"], "t", False),  # a format-1 store's first write
        # a rerun once the ref is there: its --name is taken (error), nothing changes
        "quantize": (["quantize", "base", "--scheme", "int4", "--group-size", "32",
                      "--name", "qb"], "qb", True),
        "import-quantize": (["import", model_dirs["qwen2"], "--name", "qq", "--quantize",
                             "int8", "--accept-license"], "qq", True),
    }


def prepare(command: str, store: Path, i: int) -> None:
    """Per-case set-up: push needs a remote of its own for every case."""
    if command == "push":
        res = mstore(store, "remote", "add", "origin", store.parent / f"remote-{i}")
        assert res.returncode == 0, res.stderr
    if command == "upgrade":  # registry.json as the first release wrote it
        reg = store / "registry.json"
        from mstore.store.registry import VERSION

        reg.write_text(reg.read_text().replace(f'"version": {VERSION}', '"version": 1', 1))


def failpoints_reached(template: Path, tmp: Path, command: str, args) -> Counter:
    store = copy_store(template, tmp / "probe")
    prepare(command, store, -1)
    log = tmp / "probe.log"
    res = mstore(store, *args, log=log)
    assert res.returncode == 0, res.stderr
    if "export" in map(str, args):
        import shutil

        shutil.rmtree(tmp / "exported")
    return Counter(log.read_text().split())


@pytest.mark.parametrize("command", ["import", "import-hub", "tag", "rm", "gc", "export",
                                     "export-gguf", "push", "upgrade", *PACK_COMMANDS,
                                     *(pytest.param(c, marks=pytest.mark.slow) for c in
                                       ("train", "train-lora", "merge", "import-adapter",
                                        "quantize", "import-quantize"))])
def test_every_failpoint_of_every_command(command, template, model_dirs, tmp_path, corpus,
                                          request):
    args, target, rerun_may_fail = commands(model_dirs, tmp_path, corpus, template)[command]
    if command in PACK_COMMANDS:
        template = request.getfixturevalue("pack_template")
    if command == "import-hub":
        request.getfixturevalue("hub_repos")
    reached = failpoints_reached(template, tmp_path, command, args)
    assert reached, "the command passed no failpoint"
    if command == "import-hub":  # streamed, not read from a snapshot some cache held
        assert NEW_WRITE_PATHS[command] <= set(reached), reached
    cases = []
    for name, n in sorted(reached.items()):  # each point's first hit, and its last one
        cases += [f"{name}:1"] + ([f"{name}:{n}"] if n > 1 and command not in LOADS_WEIGHTS
                                  else [])
    if command in NEW_WRITE_PATHS:  # the store's own steps are covered above: the command's
        order = list(reached)       # own points, and the first and last step it reaches
        cases = sorted({f"{order[0]}:1", f"{order[-1]}:1",
                        *(f"{p}:1" for p in order if p in NEW_WRITE_PATHS[command])})
    before = refs_of(template)
    for i, spec in enumerate(cases):
        store = copy_store(template, tmp_path / f"s{i}")
        prepare(command, store, i)
        res = mstore(store, *args, failpoint=spec)
        assert res.returncode == 137, (spec, res.returncode, res.stderr)
        allowed = {}
        if target:
            allowed[target] = {before.get(target), *_new_values(store, target, before)}
        assert_consistent(store, allowed, before)
        remote = store.parent / f"remote-{i}"
        if command == "push" and (remote / "registry.json").exists():
            assert refs_of(remote).get("base") in (None, before["base"])
            assert not fsck_errors(remote), spec
        again = mstore(store, *args)
        done = target and refs_of(store).get(target) != before.get(target)
        if again.returncode != 0:
            assert rerun_may_fail, (spec, again.stderr)
            assert again.stderr.startswith("error: ")
        after = assert_consistent(store, {target: {*_new_values(store, target, before)}}
                                  if target else None, None)
        if command == "rm":
            assert "extra" not in after
        elif command in ("gc", "gc-packs"):
            assert not (set(_objects(store)) - _reachable(store)), spec
        elif command in ("pack", "unpack"):
            s = Store(store)
            ref = "kid2" if command == "pack" else "kid"
            tensors = s.read_manifest(s.resolve(ref).commit).tensors.values()
            packed = [s.objects.is_packed(t.object) for t in tensors]
            assert (any(packed) if command == "pack" else not any(packed)), spec
            assert all(not (s.objects.path(t.object).exists()
                            and s.objects.pack_path(t.object).exists()) for t in tensors)
        elif command == "push":
            remote = store.parent / f"remote-{i}"
            assert refs_of(remote)["base"] == before["base"] and not fsck_errors(remote)
        elif command.startswith("export"):
            assert (tmp_path / "exported" / "README.md").exists()
            import shutil

            shutil.rmtree(tmp_path / "exported")
            for leftover in tmp_path.glob(".exported.mstore-export-*"):
                shutil.rmtree(leftover)
        elif target:
            assert target in after, (spec, done)


def _new_values(store: Path, target: str, before: dict) -> set:
    refs = refs_of(store)
    return {refs[target]} if target in refs else {None}


def _objects(store: Path) -> list[str]:
    return [oid for oid, _ in Store(store).objects.iter_objects()]


def _reachable(store: Path) -> set[str]:
    from mstore.store.gc import reachable

    return reachable(Store(store)).keep()


def test_sigkill_campaign(pack_template, model_dirs, tmp_path, corpus, hub_server):
    """Random kill -9 of import (of a folder, and of a Hub repo streamed while it downloads),
    train, gc, tag, pack and unpack processes at random times (seeded)."""
    rng = random.Random(SEED)
    for i in range(-1, KILLS):  # a revision of its own for each Hub import: each downloads
        hub_server.add_repo(f"kill/Qwen2-{i + 1}", model_dirs["qwen2-sharded"])
    print(f"sigkill campaign: seed {SEED}, {KILLS} kills (MSTORE_TORTURE_SEED to replay)")
    store = copy_store(pack_template, tmp_path / "store")
    cfg = scratch_config(tmp_path, corpus)
    folders = [model_dirs[k] for k in ("qwen2", "qwen2-changed", "qwen2-sharded", "qwen3-moe")]
    env = env_without_failpoints()
    env["HF_HUB_OFFLINE"] = "1"

    def args_for(kind: str, i: int) -> list:
        if kind == "import":
            return ["import", rng.choice(folders), "--accept-license", "--name", f"m{i}"]
        if kind == "import-hub":
            return ["import", f"kill/Qwen2-{i + 1}", "--accept-license", "--name", f"h{i + 1}"]
        if kind == "gc":
            return ["gc", "--grace", "0"]
        if kind == "tag":
            return ["tag", "base", f"t{i}"]
        if kind in ("pack", "unpack"):
            return [kind, "--all"]
        return ["train", "--config", cfg, "--name", f"c{i}"]

    # how long each kind takes here, so that the kills land inside the runs
    hub_run_env = online_env(tmp_path / "hf-home", env)
    duration = {}
    for kind in ("import", "import-hub", "gc", "tag", "train", "pack", "unpack"):
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "mstore", "--store", str(store),
                              *map(str, args_for(kind, -1))], capture_output=True, text=True,
                             env=hub_run_env if kind == "import-hub" else env, cwd=REPO_ROOT)
        assert res.returncode == 0, (kind, res.stderr)
        duration[kind] = time.time() - t0
    outcomes = Counter()
    for i in range(KILLS):
        kind = rng.choice(["import", "import", "import-hub", "gc", "tag", "train", "pack",
                           "unpack"])
        args = args_for(kind, i)
        delay = rng.uniform(0.05, 1.0) * duration[kind]
        proc = subprocess.Popen([sys.executable, "-m", "mstore", "--store", str(store),
                                 *map(str, args)],
                                env=hub_run_env if kind == "import-hub" else env, cwd=REPO_ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=delay)
            _, err = proc.communicate()
            assert proc.returncode == 0, (kind, err)  # finished before its kill: must succeed
            outcomes["finished"] += 1
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            outcomes["killed"] += 1
        errors = fsck_errors(store)
        assert not errors, (f"seed {SEED} kill {i} ({' '.join(map(str, args))} after "
                            f"{delay:.2f}s)", errors)
        refs_of(store)
    print(f"sigkill campaign outcomes: {dict(outcomes)}")
    assert outcomes["killed"] >= KILLS // 3
    res = mstore(store, "gc", "--grace", "0")
    assert res.returncode == 0, res.stderr
    assert not fsck_errors(store)


# -- power loss ------------------------------------------------------------------------
def _power_loss(store_root: Path, tmp_path: Path, action) -> int:
    """Run `action` recording its writes, then fsck every crash prefix; returns #prefixes."""
    before = refs_of(store_root)
    with PowerLoss(store_root) as rec:
        action()
    after = refs_of(store_root)
    assert rec.ops, "nothing was recorded"
    for k in range(len(rec.ops) + 1):
        state = rec.crash_state(k, tmp_path / "crash")
        refs = refs_of(state)
        errors = fsck_errors(state)
        assert not errors, (k, rec.ops[k - 1] if k else None, errors)
        for name in set(before) | set(after):
            assert refs.get(name) in (before.get(name), after.get(name)), (k, name)
    return len(rec.ops)


def test_power_loss_at_every_step_of_import_tag_rm_gc(template, model_dirs, tmp_path):
    root = copy_store(template, tmp_path / "store")
    s = Store(root)
    n = _power_loss(root, tmp_path, lambda: import_model(s, str(model_dirs["qwen2"]),
                                                         name="q", accept_license=True))
    assert n > 20
    _power_loss(root, tmp_path, lambda: s.tag("q", "q2"))
    _power_loss(root, tmp_path, lambda: s.remove("base"))
    from mstore.store.gc import collect

    _power_loss(root, tmp_path, lambda: collect(s, grace=0))


def test_power_loss_at_every_step_of_a_streamed_hub_import(template, model_dirs, tmp_path,
                                                           hub_server):
    """A Hub repo no HF cache holds: its shards are converted while they download."""
    hub_server.add_repo("power/Qwen2-Sharded", model_dirs["qwen2-sharded"])
    root = copy_store(template, tmp_path / "store")
    s = Store(root)
    n = _power_loss(root, tmp_path, lambda: import_model(s, "power/Qwen2-Sharded", name="h",
                                                         accept_license=True))
    assert n > 20 and "h" in refs_of(root)


def test_power_loss_at_every_step_of_pack_unpack_and_gc_of_packs(template, tmp_path):
    """On small models (six tensors of every dtype, a child of them): every prefix is
    rebuilt and fsck-ed, so the store is kept small."""
    from mstore.store import packing
    from mstore.store.gc import collect
    from tests.packs_helpers import dtype_model

    root = copy_store(template, tmp_path / "store")
    s = Store(root)
    dtype_model(s, "dp")
    dtype_model(s, "dc", parent="dp", seed=3)
    _power_loss(root, tmp_path, lambda: packing.pack(s, ["dp", "dc"]))
    _power_loss(root, tmp_path, lambda: packing.unpack(s, ["dp"]))
    s.remove("dp")
    s.remove("dc")
    _power_loss(root, tmp_path, lambda: collect(s, grace=0))


def test_power_loss_at_every_step_of_a_train_commit(template, tmp_path, corpus):
    root = copy_store(template, tmp_path / "store")
    cfg = load_config(scratch_config(tmp_path, corpus))
    _power_loss(root, tmp_path, lambda: train(Store(root), cfg))


@pytest.mark.slow
def test_power_loss_at_every_step_of_quantize_and_import_quantize(template, model_dirs,
                                                                  tmp_path):
    from mstore.runtime.quantize import quantize_model

    root = copy_store(template, tmp_path / "store")
    s = Store(root)
    _power_loss(root, tmp_path, lambda: quantize_model(s, "base", "int8", name="qb"))
    _power_loss(root, tmp_path, lambda: import_model(s, str(model_dirs["qwen2"]), name="qq",
                                                     accept_license=True, quantize="int8"))


def test_power_loss_at_every_step_of_a_lora_commit_merge_and_adapter_import(template, tmp_path,
                                                                            corpus):
    from mstore.runtime.lora import merge

    root = copy_store(template, tmp_path / "store")
    folder = peft_adapter_folder(template, tmp_path)
    cfg = load_config(lora_config(tmp_path, corpus))
    _power_loss(root, tmp_path, lambda: train(Store(root), cfg))
    _power_loss(root, tmp_path, lambda: merge(Store(root), "lora", "merged"))
    _power_loss(root, tmp_path, lambda: import_model(Store(root), str(folder), name="imported",
                                                     accept_license=True))


def test_power_loss_model_catches_a_missing_sync(template, model_dirs, tmp_path, monkeypatch):
    """The model is not vacuous: a batch of objects published without the filesystem sync
    (while the manifest and the ref are still synced) is caught."""
    from mstore.store import fsio

    monkeypatch.setattr(fsio, "sync_filesystem", lambda path: None)
    root = copy_store(template, tmp_path / "store")
    s = Store(root)
    with pytest.raises(AssertionError):
        _power_loss(root, tmp_path, lambda: import_model(s, str(model_dirs["qwen2"]),
                                                         name="q", accept_license=True))


# -- concurrency -----------------------------------------------------------------------
WRITER = r"""
import json, sys, time
from mstore.errors import MStoreError
from mstore.hub.importer import import_model
from mstore.store.repo import Store
store, role, folders, log, until = Store(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.argv[4], float(sys.argv[5])
i = 0
with open(log, "a") as out:
    while time.time() < until:
        i += 1
        try:
            if role.startswith("import"):
                name = f"{role}-{i}"
                r = import_model(store, folders[i % len(folders)], name=name, accept_license=True)
                out.write(json.dumps(["set", name, r.commit]) + "\n")
            elif role == "trainer":
                from mstore.training.config import load_config
                from mstore.training.loop import train
                cfg = load_config(folders[0], [f"seed={i}"], name=f"trained-{i}")
                r = train(store, cfg)
                out.write(json.dumps(["set", r.name, r.commit]) + "\n")
            elif role == "tagger":
                store.tag("base", f"tag-{i}")
                out.write(json.dumps(["set", f"tag-{i}", store.resolve("base").commit]) + "\n")
                if i % 2 == 0:
                    store.remove(f"tag-{i - 1}")
                    out.write(json.dumps(["rm", f"tag-{i - 1}", None]) + "\n")
        except MStoreError as e:
            out.write(json.dumps(["error", str(e), None]) + "\n")
        out.flush()
"""


def test_writers_and_gc_race_without_losing_anything(template, model_dirs, tmp_path, corpus):
    """Imports, train commits, tags and rm in four processes, a --grace 0 gc loop beside."""
    store = copy_store(template, tmp_path / "store")
    folders = ",".join(str(model_dirs[k]) for k in ("qwen2", "qwen2-changed", "qwen2-sharded"))
    until = time.time() + 8
    env = {**env_without_failpoints(), "MSTORE_LOCK_TIMEOUT": "10", "HF_HUB_OFFLINE": "1"}
    roles = {"import-a": folders, "import-b": folders, "trainer":
             str(scratch_config(tmp_path, corpus)), "tagger": folders}
    logs = {r: tmp_path / f"{r}.log" for r in roles}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store), role, roles[role],
                               str(log), str(until)], env=env, cwd=REPO_ROOT)
             for role, log in logs.items()]
    gc_runs = busy = 0
    while time.time() < until:
        res = mstore(store, "gc", "--grace", "0")
        assert res.returncode in (0, 75), res.stderr
        gc_runs += res.returncode == 0
        busy += res.returncode == 75
    for p in procs:
        assert p.wait(timeout=60) == 0
    expected: dict[str, str | None] = {}
    for log in logs.values():
        for line in log.read_text().splitlines():
            kind, name, commit = json.loads(line)
            assert kind != "error", name
            expected[name] = commit if kind == "set" else None
    refs = refs_of(store)
    for name, commit in expected.items():
        assert refs.get(name) == commit, name  # no lost ref update
    assert sum(1 for c in expected.values() if c) > 8 and gc_runs > 0
    assert any(n.startswith("trained-") for n in expected)
    assert mstore(store, "gc", "--grace", "0").returncode == 0
    assert not fsck_errors(store)


# -- gc grace and fsck classes ---------------------------------------------------------
def test_gc_removes_tmp_leftovers_only_after_the_grace_period(cli, store, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license")
    leftover = store.root / "tmp" / "obj.1.abc.incomplete"
    leftover.write_bytes(b"partial")
    assert json.loads(cli("gc", "--json").stdout)["tmp_files_deleted"] == 0
    old = time.time() - 7200
    os.utime(leftover, (old, old))
    assert json.loads(cli("gc", "--json").stdout)["tmp_files_deleted"] == 1
    assert not leftover.exists()


def _writable(path: Path) -> Path:
    os.chmod(path, 0o644)
    return path


def test_fsck_classes(cli, store, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "a")
    cli("import", model_dirs["qwen3"], "--accept-license", "--name", "b")
    cli("import", model_dirs["qwen2-moe"], "--accept-license", "--name", "c")
    ma = store.read_manifest(store.resolve("a").commit)
    mb = store.read_manifest(store.resolve("b").commit)
    names = sorted(ma.tensors)
    truncated = ma.tensors[names[3]].object
    p = _writable(store.objects.path(truncated))
    p.write_bytes(p.read_bytes()[:-10])
    renamed_from, renamed_to = ma.tensors[names[5]].object, mb.tensors[sorted(mb.tensors)[7]].object
    # object renamed to another id: b's object now holds a's bytes
    _writable(store.objects.path(renamed_to)).write_bytes(store.objects.path(renamed_from).read_bytes())
    bad_manifest = store.resolve("c").commit
    _writable(store.objects.path(bad_manifest)).write_bytes(b"{not json")
    reg = json.loads((store.root / "registry.json").read_text())
    reg["models"]["dangling"] = {**reg["models"]["a"], "model_name": "dangling",
                                 "commit": "e" * 64}
    (store.root / "registry.json").write_text(json.dumps(reg))
    unreachable = store.objects.put_bytes(b"nobody needs me").oid
    (store.root / "tmp" / "w.1.x.incomplete").write_bytes(b"")
    res = cli("fsck", "--json", ok=False)
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    errors = {(e["problem"], e["object"]) for e in doc["errors"]}
    assert ("corrupt", truncated) in errors
    assert ("corrupt", renamed_to) in errors
    assert ("corrupt", bad_manifest) in errors
    assert ("dangling-ref", "e" * 64) in errors
    info = {(i["problem"], i["object"]) for i in doc["info"]}
    assert ("unreachable", unreachable) in info
    assert any(i["problem"] == "tmp-leftover" for i in doc["info"])


def test_unreachable_and_tmp_leftovers_alone_exit_0(cli, store, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license")
    store.objects.put_bytes(b"orphan")
    (store.root / "tmp" / "x.incomplete").write_bytes(b"")
    res = cli("fsck")
    assert res.exit_code == 0 and "info  unreachable" in res.stdout


# -- Hub faults ------------------------------------------------------------------------
def test_file_missing_mid_snapshot_commits_nothing_and_a_retry_succeeds(tmp_path, hub_server,
                                                                         hub_repos):
    from tests.conftest import run_mstore

    hub_server.faults.missing_file.add("tiny/Qwen2-Sharded/tokenizer.json")
    store = tmp_path / "s"
    res = run_mstore("import", "tiny/Qwen2-Sharded", "--accept-license", store=store,
                     hf_home=tmp_path / "hf")
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and last.startswith("error: download of") and "missing" in last
    assert refs_of(store) == {}
    hub_server.reset()
    res = run_mstore("import", "tiny/Qwen2-Sharded", "--accept-license", store=store,
                     hf_home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr


def test_redirects_to_another_host(tmp_path, hub_server, hub_repos):
    from tests.conftest import run_mstore
    from tests.hub_server import refused_endpoint

    store = tmp_path / "s"
    hub_server.faults.redirect["tiny/Qwen2-Tiny/model.safetensors"] = None  # a CDN: fine
    res = run_mstore("import", "tiny/Qwen2-Tiny", "--accept-license", store=store,
                     hf_home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    assert any(r.listener == "cdn" for r in hub_server.requests)
    hub_server.reset()
    hub_server.faults.redirect["tiny/Qwen3-Tiny/model.safetensors"] = refused_endpoint()
    res = run_mstore("import", "tiny/Qwen3-Tiny", "--accept-license", store=store,
                     hf_home=tmp_path / "hf")
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in res.stderr and "qwen3-tiny" not in refs_of(store)
    hub_server.reset()
    res = run_mstore("import", "tiny/Qwen3-Tiny", "--accept-license", store=store,
                     hf_home=tmp_path / "hf")
    assert res.returncode == 0, res.stderr


# -- hostile input ---------------------------------------------------------------------
def test_lying_safetensors_header_in_a_local_folder(cli, store, model_dirs, tmp_path):
    import shutil
    import struct

    folder = tmp_path / "liar"
    shutil.copytree(model_dirs["qwen2"], folder)
    raw = (folder / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = sorted(k for k in header if k != "__metadata__")[0]
    header[name]["data_offsets"][1] += 10**9
    body = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    res = cli("import", folder, "--accept-license", ok=False)
    assert res.exit_code == 1 and "offsets out of range" in res.stderr
    assert not store.root.exists() or refs_of(store.root) == {}


def test_symlink_pointing_outside_a_local_folder_is_refused(cli, store, model_dirs, tmp_path):
    import shutil

    folder = tmp_path / "linky"
    shutil.copytree(model_dirs["qwen2"], folder)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").symlink_to(secret)
    res = cli("import", folder, "--accept-license", ok=False)
    assert "symlink pointing outside" in res.stderr


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd", "a/../../b", "x\x00y"])
def test_repo_file_names_outside_the_repo_are_refused(name):
    from mstore.errors import BadSource
    from mstore.hub.client import validate_repo_path

    with pytest.raises(BadSource):
        validate_repo_path(name)


def test_registry_of_the_wrong_shape(cli, store, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license")
    for bad in ['{"version": 1, "models": []}', '{"models": {}}', "{}", "null"]:
        (store.root / "registry.json").write_text(bad)
        before = snapshot(store.root)
        res = cli("list", ok=False)
        assert res.exit_code == 1 and res.stderr.count("\n") == 1 and "damaged" in res.stderr
        assert snapshot(store.root) == before
    # a bad entry is skipped with a warning, never fatal to the others (issue 11, item 12)
    for bad in ['{"version": 1, "models": {"x": 1}}',
                '{"version": 1, "models": {"x": {"commit": "c", "model_name": "y"}}}']:
        (store.root / "registry.json").write_text(bad)
        res = cli("list")
        assert res.stderr.startswith("warning: skipped registry entry 'x'")


def _damage(store_path: Path) -> dict[str, bytes]:
    """Flip a byte of one of base's tensor objects and delete another: {oid: damaged bytes}."""
    s = Store(store_path)
    victims = sorted(t.object for t in s.read_manifest(s.resolve("base").commit).tensors.values())
    flipped, deleted = victims[:2]
    path = s.objects.path(flipped)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    s.objects.path(deleted).unlink()
    return {flipped: bytes(data), deleted: b""}


@pytest.mark.slow
def test_every_failpoint_of_fsck_repair_leaves_a_store_fsck_can_still_repair(template, tmp_path):
    """kill -9 at each step of `fsck --repair --from`: what is left is the damage not yet
    mended (a moved-aside object reads as missing), which the next repair mends; the damaged
    copy is in lost-found/objects exactly once."""
    remote = copy_store(template, tmp_path / "remote")  # a remote is a store

    def damaged(name: str) -> tuple[Path, dict[str, bytes]]:
        store = copy_store(template, tmp_path / name)
        assert mstore(store, "remote", "add", "origin", remote).returncode == 0
        return store, _damage(store)

    probe, _ = damaged("probe")
    log = tmp_path / "probe.log"
    res = mstore(probe, "fsck", "--repair", "--from", "origin", log=log)
    assert res.returncode == 0, res.stderr
    reached = Counter(log.read_text().split())
    assert {"repair.moved-aside", "repair.object-put"} <= set(reached)
    cases = [f"{n}:{i}" for n, count in sorted(reached.items()) for i in sorted({1, count})]
    for i, spec in enumerate(cases):
        store, victims = damaged(f"s{i}")
        before = refs_of(store)
        res = mstore(store, "fsck", "--repair", "--from", "origin", failpoint=spec)
        assert res.returncode == 137, (spec, res.stderr)
        left = {line.split()[1] for line in fsck_errors(store)}
        assert left <= set(victims), (spec, left)
        again = mstore(store, "fsck", "--repair", "--from", "origin")
        assert again.returncode == 0, (spec, again.stdout, again.stderr)
        assert_consistent(store, None, before)
        aside = [p.read_bytes() for p in (store / "lost-found" / "objects").iterdir()]
        assert aside == [b for b in victims.values() if b], spec


@pytest.mark.slow
def test_every_failpoint_of_sign_leaves_the_store_consistent(template, tmp_path):
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "key.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    probe = copy_store(template, tmp_path / "probe")
    log = tmp_path / "probe.log"
    assert mstore(probe, "sign", "base", "--key", key, log=log).returncode == 0
    reached = sorted(set(log.read_text().split()))
    assert "attach.object-written" in reached
    for i, spec in enumerate(reached):
        store = copy_store(template, tmp_path / f"s{i}")
        before = refs_of(store)
        assert mstore(store, "sign", "base", "--key", key, failpoint=spec).returncode == 137
        assert_consistent(store, None, before)
        assert mstore(store, "sign", "base", "--key", key).returncode == 0
        assert mstore(store, "verify", "base").returncode == 0, spec
