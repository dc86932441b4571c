"""Who may connect to the fleet's broker: the controller's CA, certificates and passwords.

The controller holds a small certificate authority in ``$GREENFLEET_HOME/pki/`` (``ca.key``
0600, ``ca.pem``). It signs the broker's server certificate (the names devices dial, plus
localhost/127.0.0.1) and, for devices enrolled with ``--auth cert``, a client certificate whose
CN is the device id: Mosquitto's ``use_identity_as_username`` then makes the CN the username
that the ACL's ``%u`` patterns see. Devices enrolled with ``--auth password`` get a random
password; only its hash is kept (the ``$7$`` PBKDF2-SHA512 format of Mosquitto 2's password
file), the plain text goes into the enrollment bundle and nowhere else.

The database (``identities`` and ``certificates``, migration 7) is the source of truth; the
broker's files (password file, ACL, CRL) are regenerated from it by controller.broker_config,
so enrolling, re-issuing and revoking are idempotent. The controller itself has an identity
too (user ``gf-controller``, password auth) whose credentials live in ``pki/controller.yaml``
(0600) for ``greenfleet controller run``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import sqlite_utils
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import BaseModel, ConfigDict, ValidationError

from agent.protocol import ProtocolError, check_device_id
from controller.errors import ControllerError, InvalidRequest, NotFound

CONTROLLER_USER = "gf-controller"
# Names a device may not take: the ACL gives these users the controller's rights.
RESERVED_IDS = frozenset({CONTROLLER_USER})
AuthKind = Literal["password", "cert"]

# Mosquitto 2's ``$7$`` format: PBKDF2-HMAC-SHA512, base64 salt and 64-byte hash.
# mosquitto_passwd 2.0 uses 101 iterations; the broker accepts any count stored in the line.
# Device passwords are 192 random bits, so iterations add little; 1000 keeps a CONNECT cheap.
PBKDF2_ITERATIONS = 1000
_SALT_BYTES = 12
_HASH_BYTES = 64

CA_DAYS = 3650
SERVER_DAYS = 825
CLIENT_DAYS = 1826
RENEW_BEFORE = timedelta(days=30)


class PkiError(ControllerError):
    """The CA or a certificate cannot be read or made; the message says what to do."""


# ------------------------------------------------------------------------------ passwords


def new_password() -> str:
    """A random broker password: 192 bits, URL-safe (no ':' or newline, which the file uses)."""
    return secrets.token_urlsafe(24)


def hash_password(
    password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None
) -> str:
    """The Mosquitto 2 ``$7$`` hash of ``password`` (what follows ``user:`` in the file)."""
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash, checked the way Mosquitto checks it."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
    return hmac.compare_digest(digest, expected)


# ------------------------------------------------------------------------------------ PKI


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode`` (never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    # ECDSA P-256: every TLS stack a gateway may run (OpenSSL 1.1, mbedTLS, wolfSSL) has it.
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Signing (and, for a CA, certificates and CRLs); a leaf's EC key also agrees keys."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _serial() -> int:
    return x509.random_serial_number()


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, as PEM text."""

    cert_pem: str
    key_pem: str
    serial: int
    not_after: datetime


class CertificateAuthority:
    """The controller's CA in ``pki_dir`` (``ca.key`` 0600 and ``ca.pem``), made on first use."""

    def __init__(self, pki_dir: Path) -> None:
        self.dir = pki_dir
        self.key_path = pki_dir / "ca.key"
        self.cert_path = pki_dir / "ca.pem"
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._cert: x509.Certificate | None = None

    @classmethod
    def load_or_create(
        cls, pki_dir: Path, name: str = "greenfleet fleet CA"
    ) -> CertificateAuthority:
        ca = cls(pki_dir)
        if ca.key_path.exists() or ca.cert_path.exists():
            ca._load()
        else:
            ca._create(name)
        return ca

    def _load(self) -> None:
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise PkiError(
                f"cannot read the fleet CA in {self.dir}: {exc}; restore ca.key and ca.pem from "
                "backup (a new CA would lock out every enrolled device)"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.key_path} is not an EC private key")
        self._key, self._cert = key, cert

    def _create(self, name: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = utc_now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_private(self.key_path, _key_pem(key))
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._key, self._cert = key, cert

    @property
    def key(self) -> ec.EllipticCurvePrivateKey:
        assert self._key is not None
        return self._key

    @property
    def cert(self) -> x509.Certificate:
        assert self._cert is not None
        return self._cert

    @property
    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex()

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def _leaf(
        self,
        common_name: str,
        days: int,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName | None = None,
    ) -> Issued:
        key = _new_key()
        now = utc_now()
        not_after = min(now + timedelta(days=days), self.cert.not_valid_after_utc)
        serial = _serial()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM).decode(),
            _key_pem(key).decode(),
            serial,
            not_after,
        )

    def issue_server(self, hosts: Iterable[str]) -> Issued:
        """The broker's certificate, valid for ``hosts`` (names or IPs) and for loopback."""
        names = server_names(hosts)
        general: list[x509.GeneralName] = []
        for name in names:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                general.append(x509.DNSName(name))
        return self._leaf(
            names[0],
            SERVER_DAYS,
            ExtendedKeyUsageOID.SERVER_AUTH,
            x509.SubjectAlternativeName(general),
        )

    def issue_client(self, common_name: str) -> Issued:
        """A client certificate whose CN is the broker username (a device id)."""
        return self._leaf(common_name, CLIENT_DAYS, ExtendedKeyUsageOID.CLIENT_AUTH)

    def crl(
        self,
        revoked: Iterable[tuple[int, datetime]],
        *,
        last_update: datetime | None = None,
        number: int = 1,
    ) -> str:
        """A CRL (PEM) listing ``(serial, revoked_at)``; valid until the CA expires.

        The CRL is a local file the broker reads, not something published for others to
        fetch, so it does not go stale: it is rewritten whenever a certificate is revoked.
        A CRL past its nextUpdate would make OpenSSL refuse every client certificate.
        """
        now = last_update or utc_now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now)
            .next_update(max(self.cert.not_valid_after_utc, now + timedelta(days=1)))
            .add_extension(x509.CRLNumber(number), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        for serial, when in sorted(set(revoked)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(when.astimezone(UTC))
                .build()
            )
        return (
            builder.sign(self.key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )


def server_names(hosts: Iterable[str]) -> list[str]:
    """The names a broker certificate covers: ``hosts`` in order, then localhost, 127.0.0.1."""
    names: list[str] = []
    for host in [*hosts, "localhost", "127.0.0.1"]:
        host = host.strip().lower()
        if host and host not in names:
            names.append(host)
    return names


def cert_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IPs in a certificate's SAN, as text."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(n) for n in san.get_values_for_type(x509.IPAddress)
    ]


# ---------------------------------------------------------------------- the identity store


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a new identity gets, in plain text: goes into the bundle, never into the DB."""

    username: str
    auth: AuthKind
    password: str | None = None
    cert_pem: str | None = None
    key_pem: str | None = None
    serial: int | None = None


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="seconds")


def _serial_text(serial: int) -> str:
    return format(serial, "x")


def get_identity(db: sqlite_utils.Database, device: str) -> dict[str, Any] | None:
    rows = list(db.table("identities").rows_where("id = ?", [device]))
    return rows[0] if rows else None


def identities(
    db: sqlite_utils.Database, *, include_controller: bool = False
) -> list[dict[str, Any]]:
    """Every device identity row by id (and the controller's), with ``labels`` decoded;
    consumers are listed by ``greenfleet consumers list``."""
    rows = []
    for row in db.table("identities").rows_where(order_by="id"):
        if row["kind"] == "consumer" or (row["kind"] == "controller" and not include_controller):
            continue
        row["labels"] = json.loads(row["labels"] or "{}")
        rows.append(row)
    return rows


def check_new_id(device: str) -> str:
    try:
        check_device_id(device)
    except ProtocolError as exc:
        raise InvalidRequest(str(exc)) from exc
    if device.lower() in RESERVED_IDS or device.lower().startswith("gf-"):
        raise InvalidRequest(
            f"{device!r} is reserved: ids starting with 'gf-' name the controller, its ingest "
            "workers and consumers; choose another id"
        )
    return device


def enroll(
    db: sqlite_utils.Database,
    ca: CertificateAuthority,
    device: str,
    *,
    device_class: str,
    labels: dict[str, str],
    auth: AuthKind = "password",
    reissue: bool = False,
    now: datetime | None = None,
) -> Credentials:
    """Create (or with ``reissue`` replace) a device's broker identity; return its secrets.

    An identity that exists and is active is only replaced with ``reissue``: its old password
    stops working and its old certificate is revoked (superseded) once the broker files are
    written. A revoked identity may be enrolled again without it (new credentials).
    """
    check_new_id(device)
    now = now or utc_now()
    existing = get_identity(db, device)
    if existing is not None and not existing["revoked"] and not reissue:
        raise InvalidRequest(
            f"{device} is already enrolled (since {existing['created']}); pass --reissue to "
            "make new credentials (its current bundle stops working)"
        )
    creds = _issue(ca, device, auth)
    with db.conn:
        _supersede(db, device, now, "superseded")
        _store(db, device, "device", device_class, labels, creds, now, existing)
    return creds


def _issue(ca: CertificateAuthority, username: str, auth: AuthKind) -> Credentials:
    if auth == "cert":
        issued = ca.issue_client(username)
        return Credentials(
            username, "cert", cert_pem=issued.cert_pem, key_pem=issued.key_pem, serial=issued.serial
        )
    return Credentials(username, "password", password=new_password())


def _store(
    db: sqlite_utils.Database,
    ident: str,
    kind: str,
    device_class: str | None,
    labels: dict[str, str],
    creds: Credentials,
    now: datetime,
    existing: dict[str, Any] | None,
) -> None:
    db.table("identities").upsert(
        {
            "id": ident,
            "kind": kind,
            "device_class": device_class,
            "labels": json.dumps(labels, sort_keys=True),
            "auth": creds.auth,
            "password_hash": hash_password(creds.password) if creds.password else None,
            "cert_serial": _serial_text(creds.serial) if creds.serial is not None else None,
            "created": existing["created"] if existing else _iso(now),
            "issued": _iso(now),
            "revoked": 0,
            "revoked_at": None,
            "revoke_reason": None,
        },
        pk="id",
    )
    if creds.cert_pem is not None and creds.serial is not None:
        cert = x509.load_pem_x509_certificate(creds.cert_pem.encode())
        db.table("certificates").insert(
            {
                "serial": _serial_text(creds.serial),
                "identity": ident,
                "subject": ident,
                "issued": _iso(now),
                "not_after": _iso(cert.not_valid_after_utc),
                "revoked_at": None,
                "reason": None,
            },
            pk="serial",
        )


def _supersede(db: sqlite_utils.Database, ident: str, now: datetime, reason: str) -> int:
    """Revoke every unrevoked certificate of ``ident``; return how many."""
    cursor = db.execute(
        "UPDATE certificates SET revoked_at = ?, reason = ? "
        "WHERE identity = ? AND revoked_at IS NULL",
        [_iso(now), reason, ident],
    )
    return cursor.rowcount or 0


def revoke(
    db: sqlite_utils.Database, device: str, *, reason: str = "revoked", now: datetime | None = None
) -> dict[str, Any]:
    """Mark a device's identity revoked (its password dropped, its certificates revoked).

    Returns the identity row as it is now; revoking twice changes nothing the second time.
    The broker only learns of it when its files are rewritten and it reloads them.
    """
    row = get_identity(db, device)
    if row is None or row["kind"] != "device":
        raise NotFound(f"no enrolled device {device!r}; see `greenfleet devices identities`")
    if row["revoked"]:
        return row
    now = now or utc_now()
    with db.conn:
        db.table("identities").update(
            device,
            {
                "revoked": 1,
                "revoked_at": _iso(now),
                "revoke_reason": reason,
                "password_hash": None,
            },
        )
        _supersede(db, device, now, reason)
    updated = get_identity(db, device)
    assert updated is not None
    return updated


def password_entries(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """``(username, $7$ hash)`` of every active password identity, controller included."""
    return [
        (row["id"], row["password_hash"])
        for row in db.table("identities").rows_where(
            "revoked = 0 AND auth = 'password' AND password_hash IS NOT NULL", order_by="id"
        )
    ]


def revoked_devices(db: sqlite_utils.Database) -> list[str]:
    """Ids of revoked devices (re-enrolled ones are active again)."""
    return [
        row["id"]
        for row in db.table("identities").rows_where(
            "revoked = 1 AND kind = 'device'", order_by="id"
        )
    ]


def revoked_serials(db: sqlite_utils.Database) -> list[tuple[int, datetime]]:
    """``(serial, revoked_at)`` of every revoked certificate, for the CRL."""
    return [
        (int(serial, 16), datetime.fromisoformat(when))
        for serial, when in db.execute(
            "SELECT serial, revoked_at FROM certificates WHERE revoked_at IS NOT NULL "
            "ORDER BY serial"
        ).fetchall()
    ]


CRL_STATE_KEY = "crl"


def fleet_crl(db: sqlite_utils.Database, ca: CertificateAuthority) -> str:
    """The CRL of every revoked certificate (PEM), with a thisUpdate that only moves, and
    always to a later second, when the list changes.

    A reloading Mosquitto adds the new CRL file to the ones it already holds, and OpenSSL uses,
    of two CRLs from one issuer, the one with the later thisUpdate (of equal ones, whichever
    it met first): a new list must carry a later second than the last, and not a future one
    (a CRL not yet valid fails every handshake), so a second change within one second waits
    for the next. Rewriting an unchanged list gives the same CRL.
    """
    revoked = revoked_serials(db)
    digest = hashlib.sha256(
        ",".join(f"{serial:x}@{when.isoformat()}" for serial, when in revoked).encode()
    ).hexdigest()
    rows = list(db.table("settings").rows_where("key = ?", [CRL_STATE_KEY]))
    state = json.loads(rows[0]["value"]) if rows else None
    if state is not None and state["digest"] == digest and state.get("ca") == ca.fingerprint:
        return str(state["pem"])  # ECDSA signatures differ each time: keep the file as it is
    if state is None or state["digest"] != digest:
        previous = datetime.fromisoformat(state["last_update"]) if state else None
        now = utc_now()
        deadline = time.monotonic() + 2.0
        while previous is not None and now <= previous and time.monotonic() < deadline:
            time.sleep(0.05)
            now = utc_now()
        if previous is not None and now <= previous:  # the clock went back: stay ordered
            now = previous + timedelta(seconds=1)
        state = {
            "digest": digest,
            "number": (state["number"] + 1) if state else 1,
            "last_update": _iso(now),
        }
    pem = ca.crl(
        revoked, last_update=datetime.fromisoformat(state["last_update"]), number=state["number"]
    )
    state.update(pem=pem, ca=ca.fingerprint)
    with db.conn:
        db.table("settings").upsert({"key": CRL_STATE_KEY, "value": json.dumps(state)}, pk="key")
    return pem


# -------------------------------------------------------------------- controller identity


class ControllerCredentials(BaseModel):
    """``pki/controller.yaml`` (0600): how ``greenfleet controller run`` logs in to the broker."""

    model_config = ConfigDict(extra="forbid")

    username: str = CONTROLLER_USER
    password: str
    ca_file: Path
    broker: str | None = None  # HOST:PORT of the TLS listener, written by `broker config`


def load_controller_credentials(path: Path) -> ControllerCredentials | None:
    if not path.exists():
        return None
    try:
        return ControllerCredentials.model_validate(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise PkiError(
            f"cannot read the controller's broker credentials {path}: {str(exc)[:300]}; "
            "delete it and run `greenfleet broker config` to make new ones"
        ) from exc


def ensure_controller_identity(
    db: sqlite_utils.Database,
    ca: CertificateAuthority,
    path: Path,
    broker: str | None = None,
) -> ControllerCredentials:
    """The controller's broker login, made (password, hash in the DB) on first use.

    A credentials file whose password no longer matches the DB (or no DB row) is replaced.
    """
    creds = load_controller_credentials(path)
    row = get_identity(db, CONTROLLER_USER)
    valid = (
        creds is not None
        and row is not None
        and row["password_hash"]
        and verify_password(creds.password, row["password_hash"])
    )
    if not valid:
        password = new_password()
        with db.conn:
            _store(
                db,
                CONTROLLER_USER,
                "controller",
                None,
                {},
                Credentials(CONTROLLER_USER, "password", password=password),
                utc_now(),
                row,
            )
        creds = ControllerCredentials(password=password, ca_file=ca.cert_path, broker=broker)
    assert creds is not None
    if broker is not None:
        creds = creds.model_copy(update={"broker": broker})
    if not valid or broker is not None:
        text = yaml.safe_dump(creds.model_dump(mode="json"), sort_keys=False)
        write_private(path, text.encode())
    return creds
