"""Read-only consumer logins: a historian, a line PLC gateway or a SCADA bridge reads results.

The README names local consumers of results; in a secured deployment the ACL let no login read
them. ``greenfleet consumers add historian --read results,telemetry --site plant-a`` makes a
broker login ``gf-consumer-historian`` with a password of its own (shown once), written into the
password file and the ACL with ``topic read`` rules only: a consumer can never publish. With
``--site`` it reads the devices enrolled with that site label (one rule per device, rewritten
when devices are added or revoked), else every device. ``consumers revoke NAME`` drops it.

Consumers are identities (kind ``consumer``) beside devices and the controller, so the password
file, the reload and the revocation work as for devices.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from typing import Any

import sqlite_utils
from rich.markup import escape
from rich.table import Table

from agent import protocol as p
from controller import broker_config as bc
from controller import identity
from controller.db import open_db
from controller.errors import InvalidRequest, NotFound
from controller.home import Home
from controller.output import console, emit

PREFIX = "gf-consumer-"
READABLE = {
    "results": p.Channel.RESULTS,
    "telemetry": p.Channel.TELEMETRY,
    "events": p.Channel.EVENTS,
    "state": p.Channel.STATE,
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,47}$")


def username(name: str) -> str:
    return PREFIX + name


def parse_read(text: str) -> list[str]:
    channels = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in channels if c not in READABLE]
    if not channels or unknown:
        raise InvalidRequest(
            f"--read {text!r}: choose from {', '.join(READABLE)} (comma-separated)"
        )
    return sorted(set(channels))


def add_consumer(
    home: Home, name: str, read: list[str], site: str | None, db: sqlite_utils.Database
) -> dict[str, Any]:
    """Make (or re-issue) a consumer login; returns its username, password and broker reload."""
    if not _NAME.match(name):
        raise InvalidRequest(
            f"invalid consumer name {name!r}: 1-48 lower-case letters, digits, '_', '.', '-'"
        )
    user = username(name)
    existing = identity.get_identity(db, user)
    if existing is not None and existing["kind"] != "consumer":
        raise InvalidRequest(f"{user!r} is taken by a {existing['kind']}; choose another name")
    password = identity.new_password()
    now = identity.utc_now()
    with db.conn:
        db.table("identities").upsert(
            {
                "id": user,
                "kind": "consumer",
                "device_class": None,
                "labels": json.dumps({"read": read, "site": site}, sort_keys=True),
                "auth": "password",
                "password_hash": identity.hash_password(password),
                "cert_serial": None,
                "created": existing["created"] if existing else now.isoformat(),
                "issued": now.isoformat(),
                "revoked": 0,
                "revoked_at": None,
                "revoke_reason": None,
            },
            pk="id",
        )
    refreshed = bc.refresh(db, home)
    return {
        "name": name,
        "username": user,
        "password": password,
        "read": read,
        "site": site,
        "reload": refreshed[1].as_dict() if refreshed else None,
    }


def revoke_consumer(home: Home, name: str, db: sqlite_utils.Database) -> dict[str, Any]:
    user = username(name)
    row = identity.get_identity(db, user)
    if row is None or row["kind"] != "consumer":
        raise NotFound(f"no consumer {name!r}; see `greenfleet consumers list`")
    with db.conn:
        db.table("identities").update(
            user,
            {
                "revoked": 1,
                "revoked_at": identity.utc_now().isoformat(),
                "password_hash": None,
            },
        )
    refreshed = bc.refresh(db, home)
    return {"name": name, "username": user, "reload": refreshed[1].as_dict() if refreshed else None}


def consumers(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    out = []
    for row in db.table("identities").rows_where("kind = 'consumer'", order_by="id"):
        labels = json.loads(row["labels"] or "{}")
        out.append(
            {
                "name": row["id"][len(PREFIX) :],
                "username": row["id"],
                "read": labels.get("read", []),
                "site": labels.get("site"),
                "status": "revoked" if row["revoked"] else "active",
                "issued": row["issued"],
            }
        )
    return out


def acl_sections(db: sqlite_utils.Database) -> list[tuple[str, list[str]]]:
    """(username, topics it may read) of every active consumer, for the broker's ACL."""
    devices: dict[str, list[str]] = {}
    for row in db.table("identities").rows_where("kind = 'device' AND revoked = 0"):
        site = json.loads(row["labels"] or "{}").get("site")
        devices.setdefault(site, []).append(row["id"])
    sections = []
    for c in consumers(db):
        if c["status"] != "active":
            continue
        targets = ["+"] if c["site"] is None else sorted(devices.get(c["site"], []))
        topics = [f"{p.ROOT}/{d}/{READABLE[ch].value}" for d in targets for ch in c["read"]]
        sections.append((c["username"], topics))
    return sections


# ------------------------------------------------------------------------------------ CLI


def cmd_consumers_add(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    added = add_consumer(args.home, args.name, parse_read(args.read), args.site, db)

    def render() -> None:
        scope = f"devices of site {added['site']}" if added["site"] else "every device"
        console.print(
            f"consumer [bold]{escape(added['username'])}[/] may read "
            f"{', '.join(added['read'])} of {escape(scope)}, and publish nothing"
        )
        console.print(f"password (shown once): {added['password']}")
        if added["reload"] is None:
            console.print("[yellow]`greenfleet broker config` writes the broker files[/]")
        channel = READABLE[added["read"][0]].value
        console.print(
            "try: mosquitto_sub -h BROKER -p 8883 --cafile "
            f"{escape(str(args.home.broker_dir / bc.CA))} -u {escape(added['username'])} "
            f"-P PASSWORD -t '{p.ROOT}/+/{channel}' -v"
        )

    emit(args, added, render)
    return 0


def cmd_consumers_revoke(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    revoked = revoke_consumer(args.home, args.name, db)
    emit(args, revoked, lambda: console.print(f"revoked {escape(revoked['username'])}"))
    return 0


def cmd_consumers_list(args: argparse.Namespace) -> int:
    rows = consumers(open_db(args.home.database))

    def render() -> None:
        table = Table(title=f"{len(rows)} consumers", title_justify="left")
        for column in ("username", "read", "site", "status", "issued"):
            table.add_column(column)
        for r in rows:
            table.add_row(
                r["username"], ",".join(r["read"]), r["site"] or "(all)", r["status"], r["issued"]
            )
        console.print(table)

    emit(args, rows, render)
    return 0


def register(consumers_parser: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    a = add(
        consumers_parser,
        "add",
        cmd_consumers_add,
        "a read-only broker login for a local consumer (historian, PLC gateway, SCADA)",
        True,
    )
    a.add_argument("name", help="e.g. historian; the login is gf-consumer-NAME")
    a.add_argument("--read", required=True, help=f"channels: {','.join(READABLE)}")
    a.add_argument("--site", help="only the devices enrolled with this site label")
    r = add(consumers_parser, "revoke", cmd_consumers_revoke, "drop a consumer login", True)
    r.add_argument("name")
    add(consumers_parser, "list", cmd_consumers_list, "list consumer logins", True)
