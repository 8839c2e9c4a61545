"""Provenance: signed commits verified across a lineage, pulls that require a signature,
signed exports that OpenSSF's model_signing accepts, and fsck --repair from good copies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mstore.store.repo import Store
from tests.conftest import Cli, snapshot
from tests.test_metadata_commands import make_child

MODEL_SIGNING = Path(sys.executable).with_name("model_signing")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """PEM key pairs: two ECDSA P-256 ("a", "b") and one Ed25519 ("e")."""
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name, key in (("a", ec.generate_private_key(ec.SECP256R1())),
                      ("b", ec.generate_private_key(ec.SECP256R1())),
                      ("e", ed25519.Ed25519PrivateKey.generate())):
        (root / f"{name}.pem").write_bytes(key.private_bytes(
            s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
        (root / f"{name}.pub").write_bytes(key.public_key().public_bytes(
            s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
        out[name] = root / f"{name}.pem"
        out[name + ".pub"] = root / f"{name}.pub"
    return out


@pytest.fixture
def lineage(cli, store, model_dirs):
    """base (an import) -> ft1 -> ft2, fine-tune-shaped children made without torch."""
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    make_child(store, "base", "ft1", change="model.norm.weight")
    make_child(store, "ft1", "ft2", change="model.layers.0.input_layernorm.weight")
    return store


def _verify(cli, name, *keys, ok=True):
    args = ["verify", name, "--json"] + [x for k in keys for x in ("--key", k)]
    res = cli(*args, ok=ok)
    return json.loads(res.stdout)


def _flip(path: Path, at: int = 100) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sign_and_verify_a_three_generation_lineage(cli, lineage, keys):
    commits = {n: lineage.resolve(n).commit for n in ("base", "ft1", "ft2")}
    cli("sign", "base", "--key", keys["e"])  # Ed25519 too
    cli("sign", "ft1", "--key", keys["a"])
    out = cli("sign", "ft2", "--key", keys["a"]).stdout
    assert out.startswith("signed ft2")
    assert "already signed" in cli("sign", "ft2", "--key", keys["a"]).stdout
    assert {n: lineage.resolve(n).commit for n in commits} == commits  # ids unchanged
    doc = _verify(cli, "ft2", keys["a.pub"], keys["e.pub"])
    assert doc["ok"] and [g["commit"] for g in doc["generations"]] == \
        [commits["ft2"], commits["ft1"], commits["base"]]
    assert all(g["status"] == "signed" and g["objects_checked"] > 20 for g in doc["generations"])
    algos = [g["signatures"][0]["algorithm"] for g in doc["generations"]]
    assert algos == ["ecdsa-p256-sha256", "ecdsa-p256-sha256", "ed25519"]
    text = cli("verify", "ft2").stdout
    assert text.count("signed    ") == 3 and "ok: 3 generation(s) signed" in text
    # the signed statement is the in-toto statement of that manifest, in a DSSE envelope
    import base64
    att = lineage.attachments.list(commits["ft1"], "signature")[0]
    env = att.payload["envelope"]
    stmt = json.loads(base64.b64decode(env["payload"]))
    assert env["payloadType"] == "application/vnd.in-toto+json"
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["subject"][0]["digest"] == {"blake3": commits["ft1"]}
    m = lineage.read_manifest(commits["ft1"])
    assert stmt["predicate"]["parent"] == commits["base"]
    assert stmt["predicate"]["tensors"] == {k: t.object for k, t in m.tensors.items()}
    # signatures survive gc and fsck is clean with them
    cli("gc", "--grace", "0")
    assert _verify(cli, "ft2", keys["a.pub"], keys["e.pub"])["ok"]
    assert json.loads(cli("fsck", "--json").stdout)["ok"]


def test_verify_names_the_object_whose_byte_flipped(cli, lineage, keys):
    for n in ("base", "ft1", "ft2"):
        cli("sign", n, "--key", keys["a"])
    m = lineage.read_manifest(lineage.resolve("ft2").commit)
    victim = m.tensors["model.layers.0.input_layernorm.weight"].object
    _flip(lineage.objects.path(victim), at=-3)
    res = cli("verify", "ft2", "--key", keys["a.pub"], ok=False)
    assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1
    assert victim in res.stderr and "model.layers.0.input_layernorm.weight" in res.stderr
    assert "the commit" in res.stderr
    doc = _verify(cli, "ft2", ok=False)
    assert not doc["ok"] and doc["generations"][0]["status"] == "invalid"


def test_verify_names_the_unsigned_generation(cli, lineage, keys):
    cli("sign", "ft2", "--key", keys["a"])
    cli("sign", "base", "--key", keys["a"])
    ft1 = lineage.resolve("ft1").commit
    res = cli("verify", "ft2", ok=False)
    assert res.exit_code == 1
    assert res.stderr.strip() == f"error: its parent {ft1[:12]} (ft1) is not signed"
    assert f"unsigned  {ft1[:12]}" in res.stdout
    statuses = [g["status"] for g in _verify(cli, "ft2", ok=False)["generations"]]
    assert statuses == ["signed", "unsigned", "signed"]


def test_a_signature_by_another_key_is_reported_as_unknown(cli, lineage, keys):
    from mstore.store.signing import fingerprint, load_public_key

    cli("sign", "base", "--key", keys["b"])
    b = fingerprint(load_public_key(keys["b.pub"]))
    assert _verify(cli, "base")["generations"][0]["signatures"][0]["keyid"] == b
    before = snapshot(lineage.root)
    res = cli("verify", "base", "--key", keys["a.pub"], ok=False)
    assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1
    assert f"signed only by unknown key(s) {b[:16]}" in res.stderr
    g = _verify(cli, "base", keys["a.pub"], ok=False)["generations"][0]
    assert g["status"] == "unknown-key" and g["signatures"][0]["trusted"] is False
    assert snapshot(lineage.root) == before


def test_a_signature_moved_to_another_commit_does_not_verify(cli, lineage, keys):
    """A valid envelope attached to a commit it was not made for: its subject is wrong."""
    cli("sign", "ft1", "--key", keys["a"])
    payload = lineage.attachments.list(lineage.resolve("ft1").commit, "signature")[0].payload
    lineage.attachments.add(lineage.resolve("ft2").commit, "signature", payload)
    res = cli("verify", "ft2", ok=False)
    assert "the signed statement's subject is not this commit's" in res.stderr


@pytest.mark.parametrize("key, reason", [
    ("a.pub", "not a PEM private key"), ("missing.pem", "No such file"),
    ("garbage", "not a PEM file")])
def test_bad_key_files_are_one_line_and_change_nothing(cli, lineage, keys, tmp_path, key, reason):
    (tmp_path / "garbage").write_text("hello")
    path = keys.get(key) or tmp_path / key
    before = snapshot(lineage.root)
    res = cli("sign", "base", "--key", path, ok=False)
    assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1 and reason in res.stderr
    res = cli("verify", "base", "--key", tmp_path / "garbage", ok=False)
    assert res.exit_code == 1 and "not a PEM file" in res.stderr
    assert snapshot(lineage.root) == before


def test_pull_require_signature_writes_nothing_unless_signed_by_that_key(
        cli, lineage, keys, tmp_path):
    remote = tmp_path / "remote"
    cli("remote", "add", "origin", remote)
    cli("push", "ft1")
    cli("push", "base")
    cli("sign", "base", "--key", keys["b"])  # by another key, pushed with it
    cli("push", "base")
    other = Cli(tmp_path / "other")
    other("init")
    other("remote", "add", "origin", remote)
    before = snapshot(tmp_path / "other")
    for name, found in (("ft1", "is not signed"), ("base", "signed only by unknown key")):
        res = other("pull", name, "--require-signature", keys["a.pub"], ok=False)
        assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1, res.stderr
        assert found in res.stderr and "nothing was written" in res.stderr
        assert snapshot(tmp_path / "other") == before
    cli("sign", "ft1", "--key", keys["a"])
    cli("push", "ft1")
    other("pull", "ft1", "--require-signature", keys["a.pub"])
    dest = Store(tmp_path / "other")
    assert dest.resolve("ft1").commit == lineage.resolve("ft1").commit
    doc = json.loads(other("verify", "ft1", "--json", ok=False).stdout)
    assert doc["generations"][0]["status"] == "signed"  # the signature travelled
    assert json.loads(other("fsck", "--json").stdout)["ok"]


def _model_signing_loads() -> str | None:
    res = subprocess.run([str(MODEL_SIGNING), "verify", "key", "--help"],
                         capture_output=True, text=True)
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["?"])[-1]


def test_a_signed_export_passes_model_signing_verify_and_fails_once_touched(
        cli, store, model_dirs, keys, tmp_path):
    problem = _model_signing_loads()
    if problem:
        pytest.skip(f"the model_signing CLI does not start here: {problem}")
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    out = tmp_path / "out"
    cli("export", "base", out, "--sign", keys["a"])
    assert (out / "model.sig").is_file()

    def ms_verify(pub):
        return subprocess.run([str(MODEL_SIGNING), "verify", "key", "--signature",
                               str(out / "model.sig"), "--public_key", str(pub), str(out)],
                              capture_output=True, text=True)

    assert ms_verify(keys["a.pub"]).returncode == 0
    assert ms_verify(keys["b.pub"]).returncode != 0
    tok = out / "tokenizer_config.json"
    os.chmod(tok, 0o644)
    tok.write_text(tok.read_text().replace("{", "{ ", 1))
    res = ms_verify(keys["a.pub"])
    assert res.returncode != 0 and "tokenizer_config.json" in res.stdout + res.stderr


def test_export_sign_refuses_an_ed25519_key_before_writing(cli, store, model_dirs, keys,
                                                           tmp_path):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    res = cli("export", "base", tmp_path / "out", "--sign", keys["e"], ok=False)
    assert res.exit_code == 1 and "ECDSA" in res.stderr and not (tmp_path / "out").exists()


# -- fsck --repair ---------------------------------------------------------------------
@pytest.fixture
def mirrored(cli, store, model_dirs, tmp_path):
    """`base` here and on the remote `origin`; three of its objects then damaged here:
    one byte flipped, one truncated, one deleted."""
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    cli("remote", "add", "origin", tmp_path / "remote")
    cli("push", "base")
    m = store.read_manifest(store.resolve("base").commit)
    flipped, truncated, deleted = sorted(t.object for t in m.tensors.values())[:3]
    _flip(store.objects.path(flipped))
    path = store.objects.path(truncated)
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes()[:40])
    store.objects.path(deleted).unlink()
    return store, (flipped, truncated, deleted)


def test_fsck_repair_from_a_remote_mends_flipped_truncated_and_deleted_objects(cli, mirrored):
    store, (flipped, truncated, deleted) = mirrored
    errors = json.loads(cli("fsck", "--json", ok=False).stdout)["errors"]
    assert {flipped, truncated, deleted} <= {e["object"] for e in errors}
    res = cli("fsck", "--repair", "--from", "origin")
    for oid in (flipped, truncated, deleted):
        assert f"repaired {oid[:12]}" in res.stdout
    assert res.stdout.rstrip().endswith("ok: no problems found")
    assert all(store.objects.verify(o) is None for o in (flipped, truncated, deleted))
    aside = sorted(p.name.split(".")[0] for p in (store.root / "lost-found/objects").iterdir())
    assert aside == sorted([flipped, truncated])  # kept, never deleted
    assert json.loads(cli("fsck", "--json").stdout)["ok"]
    assert "nothing to repair" in cli("fsck", "--repair").stdout


def test_fsck_repair_refuses_a_remote_copy_that_is_corrupt_too(cli, mirrored, tmp_path):
    store, (flipped, truncated, deleted) = mirrored
    remote = Store(tmp_path / "remote")
    _flip(remote.objects.path(flipped))
    damaged = store.objects.path(flipped).read_bytes()
    doc = json.loads(cli("fsck", "--repair", "--from", "origin", "--json", ok=False).stdout)
    failed = {f["object"]: f["reason"] for f in doc["repair"]["failed"]}
    assert "holds a corrupt copy too" in failed[flipped]
    assert {r["object"] for r in doc["repair"]["repaired"]} == {truncated, deleted}
    assert store.objects.path(flipped).read_bytes() == damaged  # left in place, not replaced
    assert [e["object"] for e in doc["errors"]] == [flipped]


def test_fsck_repair_with_nothing_to_repair_with_is_one_line(cli, store, model_dirs):
    cli("import", model_dirs["qwen2"], "--accept-license", "--name", "base")
    m = store.read_manifest(store.resolve("base").commit)
    store.objects.path(m.config).unlink()
    before = snapshot(store.root)
    res = cli("fsck", "--repair", ok=False)
    assert res.exit_code == 1 and len(res.stderr.splitlines()) == 1
    assert "1 object(s) need repair but" in res.stderr and "nothing was changed" in res.stderr
    assert snapshot(store.root) == before
    res = cli("fsck", "--repair", "--from", "nowhere", ok=False)
    assert "unknown remote 'nowhere'" in res.stderr and snapshot(store.root) == before


def test_fsck_repair_from_the_hub_revision_mends_files_and_tensors(cli, store, hub_repos):
    cli("import", "tiny/Qwen2-Tiny", "--accept-license", "--name", "hubbed")
    m = store.read_manifest(store.resolve("hubbed").commit)
    tensor = m.tensors["model.norm.weight"].object
    tok = m.files["tokenizer.json"]
    store.objects.path(tensor).unlink()
    _flip(store.objects.path(tok))
    res = cli("fsck", "--repair")
    assert f"repaired {tensor[:12]} (missing) from the Hub" in res.stdout
    assert f"repaired {tok[:12]} (corrupt) from the Hub" in res.stdout
    assert json.loads(cli("fsck", "--json").stdout)["ok"]
