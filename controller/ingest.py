"""Ingest: everything agents publish, decoded once and written to SQLite in batches.

The MQTT network thread only calls :meth:`Ingest.offer`, which puts the raw message on a
bounded queue (blocking the network thread when full, which pushes back on the broker instead
of growing memory). One thread drains the queue and writes up to ``BATCH`` messages per
transaction. Telemetry rows are keyed (device, session, seq), so a replayed record is ignored.
Chunk requests never come here: the controller hands them to its blob server.

A message may come with an ``ack``: it is called only after the transaction that stored the
message has committed (the ingest workers of ``controller.ingest_workers`` acknowledge to the
broker then, so a message that dies with the process is delivered again). A batch the database
refuses for a reason that passes (locked by another writer, disk full, an I/O error) is retried
with backoff, holding its messages, not dropped; the bounded queue then pushes back on the
broker.

Births, telemetry and tier_changed events each name the agent's fallback tier; the newest of
them (by the agent's own timestamps) is kept on the device row as its current tier.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
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
RETRY_S = (0.5, 30.0)  # first and longest wait before writing a refused batch again

Ack = Callable[[], None]
Item = tuple[str, bytes, Ack | None]


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


def insert_new(db: Any, table: str, rows: list[dict[str, Any]]) -> None:
    """INSERT OR IGNORE rows that all have the keys of the first, in one ``executemany``.

    Not sqlite-utils' ``insert_all``: it builds multi-row statements in savepoints and checks
    every value for JSON, which was 65% of ingest's time per message (measured: 103 µs per
    telemetry message in batches of 500 with it)."""
    if not rows:
        return
    columns = list(rows[0])
    sql = (
        f"INSERT OR IGNORE INTO [{table}] ({', '.join(f'[{c}]' for c in columns)}) "
        f"VALUES ({', '.join('?' * len(columns))})"
    )
    db.conn.executemany(sql, [tuple(row[c] for c in columns) for row in rows])


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
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._database = database
        self._queue: queue.Queue[Item | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._on_change = on_change
        self._thread = threading.Thread(target=self._run, name="gf-ingest", daemon=True)
        self._stopping = threading.Event()
        self.rejected = 0
        self.retries = 0  # batches written again after the database refused them

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):  # full: the writer is stuck retrying a batch
            self._queue.put(None, timeout=10)
        self._thread.join(timeout=10)
        self._stopping.set()  # a batch still retrying gives up; its messages were not acked
        self._thread.join(timeout=5)

    def offer(self, topic: str, payload: bytes, ack: Ack | None = None) -> None:
        """Network thread: enqueue, waiting if the writer is behind (back-pressure, no drops).

        ``ack`` is called once the message is committed."""
        self._queue.put((topic, payload, ack))

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
                    self._commit(db, batch)
                    return
                batch.append(nxt)
            self._commit(db, batch)

    def _commit(self, db: Any, batch: list[Item]) -> None:
        """Write ``batch``, again and again while SQLite refuses it for a passing reason; then
        acknowledge its messages."""
        decoded = self._decode(batch)
        wait = RETRY_S[0]
        while True:
            try:
                self._write(db, decoded)
                break
            except sqlite3.OperationalError as exc:  # locked, disk full, I/O error
                self.retries += 1
                log.warning(
                    "could not store %d messages (%s); retrying in %.1f s, holding them",
                    len(batch),
                    exc,
                    wait,
                )
                if self._stopping.wait(wait):
                    return
                wait = min(wait * 2, RETRY_S[1])
            except Exception:
                log.exception("ingest batch of %d messages failed; dropped", len(batch))
                break
        for _topic, _payload, ack in batch:
            if ack is not None:
                ack()

    def _decode(self, batch: list[Item]) -> list[tuple[str, str, p.Message]]:
        """(topic, device, message) for every well-formed message, once per batch however
        often it is written."""
        decoded = []
        for topic, payload, _ack in batch:
            try:
                parsed = p.parse_topic(topic)
                message = p.decode(payload)
            except p.ProtocolError as exc:
                self.rejected += 1
                log.warning("rejected message on %s: %s", topic, exc)
                continue
            decoded.append((topic, parsed.device, message))
        return decoded

    def _write(self, db: Any, decoded: list[tuple[str, str, p.Message]]) -> None:
        now = p.utcnow()
        received = registry.iso(now)
        telemetry: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        replies: list[dict[str, Any]] = []
        tiers: dict[str, tuple[datetime, str]] = {}
        seen: set[str] = set()
        changed = False
        with db.conn:
            for topic, device, message in decoded:
                seen.add(device)
                if isinstance(message, p.Birth):
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
            insert_new(db, "telemetry", telemetry)
            insert_new(db, "events", events)
            if replies:
                insert_new(db, "replies", replies)
                for r in replies:
                    db.execute(
                        "UPDATE deployments SET status = ?, error = ?, replied_at = ? WHERE id = ?",
                        ["ok" if r["ok"] else "failed", r["error"], r["ts"], r["ref"]],
                    )
            for device, (at, tier) in tiers.items():
                registry.note_tier(db, device, tier, at)
            registry.touch(db, seen, now)
        if changed:
            self._on_change()
