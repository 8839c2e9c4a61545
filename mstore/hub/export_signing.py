"""`export --sign`: an OpenSSF model-signing signature of an exported folder.

The signature is made by the `model_signing` package itself (its elliptic-key signer and
its default file-by-file SHA-256 hashing, ignoring the signature file), so `model_signing verify key
--signature OUT/model.sig --public_key PUB.pem OUT` accepts it and rejects the folder
after any file in it changes. It runs once the export is complete and in place; if it
fails, the folder this export made is removed again, so no unsigned folder is left where
a signed one was asked for. (model-signing can hash with BLAKE3, as mstore does, but the
1.1 `verify key` command re-hashes with SHA-256 whatever the signature says, and then
rejects every file: SHA-256 is what its verifier accepts.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import BadKeyFile, ExportError
from ..store import fsio
from ..store.signing import ECDSA_P256, key_algorithm, fingerprint, load_private_key

SIGNATURE_FILE = "model.sig"


def check_signing_key(key_path: Path) -> str:
    """Before anything is exported: the key is an ECDSA P-256 PEM private key (what
    model-signing's key signer takes) and model_signing can be loaded. Returns the key's
    fingerprint."""
    key = load_private_key(key_path)
    if key_algorithm(key, key_path) != ECDSA_P256:
        raise BadKeyFile(str(key_path), "model-signing signs with ECDSA keys; this is "
                         "Ed25519 (use a P-256 key for export --sign)")
    _model_signing()
    return fingerprint(key.public_key())


def sign_folder(folder: Path, key_path: Path) -> Path:
    """Write `folder/model.sig` over every other file of `folder`; on failure, remove
    `folder` (which the caller's export just created) and raise ExportError."""
    folder = Path(folder)
    signature = folder / SIGNATURE_FILE
    try:
        ms = _model_signing()
        hashing = ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE])
        (ms.signing.Config().set_hashing_config(hashing)
         .use_elliptic_key_signer(private_key=Path(key_path))
         .sign(folder, signature))
        with open(signature, "rb") as f:
            fsio.fsync_file(f, signature)
        fsio.fsync_dir(folder)
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(e, ExportError) or not isinstance(e, Exception):
            raise
        raise ExportError(f"signing the export failed ({type(e).__name__}: {e}); the "
                          f"folder {folder} was removed") from e
    return signature


def _model_signing():
    try:
        import model_signing.hashing
        import model_signing.signing
    except ImportError as e:
        raise ExportError(f"export --sign needs the model-signing package ({e}); install "
                          "model-signing (and pyopenssl, which model-signing 1.1 imports)") \
            from None
    return model_signing
