"""The controller's Ed25519 signing key and signed manifests.

The key is made on first use under ``<home>/keys/`` (private key 0600, PKCS#8 PEM; public key
as raw 32 bytes in hex, which is what an enrollment bundle carries to agents). A manifest is
serialized once; the signature covers exactly those UTF-8 bytes, so verification never depends
on how a JSON library orders or spaces things.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.protocol import Manifest, RollbackGrant, SignedManifest, encode, load
from model_store.errors import ModelStoreError

PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SignatureError(ModelStoreError):
    """A manifest whose signature does not verify against the given key."""


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


class Signer:
    """Signs manifests with the controller's private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.key_id = key_id(self.public_raw)

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> Signer:
        """The key in ``keys_dir``, made (and written with mode 0600) if there is none."""
        private_path = keys_dir / PRIVATE_NAME
        if private_path.exists():
            try:
                key = serialization.load_pem_private_key(private_path.read_bytes(), None)
            except (OSError, ValueError, TypeError) as exc:
                raise ModelStoreError(
                    f"cannot read the signing key {private_path}: {exc}; restore it from backup "
                    "(a new key would make every enrolled agent reject new manifests)"
                ) from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise ModelStoreError(f"{private_path} is not an Ed25519 private key")
            return cls(key)
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        signer = cls(key)
        (keys_dir / PUBLIC_NAME).write_text(signer.public_raw.hex() + "\n")
        return signer

    def sign(self, manifest: Manifest | RollbackGrant) -> SignedManifest:
        """Sign a manifest (or a rollback grant) as the JSON text the agent will verify."""
        payload = encode(manifest).decode()
        signature = self._private.sign(payload.encode())
        return SignedManifest(
            payload=payload,
            signature=base64.b64encode(signature).decode(),
            key_id=self.key_id,
        )


def verify(signed: SignedManifest, public_raw: bytes) -> Manifest:
    """The manifest, if ``signed`` verifies against ``public_raw``; SignatureError otherwise."""
    try:
        public = Ed25519PublicKey.from_public_bytes(public_raw)
        public.verify(base64.b64decode(signed.signature, validate=True), signed.payload.encode())
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError(
            f"manifest signature does not verify with key {key_id(public_raw)} "
            f"(signed by {signed.key_id})"
        ) from exc
    return load(Manifest, signed.payload)
