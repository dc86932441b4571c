"""Telemetry reads at fleet scale: what the running totals (controller.db m8) buy, and cost.

A controller database gets DEVICES x WINDOWS telemetry rows (1,000 x 1,000 = 1M, what a
1,000-device fleet at 1 msg/s writes in under 17 minutes; 200 x 500 with --quick), written in
batches of 500 with ``controller.ingest.insert_new``, the ingest path's own insert, so the
triggers run as in production. Then each read the controller does repeatedly is timed (best
of 3):

- ``devices list`` / the dashboard / the API: ``views.latest_telemetry`` (newest window of
  every device);
- a Prometheus scrape: ``metrics.fleet_metrics``;
- the plan's field figures, every 30 s in the daemon: ``planning.measured``;
- the all-time energy report: ``energy.energy_report``.

Baseline, same run, same database: the queries these replaced, which aggregate the telemetry
table itself (kept here verbatim). The write cost of the triggers is measured too: the same
rows into a copy of the table without them. Target: every read at least 10x faster than its
baseline, and the triggers add at most 50% to the insert.

    python -m benchmarks.telemetry_reads [--quick]    # or: benchmarks.run telemetry_reads
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.rig import Outcome, outcome
from controller import energy, metrics, planning, views
from controller.config import ControllerConfig
from controller.db import open_db
from controller.ingest import BATCH, insert_new

# the queries of before the running totals, for the baseline
OLD = {
    "latest": "SELECT * FROM telemetry t WHERE rowid = (SELECT rowid FROM telemetry "
    "WHERE device = t.device ORDER BY start DESC LIMIT 1)",
    "metrics": "SELECT device, model, tier, power_method, SUM(inferences), SUM(errors), "
    "SUM(energy_per_inference_j * inferences), SUM(latency_p50_ms * inferences) "
    "FROM telemetry GROUP BY device, model, tier, power_method",
    "measured": "SELECT d.device_class, t.model, SUM(t.inferences), "
    "SUM(t.energy_per_inference_j * t.inferences) / NULLIF(SUM(t.inferences), 0), "
    "SUM(t.latency_p95_ms * t.inferences) / NULLIF(SUM(t.inferences), 0) "
    "FROM telemetry t JOIN devices d ON d.id = t.device "
    "WHERE t.model IS NOT NULL AND t.inferences > 0 GROUP BY d.device_class, t.model",
    "energy": "SELECT device, model, power_method, SUM(inferences), SUM(power_w * window_s), "
    "SUM(energy_per_inference_j * inferences) FROM telemetry "
    "WHERE model IS NOT NULL GROUP BY device, model, power_method",
}


def rows(devices: int, windows: int) -> Iterator[dict[str, Any]]:
    start = datetime(2026, 11, 26, tzinfo=UTC)
    for w in range(windows):  # as they arrive: every device's window w, then w + 1
        for d in range(devices):
            yield {
                "device": f"dev-{d:04d}",
                "session": "s1",
                "seq": w,
                "start": (start + timedelta(seconds=w)).isoformat(),
                "window_s": 1.0,
                "model": "vibration-ae:1.0.0+int8" if d % 3 else "vibration-ae:1.0.0",
                "tier": "active",
                "inferences": 10,
                "errors": 0,
                "latency_p50_ms": 1.0,
                "latency_p95_ms": 1.5,
                "latency_p99_ms": 2.0,
                "cpu_s": 0.01,
                "power_w": 3.0,
                "energy_per_inference_j": 0.02,
                "power_method": "estimate",
                "received_at": start.isoformat(),
            }


def _insert(db: Any, table: str, devices: int, windows: int) -> float:
    began = time.perf_counter()
    batch: list[dict[str, Any]] = []
    for row in rows(devices, windows):
        batch.append(row)
        if len(batch) == BATCH:
            with db.conn:
                insert_new(db, table, batch)
            batch = []
    if batch:
        with db.conn:
            insert_new(db, table, batch)
    return time.perf_counter() - began


def _best(fn: Callable[[], object], times: int = 3) -> float:
    best = float("inf")
    for _ in range(times):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def run(quick: bool) -> Outcome:
    devices, windows = (200, 500) if quick else (1000, 1000)
    with tempfile.TemporaryDirectory(prefix="gf-bench-reads-") as tmp:
        db = open_db(Path(tmp) / "greenfleet.db")
        with db.conn:
            for d in range(devices):
                db.execute(
                    "INSERT INTO devices (id, device_class, online, labels) VALUES (?, ?, 1, ?)",
                    [f"dev-{d:04d}", "rpi4" if d % 2 else "x86-ipc", '{"site": "plant-a"}'],
                )
            db.execute("CREATE TABLE bare AS SELECT * FROM telemetry WHERE 0")
            db.execute("CREATE UNIQUE INDEX bare_key ON bare (device, session, seq)")
            db.execute("CREATE INDEX bare_start ON bare (device, start)")
        with_triggers = _insert(db, "telemetry", devices, windows)
        without = _insert(db, "bare", devices, windows)
        db.execute("DROP TABLE bare")
        config = ControllerConfig()
        reads = {
            "latest": lambda: views.latest_telemetry(db),
            "metrics": lambda: metrics.fleet_metrics(db),
            "measured": lambda: planning.measured(db),
            "energy": lambda: energy.energy_report(db, config, lambda model, cls: None),
        }
        figures = {}
        for name, read in reads.items():
            new = _best(read)
            old = _best(lambda sql=OLD[name]: db.execute(sql).fetchall())  # type: ignore[misc]
            figures[name] = {"new_ms": round(new * 1000, 2), "old_ms": round(old * 1000, 1)}
    count = devices * windows
    write_ratio = with_triggers / without
    slowest = max(f["new_ms"] / f["old_ms"] for f in figures.values())
    return outcome(
        "telemetry_reads",
        f"Telemetry reads on {count:,} rows: running totals vs aggregating the table",
        measured=", ".join(f"{k} {v['new_ms']:.1f} ms" for k, v in figures.items()),
        baseline=", ".join(f"{k} {v['old_ms']:.0f} ms" for k, v in figures.items()),
        ratio=slowest,
        target="every read <= 0.1 of its baseline; insert with triggers <= 1.5x",
        passed=slowest <= 0.1 and write_ratio <= 1.5,
        numbers={
            "rows": count,
            "devices": devices,
            "reads": figures,
            "insert_us_per_row_with_triggers": round(with_triggers / count * 1e6, 2),
            "insert_us_per_row_without": round(without / count * 1e6, 2),
            "insert_ratio": round(write_ratio, 3),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.telemetry_reads")
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=1))


if __name__ == "__main__":
    main()
