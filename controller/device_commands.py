"""``greenfleet devices add|revoke|identities`` and ``greenfleet broker config|run --secure``.

Enrollment gives a device an identity on the site's broker (controller.identity) and writes
its enrollment bundle (agent.enrollment.Bundle), the one file ``greenfleet-agent install``
needs on the device. The broker's files are regenerated from the database
(controller.broker_config) after every change and the broker is asked to reload them.

Each command is a thin shell around a function that tests (and other code) can call
in-process: :func:`configure_broker`, :func:`add_device`, :func:`revoke_device`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import sqlite_utils
import yaml
from cryptography import x509
from rich.markup import escape
from rich.table import Table

from agent.config import TlsConfig
from agent.enrollment import Bundle, BundleBroker
from controller import broker_config as bc
from controller import identity, registry
from controller.db import open_db
from controller.errors import InvalidRequest
from controller.home import Home
from controller.output import console, emit
from controller.registry import parse_selector
from device_configs.schema import ProfileError, load_profiles
from model_store.signing import Signer

# ------------------------------------------------------------------------------ the bundle


class _BundleDumper(yaml.SafeDumper):
    """PEM blocks as YAML literal blocks, so a bundle can be read (and diffed) by a person."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BundleDumper.add_representer(str, _str)


def bundle_text(bundle: Bundle) -> str:
    header = (
        f"# greenfleet enrollment bundle for {bundle.device_id}. It holds the device's broker\n"
        "# credentials: move it to the device over a trusted channel (scp), run\n"
        "# `greenfleet-agent install <this file>` there, then delete it.\n"
    )
    body = yaml.dump(
        {k: v for k, v in msgspec.to_builtins(bundle).items() if v is not None},
        Dumper=_BundleDumper,
        sort_keys=False,
        allow_unicode=True,
    )
    return header + body


def parse_labels(text: str | None) -> dict[str, str]:
    return parse_selector(text) if text else {}


def parse_host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(f"bad broker address {text!r}: use HOST:PORT")
    return host, int(port)


# ------------------------------------------------------------------------------ functions


@dataclass(frozen=True, slots=True)
class Added:
    bundle: Bundle
    path: Path
    broker: tuple[str, int]
    reload: bc.Reload | None
    warnings: list[str]

    def as_dict(self) -> dict[str, Any]:
        host, port = self.broker
        return {
            "device": self.bundle.device_id,
            "device_class": self.bundle.device_class,
            "labels": self.bundle.labels,
            "auth": "cert" if self.bundle.broker.cert_pem else "password",
            "broker": f"{bc.host_port(host)}:{port}",
            "bundle": str(self.path),
            "reload": self.reload.as_dict() if self.reload else None,
            "warnings": self.warnings,
            "next": next_steps(self.path),
        }


def next_steps(path: Path) -> list[str]:
    return [
        f"scp {path} DEVICE:{path.name}",
        f"sudo greenfleet-agent install {path.name}   # or --user, without root",
        f"shred -u {path.name}   # on the device, once installed",
    ]


def _broker_names(home: Home) -> list[str] | None:
    """The names in the broker's current certificate, if ``broker config`` has made one."""
    path = home.pki / bc.SERVER_CERT
    try:
        return identity.cert_names(x509.load_pem_x509_certificate(path.read_bytes()))
    except (OSError, ValueError):
        return None


def add_device(
    home: Home,
    device: str,
    *,
    device_class: str,
    site: str | None = None,
    labels: dict[str, str] | None = None,
    auth: identity.AuthKind = "password",
    broker: tuple[str, int] | None = None,
    out: Path | None = None,
    reissue: bool = False,
    db: sqlite_utils.Database | None = None,
) -> Added:
    """Enroll ``device``: identity in the DB, bundle written (0600), broker files refreshed."""
    db = db if db is not None else open_db(home.database)
    identity.check_new_id(device)
    try:
        profiles = load_profiles()
    except ProfileError as exc:
        raise InvalidRequest(str(exc)) from exc
    profile = profiles.get(device_class)
    if profile is None:
        raise InvalidRequest(
            f"unknown device class {device_class!r}; classes: {', '.join(sorted(profiles))} "
            "(device_configs/)"
        )
    all_labels = dict(labels or {})
    if site:
        all_labels["site"] = site
    settings = bc.load_settings(db)
    if broker is None:
        broker = settings.device_broker(auth) if settings else None
        if broker is None:
            raise InvalidRequest(
                "no broker address for the bundle: run `greenfleet broker config --host NAME` "
                "(the name devices dial), or pass --broker HOST:PORT"
            )
    warnings = []
    names = _broker_names(home)
    if names is not None and broker[0].lower() not in names:
        warnings.append(
            f"the broker certificate does not name {broker[0]} (it names {', '.join(names)}): "
            f"the device will refuse it; run `greenfleet broker config --host {broker[0]}`"
        )
    if settings is None:
        warnings.append(
            "the broker files are not written yet: run `greenfleet broker config --host NAME`"
        )
    out = out or home.enrollments / f"{device}.yaml"
    if out.is_dir():
        out = out / f"{device}.yaml"
    if out.parent != home.enrollments and not out.parent.is_dir():
        raise InvalidRequest(f"cannot write the bundle to {out}: no directory {out.parent}")
    ca = identity.CertificateAuthority.load_or_create(home.pki)
    signer = Signer.load_or_create(home.keys)
    creds = identity.enroll(
        db, ca, device, device_class=device_class, labels=all_labels, auth=auth, reissue=reissue
    )
    registry.mark_enrolled(db, device)  # enrolled again after a revoke: back once it connects
    bundle = Bundle(
        device_id=device,
        device_class=device_class,
        labels=all_labels,
        broker=BundleBroker(
            host=broker[0],
            port=broker[1],
            username=device if creds.password else None,
            password=creds.password,
            ca_pem=ca.pem,
            cert_pem=creds.cert_pem,
            key_pem=creds.key_pem,
        ),
        controller_keys=[signer.public_raw.hex()],
        power={
            "idle_w": profile.power.idle_w,
            "active_w_per_core": profile.power.active_w_per_core,
        },
    )
    if out.parent == home.enrollments:
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity.write_private(out, bundle_text(bundle).encode())
    refreshed = bc.refresh(db, home)
    return Added(bundle, out, broker, refreshed[1] if refreshed else None, warnings)


@dataclass(frozen=True, slots=True)
class Revoked:
    device: str
    auth: str
    revoked_at: str
    serials: list[str]
    reload: bc.Reload | None
    removed_bundle: Path | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "auth": self.auth,
            "revoked_at": self.revoked_at,
            "revoked_serials": self.serials,
            "reload": self.reload.as_dict() if self.reload else None,
            "removed_bundle": str(self.removed_bundle) if self.removed_bundle else None,
        }


def revoke_device(
    home: Home,
    device: str,
    *,
    reason: str = "revoked",
    db: sqlite_utils.Database | None = None,
) -> Revoked:
    """Revoke ``device``: password dropped, certificates in the CRL, broker files + reload."""
    db = db if db is not None else open_db(home.database)
    row = identity.revoke(db, device, reason=reason)
    # offline and out of plans and rollouts at once; the controller deletes its retained birth
    registry.mark_revoked(db, device, reason, identity.utc_now())
    serials = [
        serial
        for (serial,) in db.execute(
            "SELECT serial FROM certificates WHERE identity = ? AND revoked_at IS NOT NULL "
            "ORDER BY issued",
            [device],
        ).fetchall()
    ]
    refreshed = bc.refresh(db, home)
    bundle = home.enrollments / f"{device}.yaml"
    removed = None
    if bundle.exists():
        bundle.unlink()
        removed = bundle
    return Revoked(
        device,
        row["auth"],
        row["revoked_at"],
        serials,
        refreshed[1] if refreshed else None,
        removed,
    )


def configure_broker(
    home: Home, settings: bc.BrokerSettings, db: sqlite_utils.Database | None = None
) -> tuple[bc.BrokerFiles, bc.Reload]:
    """Write every broker file for ``settings`` (saved for later regeneration) and reload a
    running broker of ours."""
    db = db if db is not None else open_db(home.database)
    files = bc.write_broker_files(db, home, settings)
    return files, bc.reload_broker(files)


# ---------------------------------------------------------------------- controller login


@dataclass(frozen=True, slots=True)
class Connection:
    """How ``controller run`` connects: from the flags, else the home's credentials."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: TlsConfig | None
    allow_plaintext: bool

    def describe(self) -> str:
        how = f"TLS, CA {self.tls.ca_file}" if self.tls else "plain TCP"
        return f"{bc.host_port(self.host)}:{self.port} ({how}, user {self.username or '-'})"


def controller_connection(
    home: Home,
    broker: str | None,
    *,
    username: str | None = None,
    password: str | None = None,
    plain: bool = False,
    allow_plaintext: bool = False,
) -> Connection:
    """The controller's broker login: the home's credentials (``pki/controller.yaml``, made by
    ``broker config``) and TLS with the fleet CA when the home has them and ``plain`` is not
    set; explicit flags win. Without them: plain TCP, as before enrollment existed."""
    creds = None if plain else identity.load_controller_credentials(home.controller_credentials)
    text = broker or (creds.broker if creds else None) or "127.0.0.1:1883"
    host, port = parse_host_port(text)
    if creds is None:
        return Connection(host, port, username, password, None, allow_plaintext)
    if username is None or username == creds.username:
        username, password = creds.username, password or creds.password
    return Connection(
        host, port, username, password, TlsConfig(ca_file=creds.ca_file), allow_plaintext
    )


# -------------------------------------------------------------------------------- commands


def cmd_devices_add(args: argparse.Namespace) -> int:
    added = add_device(
        args.home,
        args.id,
        device_class=args.profile,
        site=args.site,
        labels=parse_labels(args.labels),
        auth=args.auth,
        broker=parse_host_port(args.broker) if args.broker else None,
        out=Path(args.out).expanduser() if args.out else None,
        reissue=args.reissue,
    )
    data = added.as_dict()

    def render() -> None:
        labels = ",".join(f"{k}={v}" for k, v in added.bundle.labels.items()) or "-"
        console.print(
            f"enrolled [bold]{escape(args.id)}[/] (class {args.profile}, labels {escape(labels)}, "
            f"{data['auth']} auth)"
        )
        console.print(
            f"bundle: {escape(str(added.path))} (mode 0600: it holds the device's "
            f"{'client key' if data['auth'] == 'cert' else 'broker password'})"
        )
        console.print(f"broker: {escape(data['broker'])} over TLS, the fleet CA pinned")
        _print_reload(added.reload)
        for warning in added.warnings:
            console.print(f"[yellow]warning[/]: {escape(warning)}")
        console.print("next, on the device:")
        for step in data["next"]:
            console.print(f"  {escape(step)}")

    emit(args, data, render)
    return 0


def _print_reload(reload: bc.Reload | None) -> None:
    if reload is None:
        return
    if reload.signalled:
        console.print(f"broker files rewritten; {escape(reload.message)}")
    else:
        console.print(
            f"broker files rewritten; [yellow]not reloaded[/]: {escape(reload.message)}; a "
            f"running broker applies them after `{escape(reload.command)}` (or `systemctl "
            "reload mosquitto`) on its host"
        )


def cmd_devices_revoke(args: argparse.Namespace) -> int:
    revoked = revoke_device(args.home, args.id, reason=args.reason or "revoked")

    def render() -> None:
        what = (
            f"certificate{'s' if len(revoked.serials) > 1 else ''} "
            f"{', '.join(revoked.serials)} in the CRL, all access denied in the ACL"
            if revoked.serials
            else "password removed from the broker's password file"
        )
        console.print(f"revoked [bold]{escape(args.id)}[/] at {revoked.revoked_at}: {what}")
        if revoked.reload is None:
            console.print(
                "[yellow]the broker files are not written yet[/]: `greenfleet broker config` "
                "writes them without this device"
            )
        elif revoked.reload.signalled:
            console.print(f"{escape(revoked.reload.message)}: {escape(args.id)} cannot connect")
        else:
            _print_reload(revoked.reload)
            console.print(f"until then {escape(args.id)} can still connect")
        if revoked.removed_bundle:
            console.print(f"removed its bundle {escape(str(revoked.removed_bundle))}")

    emit(args, revoked.as_dict(), render)
    return 0


def cmd_devices_identities(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    seen = {r["id"]: r for r in db.table("devices").rows_where(select="id, online, last_seen")}
    rows = []
    for row in identity.identities(db):
        device = seen.get(row["id"])
        rows.append(
            {
                "id": row["id"],
                "device_class": row["device_class"],
                "labels": row["labels"],
                "auth": row["auth"],
                "status": "revoked" if row["revoked"] else "enrolled",
                "issued": row["issued"],
                "revoked_at": row["revoked_at"],
                "seen": (
                    "online"
                    if device and device["online"]
                    else (f"last {device['last_seen']}" if device else "never seen")
                ),
            }
        )

    def render() -> None:
        table = Table(title=f"{len(rows)} enrolled devices", title_justify="left")
        for col in ("device", "class", "labels", "auth", "status", "issued", "seen"):
            table.add_column(col)
        for r in rows:
            status = "[red]revoked[/]" if r["status"] == "revoked" else "[green]enrolled[/]"
            table.add_row(
                r["id"],
                r["device_class"] or "-",
                escape(",".join(f"{k}={v}" for k, v in r["labels"].items())),
                r["auth"],
                status,
                r["revoked_at"] or r["issued"],
                r["seen"],
            )
        console.print(table)

    emit(args, rows, render)
    return 0


def _settings_from_args(
    args: argparse.Namespace, saved: bc.BrokerSettings | None
) -> bc.BrokerSettings:
    """The options given, the saved ones for those not given, else the defaults."""
    base = saved or bc.default_settings(args.home)
    update: dict[str, Any] = {}
    if args.out:
        update["out_dir"] = Path(args.out).expanduser().resolve()
    if args.host:
        update["hosts"] = [h for h in args.host if h]
    for key in ("port", "bind", "plain_port", "plain_bind", "user"):
        value = getattr(args, key)
        if value is not None:
            update[key] = value
    if args.cert_port is not None:
        update["cert_port"] = args.cert_port or None
    if args.no_plain:
        update["plain_port"] = None
    if args.allow_plaintext:
        update["allow_plaintext"] = True
    return bc.BrokerSettings.model_validate({**base.model_dump(), **update})


def cmd_broker_config(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    settings = _settings_from_args(args, bc.load_settings(db))
    files, reload = configure_broker(args.home, settings, db)
    settings = bc.load_settings(db) or settings
    listeners = [
        {"port": settings.port, "bind": settings.bind or "*", "auth": "TLS + password"},
    ]
    if settings.cert_port is not None:
        listeners.append(
            {"port": settings.cert_port, "bind": settings.bind or "*", "auth": "TLS + client cert"}
        )
    if settings.plain_port is not None:
        listeners.append(
            {"port": settings.plain_port, "bind": settings.plain_bind, "auth": "plain + password"}
        )
    data: dict[str, Any] = {
        "dir": str(files.dir),
        "files": {
            name: str(getattr(files, name))
            for name in ("conf", "passwd", "acl", "ca", "server_cert", "server_key", "crl")
        },
        "hosts": identity.server_names(settings.hosts),
        "listeners": listeners,
        "controller": settings.controller_broker(),
        "reload": reload.as_dict(),
        "warnings": files.warnings,
    }

    def render() -> None:
        console.print(f"wrote the broker configuration to {escape(str(files.dir))}:")
        for name, path in data["files"].items():
            console.print(f"  {name:12} {escape(path)}")
        console.print(f"server certificate for: {', '.join(data['hosts'])}")
        for listener in listeners:
            console.print(f"  listener {listener['bind']}:{listener['port']}  {listener['auth']}")
        console.print(
            "anonymous clients refused; each device may use its own gf/v1/<id>/... topics only"
        )
        console.print(
            f"the controller logs in as {identity.CONTROLLER_USER} "
            f"({escape(str(args.home.controller_credentials))}), at {data['controller']}"
        )
        for warning in files.warnings:
            console.print(f"[yellow]warning[/]: {escape(warning)}")
        if reload.signalled:
            console.print(escape(reload.message))
        else:
            console.print(
                "start it: greenfleet broker run --secure   "
                f"(or: mosquitto -c {escape(str(files.conf))})"
            )

    emit(args, data, render)
    return 0


def cmd_broker_run_secure(args: argparse.Namespace) -> int:
    """Mosquitto with the generated configuration, in the foreground, until Ctrl-C."""
    from controller.broker import ConfiguredMosquitto, mosquitto_path

    if mosquitto_path() is None:
        raise InvalidRequest("mosquitto is not installed (apt-get install -y mosquitto)")
    db = open_db(args.home.database)
    files = bc.write_broker_files(db, args.home)
    settings = bc.load_settings(db)
    assert settings is not None
    host = (
        settings.bind if settings.bind and settings.bind not in ("0.0.0.0", "::") else "127.0.0.1"
    )
    broker = ConfiguredMosquitto(files.conf, settings.port, files.dir / "mosquitto.log", host)
    try:
        broker.start()
    except RuntimeError as exc:
        raise InvalidRequest(str(exc)) from exc
    ports = f"TLS {settings.port} (password)" + (
        f", {settings.cert_port} (client certificate)" if settings.cert_port else ""
    )
    print(
        f"mosquitto (pid {broker.pid}) running {files.conf}: {ports}, no anonymous access, "
        f"per-device ACL; log {broker.log}; Ctrl-C stops it",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        if broker.process is not None and broker.process.poll() is not None:
            print(
                f"mosquitto exited ({broker.process.returncode}); see {broker.log}", file=sys.stderr
            )
            return 1
    broker.stop()
    return 0


# -------------------------------------------------------------------------------- parser


def register_devices(devices: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add(devices, "add", cmd_devices_add, "enroll a device: credentials and a bundle", True)
    p.add_argument("id", help="device id (letters, digits, '_', '.', '-')")
    p.add_argument("--profile", required=True, help="hardware class (device_configs/*.yaml)")
    p.add_argument("--site", help="site label")
    p.add_argument("--labels", help="more labels: k=v[,k=v...]")
    p.add_argument(
        "--auth",
        choices=["password", "cert"],
        default="password",
        help="broker login: a password (default) or a client certificate",
    )
    p.add_argument(
        "--broker", help="HOST:PORT the device dials (default: from `greenfleet broker config`)"
    )
    p.add_argument("--out", help="bundle file (default $GREENFLEET_HOME/enroll/ID.yaml)")
    p.add_argument(
        "--reissue",
        action="store_true",
        help="new credentials for an enrolled device (its old bundle stops working)",
    )
    r = add(devices, "revoke", cmd_devices_revoke, "stop a device connecting to the broker", True)
    r.add_argument("id")
    r.add_argument("--reason", help="recorded with the revocation")
    add(devices, "identities", cmd_devices_identities, "list enrolled and revoked devices", True)


def register_broker(broker: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    c = add(
        broker,
        "config",
        cmd_broker_config,
        "write a locked-down Mosquitto configuration (TLS, passwords/certs, ACL)",
        True,
    )
    c.add_argument("--out", help="directory (default $GREENFLEET_HOME/broker)")
    c.add_argument(
        "--host",
        action="append",
        help="name or IP devices use to reach the broker (repeatable; in its certificate)",
    )
    c.add_argument("--port", type=int, help="TLS + password listener (default 8883)")
    c.add_argument(
        "--cert-port", type=int, help="TLS + client certificate listener (default 8884; 0: none)"
    )
    c.add_argument("--bind", help="address of the TLS listeners (default: all)")
    c.add_argument("--plain-port", type=int, help="also a plain TCP listener (password needed)")
    c.add_argument("--plain-bind", help="its address (default 127.0.0.1)")
    c.add_argument("--no-plain", action="store_true", help="remove the plain listener")
    c.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="let the plain listener bind a non-loopback address",
    )
    c.add_argument("--user", help="user Mosquitto runs as (default: you)")
