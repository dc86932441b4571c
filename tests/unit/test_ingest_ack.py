"""Ingest acknowledges a message only after its batch is committed, and holds a batch SQLite
refuses for a passing reason (disk full, locked) until it can be written, instead of dropping
it. The ingest workers acknowledge to the broker through this (controller.ingest_workers)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from controller import ingest
from controller.db import open_db
from controller.ingest import Ingest


def telemetry(seq: int) -> tuple[str, bytes]:
    record = p.TelemetryRecord(
        seq=seq,
        start=p.utcnow(),
        window_s=1.0,
        model=None,
        inferences=1,
        errors=0,
        latency_p50_ms=1.0,
        latency_p95_ms=1.0,
        cpu_s=0.0,
        power_w=1.0,
    )
    batch = p.TelemetryBatch(session="s1", records=[record])
    return p.topic("ack-dev", p.Channel.TELEMETRY), p.encode(batch)


def rows(database: Path) -> int:
    return int(open_db(database).execute("SELECT count(*) FROM telemetry").fetchone()[0])


def test_a_refused_batch_is_held_retried_and_acknowledged_once_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "greenfleet.db"
    open_db(database).conn.close()
    monkeypatch.setattr(ingest, "RETRY_S", (0.01, 0.02))
    sink = Ingest(database)
    real_write = sink._write
    refusals = iter(["database or disk is full", "database is locked"])

    def flaky(db: Any, batch: Any) -> None:
        reason = next(refusals, None)
        if reason is not None:
            raise sqlite3.OperationalError(reason)
        real_write(db, batch)

    monkeypatch.setattr(sink, "_write", flaky)
    acked: list[int] = []  # rows in the database when each ack came
    done = threading.Event()

    def ack() -> None:
        acked.append(rows(database))
        done.set()

    sink.start()
    sink.offer(*telemetry(0), ack)
    assert done.wait(5), "the message was never acknowledged"
    sink.stop()
    assert sink.retries == 2
    assert acked == [1]  # once, and only after the row was there


def test_a_malformed_message_is_rejected_and_still_acknowledged(tmp_path: Path) -> None:
    """Otherwise it would be sent again at every reconnect, for ever."""
    database = tmp_path / "greenfleet.db"
    open_db(database).conn.close()
    sink = Ingest(database)
    acks: list[str] = []
    sink.start()
    sink.offer(p.topic("ack-dev", p.Channel.TELEMETRY), b"{not json", lambda: acks.append("bad"))
    sink.offer(*telemetry(1), lambda: acks.append("good"))
    sink.stop()
    assert sorted(acks) == ["bad", "good"]
    assert sink.rejected == 1
    assert rows(database) == 1


def batch_of(device: str, seq: int, **changes: Any) -> tuple[str, bytes, str]:
    _topic, payload = telemetry(seq)
    batch = p.decode(payload)
    assert isinstance(batch, p.TelemetryBatch)
    record = p.replace(batch.records[0], **changes)
    batch = p.replace(batch, records=[record], session=f"s-{device}")
    return p.topic(device, p.Channel.TELEMETRY), p.encode(batch), batch.id


def test_one_bad_record_is_refused_alone_and_agents_hear_what_was_stored(
    tmp_path: Path,
) -> None:
    """A record that passes the schema but breaks the write (a window of 1e300 s overflows the
    tier's timestamp) costs only itself: the other devices' records in the same batch are
    stored, and each agent is told which of its messages are stored and which refused."""
    database = tmp_path / "greenfleet.db"
    open_db(database).conn.close()
    told: list[dict[str, tuple[list[str], list[str]]]] = []
    sink = Ingest(database, on_stored=told.append)
    good_a = batch_of("dev-a", 0)
    bad = batch_of("dev-b", 0, window_s=1e300)
    good_b = batch_of("dev-b", 1)
    good_c = batch_of("dev-c", 0)
    acks: list[str] = []
    for topic, payload, _id in (good_a, bad, good_b, good_c):
        sink._queue.put((topic, payload, lambda: acks.append("broker")))  # one batch
    sink.start()
    sink.stop()
    assert len(acks) == 4, "every message acknowledged to the broker: stored or refused"
    assert rows(database) == 3
    merged: dict[str, tuple[list[str], list[str]]] = {}
    for acked in told:
        for device, (ids, rejected) in acked.items():
            merged.setdefault(device, ([], []))[0].extend(ids)
            merged[device][1].extend(rejected)
    assert merged == {
        "dev-a": ([good_a[2]], []),
        "dev-b": ([good_b[2]], [bad[2]]),
        "dev-c": ([good_c[2]], []),
    }
    assert sink.rejected == 1


def test_a_malformed_message_that_names_an_id_is_refused_by_that_id(tmp_path: Path) -> None:
    database = tmp_path / "greenfleet.db"
    open_db(database).conn.close()
    told: list[dict[str, tuple[list[str], list[str]]]] = []
    sink = Ingest(database, on_stored=told.append)
    sink.start()
    sink.offer(p.topic("dev-x", p.Channel.EVENTS), b'{"id": "e-1", "kind": "event"}')
    sink.stop()
    assert told == [{"dev-x": ([], ["e-1"])}]
