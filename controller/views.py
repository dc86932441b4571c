"""Read models for the operator: fleet rows joined with their latest telemetry.

Shared by the CLI tables, ``--json`` output and the demo screen, so all three agree.
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from controller import registry


def latest_telemetry(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    rows = db.execute(
        "SELECT * FROM telemetry t WHERE rowid = (SELECT rowid FROM telemetry "
        "WHERE device = t.device ORDER BY start DESC LIMIT 1)"
    )
    cols = [c[0] for c in rows.description]
    return {r[0]: dict(zip(cols, r, strict=True)) for r in rows.fetchall()}


def fleet(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """One dict per device: registry facts, intent, and the newest telemetry window."""
    telemetry = latest_telemetry(db)
    out = []
    for row in registry.devices(db):
        t = telemetry.get(row["id"], {})
        out.append(
            {
                "id": row["id"],
                "device_class": row["device_class"],
                "labels": json.loads(row["labels"] or "{}"),
                "online": bool(row["online"]),
                "agent_version": row["agent_version"],
                "runtimes": json.loads(row["runtimes"] or "[]"),
                "active_model": row["active_model"],
                "desired_model": row["desired_model"],
                "last_seen": row["last_seen"],
                "inferences": t.get("inferences"),
                "window_s": t.get("window_s"),
                "latency_p50_ms": t.get("latency_p50_ms"),
                "latency_p95_ms": t.get("latency_p95_ms"),
                "errors": t.get("errors"),
                "power_w": t.get("power_w"),
                "energy_per_inference_j": t.get("energy_per_inference_j"),
                "power_method": t.get("power_method"),
            }
        )
    return out


def hardware_mismatches(row: dict[str, Any]) -> list[dict[str, str]]:
    """Where the facts the agent reported disagree with its hardware class's profile."""
    from agent.protocol import HardwareFacts
    from controller.hardware_check import check_device
    from device_configs.schema import ProfileError, load_profiles

    if not row.get("hardware"):
        return []
    try:
        profiles = load_profiles()
    except ProfileError as exc:
        return [{"field": "profiles", "severity": "error", "message": str(exc)}]
    facts = HardwareFacts.model_validate_json(row["hardware"])
    runtimes = json.loads(row.get("runtimes") or "[]")
    return [
        {"field": m.field, "severity": m.severity.value, "message": m.message}
        for m in check_device(row["device_class"], facts, runtimes, profiles)
    ]


def device_detail(db: sqlite_utils.Database, device: str, events: int = 10) -> dict[str, Any]:
    row = registry.get_device(db, device)
    detail = next(d for d in fleet(db) if d["id"] == device)
    detail["hardware"] = json.loads(row["hardware"] or "{}")
    detail["hardware_check"] = hardware_mismatches(row)
    detail["session"] = row["session"]
    detail["first_seen"] = row["first_seen"]
    detail["recent_events"] = [
        {"ts": e["ts"], "event": e["event"], "message": e["message"]}
        for e in db.table("events").rows_where(
            "device = ?", [device], order_by="ts DESC", limit=events
        )
    ]
    detail["recent_deployments"] = [
        {k: d[k] for k in ("model", "sent_at", "status", "error")}
        for d in db.table("deployments").rows_where(
            "device = ?", [device], order_by="sent_at DESC", limit=5
        )
    ]
    return detail


def recent_events(db: sqlite_utils.Database, limit: int = 10) -> list[dict[str, Any]]:
    return [
        {"ts": e["ts"], "device": e["device"], "event": e["event"], "message": e["message"]}
        for e in db.table("events").rows_where(order_by="ts DESC", limit=limit)
    ]
