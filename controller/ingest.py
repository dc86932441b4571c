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

Agents keep a telemetry batch or an event in their outbox until the controller says it is
stored: after every commit ``on_stored`` gets, per device, the envelope ids of the telemetry
batches and events the database now holds (new or stored before) and of those it refused for
good (malformed, or failing on their own), and the controller publishes them as
``protocol.Stored`` on the device's ack topic. A message that fails inside a batch is written
again alone, so one device's bad record never costs the batch, nor another device its data.

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
REJECTION_EVENT_S = 600.0  # at most one messages_rejected event per device this often

Ack = Callable[[], None]
Item = tuple[str, bytes, Ack | None]
Decoded = tuple[str, str, p.Message]  # topic, device, message
# device -> (ids stored, ids refused for good), after the transaction that stored them
OnStored = Callable[[dict[str, tuple[list[str], list[str]]]], None]


def stored_messages(acks: dict[str, tuple[list[str], list[str]]]) -> list[tuple[str, bytes]]:
    """The ``protocol.Stored`` messages that tell agents what ingest stored: (topic, payload)
    per device, each naming at most ``protocol.MAX_ACKED`` ids."""
    out = []
    for device, (ids, rejected) in acks.items():
        topic = p.topic(device, p.Channel.ACK)
        for start in range(0, max(len(ids), len(rejected)), p.MAX_ACKED):
            end = start + p.MAX_ACKED
            out.append(
                (topic, p.encode(p.Stored(ids=ids[start:end], rejected=rejected[start:end])))
            )
    return out


def telemetry_rows(device: str, batch: p.TelemetryBatch, received: str) -> list[dict[str, Any]]:
    rows = []
    for r in batch.records:
        row = p.to_builtins(r)
        del row["outbox_dropped"]  # a counter of the device, not of the window (registry)
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
        on_stored: OnStored | None = None,
    ) -> None:
        self._database = database
        self._queue: queue.Queue[Item | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self._on_change = on_change
        self._on_stored = on_stored
        self._thread = threading.Thread(target=self._run, name="gf-ingest", daemon=True)
        self._stopping = threading.Event()
        self.rejected = 0
        self._rejections: dict[str, list[str]] = {}  # device -> reasons, until recorded
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
        acknowledge its messages to the broker, and the stored ones to their agents."""
        decoded, refused = self._decode(batch)
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
            except Exception as exc:  # one message the database or our code cannot take
                log.warning(
                    "an ingest batch of %d failed (%r); writing it one by one", len(batch), exc
                )
                decoded = self._write_alone(db, decoded, refused)
                break
        for _topic, _payload, ack in batch:
            if ack is not None:
                ack()
        self._tell_agents(decoded, refused)
        self._record_rejections(db)

    def _reject(self, device: str, topic: str, reason: str) -> None:
        self.rejected += 1
        log.warning("rejected message on %s: %s", topic, reason[:500])
        self._rejections.setdefault(device, []).append(reason[:500])

    def _record_rejections(self, db: Any) -> None:
        """Count refused messages on their device's row (``devices show``, /metrics) and
        record a ``messages_rejected`` event at most every REJECTION_EVENT_S per device."""
        rejections, self._rejections = self._rejections, {}
        if not rejections:
            return
        now = p.utcnow()
        stamp = registry.iso(now)
        quiet_since = registry.iso(now - timedelta(seconds=REJECTION_EVENT_S))
        try:
            with db.conn:
                for device, reasons in rejections.items():
                    db.execute(
                        "UPDATE devices SET rejected_messages = rejected_messages + ?, "
                        "last_rejection = ? WHERE id = ?",
                        [len(reasons), reasons[-1], device],
                    )
                    row = db.execute(
                        "SELECT rejection_event_at FROM devices WHERE id = ?", [device]
                    ).fetchone()
                    if row is None or (row[0] is not None and row[0] > quiet_since):
                        continue  # no row (never born), or an event within the quiet time
                    db.execute(
                        "UPDATE devices SET rejection_event_at = ? WHERE id = ?", [stamp, device]
                    )
                    db.table("events").insert(
                        {
                            "id": p.new_id(),
                            "device": device,
                            "ts": stamp,
                            "session": "controller",
                            "event": "messages_rejected",
                            "message": f"{len(reasons)} message(s) rejected; last: {reasons[-1]}",
                            "detail": json.dumps({"count": len(reasons), "last": reasons[-1]}),
                        },
                        pk="id",
                    )
        except sqlite3.Error as exc:  # the counts are lost, the stored data is not
            log.warning("could not record %d rejected message(s): %s", len(rejections), exc)

    def _write_alone(
        self, db: Any, decoded: list[Decoded], refused: dict[str, list[str]]
    ) -> list[Decoded]:
        """Write each message in its own transaction; return the stored ones, and add the ids
        of those that fail to ``refused`` (a database that refuses everything for a passing
        reason raises, and the batch is retried whole)."""
        stored = []
        for item in decoded:
            try:
                self._write(db, [item])
            except sqlite3.OperationalError:
                raise
            except Exception as exc:
                topic, device, message = item
                self._reject(
                    device, topic, f"{message.kind} {message.id} cannot be stored: {exc!r}"
                )
                refused.setdefault(device, []).append(message.id)
            else:
                stored.append(item)
        return stored

    def _tell_agents(self, decoded: list[Decoded], refused: dict[str, list[str]]) -> None:
        """Name what is now stored, per device (see protocol.Stored)."""
        if self._on_stored is None:
            return
        acks: dict[str, tuple[list[str], list[str]]] = {
            device: ([], ids) for device, ids in refused.items()
        }
        for _topic, device, message in decoded:
            if isinstance(message, p.TelemetryBatch | p.Event):
                acks.setdefault(device, ([], []))[0].append(message.id)
        acks = {device: pair for device, pair in acks.items() if pair[0] or pair[1]}
        if acks:
            try:
                self._on_stored(acks)
            except Exception:  # never let a publish problem stop ingest; agents resend
                log.exception("could not acknowledge stored messages to their agents")

    def _decode(self, batch: list[Item]) -> tuple[list[Decoded], dict[str, list[str]]]:
        """(topic, device, message) for every well-formed message, once per batch however
        often it is written; and per device the ids of malformed messages that name one."""
        decoded: list[Decoded] = []
        refused: dict[str, list[str]] = {}
        for topic, payload, _ack in batch:
            if not payload and topic.endswith("/state"):
                continue  # a retained birth deleted (a revoked device's, by the controller)
            try:
                parsed = p.parse_topic(topic)
            except p.ProtocolError as exc:
                self.rejected += 1
                log.warning("rejected message on %s: %s", topic, exc)
                continue
            try:
                message = p.decode(payload)
            except p.ProtocolError as exc:
                self._reject(parsed.device, topic, str(exc))
                if parsed.channel in (p.Channel.TELEMETRY, p.Channel.EVENTS):
                    named = p.command_id(payload)
                    if named:
                        refused.setdefault(parsed.device, []).append(named)
                continue
            decoded.append((topic, parsed.device, message))
        return decoded, refused

    def _write(self, db: Any, decoded: list[Decoded]) -> None:
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
                    if not registry.apply_birth(db, device, message, now):
                        seen.discard(device)  # revoked: the controller deletes the birth
                    changed = True
                elif isinstance(message, p.Death):
                    seen.discard(device)
                    changed |= registry.apply_death(db, device, message, now)
                elif isinstance(message, p.TelemetryBatch):
                    telemetry.extend(telemetry_rows(device, message, received))
                    _newer(tiers, device, reported_tier(message))
                    dropped = max((r.outbox_dropped or 0) for r in message.records)
                    if dropped:
                        registry.note_outbox_dropped(db, device, dropped, now)
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
