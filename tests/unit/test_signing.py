"""The controller's signing key and signed manifests."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import protocol as p
from model_store.signing import SignatureError, Signer, verify

SHA = "ab" * 32


def manifest() -> p.Manifest:
    return p.Manifest(
        model=p.ModelRef(name="vib", version="1.0.0+fp16"),
        artifact=p.Artifact(sha256=SHA, size=100, format=p.ModelFormat.ONNX),
        task=p.Task.ANOMALY,
        precision="fp16",
        technique="fp16",
        inputs=[p.TensorSignature(name="window", dtype="float32", shape=[1, 512])],
        outputs=[p.TensorSignature(name="score", dtype="float32", shape=[1, 1])],
        golden=[p.GoldenCase(inputs={"window": [0.0] * 4}, outputs={"score": [0.4]})],
        created=datetime(2026, 11, 26, tzinfo=UTC),
    )


def test_key_is_made_once_private_and_reused(tmp_path: Path) -> None:
    first = Signer.load_or_create(tmp_path / "keys")
    mode = stat.S_IMODE((tmp_path / "keys" / "signing.key").stat().st_mode)
    assert mode == 0o600
    again = Signer.load_or_create(tmp_path / "keys")
    assert again.public_raw == first.public_raw and again.key_id == first.key_id
    assert (tmp_path / "keys" / "signing.pub").read_text().strip() == first.public_raw.hex()


def test_signed_manifest_verifies_and_tampering_is_caught(tmp_path: Path) -> None:
    signer = Signer.load_or_create(tmp_path / "keys")
    signed = signer.sign(manifest())
    assert verify(signed, signer.public_raw) == manifest()
    tampered = p.replace(signed, payload=signed.payload.replace("fp16", "fp32", 1))
    with pytest.raises(SignatureError, match="does not verify"):
        verify(tampered, signer.public_raw)
    other = Signer.load_or_create(tmp_path / "other")
    with pytest.raises(SignatureError, match=other.key_id):
        verify(signed, other.public_raw)


def test_unreadable_key_is_a_clear_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "signing.key").write_text("not a key")
    with pytest.raises(Exception, match="restore it from backup"):
        Signer.load_or_create(keys)
