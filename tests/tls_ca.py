"""A throwaway certificate authority for tests: a CA, broker and client certificates, and an
enrollment bundle built from them. EC P-256 keys, so making one takes milliseconds.

Independent of the controller's CA code on purpose: the agent's TLS tests check the agent
against certificates made here, not against the code under test on the other side.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@dataclass
class Issued:
    """A certificate and its key, as PEM text."""

    cert_pem: str
    key_pem: str

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        """``folder/name.pem`` and ``folder/name.key`` (0600)."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{name}.pem", folder / f"{name}.key"
        cert.write_text(self.cert_pem)
        key.write_text(self.key_pem)
        key.chmod(0o600)
        return cert, key


class TestCA:
    """A self-signed CA that issues server and client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "greenfleet test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.pem)
        return path

    def issue(
        self,
        common_name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        client: bool = False,
        days: int = 30,
    ) -> Issued:
        """A leaf certificate: for a server (with these names) or, ``client``, a device."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key))


def controller_key_hex() -> str:
    """A fresh Ed25519 public key in the form of the controller's keys/signing.pub."""
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def bundle_document(
    device: str = "gw-press-01",
    *,
    host: str = "mqtt.plant-a.local",
    port: int = 8883,
    ca: TestCA | None = None,
    client: Issued | None = None,
    password: str | None = "s3cret-pass",
    **extra: Any,
) -> dict[str, Any]:
    """An enrollment bundle (agent.enrollment.Bundle) as a mapping."""
    broker: dict[str, Any] = {"host": host, "port": port, "username": device}
    if password is not None:
        broker["password"] = password
    if ca is not None:
        broker["ca_pem"] = ca.pem
    if client is not None:
        broker["cert_pem"], broker["key_pem"] = client.cert_pem, client.key_pem
    document: dict[str, Any] = {
        "kind": "greenfleet-enrollment",
        "version": 1,
        "device_id": device,
        "device_class": "rpi4",
        "labels": {"site": "plant-a", "line": "1"},
        "broker": broker,
        "controller_keys": [controller_key_hex()],
        "power": {"idle_w": 2.7, "active_w_per_core": 1.1},
    }
    document.update(extra)
    return document


def write_bundle(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)
    return path
