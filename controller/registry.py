"""The device registry: what the controller knows about every device, kept in SQLite."""

from __future__ import annotations

import json
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

import sqlite_utils

from agent.protocol import Birth, Death, ProtocolError, check_device_id, encode, new_id
from controller.errors import InvalidRequest, NotFound
from controller.reconcile import DeviceView, LastDeploy


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds")


def as_utc(ts: datetime) -> datetime:
    """``ts`` in UTC; a timestamp without a zone (a foreign sender) is taken to be UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def iso_utc(ts: datetime) -> str:
    """``iso`` in UTC, so that stored agent timestamps compare correctly as text."""
    return iso(as_utc(ts))


def apply_birth(db: sqlite_utils.Database, device: str, birth: Birth, now: datetime) -> bool:
    """A device came online: record its facts and what it runs. A birth of a revoked device
    (retained on the broker from before the revoke) changes nothing but asks the controller to
    delete it from the broker; returns whether the birth was applied."""
    existing = list(db.table("devices").rows_where("id = ?", [device]))
    if existing and existing[0].get("revoked"):
        db.execute("UPDATE devices SET clear_state = 1 WHERE id = ?", [device])
        return False
    row: dict[str, Any] = {
        "id": device,
        "device_class": birth.device_class,
        "labels": json.dumps(birth.labels, sort_keys=True),
        "online": 1,
        "session": birth.session,
        "agent_version": birth.agent_version,
        "runtimes": json.dumps([r.value for r in birth.runtimes]),
        "hardware": encode(birth.hardware).decode(),
        "active_model": str(birth.active.model) if birth.active else None,
        "active_sha256": birth.active.sha256 if birth.active else None,
        "last_good_model": str(birth.last_good.model) if birth.last_good else None,
        "fallback_model": str(birth.fallback.model) if birth.fallback else None,
        "fallback_sha256": birth.fallback.sha256 if birth.fallback else None,
        "preloaded_model": str(birth.preloaded.model) if birth.preloaded else None,
        "preloaded_sha256": birth.preloaded.sha256 if birth.preloaded else None,
        "budgets": encode(birth.budgets).decode() if birth.budgets else None,
        "last_seen": iso(now),
    }
    if not existing:
        row.update(first_seen=iso(now), state_changed=iso(now), desired_model=None)
    elif not existing[0]["online"] or existing[0]["session"] != birth.session:
        row["state_changed"] = iso(now)
    db.table("devices").upsert(row, pk="id")
    note_tier(db, device, birth.tier.value, birth.ts)
    if birth.outbox_dropped:
        note_outbox_dropped(db, device, birth.outbox_dropped, now)
    return True


def note_outbox_dropped(
    db: sqlite_utils.Database, device: str, dropped: int, now: datetime
) -> None:
    """The agent says its outbox dropped ``dropped`` messages over its life: keep the highest,
    and record a ``telemetry_dropped`` event when it grows (once per report that shows new
    drops: a report comes at most once per telemetry window, and only while they go on)."""
    row = db.execute("SELECT outbox_dropped FROM devices WHERE id = ?", [device]).fetchone()
    if row is None or dropped <= (row[0] or 0):
        return
    db.execute("UPDATE devices SET outbox_dropped = ? WHERE id = ?", [dropped, device])
    db.table("events").insert(
        {
            "id": new_id(),
            "device": device,
            "ts": iso(now),
            "session": "controller",
            "event": "telemetry_dropped",
            "message": f"the agent's outbox dropped {dropped - (row[0] or 0)} more message(s) "
            f"({dropped} in all): records it could neither store nor send",
            "detail": json.dumps({"dropped": dropped, "before": row[0] or 0}),
        },
        pk="id",
    )


def mark_revoked(db: sqlite_utils.Database, device: str, reason: str, now: datetime) -> bool:
    """Record a revoke on the device row (if the device ever connected): offline at once, out
    of plans and rollouts, its retained birth to be deleted from the broker, and an event.
    Returns whether there was a row."""
    if not list(db.table("devices").rows_where("id = ?", [device])):
        return False
    stamp = iso(now)
    with nullcontext() if db.conn.in_transaction else db.conn:
        db.table("devices").update(
            device,
            {
                "online": 0,
                "revoked": 1,
                "revoked_at": stamp,
                "clear_state": 1,
                "state_changed": stamp,
                "desired_model": None,
            },
        )
        db.table("events").insert(
            {
                "id": new_id(),
                "device": device,
                "ts": stamp,
                "session": "controller",
                "event": "device_revoked",
                "message": f"revoked ({reason}): offline, out of plans and rollouts",
                "detail": json.dumps({"reason": reason, "cause": "revoke"}),
            },
            pk="id",
        )
    return True


def mark_enrolled(db: sqlite_utils.Database, device: str) -> None:
    """A revoked device enrolled again: it counts once its agent connects (its birth)."""
    db.execute("UPDATE devices SET revoked = 0, revoked_at = NULL WHERE id = ?", [device])


def states_to_clear(db: sqlite_utils.Database) -> list[str]:
    """Revoked devices whose retained birth may still be on the broker."""
    return [
        row[0]
        for row in db.execute("SELECT id FROM devices WHERE clear_state = 1 ORDER BY id").fetchall()
    ]


def state_cleared(db: sqlite_utils.Database, device: str) -> None:
    with db.conn:
        db.execute("UPDATE devices SET clear_state = 0 WHERE id = ?", [device])


def note_tier(db: sqlite_utils.Database, device: str, tier: str, at: datetime) -> None:
    """Record the tier a device reported at ``at`` (its own clock) unless a newer report is in.

    Births, telemetry and tier_changed events all name the tier, and they do not arrive in
    the order they were made: after a reconnect the agent publishes its birth first and then
    replays buffered telemetry, so the newest report wins, not the last to arrive.
    """
    stamp = iso_utc(at)
    db.execute(
        "UPDATE devices SET tier = ?, tier_at = ? "
        "WHERE id = ? AND (tier_at IS NULL OR tier_at <= ?)",
        [tier, stamp, device, stamp],
    )


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


def devices(db: sqlite_utils.Database, *, revoked: bool = False) -> list[dict[str, Any]]:
    """Device rows; revoked devices only with ``revoked`` (for lists that show them as such):
    plans, rollouts, reconcile and live figures never see them."""
    where = None if revoked else "revoked = 0"
    return list(db.table("devices").rows_where(where, order_by="id"))


def get_device(db: sqlite_utils.Database, device: str) -> dict[str, Any]:
    rows = list(db.table("devices").rows_where("id = ?", [device]))
    if not rows:
        raise NotFound(f"no device {device!r}; see `greenfleet devices list`")
    return rows[0]


def matches(row: dict[str, Any], selector: dict[str, str]) -> bool:
    """Whether a device row's labels (and ``class``, its device class) include the selector."""
    labels = json.loads(row["labels"] or "{}")
    labels.setdefault("class", row["device_class"])
    return all(labels.get(k) == v for k, v in selector.items())


def matching(db: sqlite_utils.Database, selector: dict[str, str]) -> list[str]:
    """Ids of devices whose labels include every ``key=value`` of the selector."""
    return [row["id"] for row in devices(db) if matches(row, selector)]


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
    # inside a caller's transaction (a rollout step), the caller commits, all or nothing
    with nullcontext() if db.conn.in_transaction else db.conn:
        for device in device_ids:
            db.table("devices").update(
                device, {"desired_model": model, "desired_rollback": int(rollback)}
            )


def set_pinned(
    db: sqlite_utils.Database, device: str, pinned: bool, reason: str, now: datetime
) -> dict[str, Any]:
    """Pin a device (rollouts skip it and show it as skipped) or unpin it; a change is
    recorded as an event on the device. Returns the device row as it was before."""
    row = get_device(db, device)
    if bool(row.get("pinned")) == pinned and (row.get("pin_reason") or "") == (
        reason if pinned else ""
    ):
        return row
    with db.conn:
        db.table("devices").update(
            device, {"pinned": int(pinned), "pin_reason": reason if pinned else None}
        )
        db.table("events").insert(
            {
                "id": new_id(),
                "device": device,
                "ts": iso(now),
                "session": "controller",
                "event": "device_pinned" if pinned else "device_unpinned",
                "message": ("pinned" if pinned else "unpinned") + (f": {reason}" if reason else ""),
                "detail": json.dumps({"reason": reason}),
            },
            pk="id",
        )
    return row


def views(db: sqlite_utils.Database, rows: list[dict[str, Any]] | None = None) -> list[DeviceView]:
    """What reconcile needs of each device (from ``rows`` when the caller has read them)."""
    return [
        DeviceView(
            id=r["id"],
            online=bool(r["online"]),
            active_model=r["active_model"],
            desired_model=r["desired_model"],
            runtimes=frozenset(json.loads(r["runtimes"] or "[]")),
            fallback_model=r.get("fallback_model"),
            preloaded_model=r.get("preloaded_model"),
        )
        for r in (devices(db) if rows is None else rows)
    ]


def last_deploys(db: sqlite_utils.Database, slot: str = "active") -> dict[str, LastDeploy]:
    """The newest deploy per device into ``slot`` (agent.protocol.Slot): each slot keeps its
    own resend and retry clock, so staging a fallback never looks like a new active deploy."""
    rows = db.execute(
        "SELECT device, model, sent_at, status, error FROM deployments d WHERE slot = ? AND "
        "sent_at = (SELECT MAX(sent_at) FROM deployments WHERE device = d.device AND slot = ?)",
        [slot, slot],
    ).fetchall()
    failed = [(device, model) for device, model, _, status, _ in rows if status == "failed"]
    streaks = {key: _failures_in_a_row(db, slot, *key) for key in failed}
    return {
        device: LastDeploy(
            model,
            datetime.fromisoformat(sent_at),
            status,
            error,
            streaks.get((device, model), 1),
        )
        for device, model, sent_at, status, error in rows
    }


def _failures_in_a_row(db: sqlite_utils.Database, slot: str, device: str, model: str) -> int:
    """Failed deploys of ``model`` to ``device`` since its last one that did not fail."""
    recent = db.execute(
        "SELECT model, status FROM deployments WHERE device = ? AND slot = ? "
        "ORDER BY sent_at DESC LIMIT 16",
        [device, slot],
    ).fetchall()
    count = 0
    for m, status in recent:
        if m != model or status != "failed":
            break
        count += 1
    return max(count, 1)


def retry_now(db: sqlite_utils.Database, devices: list[str]) -> int:
    """Mark the newest failed deploy of each device as ``retry``: reconcile sends it again at
    its next pass instead of waiting out the retry delay. Returns how many were failed."""
    with db.conn:
        cursor = db.execute(
            "UPDATE deployments SET status = 'retry' WHERE status = 'failed' AND sent_at = "
            "(SELECT MAX(sent_at) FROM deployments d WHERE d.device = deployments.device AND "
            f"d.slot = deployments.slot) AND device IN ({','.join('?' * len(devices))})",
            devices,
        )
    return cursor.rowcount or 0
