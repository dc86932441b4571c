"""Ingest: everything agents publish, decoded once and written to SQLite in batches.

The MQTT network thread only calls :meth:`Ingest.offer`, which puts the raw message on a
bounded queue (blocking the network thread when full, which pushes back on the broker instead
of growing memory). One thread drains the queue and writes up to ``BATCH`` messages per
transaction. Telemetry rows are keyed (device, session, seq), so a replayed record is ignored.
Blob requests are not written: they go straight to the blob server.

Births, telemetry and tier_changed events each name the agent's fallback tier; the newest of
them (by the agent's own timestamps) is kept on the device row as its current tier.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agent import protocol as p
from controller import registry
from controller.db import open_db

log = logging.getLogger(__name__)

BATCH = 500
QUEUE_LIMIT = 20_000


def telemetry_rows(device: str, batch: p.TelemetryBatch, received: str) -> list[dict[str, Any]]:
    rows = []
    for r in batch.records:
        row = r.model_dump(mode="json")
        row.update(
            device=device,
            session=batch.session,
            model=str(r.model) if r.model else None,
            received_at=received,
        )
        rows.append(row)
    return rows


def reported_tier(message: p.TelemetryBatch | p.Event) -> tuple[datetime, str] | None:
    """The tier a telemetry batch or a tier_changed event reports, and as of when."""
    if isinstance(message, p.TelemetryBatch):
        ends = [
            (registry.as_utc(r.start) + timedelta(seconds=r.window_s), r) for r in message.records
        ]
        end, last = max(ends, key=lambda item: item[0])
        return end, last.tier.value
    if message.event is p.EventKind.TIER_CHANGED:
        try:
            return registry.as_utc(message.ts), p.Tier(str(message.detail.get("to"))).value
        except ValueError:
            log.warning("tier_changed event %s names no known tier: %s", message.id, message.detail)
    return None


def _newer(
    tiers: dict[str, tuple[datetime, str]], device: str, found: tuple[datetime, str] | None
) -> None:
    if found is not None and (device not in tiers or tiers[device][0] <= found[0]):
        tiers[device] = found


class Ingest:
    """Queue + writer thread for agent messages."""

    def __init__(
        self,
        database: Path,
        on_blob_request: Callable[[str, p.BlobRequest], None],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._database = database
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._on_blob_request = on_blob_request
        self._on_change = on_change
        self._thread = threading.Thread(target=self._run, name="gf-ingest", daemon=True)
        self.rejected = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def offer(self, topic: str, payload: bytes) -> None:
        """Network thread: enqueue, waiting if the writer is behind (back-pressure, no drops)."""
        self._queue.put((topic, payload))

    def _run(self) -> None:
        db = open_db(self._database)
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._write(db, batch)
                    return
                batch.append(nxt)
            self._write(db, batch)

    def _write(self, db: Any, batch: list[tuple[str, bytes]]) -> None:
        now = p.utcnow()
        received = registry.iso(now)
        telemetry: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        replies: list[dict[str, Any]] = []
        tiers: dict[str, tuple[datetime, str]] = {}
        seen: set[str] = set()
        changed = False
        try:
            with db.conn:
                for topic, payload in batch:
                    try:
                        parsed = p.parse_topic(topic)
                        message = p.decode(payload)
                    except p.ProtocolError as exc:
                        self.rejected += 1
                        log.warning("rejected message on %s: %s", topic, exc)
                        continue
                    device = parsed.device
                    seen.add(device)
                    if isinstance(message, p.BlobRequest):
                        self._on_blob_request(device, message)
                    elif isinstance(message, p.Birth):
                        registry.apply_birth(db, device, message, now)
                        changed = True
                    elif isinstance(message, p.Death):
                        seen.discard(device)
                        changed |= registry.apply_death(db, device, message, now)
                    elif isinstance(message, p.TelemetryBatch):
                        telemetry.extend(telemetry_rows(device, message, received))
                        _newer(tiers, device, reported_tier(message))
                    elif isinstance(message, p.Event):
                        _newer(tiers, device, reported_tier(message))
                        events.append(
                            {
                                "id": message.id,
                                "device": device,
                                "ts": registry.iso(message.ts),
                                "session": message.session,
                                "event": message.event.value,
                                "message": message.message,
                                "detail": json.dumps(message.detail),
                            }
                        )
                    elif isinstance(message, p.Reply):
                        replies.append(
                            {
                                "id": message.id,
                                "device": device,
                                "ref": message.ref,
                                "ts": registry.iso(message.ts),
                                "ok": int(message.ok),
                                "error": message.error,
                                "detail": json.dumps(message.detail),
                            }
                        )
                    else:
                        log.warning("ignored %s message on %s", message.kind, topic)
                if telemetry:
                    db.table("telemetry").insert_all(telemetry, ignore=True)
                if events:
                    db.table("events").insert_all(events, ignore=True)
                if replies:
                    db.table("replies").insert_all(replies, ignore=True)
                    for r in replies:
                        db.execute(
                            "UPDATE deployments SET status = ?, error = ?, replied_at = ? "
                            "WHERE id = ?",
                            ["ok" if r["ok"] else "failed", r["error"], r["ts"], r["ref"]],
                        )
                for device, (at, tier) in tiers.items():
                    registry.note_tier(db, device, tier, at)
                registry.touch(db, seen, now)
        except Exception:
            log.exception("ingest batch of %d messages failed", len(batch))
        if changed:
            self._on_change()
