"""controller.identity: the fleet CA, certificates, the CRL and Mosquitto-compatible passwords."""

from __future__ import annotations

import base64
import shutil
import stat
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import sqlite_utils
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller import identity
from controller.db import open_db
from controller.errors import InvalidRequest, NotFound
from controller.identity import CertificateAuthority


@pytest.fixture
def db(tmp_path: Path) -> sqlite_utils.Database:
    return open_db(tmp_path / "gf.db")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "pki")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------- passwords


def test_password_hash_is_mosquitto_7_format_and_verifies() -> None:
    password = identity.new_password()
    encoded = identity.hash_password(password)
    _, seven, iterations, salt, digest = encoded.split("$")
    assert seven == "7" and int(iterations) == identity.PBKDF2_ITERATIONS
    assert len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64
    assert identity.verify_password(password, encoded)
    assert not identity.verify_password(password + "x", encoded)
    assert not identity.verify_password(password, "$6$abc$def")
    assert ":" not in password and "\n" not in password and len(password) >= 32


def test_hash_matches_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    """The same salt and iterations give mosquitto_passwd's line, and we verify its hashes."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    path = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(path), "alice", "s3cret"], check=True, timeout=10)
    user, encoded = path.read_text().strip().split(":", 1)
    assert user == "alice"
    _, _, iterations, salt, _ = encoded.split("$")
    assert identity.verify_password("s3cret", encoded)
    assert not identity.verify_password("s3cre", encoded)
    ours = identity.hash_password("s3cret", iterations=int(iterations), salt=base64.b64decode(salt))
    assert ours == encoded


# -------------------------------------------------------------------------------- certificates


def test_ca_is_made_once_with_a_private_key_file(tmp_path: Path, ca: CertificateAuthority) -> None:
    assert mode(ca.key_path) == 0o600
    assert mode(ca.dir) == 0o700
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    again = CertificateAuthority.load_or_create(tmp_path / "pki")
    assert again.pem == ca.pem
    ca.key_path.write_text("garbage")
    with pytest.raises(identity.PkiError, match="restore"):
        CertificateAuthority.load_or_create(tmp_path / "pki")


def test_server_certificate_names_the_hosts_and_loopback(ca: CertificateAuthority) -> None:
    issued = ca.issue_server(["Broker.Plant-A.local", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    cert.verify_directly_issued_by(ca.cert)
    assert identity.cert_names(cert) == [
        "broker.plant-a.local",
        "localhost",
        "10.0.0.5",
        "127.0.0.1",
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_client_certificate_is_the_device_id_and_chains_to_the_ca(
    ca: CertificateAuthority,
) -> None:
    issued = ca.issue_client("press-1")
    cert = x509.load_pem_x509_certificate(issued.cert_pem.encode())
    cert.verify_directly_issued_by(ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "press-1"
    assert cert.serial_number == issued.serial
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.not_valid_after_utc <= ca.cert.not_valid_after_utc
    other = CertificateAuthority.load_or_create(ca.dir.parent / "other-pki")
    with pytest.raises(InvalidSignature):  # same CA name, another key
        cert.verify_directly_issued_by(other.cert)


# ------------------------------------------------------------------------ identities and CRL


def enroll(
    db: sqlite_utils.Database, ca: CertificateAuthority, device: str, **kw: object
) -> identity.Credentials:
    return identity.enroll(db, ca, device, device_class="rpi5", labels={"site": "a"}, **kw)  # type: ignore[arg-type]


def test_enrolling_stores_only_the_hash_and_refuses_duplicates(
    db: sqlite_utils.Database, ca: CertificateAuthority
) -> None:
    creds = enroll(db, ca, "press-1")
    assert creds.password and creds.cert_pem is None
    dump = "\n".join(str(row) for t in db.table_names() for row in db.table(t).rows)
    assert creds.password not in dump
    (user, hashed), *_ = identity.password_entries(db)
    assert user == "gf-controller" or identity.verify_password(creds.password, hashed)
    with pytest.raises(InvalidRequest, match="--reissue"):
        enroll(db, ca, "press-1")
    again = enroll(db, ca, "press-1", reissue=True)
    entries = dict(identity.password_entries(db))
    assert identity.verify_password(again.password or "", entries["press-1"])
    assert not identity.verify_password(creds.password, entries["press-1"])


@pytest.mark.parametrize("bad", ["gf-controller", "a/b", "+", "#", ""])
def test_reserved_and_malformed_ids_are_refused(
    db: sqlite_utils.Database, ca: CertificateAuthority, bad: str
) -> None:
    with pytest.raises(InvalidRequest):
        enroll(db, ca, bad)


def crl_of(db: sqlite_utils.Database, ca: CertificateAuthority) -> x509.CertificateRevocationList:
    crl = x509.load_pem_x509_crl(identity.fleet_crl(db, ca).encode())
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    return crl


def test_crl_lists_revoked_and_superseded_serials(
    db: sqlite_utils.Database, ca: CertificateAuthority
) -> None:
    first = enroll(db, ca, "cam-1", auth="cert")
    keep = enroll(db, ca, "cam-2", auth="cert")
    empty = crl_of(db, ca)
    assert len(empty) == 0
    assert crl_of(db, ca).last_update_utc == empty.last_update_utc  # unchanged: same CRL

    second = enroll(db, ca, "cam-1", auth="cert", reissue=True)  # the first is superseded
    after_reissue = crl_of(db, ca)
    assert {r.serial_number for r in after_reissue} == {first.serial}
    assert after_reissue.last_update_utc > empty.last_update_utc  # a later second, always
    number = after_reissue.extensions.get_extension_for_class(x509.CRLNumber).value
    assert number.crl_number == 2

    row = identity.revoke(db, "cam-1", reason="stolen")
    assert row["revoked"] and row["revoked_at"]
    assert identity.revoke(db, "cam-1") == row  # twice: nothing changes
    revoked = crl_of(db, ca)
    assert {r.serial_number for r in revoked} == {first.serial, second.serial}
    assert keep.serial not in {r.serial_number for r in revoked}
    assert revoked.next_update_utc is not None
    assert revoked.next_update_utc - revoked.last_update_utc > timedelta(days=365)
    assert identity.revoked_devices(db) == ["cam-1"]
    with pytest.raises(NotFound):
        identity.revoke(db, "nobody")


def test_openssl_refuses_a_revoked_certificate(
    tmp_path: Path, db: sqlite_utils.Database, ca: CertificateAuthority
) -> None:
    """The CA, a client certificate and the CRL as OpenSSL (and so Mosquitto) sees them."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    good = enroll(db, ca, "cam-ok", auth="cert")
    bad = enroll(db, ca, "cam-bad", auth="cert")
    identity.revoke(db, "cam-bad")
    (tmp_path / "crl.pem").write_text(identity.fleet_crl(db, ca))
    for name, creds in (("good", good), ("bad", bad)):
        (tmp_path / f"{name}.pem").write_text(creds.cert_pem or "")

    def verify(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                openssl,
                "verify",
                "-CAfile",
                str(ca.cert_path),
                "-crl_check",
                "-CRLfile",
                str(tmp_path / "crl.pem"),
                str(tmp_path / f"{name}.pem"),
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )

    assert verify("good").returncode == 0, verify("good").stdout + verify("good").stderr
    refused = verify("bad")
    assert refused.returncode != 0 and "revoked" in (refused.stdout + refused.stderr)


def test_revoked_password_identities_leave_the_password_file(
    db: sqlite_utils.Database, ca: CertificateAuthority
) -> None:
    enroll(db, ca, "press-1")
    enroll(db, ca, "press-2")
    identity.revoke(db, "press-1")
    assert [u for u, _ in identity.password_entries(db)] == ["press-2"]
    # a revoked device may be enrolled again (new credentials), without --reissue
    back = enroll(db, ca, "press-1")
    assert back.password and [u for u, _ in identity.password_entries(db)] == [
        "press-1",
        "press-2",
    ]
    assert identity.revoked_devices(db) == []


def test_controller_identity_is_stable_and_private(
    tmp_path: Path, db: sqlite_utils.Database, ca: CertificateAuthority
) -> None:
    path = tmp_path / "pki" / "controller.yaml"
    creds = identity.ensure_controller_identity(db, ca, path, "broker.local:8883")
    assert mode(path) == 0o600
    assert creds.username == "gf-controller" and creds.broker == "broker.local:8883"
    assert creds.ca_file == ca.cert_path
    again = identity.ensure_controller_identity(db, ca, path, None)
    assert again.password == creds.password and again.broker == "broker.local:8883"
    entries = dict(identity.password_entries(db))
    assert identity.verify_password(creds.password, entries["gf-controller"])
    assert identity.identities(db) == []  # the controller is not a device
    path.unlink()  # lost: a new password replaces the old one
    fresh = identity.ensure_controller_identity(db, ca, path, None)
    assert fresh.password != creds.password
    entries = dict(identity.password_entries(db))
    assert identity.verify_password(fresh.password, entries["gf-controller"])
