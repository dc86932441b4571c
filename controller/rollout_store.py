"""Rollout state in SQLite: :class:`controller.rollout.RolloutState` <-> rows.

A rollout is one row of ``rollouts`` and one row of ``rollout_members`` per device; fields the
schema has no column for go to their ``extra`` JSON. Every change to a rollout goes through
:func:`commit_step` inside :func:`write_transaction`: the new state, the desired models it sets
and the events it records are committed together, so a controller killed at any point either
made a decision completely or not at all, and makes it again after a restart.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any, get_type_hints

import sqlite_utils
from pydantic import TypeAdapter

from agent.protocol import new_id
from controller import registry
from controller.errors import DatabaseError, NotFound
from controller.rollout import (
    GateResult,
    Member,
    MemberStatus,
    RolloutEvent,
    RolloutSpec,
    RolloutState,
    Status,
    Step,
    needs_advance,
)

LIVE = (Status.RUNNING, Status.PAUSED, Status.ABORTING)  # the daemon advances these

_STATE_COLUMNS = {
    "id",
    "spec",
    "status",
    "created",
    "wave",
    "waves",
    "wave_started",
    "soak_started",
    "metrics_since",
    "members",
    "reason",
}
_MEMBER_COLUMNS = {"device", "wave", "previous_model", "status", "since", "reason"}


# -------------------------------------------------------------------------------- transactions


@contextmanager
def write_transaction(db: sqlite_utils.Database) -> Iterator[None]:
    """One IMMEDIATE transaction: it takes the write lock up front, so the daemon's advance
    and an operator's ``rollout pause`` never both read a state and overwrite each other."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot lock the controller database: {exc}") from exc
    try:
        yield
    except BaseException:
        db.rollback()
        raise
    db.commit()


# ---------------------------------------------------------------------------------- encoding


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()  # full precision: exact round trip


def _parse_ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _extra(obj: Any, columns: set[str]) -> str:
    """Fields added to a state dataclass that have no column yet, as JSON."""
    hints = _hints(type(obj))
    return json.dumps(
        {
            f.name: TypeAdapter(hints[f.name]).dump_python(getattr(obj, f.name), mode="json")
            for f in dataclasses.fields(obj)
            if f.name not in columns
        },
        sort_keys=True,
    )


def _from_extra(cls: type, text: str | None) -> dict[str, Any]:
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    return {
        name: TypeAdapter(hints[name]).validate_python(value)
        for name, value in json.loads(text or "{}").items()
        if name in known  # a field that was dropped again
    }


def _rollout_row(state: RolloutState, updated: datetime) -> dict[str, Any]:
    return {
        "id": state.id,
        "model": state.spec.model,
        "spec": state.spec.model_dump_json(),
        "status": state.status.value,
        "wave": state.wave,
        "waves": state.waves,
        "wave_started": _ts(state.wave_started),
        "soak_started": _ts(state.soak_started),
        "metrics_since": _ts(state.metrics_since),
        "reason": state.reason,
        "created": _ts(state.created),
        "updated": _ts(updated),
        "extra": _extra(state, _STATE_COLUMNS),
    }


def _member_row(rollout_id: str, m: Member) -> dict[str, Any]:
    return {
        "rollout": rollout_id,
        "device": m.device,
        "wave": m.wave,
        "previous_model": m.previous_model,
        "status": m.status.value,
        "since": _ts(m.since),
        "reason": m.reason,
        "extra": _extra(m, _MEMBER_COLUMNS),
    }


def _member(row: dict[str, Any]) -> Member:
    return Member(
        device=row["device"],
        wave=row["wave"],
        previous_model=row["previous_model"],
        status=MemberStatus(row["status"]),
        since=_parse_ts(row["since"]),
        reason=row["reason"] or "",
        **_from_extra(Member, row["extra"]),
    )


def _state(row: dict[str, Any], members: list[Member]) -> RolloutState:
    return RolloutState(
        id=row["id"],
        spec=RolloutSpec.model_validate_json(row["spec"]),
        status=Status(row["status"]),
        created=datetime.fromisoformat(row["created"]),
        wave=row["wave"],
        waves=row["waves"],
        wave_started=_parse_ts(row["wave_started"]),
        soak_started=_parse_ts(row["soak_started"]),
        metrics_since=_parse_ts(row["metrics_since"]),
        members=tuple(members),
        reason=row["reason"] or "",
        **_from_extra(RolloutState, row["extra"]),
    )


# ------------------------------------------------------------------------------------ reading


def load(db: sqlite_utils.Database, rollout_id: str) -> RolloutState:
    rows = list(db.table("rollouts").rows_where("id = ?", [rollout_id]))
    if not rows:
        raise NotFound(f"no rollout {rollout_id!r}; see `greenfleet rollout list`")
    return _state(rows[0], _members(db, rollout_id))


def _members(db: sqlite_utils.Database, rollout_id: str) -> list[Member]:
    return [
        _member(r)
        for r in db.table("rollout_members").rows_where(
            "rollout = ?", [rollout_id], order_by="wave, rowid"
        )
    ]


# what rollout.needs_advance keeps advancing: live, or aborted with rollbacks still pending
_ADVANCING = (
    f"status IN ({','.join(repr(s.value) for s in LIVE)}) OR (status = 'aborted' AND EXISTS "
    "(SELECT 1 FROM rollout_members m WHERE m.rollout = rollouts.id AND m.status = "
    f"'{MemberStatus.ROLLING_BACK.value}'))"
)


def load_all(db: sqlite_utils.Database, advancing: bool = False) -> list[RolloutState]:
    """Every rollout (or only those the daemon still advances), oldest first."""
    rows = db.table("rollouts").rows_where(
        _ADVANCING if advancing else None, order_by="created, id"
    )
    states = [_state(r, _members(db, r["id"])) for r in rows]
    return [s for s in states if needs_advance(s)] if advancing else states


def revision(db: sqlite_utils.Database, rollout_id: str) -> str | None:
    """When the rollout was last written: a decision made from an older read is stale."""
    row = db.execute("SELECT updated FROM rollouts WHERE id = ?", [rollout_id]).fetchone()
    return None if row is None else str(row[0])


def revisions(db: sqlite_utils.Database) -> dict[str, str]:
    """:func:`revision` of every rollout."""
    return {str(i): str(u) for i, u in db.execute("SELECT id, updated FROM rollouts")}


def gates(db: sqlite_utils.Database, rollout_id: str) -> dict[str, Any]:
    """The gate results of the rollout's last decision: ``{"wave", "at", "results"}``."""
    row = db.execute("SELECT gates FROM rollouts WHERE id = ?", [rollout_id]).fetchone()
    empty: dict[str, Any] = {"wave": None, "at": None, "results": []}
    return json.loads(row[0]) if row and row[0] else empty


def events(db: sqlite_utils.Database, rollout_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The rollout's events, newest first."""
    return [
        {
            "ts": e["ts"],
            "device": e["device"] or None,
            "event": e["event"],
            "message": e["message"],
        }
        for e in db.table("events").rows_where(
            "rollout = ?", [rollout_id], order_by="ts DESC, rowid DESC", limit=limit
        )
    ]


def next_id(db: sqlite_utils.Database) -> str:
    """``r1``, ``r2`` ...: short enough to type (call inside the creating transaction)."""
    row = db.execute(
        "SELECT MAX(CAST(substr(id, 2) AS INTEGER)) FROM rollouts WHERE id GLOB 'r[0-9]*'"
    ).fetchone()
    return f"r{(row[0] or 0) + 1}"


# ------------------------------------------------------------------------------------ writing


def save(
    db: sqlite_utils.Database,
    state: RolloutState,
    now: datetime,
    previous: RolloutState | None = None,
) -> None:
    """Write ``state`` (only the members that differ from ``previous``, when given)."""
    last = revision(db, state.id)
    updated = now
    if last is not None and updated <= datetime.fromisoformat(last):
        updated = datetime.fromisoformat(last) + timedelta(microseconds=1)  # always moves on
    db.table("rollouts").upsert(_rollout_row(state, updated), pk="id")
    before = {m.device: m for m in previous.members} if previous else {}
    changed = [m for m in state.members if before.get(m.device) != m]
    if changed:
        db.table("rollout_members").upsert_all(
            [_member_row(state.id, m) for m in changed], pk=("rollout", "device")
        )
    gone = set(before) - {m.device for m in state.members}
    for device in gone:
        db.execute(
            "DELETE FROM rollout_members WHERE rollout = ? AND device = ?", [state.id, device]
        )


def save_gates(
    db: sqlite_utils.Database,
    rollout_id: str,
    wave: int,
    results: tuple[GateResult, ...],
    now: datetime,
) -> bool:
    """Record the gate results of a decision; none keeps those already recorded for the same
    wave (the last verdict stays visible). Returns whether anything was written."""
    current = gates(db, rollout_id)
    if not results and current["wave"] == wave:
        return False
    listed = [asdict(g) for g in results]
    if current["wave"] == wave and current["results"] == listed:
        return False
    value = {"wave": wave, "at": registry.iso(now), "results": listed}
    db.execute("UPDATE rollouts SET gates = ? WHERE id = ?", [json.dumps(value), rollout_id])
    return True


def record_events(
    db: sqlite_utils.Database, state: RolloutState, found: tuple[RolloutEvent, ...], now: datetime
) -> None:
    """Rollout events go to the events table: on the member's device (so ``devices show``
    lists them) or on no device (``""``), with the rollout id in ``rollout`` and the detail."""
    stamp = registry.iso(now)
    db.table("events").insert_all(
        [
            {
                "id": new_id(),
                "device": e.device or "",
                "ts": stamp,
                "session": "controller",
                "event": e.kind,
                "message": e.message,
                "detail": json.dumps(
                    {"rollout": state.id, "model": state.spec.model, "wave": state.wave}
                ),
                "rollout": state.id,
            }
            for e in found
        ],
        pk="id",
    )


def commit_step(
    db: sqlite_utils.Database, step: Step, now: datetime, previous: RolloutState | None
) -> bool:
    """Persist a decision: its state, gate results, desired models and events. Call inside
    :func:`write_transaction`. Returns whether desired models changed (reconcile has work)."""
    if step.state != previous:
        save(db, step.state, now, previous)
    save_gates(db, step.state.id, step.state.wave, step.gates, now)
    by_target: dict[tuple[str, bool], list[str]] = {}
    for change in step.changes:
        by_target.setdefault((change.model, change.rollback), []).append(change.device)
    for (model, rollback), devices in by_target.items():
        registry.set_desired(db, devices, model, rollback=rollback)
    if step.events:
        record_events(db, step.state, step.events, now)
    return bool(step.changes)
