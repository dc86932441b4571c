"""``greenfleet broker config``: a locked-down Mosquitto configuration, made from the database.

Design (one broker, two TLS listeners, one ACL):

- **port 8883, TLS + username/password.** The broker's certificate is signed by the fleet CA
  (controller.identity), which devices pin. Devices enrolled with ``--auth password`` and the
  controller (user ``gf-controller``) log in here; the password file holds only ``$7$``
  PBKDF2-SHA512 hashes.
- **port 8884, mutual TLS.** ``require_certificate true`` + ``use_identity_as_username true``:
  a client certificate signed by the fleet CA, not listed in ``crl.pem``, is the login, and
  its CN (the device id) is the username. Mosquitto cannot take "a password or a certificate"
  on one listener (``use_identity_as_username`` needs ``require_certificate``), hence two.
- **no anonymous access** anywhere (``allow_anonymous false``), and **no plain TCP** unless
  asked for with ``--plain-port``, and then only on loopback (a local bridge or tool on the
  broker host) unless ``--allow-plaintext`` says otherwise, with a warning. Plain listeners
  still need a password.
- **one ACL** (``per_listener_settings false``): ``pattern`` rules with ``%u`` give every device
  its own topics and nothing else; the ``user gf-controller`` section gives the controller
  what it subscribes to and publishes. No device may publish on any ``cmd`` topic.

Every file is regenerated from the database (identities, revoked certificates, the options of
the last ``broker config``), so ``devices add``/``revoke`` rewrite them and ask the broker to
reload (SIGHUP re-reads the password file, the ACL and the CRL).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import signal
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils
from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field

from agent import protocol as p
from agent.link import is_loopback
from controller.errors import InvalidRequest
from controller.home import Home
from controller.identity import (
    CONTROLLER_USER,
    RENEW_BEFORE,
    CertificateAuthority,
    cert_names,
    ensure_controller_identity,
    fleet_crl,
    password_entries,
    revoked_devices,
    server_names,
    utc_now,
    write_private,
)

SETTINGS_KEY = "broker"
CONF = "mosquitto.conf"
PASSWD = "passwd"
ACL = "acl"
CA = "ca.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CRL = "crl.pem"
PID = "mosquitto.pid"
DATA = "data"

# What each device may do with its own topics (``%u`` is its username: its device id).
DEVICE_WRITES = [p.Channel.REPLY, p.Channel.EVENTS, p.Channel.TELEMETRY, p.Channel.RESULTS]
DEVICE_READS = [p.Channel.CMD, p.Channel.ACK]
# The controller's side of the same contract (controller.daemon's subscriptions, its publishes).
CONTROLLER_READS = [
    p.Channel.REPLY,
    p.Channel.EVENTS,
    p.Channel.TELEMETRY,
    p.Channel.BLOB_REQ,
]


class BrokerSettings(BaseModel):
    """The options of ``greenfleet broker config``, kept in the database for regeneration."""

    model_config = ConfigDict(extra="forbid")

    out_dir: Path
    hosts: list[str] = Field(default_factory=list, description="Names/IPs devices dial.")
    port: int = Field(default=8883, ge=1, le=65535, description="TLS + password listener.")
    cert_port: int | None = Field(
        default=8884, ge=1, le=65535, description="Mutual-TLS listener; none: no cert auth."
    )
    bind: str | None = Field(default=None, description="Address of the TLS listeners; all.")
    plain_port: int | None = Field(default=None, ge=1, le=65535)
    plain_bind: str = "127.0.0.1"
    allow_plaintext: bool = False
    user: str = Field(default_factory=getpass.getuser, description="Mosquitto runs as.")
    max_queued_messages: int = Field(default=100_000, ge=0)

    def controller_broker(self) -> str:
        """HOST:PORT the controller dials: the first name devices use, else loopback."""
        host = self.hosts[0] if self.hosts else "127.0.0.1"
        if self.bind and self.bind not in ("0.0.0.0", "::"):
            host = self.bind
        return f"{host_port(host)}:{self.port}"

    def device_broker(self, auth: str) -> tuple[str, int] | None:
        """Where a device with ``auth`` connects, if ``broker config`` named a host."""
        if not self.hosts:
            return None
        if auth == "cert":
            if self.cert_port is None:
                raise InvalidRequest(
                    "the broker has no certificate listener (broker config --cert-port)"
                )
            return self.hosts[0], self.cert_port
        return self.hosts[0], self.port


def host_port(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_settings(settings: BrokerSettings) -> list[str]:
    """Refuse contradictory options; return warnings to print (plain TCP off loopback)."""
    ports = [settings.port, settings.cert_port, settings.plain_port]
    used = [port for port in ports if port is not None]
    if len(used) != len(set(used)):
        raise InvalidRequest(f"listener ports must differ: {used}")
    warnings = []
    if settings.plain_port is not None and not is_loopback(settings.plain_bind):
        if not settings.allow_plaintext:
            raise InvalidRequest(
                f"a plain TCP listener on {settings.plain_bind} would send passwords and "
                "commands in clear on the network; bind it to 127.0.0.1, or pass "
                "--allow-plaintext if the network is isolated"
            )
        warnings.append(
            f"plain TCP listener on {settings.plain_bind}:{settings.plain_port}: passwords "
            "and commands cross the network unencrypted"
        )
    for host in settings.hosts:
        if not host or any(c in host for c in " /\n\t"):
            raise InvalidRequest(f"bad broker host name {host!r}")
    return warnings


# ------------------------------------------------------------------------ settings storage


def load_settings(db: sqlite_utils.Database) -> BrokerSettings | None:
    rows = list(db.table("settings").rows_where("key = ?", [SETTINGS_KEY]))
    return BrokerSettings.model_validate_json(rows[0]["value"]) if rows else None


def save_settings(db: sqlite_utils.Database, settings: BrokerSettings) -> None:
    with db.conn:
        db.table("settings").upsert(
            {"key": SETTINGS_KEY, "value": settings.model_dump_json()}, pk="key"
        )


def default_settings(home: Home) -> BrokerSettings:
    return BrokerSettings(out_dir=home.broker_dir)


# Every listener replaces the client id a client asks for with its login (username, or a
# certificate's CN): a device that connects as ``gf-controller``, or as another device, gets a
# session of its own and knocks nobody off. So every process that connects at the same time
# needs a login of its own: the ingest workers have theirs (ingest_worker_user).
CLIENT_ID_IS_LOGIN = [
    "# The client id is the login: no client can take over another's session (or kick it).",
    "use_username_as_clientid true",
]
MAX_INGEST_WORKERS = 16  # logins gf-ingest-0 .. gf-ingest-15 (controller run --ingest-workers)


def ingest_worker_user(index: int) -> str:
    """The login of ingest worker ``index``: the controller's password, its own name."""
    return f"gf-ingest-{index}"


# ------------------------------------------------------------------------------ file text


def consumer_acl(db: sqlite_utils.Database) -> list[tuple[str, list[str]]]:
    """The read-only consumers' ACL sections (controller.consumer_commands, which imports
    this module: hence the import here)."""
    from controller.consumer_commands import acl_sections

    return acl_sections(db)


def acl_text(
    revoked: list[str] | None = None, consumers: list[tuple[str, list[str]]] | None = None
) -> str:
    """The ACL: per-device ``pattern`` rules, the controller's ``user`` section, and a
    ``deny #`` section for each revoked device.

    The denials matter for certificate devices: a reload makes Mosquitto re-read the CRL and
    drop connections whose password is gone, but it keeps a connection made with a
    certificate that is now revoked. Denied everything, that connection is inert until it
    drops, and it cannot come back (the CRL refuses the handshake).
    """
    root = p.ROOT
    lines = [
        "# greenfleet broker ACL, generated by `greenfleet broker config`; do not edit: it is",
        "# rewritten from the controller database by `broker config` and `devices add/revoke`.",
        "#",
        "# Anonymous clients are refused (allow_anonymous false), so no rules come before the",
        "# first `user` line. Every device's username is its device id (password file, or the",
        "# CN of its client certificate), and %u is that name: a device reads and writes its own",
        "# topics only. Writing is never granted on a cmd topic except to the controller.",
        "# A denied publish is dropped (MQTT 5: PUBACK 0x87); a denied subscribe gets SUBACK",
        "# failure (0x80) and the client stays connected.",
        "",
        "# device -> controller (state is read too: the agent re-asserts a stale last will)",
        f"pattern readwrite {root}/%u/{p.Channel.STATE.value}",
    ]
    lines += [f"pattern write {root}/%u/{c.value}" for c in DEVICE_WRITES]
    lines.append(f"pattern write {root}/%u/{p.Channel.BLOB_REQ.value}")
    lines += [
        "",
        "# controller -> device: commands, what it stored (ack), model chunks (blob/{sha}/{i})",
    ]
    lines += [f"pattern read {root}/%u/{c.value}" for c in DEVICE_READS]
    lines.append(f"pattern read {root}/%u/blob/+/+")
    lines += [
        "# model chunks shared by the fleet (one publish, fanned out by the broker): every",
        "# device may read them (models are signed, not secret within a fleet); only the",
        "# controller writes them",
        f"pattern read {p.BLOB_ROOT}/+/+",
    ]
    lines += [
        "# whether the controller is online (retained, written by the controller only); the",
        "# same topic for everyone, so Mosquitto warns that this pattern has no %u: expected",
        f"pattern read {p.CONTROLLER_TOPIC}",
        "",
        "# the controller: subscribes to every device's reports, sends commands and chunks",
        f"user {CONTROLLER_USER}",
    ]
    lines += [f"topic read {root}/+/{c.value}" for c in CONTROLLER_READS]
    lines += [
        "# state: written too, to delete the retained birth of a revoked device (whose last",
        "# will the deny below blocks)",
        f"topic readwrite {root}/+/{p.Channel.STATE.value}",
    ]
    lines += [
        f"topic write {root}/+/{p.Channel.CMD.value}",
        f"topic write {root}/+/{p.Channel.ACK.value}",
        f"topic write {root}/+/blob/+/+",
        f"topic write {p.BLOB_ROOT}/+/+",
        f"topic readwrite {p.CONTROLLER_TOPIC}",
    ]
    for index in range(MAX_INGEST_WORKERS):
        lines += [
            "",
            f"# ingest worker {index}: stores telemetry, tells agents what it stored"
            if index == 0
            else f"# ingest worker {index}",
            f"user {ingest_worker_user(index)}",
            f"topic read {root}/+/{p.Channel.TELEMETRY.value}",
            f"topic write {root}/+/{p.Channel.ACK.value}",
        ]
    for user, topics in consumers or []:
        lines += ["", "# a read-only consumer (greenfleet consumers add): it can never publish"]
        lines += [f"user {user}", *(f"topic read {topic}" for topic in topics)]
        if not topics:
            lines.append("topic deny #")  # a site with no device yet: nothing to read
    if revoked:
        lines += ["", "# revoked devices: denied everything (a `deny` wins over every pattern)"]
        for device in revoked:
            lines += [f"user {device}", "topic deny #"]
    lines.append("")
    return "\n".join(lines)


def with_worker_logins(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The password entries plus one login per ingest worker, each with the controller's
    password hash (a worker runs with the controller's credentials, under its own name)."""
    hashed = dict(entries).get(CONTROLLER_USER)
    if hashed is None:
        return entries
    return entries + [(ingest_worker_user(i), hashed) for i in range(MAX_INGEST_WORKERS)]


def passwd_text(entries: list[tuple[str, str]]) -> str:
    return "".join(f"{user}:{hashed}\n" for user, hashed in entries)


def conf_text(settings: BrokerSettings, files: BrokerFiles) -> str:
    out = settings.out_dir
    bind = f" {settings.bind}" if settings.bind else ""
    lines = [
        "# Mosquitto configuration for a greenfleet site, made by `greenfleet broker config`.",
        "# Rewritten from the controller database by `broker config` and `devices add/revoke`:",
        "# edits here are lost. Start: mosquitto -c this file, or `greenfleet broker run",
        "# --secure` (which rewrites the files first);",
        f"# reload (password file, ACL, CRL): kill -HUP $(cat {files.pid})",
        "",
        "# One ACL and one password file for every listener below.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {files.passwd}",
        f"acl_file {files.acl}",
        "",
        "# Started as root, Mosquitto drops to this user: it must be able to read these files.",
        f"user {settings.user}",
        f"pid_file {files.pid}",
        "",
        "# Keep sessions, subscriptions and queued QoS 1 messages (a Deploy for an offline",
        "# device) across a broker restart: saved every autosave_interval seconds and at a clean",
        "# shutdown to persistence_location. Agents and the controller use persistent sessions.",
        "persistence true",
        f"persistence_location {out / DATA}/",
        "autosave_interval 60",
        "",
        "# Mosquitto's default of 1000 queued messages per client silently drops QoS 1 traffic",
        "# for a subscriber that falls behind (the controller during a fleet-wide burst).",
        f"max_queued_messages {settings.max_queued_messages}",
        "max_inflight_messages 100",
        "# Chunk requests are small request/response exchanges: do not hold them back (Nagle).",
        "set_tcp_nodelay true",
        "",
        "# 1. TLS, username + password (devices enrolled with --auth password, the controller).",
        f"listener {settings.port}{bind}",
        "protocol mqtt",
        f"cafile {files.ca}",
        f"certfile {files.server_cert}",
        f"keyfile {files.server_key}",
        "require_certificate false",
        *CLIENT_ID_IS_LOGIN,
    ]
    if settings.cert_port is not None:
        lines += [
            "",
            "# 2. Mutual TLS (devices enrolled with --auth cert): the client certificate is the",
            "# login and its CN (the device id) the username; revoked serials are in the CRL.",
            f"listener {settings.cert_port}{bind}",
            "protocol mqtt",
            f"cafile {files.ca}",
            f"certfile {files.server_cert}",
            f"keyfile {files.server_key}",
            f"crlfile {files.crl}",
            "require_certificate true",
            "use_identity_as_username true",
            *CLIENT_ID_IS_LOGIN,
        ]
    if settings.plain_port is not None:
        lines += [
            "",
            "# 3. Plain TCP for local tools on the broker host; still needs a password.",
            f"listener {settings.plain_port} {settings.plain_bind}",
            "protocol mqtt",
            *CLIENT_ID_IS_LOGIN,
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """Where ``broker config`` put each file."""

    dir: Path
    conf: Path
    passwd: Path
    acl: Path
    ca: Path
    server_cert: Path
    server_key: Path
    crl: Path
    pid: Path
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def at(cls, out: Path, warnings: list[str] | None = None) -> BrokerFiles:
        return cls(
            out,
            out / CONF,
            out / PASSWD,
            out / ACL,
            out / CA,
            out / SERVER_CERT,
            out / SERVER_KEY,
            out / CRL,
            out / PID,
            warnings or [],
        )


def ensure_server_cert(ca: CertificateAuthority, pki: Path, hosts: list[str]) -> tuple[str, str]:
    """The broker's certificate and key (PEM), re-issued when the names change or it expires."""
    cert_path, key_path = pki / SERVER_CERT, pki / SERVER_KEY
    wanted = server_names(hosts)
    if cert_path.exists() and key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            fresh = cert.not_valid_after_utc - utc_now() > RENEW_BEFORE
            if (
                fresh
                and sorted(cert_names(cert)) == sorted(wanted)
                and cert.issuer == ca.cert.subject
            ):
                return cert_path.read_text(), key_path.read_text()
        except ValueError:
            pass
    issued = ca.issue_server(wanted)
    write_private(key_path, issued.key_pem.encode())
    cert_path.write_text(issued.cert_pem)
    return issued.cert_pem, issued.key_pem


def _chown_to(path: Path, user: str) -> None:
    """As root, hand a file Mosquitto must read to the user it drops to."""
    if os.geteuid() != 0 or user == "root":
        return
    with contextlib.suppress(KeyError, OSError):
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def write_broker_files(
    db: sqlite_utils.Database, home: Home, settings: BrokerSettings | None = None
) -> BrokerFiles:
    """(Re)write every broker file from the database; ``settings`` are saved for next time.

    Without ``settings``, the last saved ones are used (the defaults if there are none).
    """
    settings = settings or load_settings(db) or default_settings(home)
    warnings = check_settings(settings)
    settings = settings.model_copy(update={"out_dir": settings.out_dir.expanduser().resolve()})
    ca = CertificateAuthority.load_or_create(home.pki)
    ensure_controller_identity(db, ca, home.controller_credentials, settings.controller_broker())
    server_cert, server_key = ensure_server_cert(ca, home.pki, settings.hosts)
    files = BrokerFiles.at(settings.out_dir, warnings)
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    (files.dir / DATA).mkdir(exist_ok=True, mode=0o750)
    public = 0o644
    for path, text, mode in (
        (files.ca, ca.pem, public),
        (files.server_cert, server_cert, public),
        (files.server_key, server_key, 0o600),
        (files.crl, fleet_crl(db, ca), public),
        (files.passwd, passwd_text(with_worker_logins(password_entries(db))), 0o600),
        (files.acl, acl_text(revoked_devices(db), consumer_acl(db)), public),
        (files.conf, conf_text(settings, files), public),
    ):
        write_private(path, text.encode(), mode)
        _chown_to(path, settings.user)
    _chown_to(files.dir / DATA, settings.user)
    _chown_to(files.dir, settings.user)
    save_settings(db, settings)
    return files


# --------------------------------------------------------------------------------- reload


@dataclass(frozen=True, slots=True)
class Reload:
    """What happened when we asked the broker to re-read its files."""

    signalled: bool
    pid: int | None
    message: str
    command: str

    def as_dict(self) -> dict[str, object]:
        return {
            "signalled": self.signalled,
            "pid": self.pid,
            "message": self.message,
            "command": self.command,
        }


def _our_mosquitto(pid: int, conf: Path) -> bool:
    """Whether ``pid`` is a Mosquitto we may signal: runs with ``conf``, as us (or we're root)."""
    proc = Path(f"/proc/{pid}")
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        uid = proc.stat().st_uid
    except OSError:
        return False
    if not argv or "mosquitto" not in Path(argv[0].decode(errors="replace")).name:
        return False
    try:
        cwd = (proc / "cwd").resolve()
    except OSError:
        cwd = Path("/")
    configs = {
        (cwd / argv[i + 1].decode(errors="replace")).resolve()
        for i, arg in enumerate(argv[:-1])
        if arg in (b"-c", b"--config-file")
    }
    if conf.resolve() not in configs:
        return False
    return os.geteuid() == 0 or uid == os.geteuid()


def reload_broker(files: BrokerFiles) -> Reload:
    """SIGHUP the Mosquitto whose pid file is in the broker directory, if it is ours."""
    command = f"kill -HUP $(cat {files.pid})"
    try:
        pid = int(files.pid.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return Reload(
            False,
            None,
            f"no broker of ours is running (no pid in {files.pid}); one started later reads "
            "the new files",
            command,
        )
    if not _our_mosquitto(pid, files.conf):
        return Reload(
            False,
            pid,
            f"pid {pid} is not a Mosquitto running {files.conf} that we may signal",
            command,
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return Reload(False, pid, f"cannot signal pid {pid}: {exc}", command)
    return Reload(True, pid, f"broker (pid {pid}) reloads its password file, ACL and CRL", command)


def refresh(db: sqlite_utils.Database, home: Home) -> tuple[BrokerFiles, Reload] | None:
    """After an identity change: rewrite the broker files and reload the broker.

    Does nothing (None) before the first ``broker config``: that writes them all.
    """
    if load_settings(db) is None:
        return None
    files = write_broker_files(db, home)
    return files, reload_broker(files)
