"""Artifact signatures: Ed25519 over the manifest's digest, in `manifest.sig`.

The manifest lists the sha256 of every other file of a version, so a signature over the
manifest's own sha256 covers the whole artifact. Checksums in the same directory only
catch corruption (whoever can write the model repository can recompute them); a
signature made with a private key kept elsewhere catches tampering too: a server given
the public key (`--trusted-keys`) refuses versions that are unsigned or signed by
another key.

`manifest.sig` is one line: `ed25519 <key id> <base64 signature>`, where the key id is
the first 16 hex digits of the sha256 of the raw public key (which key signed, for the
log; every trusted key is tried). The signed message is SIGNED_PREFIX followed by the
manifest's sha256 in hex, so that a signature of this kind cannot be replayed as one of
something else.

Keys are PEM files: PKCS#8 private keys, SubjectPublicKeyInfo public keys (several
public keys may sit in one file, for a rotation).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Sequence

SIGNATURE_FILE = "manifest.sig"
SIGNED_PREFIX = b"warmstart.artifact.v1 manifest sha256 "
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


class SignatureError(ValueError):
    """A signature or key is missing, malformed, or does not verify."""


def _message(manifest_bytes: bytes) -> bytes:
    return SIGNED_PREFIX + hashlib.sha256(manifest_bytes).hexdigest().encode("ascii")


def key_id(public_key) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def generate_key_pair(private_path: Path, public_path: Path) -> str:
    """Writes a new Ed25519 key pair (the private key readable by its owner only); returns its key id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    private = Ed25519PrivateKey.generate()
    private_path = Path(private_path)
    private_path.touch(mode=0o600, exist_ok=False)
    private_path.write_bytes(private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    Path(public_path).write_bytes(private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return key_id(private.public_key())


def load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: an {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public_keys(path: Path) -> list:
    """Every Ed25519 public key in a PEM file (at least one)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: unreadable: {exc}") from exc
    keys = []
    for block in _PEM_PUBLIC.findall(data):
        try:
            key = load_pem_public_key(block)
        except ValueError as exc:
            raise SignatureError(f"{path}: a malformed public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{path}: an {type(key).__name__}, not an Ed25519 public key")
        keys.append(key)
    if not keys:
        raise SignatureError(f"{path}: no PEM public key in it")
    return keys


def signature_line(manifest_bytes: bytes, private_key) -> str:
    """The content of manifest.sig for a manifest, signed with `private_key`."""
    signature = private_key.sign(_message(manifest_bytes))
    return f"ed25519 {key_id(private_key.public_key())} {base64.b64encode(signature).decode('ascii')}\n"


def sign_artifact(artifact: Path, private_key) -> Path:
    """Writes manifest.sig beside an artifact's manifest.json; returns its path."""
    artifact = Path(artifact)
    target = artifact / SIGNATURE_FILE
    target.unlink(missing_ok=True)  # a previous signature is read-only, like the rest of a version
    target.write_text(signature_line((artifact / "manifest.json").read_bytes(), private_key), encoding="ascii")
    return target


def verify(manifest_bytes: bytes, signature_text: str, public_keys: Sequence) -> str:
    """Returns the id of the trusted key that signed the manifest; raises SignatureError."""
    from cryptography.exceptions import InvalidSignature

    parts = signature_text.strip().split()
    if len(parts) != 3 or parts[0] != "ed25519":
        raise SignatureError(f"expected 'ed25519 <key id> <base64 signature>', got {signature_text[:80]!r}")
    try:
        signature = base64.b64decode(parts[2], validate=True)
    except ValueError as exc:
        raise SignatureError(f"the signature is not base64: {exc}") from exc
    message = _message(manifest_bytes)
    for key in public_keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return key_id(key)
    raise SignatureError(f"no trusted key verifies the signature (signed by key {parts[1][:16]!r})")
