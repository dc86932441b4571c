"""Registry, migrations and ingest against a real SQLite file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent import protocol as p
from controller import registry, views
from controller.db import MIGRATIONS, open_db
from controller.errors import InvalidRequest, NotFound
from controller.ingest import Ingest

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
HW = p.HardwareFacts(arch="x86_64", cores=2, memory_mb=1024, os="Linux", python="3.11")


def birth(session: str = "s1", labels: dict[str, str] | None = None) -> p.Birth:
    return p.Birth(
        session=session,
        agent_version="0.1.0",
        device_class="x86-ipc",
        labels=labels or {"site": "a", "line": "1"},
        runtimes=[p.ModelFormat.ONNX],
        hardware=HW,
    )


def test_migrations_are_recorded_and_idempotent(tmp_path: Path) -> None:
    db = open_db(tmp_path / "g.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db2 = open_db(tmp_path / "g.db")
    versions = [r[0] for r in db2.execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert {"devices", "models", "telemetry", "events", "deployments"} <= set(db2.table_names())


def test_birth_death_and_stale_will(tmp_path: Path) -> None:
    db = open_db(tmp_path / "g.db")
    registry.apply_birth(db, "d1", birth("s1"), NOW)
    assert registry.get_device(db, "d1")["online"] == 1
    registry.apply_birth(db, "d1", birth("s2"), NOW + timedelta(seconds=1))
    # the will of the old session arrives late: the device stays online
    assert not registry.apply_death(db, "d1", p.Death(session="s1"), NOW)
    assert registry.get_device(db, "d1")["online"] == 1
    assert registry.apply_death(db, "d1", p.Death(session="s2"), NOW)
    assert registry.get_device(db, "d1")["online"] == 0


def test_selectors_and_desired_state(tmp_path: Path) -> None:
    db = open_db(tmp_path / "g.db")
    registry.apply_birth(db, "d1", birth(labels={"site": "a", "line": "1"}), NOW)
    registry.apply_birth(db, "d2", birth(labels={"site": "a", "line": "2"}), NOW)
    registry.apply_birth(db, "d3", birth(labels={"site": "b", "line": "1"}), NOW)
    assert registry.matching(db, registry.parse_selector("site=a")) == ["d1", "d2"]
    assert registry.matching(db, registry.parse_selector("site=a, line=2")) == ["d2"]
    assert registry.matching(db, registry.parse_selector("class=x86-ipc")) == ["d1", "d2", "d3"]
    with pytest.raises(InvalidRequest, match="key=value"):
        registry.parse_selector("site")
    with pytest.raises(NotFound, match="devices list"):
        registry.set_desired(db, ["d1", "ghost"], "m:1")
    assert registry.get_device(db, "d1")["desired_model"] is None, "all or nothing"
    registry.set_desired(db, ["d1", "d2"], "m:1")
    assert [v.desired_model for v in registry.views(db)] == ["m:1", "m:1", None]


def test_ingest_writes_batches_dedups_replays_and_survives_garbage(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    open_db(path)
    ingest = Ingest(path)
    record = p.TelemetryRecord(
        seq=0,
        start=NOW,
        window_s=1.0,
        model=p.ModelRef(name="m", version="1"),
        inferences=10,
        errors=0,
        latency_p50_ms=0.2,
        cpu_s=0.01,
        power_w=3.0,
        energy_per_inference_j=0.001,
    )
    batch = p.TelemetryBatch(session="s1", records=[record])
    ingest.start()
    ingest.offer(p.topic("d1", p.Channel.STATE), p.encode(birth()))
    ingest.offer(p.topic("d1", p.Channel.TELEMETRY), p.encode(batch))
    ingest.offer(p.topic("d1", p.Channel.TELEMETRY), p.encode(batch))  # replayed after reconnect
    ingest.offer(p.topic("d1", p.Channel.TELEMETRY), b"{garbage")
    ingest.offer("gf/v1/d1/nonsense", b"{}")
    ingest.offer(
        p.topic("d1", p.Channel.EVENTS),
        p.encode(p.Event(event=p.EventKind.ACTIVATED, session="s1", message="m:1 active")),
    )
    ingest.stop()
    db = open_db(path)
    assert db["telemetry"].count == 1
    kinds = sorted(e["event"] for e in db["events"].rows)
    assert kinds == ["activated", "messages_rejected"]  # the garbage is counted on d1
    assert ingest.rejected == 2
    row = views.fleet(db)[0]
    assert row["rejected_messages"] == 1
    assert (row["id"], row["online"], row["inferences"]) == ("d1", True, 10)


def test_ingest_stores_fallback_and_the_newest_tier_report(tmp_path: Path) -> None:
    """Birth, telemetry and tier_changed all name the tier; the newest by the agent's clock
    wins, so telemetry replayed after a reconnect cannot turn the clock back."""
    path = tmp_path / "g.db"
    open_db(path)
    sha = "b" * 64
    small = p.ActiveModel(
        model=p.ModelRef(name="m", version="1+int8"), sha256=sha, format=p.ModelFormat.ONNX
    )
    staged = p.replace(birth("s1"), fallback=small, tier=p.Tier.LAST_GOOD, ts=NOW)

    def record(seq: int, start: datetime, tier: p.Tier) -> p.TelemetryRecord:
        return p.TelemetryRecord(
            seq=seq,
            start=start,
            window_s=10.0,
            model=None,
            tier=tier,
            inferences=0,
            errors=0,
            cpu_s=0.0,
        )

    def tier_event(at: datetime, to: str) -> p.Event:
        return p.Event(
            event=p.EventKind.TIER_CHANGED,
            session="s1",
            ts=at,
            detail={"from": "active", "to": to, "cause": "3 latency budget breaches"},
        )

    def run(*messages: tuple[p.Channel, p.Envelope]) -> None:
        ingest = Ingest(path)
        ingest.start()
        for channel, message in messages:
            ingest.offer(p.topic("d1", channel), p.encode(message))
        ingest.stop()

    run((p.Channel.STATE, staged))
    db = open_db(path)
    row = registry.get_device(db, "d1")
    assert (row["fallback_model"], row["fallback_sha256"]) == ("m:1+int8", sha)
    assert row["tier"] == "last_good"
    # a tier change after the birth, then telemetry from before the birth replayed late
    later = NOW + timedelta(seconds=30)
    old = p.TelemetryBatch(
        session="s0", records=[record(0, NOW - timedelta(minutes=5), p.Tier.RULES)]
    )
    run((p.Channel.EVENTS, tier_event(later, "fallback")), (p.Channel.TELEMETRY, old))
    assert registry.get_device(db, "d1")["tier"] == "fallback"
    # newer telemetry: the last window of the batch counts, and the table keeps every record
    newer = p.TelemetryBatch(
        session="s1",
        records=[
            record(0, later, p.Tier.FALLBACK),
            record(1, later + timedelta(seconds=10), p.Tier.ACTIVE),
        ],
    )
    run((p.Channel.TELEMETRY, newer), (p.Channel.EVENTS, tier_event(later, "nonsense")))
    assert registry.get_device(db, "d1")["tier"] == "active"
    assert [r["tier"] for r in db["telemetry"].rows_where(order_by="start")] == [
        "rules",
        "fallback",
        "active",
    ]
    shown = views.device_detail(db, "d1")
    assert (shown["tier"], shown["fallback_model"]) == ("active", "m:1+int8")
    assert [e["message"] for e in shown["recent_tier_changes"]] == [
        "active -> nonsense: 3 latency budget breaches",
        "active -> fallback: 3 latency budget breaches",
    ]
    # the agent restarts without its fallback staged (a wiped disk): the controller sees it
    run((p.Channel.STATE, p.replace(birth("s2"), ts=later + timedelta(minutes=1))))
    row = registry.get_device(db, "d1")
    assert (row["fallback_model"], row["tier"]) == (None, "active")


def test_last_deploys_keep_one_clock_per_slot(tmp_path: Path) -> None:
    db = open_db(tmp_path / "g.db")
    for i, (model, slot) in enumerate((("m:2", None), ("m:2+small", "fallback"))):
        row = {"id": f"c{i}", "device": "d1", "model": model, "sha256": "x", "status": "ok"}
        row["sent_at"] = registry.iso(NOW + timedelta(seconds=i))
        db.table("deployments").insert({**row, **({"slot": slot} if slot else {})})
    assert registry.last_deploys(db)["d1"].model == "m:2", "rows before m4 were active deploys"
    assert registry.last_deploys(db, "fallback")["d1"].model == "m:2+small"


def test_failed_deploys_in_a_row_and_an_operators_retry(tmp_path: Path) -> None:
    """What the retry rule reads (controller.reconcile.retry_wait): the newest deploy's error and
    how many of that model failed in a row; `deploy --retry` marks it to go now."""
    db = open_db(tmp_path / "g.db")
    rows = [
        ("m:1", "2026-12-07T10:00:00+00:00", "ok", None),
        ("m:2", "2026-12-07T10:01:00+00:00", "failed", "disk full"),
        ("m:2", "2026-12-07T10:02:00+00:00", "failed", "disk full"),
        ("m:2", "2026-12-07T10:03:00+00:00", "failed", "cannot store the download: disk"),
    ]
    for i, (model, sent_at, status, error) in enumerate(rows):
        db.table("deployments").insert(
            {
                "id": f"c{i}",
                "device": "d1",
                "model": model,
                "sha256": "x",
                "sent_at": sent_at,
                "status": status,
                "error": error,
                "slot": "active",
            }
        )
    last = registry.last_deploys(db)["d1"]
    assert (last.model, last.status, last.failures) == ("m:2", "failed", 3)
    assert last.error == "cannot store the download: disk"
    assert registry.retry_now(db, ["d1"]) == 1
    assert registry.last_deploys(db)["d1"].status == "retry"
