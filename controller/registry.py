"""The device registry: what the controller knows about every device, kept in SQLite."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlite_utils

from agent.protocol import Birth, Death, ProtocolError, check_device_id
from controller.errors import InvalidRequest, NotFound
from controller.reconcile import DeviceView, LastDeploy


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds")


def apply_birth(db: sqlite_utils.Database, device: str, birth: Birth, now: datetime) -> None:
    """A device came online: record its facts and what it runs."""
    existing = list(db.table("devices").rows_where("id = ?", [device]))
    row: dict[str, Any] = {
        "id": device,
        "device_class": birth.device_class,
        "labels": json.dumps(birth.labels, sort_keys=True),
        "online": 1,
        "session": birth.session,
        "agent_version": birth.agent_version,
        "runtimes": json.dumps([r.value for r in birth.runtimes]),
        "hardware": birth.hardware.model_dump_json(),
        "active_model": str(birth.active.model) if birth.active else None,
        "active_sha256": birth.active.sha256 if birth.active else None,
        "last_good_model": str(birth.last_good.model) if birth.last_good else None,
        "last_seen": iso(now),
    }
    if not existing:
        row.update(first_seen=iso(now), state_changed=iso(now), desired_model=None)
    elif not existing[0]["online"] or existing[0]["session"] != birth.session:
        row["state_changed"] = iso(now)
    db.table("devices").upsert(row, pk="id")


def apply_death(db: sqlite_utils.Database, device: str, death: Death, now: datetime) -> bool:
    """The device's last will (or clean stop) arrived; ignore it if a newer session is online."""
    rows = list(db.table("devices").rows_where("id = ?", [device]))
    if not rows or rows[0]["session"] not in (None, death.session):
        return False
    stamp = iso(now)
    db.table("devices").update(device, {"online": 0, "state_changed": stamp, "last_seen": stamp})
    return True


def touch(db: sqlite_utils.Database, devices: set[str], now: datetime) -> None:
    if devices:
        marks = ",".join("?" * len(devices))
        db.execute(f"UPDATE devices SET last_seen = ? WHERE id IN ({marks})", [iso(now), *devices])


def parse_selector(selector: str) -> dict[str, str]:
    """``site=plant-a,line=3`` -> {"site": "plant-a", "line": "3"}."""
    labels: dict[str, str] = {}
    for part in selector.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InvalidRequest(f"bad selector {selector!r}: use key=value[,key=value...]")
        labels[key.strip()] = value.strip()
    return labels


def devices(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    return list(db.table("devices").rows_where(order_by="id"))


def get_device(db: sqlite_utils.Database, device: str) -> dict[str, Any]:
    rows = list(db.table("devices").rows_where("id = ?", [device]))
    if not rows:
        raise NotFound(f"no device {device!r}; see `greenfleet devices list`")
    return rows[0]


def matching(db: sqlite_utils.Database, selector: dict[str, str]) -> list[str]:
    """Ids of devices whose labels include every ``key=value`` of the selector."""
    found = []
    for row in devices(db):
        labels = json.loads(row["labels"] or "{}")
        labels.setdefault("class", row["device_class"])
        if all(labels.get(k) == v for k, v in selector.items()):
            found.append(row["id"])
    return found


def set_desired(
    db: sqlite_utils.Database, device_ids: list[str], model: str, *, rollback: bool = False
) -> None:
    """Record intent; the daemon's reconcile loop acts on it.

    ``rollback`` marks an explicit rollback: the agent may then accept an older version.
    """
    for device in device_ids:
        try:
            check_device_id(device)
        except ProtocolError as exc:
            raise InvalidRequest(str(exc)) from exc
        if not list(db.table("devices").rows_where("id = ?", [device])):
            raise NotFound(
                f"no device {device!r}; a device appears once its agent has connected "
                "(see `greenfleet devices list`)"
            )
    with db.conn:
        for device in device_ids:
            db.table("devices").update(
                device, {"desired_model": model, "desired_rollback": int(rollback)}
            )


def views(db: sqlite_utils.Database, rows: list[dict[str, Any]] | None = None) -> list[DeviceView]:
    """What reconcile needs of each device (from ``rows`` when the caller has read them)."""
    return [
        DeviceView(
            id=r["id"],
            online=bool(r["online"]),
            active_model=r["active_model"],
            desired_model=r["desired_model"],
            runtimes=frozenset(json.loads(r["runtimes"] or "[]")),
        )
        for r in (devices(db) if rows is None else rows)
    ]


def last_deploys(db: sqlite_utils.Database) -> dict[str, LastDeploy]:
    rows = db.execute(
        "SELECT device, model, sent_at, status FROM deployments d WHERE sent_at = "
        "(SELECT MAX(sent_at) FROM deployments WHERE device = d.device)"
    ).fetchall()
    return {
        device: LastDeploy(model, datetime.fromisoformat(sent_at), status)
        for device, model, sent_at, status in rows
    }
