"""Signed commits: an in-toto statement about a manifest, in a DSSE envelope, attached.

A signature never enters the manifest (that would change the commit id); it is a
"signature" attachment of the commit (attachments.py), so it travels with push and pull
and lives as long as the commit. What is signed is an in-toto Statement v1 whose subject is
the manifest id (a blake3 digest) and whose predicate names every object the manifest names
(config, files, tensors: name -> blake3), the parent commit and the training record's
hashes: verifying re-derives the predicate from the manifest and re-hashes the objects, so
a flipped byte, a swapped object or a rewritten manifest are each caught and named.

The envelope is DSSE's (payloadType application/vnd.in-toto+json, the signature over
PAE(type, payload)); keys are ECDSA P-256 (SHA-256, DER signatures: what OpenSSF
model-signing's key signer uses) or Ed25519, as PEM files, read through `cryptography`.
A key is named by its fingerprint: sha256 of its SubjectPublicKeyInfo DER, in hex.
`cryptography` is imported inside the functions that need it (metadata commands stay fast).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import BadKeyFile, VerificationFailed
from .attachments import Attachment
from .manifest import Manifest, canonical_json

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://mstore.dev/commit-provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
ECDSA_P256 = "ecdsa-p256-sha256"
ED25519 = "ed25519"


# -- keys ----------------------------------------------------------------------------------
def _read_pem(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadKeyFile(str(path), e.strerror or str(e)) from None
    if b"-----BEGIN" not in data:
        raise BadKeyFile(str(path), "not a PEM file")
    return data


def key_algorithm(key, path: Path) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name != "secp256r1":
            raise BadKeyFile(str(path), f"curve {key.curve.name} is not P-256")
        return ECDSA_P256
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return ED25519
    raise BadKeyFile(str(path), f"{type(key).__name__.lstrip('_')} keys are not supported "
                     "(use ECDSA P-256 or Ed25519)")


def load_private_key(path: Path):
    """A PEM private key (unencrypted) that can sign: ECDSA P-256 or Ed25519."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_pem(path)
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise BadKeyFile(str(path), "the key is encrypted; give an unencrypted PEM key") \
            from None
    except ValueError:
        raise BadKeyFile(str(path), "not a PEM private key") from None
    key_algorithm(key, path)
    return key


def load_public_key(path: Path):
    """A PEM public key (a private key file gives its public half)."""
    from cryptography.hazmat.primitives.serialization import (
        load_pem_private_key, load_pem_public_key,
    )

    data = _read_pem(path)
    try:
        key = load_pem_public_key(data)
    except ValueError:
        try:
            key = load_pem_private_key(data, password=None).public_key()
        except (TypeError, ValueError):
            raise BadKeyFile(str(path), "not a PEM public key") from None
    key_algorithm(key, path)
    return key


def public_pem(key) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def fingerprint(public_key) -> str:
    """sha256 of the key's SubjectPublicKeyInfo DER, hex: the key id shown and stored."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


# -- the statement -------------------------------------------------------------------------
def training_hashes(training: dict[str, Any] | None) -> dict[str, str]:
    """Every hash in a training record, by its dotted path (`dataset.blake3` -> hex): what
    the data a generation was trained on is pinned by."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                path = f"{prefix}.{k}" if prefix else str(k)
                if isinstance(v, str) and (k in ("blake3", "sha256") or k.endswith(
                        ("_blake3", "_sha256"))):
                    out[path] = v
                else:
                    walk(v, path)

    walk(training, "")
    return dict(sorted(out.items()))


def statement(commit: str, m: Manifest) -> dict[str, Any]:
    """The in-toto statement a signature of `commit` signs (derived from its manifest)."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f"mstore-commit-{commit}", "digest": {"blake3": commit}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "manifest": commit,
            "model_id": m.model_id,
            "architecture": m.architecture,
            "kind": m.kind,
            "parent": m.parent,
            "config": m.config,
            "files": dict(sorted(m.files.items())),
            "tensors": {name: t.object for name, t in sorted(m.tensors.items())},
            "training": training_hashes(m.training),
        },
    }


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what the signature is over."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def sign(commit: str, m: Manifest, private_key) -> dict[str, Any]:
    """The signature attachment's payload: the DSSE envelope and the signer's public key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    algorithm = key_algorithm(private_key, Path("key"))
    body = canonical_json(statement(commit, m))
    message = pae(PAYLOAD_TYPE, body)
    if algorithm == ECDSA_P256:
        sig = private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    else:
        sig = private_key.sign(message)
    public = private_key.public_key()
    keyid = fingerprint(public)
    return {
        "envelope": {"payloadType": PAYLOAD_TYPE,
                     "payload": base64.b64encode(body).decode("ascii"),
                     "signatures": [{"keyid": keyid,
                                     "sig": base64.b64encode(sig).decode("ascii")}]},
        "algorithm": algorithm,
        "keyid": keyid,
        "public_key": public_pem(public),
    }


# -- checking ------------------------------------------------------------------------------
@dataclass
class SignatureCheck:
    """One signature attachment, checked: `problem` None means the envelope verifies with
    its key and its statement is exactly the one the manifest gives."""
    attachment: str
    keyid: str
    algorithm: str
    created_at: str
    trusted: bool  # the key is one of those given (True for all when none is given)
    problem: str | None = None

    @property
    def valid(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "valid": self.valid}


def check_signature(att: Attachment, m: Manifest, trusted: set[str] | None) -> SignatureCheck:
    """Verify one signature attachment of `att.commit` against the manifest `m`.

    The public key stored beside the envelope must be the one its key id names, the
    signature must verify over PAE(payloadType, payload), and the payload must be the
    statement `m` gives, field for field (the first difference is named)."""
    p = att.payload
    keyid = str(p.get("keyid", ""))
    out = SignatureCheck(att.oid, keyid, str(p.get("algorithm", "")), att.created_at,
                         trusted is None or keyid in trusted)
    try:
        public, body = _open_envelope(p)
    except ValueError as e:
        out.problem = f"signature {att.oid[:12]} is malformed ({e})"
        return out
    if fingerprint(public) != keyid:
        out.problem = f"signature {att.oid[:12]}: its public key is not key {keyid[:16]}"
        return out
    if not _signature_holds(public, p, body):
        out.problem = f"signature {att.oid[:12]} by key {keyid[:16]} does not verify"
        return out
    try:
        signed = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        out.problem = f"signature {att.oid[:12]}: the signed payload is not JSON"
        return out
    diff = statement_difference(signed, statement(att.commit, m))
    if diff:
        out.problem = f"signature {att.oid[:12]} by key {keyid[:16]}: {diff}"
    return out


def _open_envelope(p: dict[str, Any]):
    """(public key, payload bytes) of a signature payload; ValueError names what is wrong."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    env = p.get("envelope")
    if not isinstance(env, dict) or env.get("payloadType") != PAYLOAD_TYPE:
        raise ValueError(f"envelope is not a DSSE envelope of {PAYLOAD_TYPE}")
    sigs = env.get("signatures")
    if not (isinstance(sigs, list) and sigs and all(isinstance(s, dict) for s in sigs)):
        raise ValueError("envelope has no signatures")
    try:
        body = base64.b64decode(env.get("payload", ""), validate=True)
        key = load_pem_public_key(str(p.get("public_key", "")).encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise ValueError(type(e).__name__) from None
    if p.get("algorithm") != key_algorithm(key, Path("public_key")):
        raise ValueError("algorithm does not match its key")
    return key, body


def _signature_holds(public, p: dict[str, Any], body: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    message = pae(PAYLOAD_TYPE, body)
    for s in p["envelope"]["signatures"]:
        if s.get("keyid") != p.get("keyid"):
            continue
        try:
            sig = base64.b64decode(str(s.get("sig", "")), validate=True)
            if p["algorithm"] == ECDSA_P256:
                public.verify(sig, message, ec.ECDSA(hashes.SHA256()))
            else:
                public.verify(sig, message)
            return True
        except (InvalidSignature, ValueError):
            continue
    return False


def statement_difference(signed: Any, expected: dict[str, Any]) -> str | None:
    """The first way the signed statement differs from the manifest's, in words."""
    if not isinstance(signed, dict):
        return "the signed statement is not an object"
    for key in ("_type", "predicateType", "subject"):
        if signed.get(key) != expected[key]:
            return f"the signed statement's {key} is not this commit's"
    got, want = signed.get("predicate"), expected["predicate"]
    if not isinstance(got, dict):
        return "the signed statement has no predicate"
    for section in ("config", "parent", "model_id", "architecture", "kind", "manifest"):
        if got.get(section) != want[section]:
            return f"the signed {section} is {got.get(section)!r}, the manifest's {want[section]!r}"
    for section, what in (("files", "file"), ("tensors", "tensor"), ("training", "training hash")):
        a = got.get(section) if isinstance(got.get(section), dict) else {}
        b = want[section]
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                return (f"{what} {name} is signed as {_short(a.get(name))} but the manifest "
                        f"has {_short(b.get(name))}")
    return None


def _short(oid: Any) -> str:
    return oid[:12] if isinstance(oid, str) else "nothing"


# -- a lineage, verified -------------------------------------------------------------------
@dataclass
class GenerationCheck:
    commit: str
    names: list[str]
    depth: int  # 0 the commit asked about, 1 its parent, ...
    signatures: list[SignatureCheck] = field(default_factory=list)
    objects_checked: int = 0
    objects_absent: int = 0  # not in this store (a parent's weights after gc, or not pulled)
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """signed (a valid signature by a trusted key) | unsigned | unknown-key | invalid."""
        if self.problems:
            return "invalid"
        if any(s.valid and s.trusted for s in self.signatures):
            return "signed"
        if any(s.valid for s in self.signatures):
            return "unknown-key"
        return "unsigned"

    def to_json(self) -> dict[str, Any]:
        return {"commit": self.commit, "short_commit": self.commit[:12], "names": self.names,
                "depth": self.depth, "status": self.status,
                "signatures": [s.to_json() for s in self.signatures],
                "objects_checked": self.objects_checked,
                "objects_absent": self.objects_absent, "problems": self.problems}


@dataclass
class VerifyReport:
    commit: str
    trusted: list[str] | None  # fingerprints given (None: every valid signature counts)
    generations: list[GenerationCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(g.status == "signed" for g in self.generations)

    def first_problem(self) -> str | None:
        for g in self.generations:
            label = _generation(g)
            if g.problems:
                return f"{label}: {g.problems[0]}"
            if g.status == "unknown-key":
                keys = ", ".join(sorted({s.keyid[:16] for s in g.signatures if s.valid}))
                return f"{label} is signed only by unknown key(s) {keys}"
            if g.status == "unsigned":
                return f"{label} is not signed"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"commit": self.commit, "ok": self.ok, "trusted_keys": self.trusted,
                "generations": [g.to_json() for g in self.generations],
                "problem": self.first_problem()}


def _generation(g: GenerationCheck) -> str:
    who = f" ({', '.join(g.names)})" if g.names else ""
    where = "the commit" if g.depth == 0 else (
        "its parent" if g.depth == 1 else f"generation -{g.depth}")
    return f"{where} {g.commit[:12]}{who}"


def verify_lineage(store, commit: str, trusted: set[str] | None) -> VerifyReport:
    """Check every signature on `commit` and on each generation of its lineage, re-hashing
    the objects each names that are in this store. Never raises on what it finds."""
    from ..errors import MStoreError

    report = VerifyReport(commit, sorted(trusted) if trusted is not None else None)
    names = store.names_by_commit()
    rehashed: dict[str, str | None] = {}
    for depth, (oid, light) in enumerate(store.lineage(commit)):
        g = GenerationCheck(oid, sorted(names.get(oid, [])), depth)
        report.generations.append(g)
        if light is None:
            g.problems.append("its manifest is missing or damaged")
            break
        m = store.read_manifest(oid)
        try:
            atts = store.attachments.list(oid, "signature")
        except MStoreError as e:
            g.problems.append(str(e))
            continue
        g.signatures = [check_signature(a, m, trusted) for a in atts]
        g.problems += [s.problem for s in g.signatures if s.problem]
        if not any(s.valid for s in g.signatures):
            continue  # nothing signed here to hold the objects to
        for what, name, obj in named_objects(m):
            if not store.objects.exists(obj):
                g.objects_absent += 1
                if depth == 0:
                    g.problems.append(f"{what} {name} ({obj}) is missing from the store")
                continue
            if obj not in rehashed:
                rehashed[obj] = store.objects.verify(obj)
            g.objects_checked += 1
            if rehashed[obj]:
                g.problems.append(f"{what} {name} ({obj}) does not match its signed hash "
                                  f"({rehashed[obj]})")
    return report


def named_objects(m: Manifest) -> Iterable[tuple[str, str, str]]:
    """(kind, name, object id) of every object a manifest names, in a stable order."""
    yield "file", "config.json", m.config
    for name, oid in sorted(m.files.items()):
        yield "file", name, oid
    for name, t in sorted(m.tensors.items()):
        yield "tensor", name, t.object


def require_verified(store, commit: str, m: Manifest) -> None:
    """Before signing: every object the manifest names is here and intact (a signature
    vouches for bytes someone checked)."""
    for what, name, obj in named_objects(m):
        problem = store.objects.verify(obj)
        if problem:
            raise VerificationFailed(f"{what} {name} ({obj}) of {commit[:12]} is {problem}; "
                                     "nothing was signed (`mstore fsck --repair` mends it)")


@dataclass
class SignResult:
    name: str | None
    commit: str
    keyid: str
    algorithm: str
    attachment: str
    already: bool  # the commit already had a valid signature by this key: nothing added

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sign_commit(store, ref: str, key_path: Path) -> SignResult:
    """Sign the commit `ref` names with the PEM private key at `key_path` (read first: a bad
    key file writes nothing), after re-hashing every object it names."""
    key = load_private_key(key_path)
    store.require()
    r = store.resolve(ref)
    m = store.read_manifest(r.commit)
    keyid = fingerprint(key.public_key())
    for att in store.attachments.list(r.commit, "signature"):
        check = check_signature(att, m, {keyid})
        if check.valid and check.keyid == keyid:
            return SignResult(r.name, r.commit, keyid, check.algorithm, att.oid, True)
    require_verified(store, r.commit, m)
    payload = sign(r.commit, m, key)
    oid = store.attachments.add(r.commit, "signature", payload)
    return SignResult(r.name, r.commit, keyid, payload["algorithm"], oid, False)
