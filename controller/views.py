"""Read models for the operator: fleet rows joined with their latest telemetry.

Shared by the CLI tables, ``--json`` output and the demo screen, so all three agree.
"""

from __future__ import annotations

import json
from typing import Any

import sqlite_utils

from controller import registry


def latest_telemetry(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    # telemetry_latest is kept by a trigger (controller.db, m8): no scan of the table
    rows = db.execute("SELECT t.* FROM telemetry_latest l JOIN telemetry t ON t.rowid = l.row")
    cols = [c[0] for c in rows.description]
    return {r[0]: dict(zip(cols, r, strict=True)) for r in rows.fetchall()}


def fleet(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """One dict per device: registry facts, intent, and the newest telemetry window."""
    telemetry = latest_telemetry(db)
    out = []
    for row in registry.devices(db, revoked=True):
        # a revoked device keeps its row, shown as such, without live figures
        t = {} if row.get("revoked") else telemetry.get(row["id"], {})
        out.append(
            {
                "id": row["id"],
                "device_class": row["device_class"],
                "labels": json.loads(row["labels"] or "{}"),
                "online": bool(row["online"]),
                "revoked": bool(row.get("revoked")),
                "revoked_at": row.get("revoked_at"),
                "rejected_messages": row.get("rejected_messages") or 0,
                "outbox_dropped": row.get("outbox_dropped") or 0,
                "agent_version": row["agent_version"],
                "runtimes": json.loads(row["runtimes"] or "[]"),
                "active_model": row["active_model"],
                "tier": row.get("tier"),
                "fallback_model": row.get("fallback_model"),
                "desired_model": row["desired_model"],
                "pinned": bool(row.get("pinned")),
                "pin_reason": row.get("pin_reason"),
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
    from agent.protocol import HardwareFacts, load
    from controller.hardware_check import check_device
    from device_configs.schema import ProfileError, load_profiles

    if not row.get("hardware"):
        return []
    try:
        profiles = load_profiles()
    except ProfileError as exc:
        return [{"field": "profiles", "severity": "error", "message": str(exc)}]
    facts = load(HardwareFacts, row["hardware"])
    runtimes = json.loads(row.get("runtimes") or "[]")
    return [
        {"field": m.field, "severity": m.severity.value, "message": m.message}
        for m in check_device(row["device_class"], facts, runtimes, profiles)
    ]


def event_text(event: str, message: str, detail: dict[str, Any]) -> str:
    """An event's message, or for a tier change without one, ``from -> to: cause``."""
    if message or event != "tier_changed":
        return message
    return f"{detail.get('from', '?')} -> {detail.get('to', '?')}: {detail.get('cause', '')}"


def _events(rows: Any) -> list[dict[str, Any]]:
    out = []
    for e in rows:
        detail = json.loads(e["detail"] or "{}")
        out.append(
            {
                "ts": e["ts"],
                "event": e["event"],
                "message": event_text(e["event"], e["message"], detail),
                "detail": detail,
            }
        )
    return out


def deploy_retry(db: sqlite_utils.Database, device: str) -> dict[str, Any] | None:
    """The device's newest active deploy if it failed: why, how often in a row, and when the
    controller tries again (``greenfleet deploy ... --retry`` tries now)."""
    from datetime import timedelta

    from controller.reconcile import next_try

    last = registry.last_deploys(db, "active").get(device)
    due = next_try(last, timedelta(minutes=5))
    if last is None or due is None:
        return None
    return {
        "model": last.model,
        "error": last.error,
        "failures": last.failures,
        "next_try": registry.iso(due),
    }


def budgets(row: dict[str, Any]) -> dict[str, Any]:
    """The budgets the agent applies (its birth) and those the controller plans with (class
    profile, label overrides; sent with the next active deploy)."""
    from agent.protocol import Budgets, load, to_builtins
    from controller.planning import device_budgets
    from device_configs.schema import ProfileError, load_profiles

    applied = load(Budgets, row["budgets"]) if row.get("budgets") else None
    try:
        profile = load_profiles().get(row.get("device_class") or "")
    except ProfileError:
        profile = None
    planned = device_budgets(row, profile) if profile is not None else None
    return {
        "applied": to_builtins(applied) if applied else None,
        "planned": to_builtins(planned) if planned else None,
    }


def device_detail(
    db: sqlite_utils.Database, device: str, events: int = 10, tier_changes: int = 5
) -> dict[str, Any]:
    """Everything ``devices show`` prints about one device.

    Tier changes are listed on their own as well: deploy progress events can push them out of
    the recent events, and they are what explains a device answering from a fallback tier.
    """
    row = registry.get_device(db, device)
    detail = next(d for d in fleet(db) if d["id"] == device)
    detail["hardware"] = json.loads(row["hardware"] or "{}")
    detail["hardware_check"] = hardware_mismatches(row)
    detail["session"] = row["session"]
    detail["first_seen"] = row["first_seen"]
    detail["last_good_model"] = row.get("last_good_model")
    detail["fallback_sha256"] = row.get("fallback_sha256")
    detail["tier_at"] = row.get("tier_at")
    detail["preloaded_model"] = row.get("preloaded_model")
    detail["last_rejection"] = row.get("last_rejection")
    detail["budgets"] = budgets(row)
    detail["deploy_retry"] = deploy_retry(db, device)
    detail["recent_events"] = _events(
        db.table("events").rows_where("device = ?", [device], order_by="ts DESC", limit=events)
    )
    detail["recent_tier_changes"] = _events(
        db.table("events").rows_where(
            "device = ? AND event = 'tier_changed'",
            [device],
            order_by="ts DESC",
            limit=tier_changes,
        )
    )
    detail["recent_deployments"] = [
        {k: d[k] for k in ("model", "slot", "sent_at", "status", "error")}
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
