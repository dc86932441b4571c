"""The running telemetry totals and newest window per device (controller.db m8, triggers)
agree with aggregating the telemetry table itself, through replays (INSERT OR IGNORE),
windows that arrive out of order, windows without power or model, and the migration's
backfill of rows that were there before it."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

from controller.db import MIGRATIONS, open_db
from controller.ingest import insert_new

RAW_TOTALS = (
    "SELECT device, COALESCE(model, ''), COALESCE(tier, ''), COALESCE(power_method, ''), "
    "COUNT(*), SUM(inferences), SUM(errors), SUM(energy_per_inference_j * inferences), "
    "SUM(power_w * window_s), SUM(latency_p50_ms * inferences), "
    "SUM(latency_p95_ms * inferences) FROM telemetry GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
)
TOTALS = (
    "SELECT device, model, tier, power_method, windows, inferences, errors, energy_j, "
    "device_j, p50_x_n, p95_x_n FROM telemetry_totals ORDER BY 1, 2, 3, 4"
)
RAW_LATEST = "SELECT device, MAX(start) FROM telemetry GROUP BY device ORDER BY device"
LATEST = (
    "SELECT l.device, t.start FROM telemetry_latest l JOIN telemetry t ON t.rowid = l.row "
    "ORDER BY l.device"
)


def windows(rng: random.Random, count: int) -> list[dict[str, Any]]:
    rows = []
    for n in range(count):
        device = f"d{rng.randrange(4)}"
        measured = rng.random() < 0.7
        rows.append(
            {
                "device": device,
                "session": "s",
                "seq": n,
                "start": f"2026-11-26T10:{rng.randrange(60):02d}:{rng.randrange(60):02d}",
                "window_s": 1.0,
                "model": rng.choice(["m:1.0.0", "m:1.0.0+int8", None]),
                "tier": rng.choice(["active", "last_good"]),
                "inferences": rng.randrange(0, 20),
                "errors": rng.randrange(0, 2),
                "latency_p50_ms": rng.random() if measured else None,
                "latency_p95_ms": rng.random() * 2 if measured else None,
                "latency_p99_ms": None,
                "cpu_s": 0.01,
                "power_w": rng.random() * 5 if measured else None,
                "energy_per_inference_j": rng.random() / 10 if measured else None,
                "power_method": rng.choice(["estimate", "rapl"]),
                "received_at": "2026-11-26T10:00:00",
            }
        )
    return rows


def same(db: Any, a: str, b: str) -> None:
    left, right = db.execute(a).fetchall(), db.execute(b).fetchall()
    assert len(left) == len(right) and left
    for x, y in zip(left, right, strict=True):
        for u, v in zip(x, y, strict=True):
            assert (u is None and v is None) or u == v or abs(u - v) < 1e-9, (x, y)


def test_the_trigger_kept_totals_match_the_table_through_replays(tmp_path: Path) -> None:
    db = open_db(tmp_path / "g.db")
    rows = windows(random.Random(9), 600)
    with db.conn:
        insert_new(db, "telemetry", rows[:400])
        insert_new(db, "telemetry", rows[200:])  # 200 replayed: must not count twice
    assert db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == 600
    same(db, TOTALS, RAW_TOTALS)
    same(db, LATEST, RAW_LATEST)


def test_the_migration_backfills_what_was_there(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TEXT)")
    conn.close()
    # a database at m7 with telemetry, then opened by this version
    import sqlite_utils

    old = sqlite_utils.Database(path)
    for version, migration in enumerate(MIGRATIONS[:7], start=1):
        migration(old)
        old.execute("INSERT INTO schema_version VALUES (?, 'then')", [version])
    insert_new(old, "telemetry", windows(random.Random(3), 300))
    old.conn.commit()
    old.conn.close()
    db = open_db(path)
    same(db, TOTALS, RAW_TOTALS)
    same(db, LATEST, RAW_LATEST)
    insert_new(
        db, "telemetry", [dict(r, seq=r["seq"] + 1000) for r in windows(random.Random(4), 50)]
    )
    same(db, TOTALS, RAW_TOTALS)
