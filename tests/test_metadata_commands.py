"""list, show, log, tag, rm, gc, fsck, du, diff through the CLI, and what they must not do."""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from mstore.store.locks import StoreLock
from mstore.store.manifest import Manifest
from tests.conftest import REPO_ROOT, snapshot


@pytest.fixture
def two_models(cli, store, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "q2")
    cli("import", model_dirs["qwen3"], "--accept-license", "--name", "q3")
    return store


def make_child(store, parent_name: str, name: str, change: str | None = None) -> str:
    """A fine-tune-shaped child commit (one tensor replaced) without torch."""
    parent = store.resolve(parent_name).commit
    m = store.read_manifest(parent)
    tensors = dict(m.tensors)
    if change:
        t = tensors[change]
        assert t.dtype == "BF16"
        values = np.random.default_rng(len(name)).standard_normal(math.prod(t.shape))
        bf16 = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        with store.objects.batch() as b:
            res = b.put_tensor_bytes(t.dtype, t.shape, bf16.tobytes())
        tensors[change] = type(t)(res.oid, t.dtype, t.shape)
    child = Manifest(architecture=m.architecture, model_id=m.model_id,
                     source={"type": "finetune"}, license=m.license, config=m.config,
                     files=m.files, tensors=tensors, parent=parent, message=f"child {name}",
                     tied_weights=m.tied_weights, training={"steps": 3, "train_loss": [[1, 2.0], [3, 1.0]]})
    commit = store.put_manifest(child)
    store.registry.set_ref(store.registry_entry(name, commit, child, parent_name), expected=None)
    return commit


def test_list_and_show_json(cli, two_models):
    rows = json.loads(cli("list", "--json").stdout)
    assert [r["model_name"] for r in rows] == ["q2", "q3"]
    for r in rows:
        assert set(r) >= {"model_name", "commit", "model_id", "source", "architecture_type",
                          "license", "created_at", "fine_tuned_from", "parameters", "size_bytes"}
    assert cli("ls").stdout.splitlines()[0].split()[:4] == ["NAME", "COMMIT", "ARCH", "PARAMS"]
    doc = json.loads(cli("show", "q2", "--json").stdout)
    assert doc["manifest"]["architecture"] == "qwen2" and doc["names"] == ["q2"]
    assert doc["commit"] == rows[0]["commit"]
    text = cli("info", doc["commit"][:9]).stdout
    assert "architecture  qwen2" in text and "tied" in text


def test_tag_and_rm(cli, two_models):
    cli("tag", "q2", "q2-copy")
    refs = two_models.refs()
    assert refs["q2-copy"].commit == refs["q2"].commit
    res = cli("tag", "q2", "q3", ok=False)
    assert "already taken" in res.stderr
    cli("rm", "q2")
    cli("delete", "q2-copy")
    assert list(two_models.refs()) == ["q3"]
    res = cli("rm", "nope", ok=False)
    assert res.stderr.startswith("error: unknown model 'nope'")


def test_log_shows_lineage_and_collected_weights(cli, two_models):
    make_child(two_models, "q2", "q2-ft", change="model.layers.0.mlp.up_proj.weight")
    make_child(two_models, "q2-ft", "q2-ft-ft", change="model.layers.1.mlp.up_proj.weight")
    entries = json.loads(cli("log", "q2-ft-ft", "--json").stdout)
    assert [e["names"] for e in entries] == [["q2-ft-ft"], ["q2-ft"], ["q2"]]
    for e in entries:
        assert set(e) >= {"commit", "names", "parent", "created_at", "message", "training",
                          "weights_present"}
    assert entries[0]["parent"] == entries[1]["commit"]
    cli("rm", "q2")
    cli("rm", "q2-ft")
    cli("gc", "--grace", "0")
    entries = json.loads(cli("log", "q2-ft-ft", "--json").stdout)
    assert [e["weights_present"] for e in entries] == [True, False, False]
    assert "[weights collected]" in cli("log", "q2-ft-ft").stdout
    assert not cli("fsck").stderr


def test_gc_keeps_reachable_frees_unreachable_and_dry_run_deletes_nothing(cli, two_models):
    store = two_models
    make_child(store, "q2", "q2-ft", change="model.layers.0.mlp.up_proj.weight")
    q2 = store.read_manifest(store.resolve("q2").commit)
    child = store.read_manifest(store.resolve("q2-ft").commit)
    only_parent = q2.object_ids() - child.object_ids()
    assert len(only_parent) == 1
    cli("rm", "q2")
    before = snapshot(store.root)
    plan = json.loads(cli("gc", "--dry-run", "--grace", "0", "--json").stdout)
    assert set(plan["deleted"]) == only_parent and plan["dry_run"]
    assert snapshot(store.root) == before
    # within the grace period nothing goes
    assert json.loads(cli("gc", "--json").stdout)["objects_deleted"] == 0
    done = json.loads(cli("gc", "--grace", "0", "--json").stdout)
    assert set(done["deleted"]) == only_parent and done["bytes_freed"] > 0
    assert store.objects.exists(store.resolve("q2-ft").commit)
    assert store.objects.exists(child.parent)  # the parent manifest stays: history
    for oid in child.object_ids():
        assert store.objects.exists(oid)
    assert cli("fsck").exit_code == 0


def test_gc_grace_keeps_young_objects_and_collects_backdated_ones(cli, two_models):
    store = two_models
    orphan = store.objects.put_bytes(b"orphan").oid
    assert json.loads(cli("gc", "--grace", "1h", "--json").stdout)["objects_deleted"] == 0
    old = time.time() - 7200
    os.utime(store.objects.path(orphan), (old, old))
    assert json.loads(cli("gc", "--grace", "1h", "--json").stdout)["deleted"] == [orphan]


def test_gc_refuses_when_a_manifest_cannot_be_read(cli, two_models):
    store = two_models
    commit = store.resolve("q2").commit
    path = store.objects.path(commit)
    os.chmod(path, 0o644)
    path.write_bytes(b"garbage")
    store.objects.put_bytes(b"orphan")
    before = snapshot(store.root)
    res = cli("gc", "--grace", "0", ok=False)
    assert res.exit_code == 1 and "gc refused" in res.stderr and commit in res.stderr
    assert snapshot(store.root) == before


def test_fsck_names_a_flipped_byte_and_a_missing_object(cli, two_models):
    store = two_models
    assert "ok: no problems found" in cli("fsck").stdout
    m = store.read_manifest(store.resolve("q2").commit)
    flipped = m.tensors["model.layers.0.self_attn.q_proj.weight"].object
    missing = m.tensors["model.norm.weight"].object
    path = store.objects.path(flipped)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    os.chmod(store.objects.path(missing), 0o644)
    os.unlink(store.objects.path(missing))
    res = cli("fsck", "--json", ok=False)
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    problems = {(e["problem"], e["object"]) for e in doc["errors"]}
    assert ("corrupt", flipped) in problems and ("missing", missing) in problems
    text = cli("fsck", ok=False).stdout
    assert f"corrupt: {flipped}" in text and f"missing: {missing}" in text


def test_fsck_read_data_subset_covers_everything_in_slices(cli, two_models):
    store = two_models
    m = store.read_manifest(store.resolve("q3").commit)
    bad = m.tensors["model.embed_tokens.weight"].object
    path = store.objects.path(bad)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    hits = [cli("fsck", "--read-data-subset", f"{n}/3", ok=False).exit_code for n in (1, 2, 3)]
    assert sorted(hits) == [0, 0, 1]


def test_du_and_diff(cli, two_models):
    store = two_models
    make_child(store, "q2", "q2-ft", change="model.layers.0.mlp.up_proj.weight")
    doc = json.loads(cli("du", "--json").stdout)
    by = {m["name"]: m for m in doc["models"]}
    changed = store.read_manifest(store.resolve("q2-ft").commit).tensors[
        "model.layers.0.mlp.up_proj.weight"].object
    assert by["q2-ft"]["new_vs_parent_bytes"] == store.objects.size(changed)
    assert doc["logical_bytes"] > doc["physical_bytes"]
    assert "dedup ratio" in cli("du").stdout
    d = json.loads(cli("diff", "q2", "q2-ft", "--json").stdout)
    assert [c["name"] for c in d["changed"]] == ["model.layers.0.mlp.up_proj.weight"]
    assert d["changed"][0]["relative_l2"] > 0.5
    assert "model.embed_tokens.weight" in d["shared"] and not d["added"]
    d = json.loads(cli("diff", "q2", "q3", "--json").stdout)
    assert d["config_changed"]


def test_unknown_model_and_bad_input_are_one_line_errors(cli, two_models):
    for args in (["show", "nope"], ["log", "q22"], ["diff", "q2", "zz"], ["gc", "--grace", "x"]):
        res = cli(*args, ok=False)
        assert res.exit_code != 0 and "Traceback" not in res.stderr + res.stdout
    res = cli("show", "q22", ok=False)
    assert res.stderr.strip() == "error: unknown model 'q22' (did you mean 'q2'?)"


def test_damaged_registry_is_a_clear_error_and_not_overwritten(cli, two_models):
    reg = two_models.root / "registry.json"
    reg.write_text('{"version": 1, "models": [')
    before = snapshot(two_models.root)
    for args in (["list"], ["tag", "q2", "x"], ["rm", "q2"], ["gc"]):
        res = cli(*args, ok=False)
        assert res.exit_code == 1 and "registry" in res.stderr and "damaged" in res.stderr
    assert snapshot(two_models.root) == before


def test_lock_held_by_gc_blocks_writers_with_a_clear_message(cli, two_models, monkeypatch):
    monkeypatch.setenv("MSTORE_LOCK_TIMEOUT", "0.3")
    with StoreLock(two_models.lock_path, shared=False, purpose="gc"):
        res = cli("tag", "q2", "q2-tag", ok=False)
    assert res.exit_code == 75
    assert f"store is busy: gc running in pid {os.getpid()}" in res.stderr
    cli("tag", "q2", "q2-tag")  # released: works again


def test_a_killed_lock_holder_does_not_block(two_models, tmp_path):
    code = ("import sys, time; from mstore.store.locks import StoreLock;"
            "l = StoreLock(sys.argv[1], shared=False, purpose='gc'); l.__enter__();"
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(two_models.lock_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    with StoreLock(two_models.lock_path, shared=False, purpose="gc", timeout=1):
        pass


@pytest.mark.parametrize("command", [["list"], ["show", "q2"], ["log", "q2"], ["du"], ["fsck"],
                                     ["gc", "--dry-run"], ["diff", "q2", "q3"]])
def test_metadata_commands_import_no_torch(two_models, command):
    env = {**os.environ, "MSTORE_HOME": str(two_models.root)}
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "mstore", *command],
                         capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines()
                if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported
    assert "huggingface_hub" not in imported


def _reference_list_table(rows: list[dict]) -> str:
    """`mstore list`'s table as the straightforward per-cell code printed it before it
    was made fast at 10,000 refs (format per commit, one format call per line)."""
    from mstore.cli.output import license_text, safe_text
    from mstore.units import fmt_bytes, fmt_count

    table = [("NAME", "COMMIT", "ARCH", "PARAMS", "SIZE", "RUN MEM", "PARENT", "KIND",
              "LICENSE")]
    for r in rows:
        run = r.get("run_bytes")
        table.append((r["model_name"], r["short_commit"], r.get("architecture_type") or "-",
                      fmt_count(r.get("parameters") or 0), fmt_bytes(r.get("size_bytes") or 0),
                      "-" if run is None else fmt_bytes(run), r.get("fine_tuned_from") or "-",
                      r.get("variant") or r.get("kind") or "-",
                      license_text(r.get("license"), r.get("license_note") and "inherited, "
                                   "not permissive")))
    table = [tuple(safe_text(str(c)) for c in r) for r in table]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n"
                   for r in table)


def test_list_of_many_refs_children_and_adapters_prints_the_reference_table(cli, two_models):
    store = two_models
    make_child(store, "q2", "q2-ft", change="model.norm.weight")
    base = store.read_manifest(store.resolve("q2").commit)
    some = dict(list(base.tensors.items())[:2])
    kids = {  # (parent, manifest fields): the last two are siblings under a llama3 parent
        "q2-llama": ("q2", dict(tensors=base.tensors, license="llama3")),
        "q2-lora": ("q2-llama", dict(tensors=some, kind="adapter", license="llama3",
                                     adapter={"method": "lora", "r": 8, "alpha": 16})),
        "q2-int4": ("q2-llama", dict(tensors=some, kind="quantized",
                                     quantization={"scheme": "int4", "group_size": 32},
                                     license="odd\x1blicense")),  # a control character
    }
    for name, (parent, extra) in kids.items():
        child = Manifest(architecture=base.architecture, model_id=base.model_id,
                         source={"type": "finetune"}, config=base.config, files=base.files,
                         parent=store.resolve(parent).commit, message=f"child {name}",
                         **extra)
        commit = store.put_manifest(child)
        store.registry.set_ref(store.registry_entry(name, commit, child, parent), expected=None)
    targets = ["q2", "q3", "q2-ft", "q2-lora", "q2-int4", "q2-llama"]
    store.registry.update(lambda models: models.update(
        {f"tag-{i:03d}": models[targets[i % 6]].renamed(f"tag-{i:03d}") for i in range(300)},
        # the same commit as q2, another license in its entry: rows differ by that alone
        **{"tag-mit": replace(models["q2"], model_name="tag-mit", license="mit", _raw=None)}))

    rows = json.loads(cli("list", "--json").stdout)
    assert len(rows) == 307 and {r["kind"] for r in rows} == {"full", "adapter", "quantized"}
    assert any(r["license_note"] for r in rows)
    assert cli("list").stdout == _reference_list_table(rows)
