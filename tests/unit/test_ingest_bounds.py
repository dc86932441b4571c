"""One device's record at the edge of any field never costs another device its data.

Hostile bytes, not our own models: the records are JSON built field by field, with values at
and past every bound (huge and tiny floats, infinities as JSON can spell them, negative counts,
timestamps from year 1 to 9999, long strings). Each goes into one ingest batch between good
records of two other devices; whatever happens to it (stored, or refused alone), the good
records around it are stored and every message is acknowledged once.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import protocol as p
from controller.db import open_db
from controller.ingest import Ingest

NOW = "2026-12-07T10:00:00Z"

EDGE_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-320, 1e300, -1e300, 1.7976931348623157e308, -1.0, 86400.0]),
    st.floats(allow_nan=False, allow_infinity=False),
)
EDGE_INTS = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**53, 2**63, 2**64, 10**30, -(2**63)]),
    st.integers(),
)
EDGE_TIMES = st.one_of(
    st.sampled_from(
        [
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "1970-01-01T00:00:00Z",
            "2099-12-31T23:00:00Z",
            "2026-12-07T10:00:00",
            "not a time",
        ]
    ),
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
)

FIELD_VALUES: dict[str, Any] = {
    "seq": EDGE_INTS,
    "start": EDGE_TIMES,
    "window_s": EDGE_FLOATS,
    "inferences": EDGE_INTS,
    "errors": EDGE_INTS,
    "latency_p50_ms": EDGE_FLOATS,
    "latency_p95_ms": EDGE_FLOATS,
    "latency_p99_ms": EDGE_FLOATS,
    "cpu_s": EDGE_FLOATS,
    "power_w": EDGE_FLOATS,
    "energy_per_inference_j": EDGE_FLOATS,
}


def good_record(seq: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "start": NOW,
        "window_s": 1.0,
        "model": None,
        "inferences": 10,
        "errors": 0,
        "latency_p50_ms": 1.0,
        "latency_p95_ms": 2.0,
        "cpu_s": 0.1,
        "power_w": 3.0,
    }


def batch(session: str, record: dict[str, Any], ts: str = NOW) -> bytes:
    body = {"v": 1, "id": p.new_id(), "ts": ts, "kind": "telemetry", "session": session}
    body["records"] = [record]
    # JSON as a hostile client may write it: Python's json spells inf as Infinity
    return json.dumps(body).encode()


@st.composite
def hostile_records(draw: st.DrawFn) -> tuple[dict[str, Any], str, str]:
    record = good_record(draw(st.integers(0, 5)))
    for name in draw(st.sets(st.sampled_from(sorted(FIELD_VALUES)), min_size=1, max_size=4)):
        record[name] = draw(FIELD_VALUES[name])
    if draw(st.booleans()):
        record["window_s"] = draw(st.sampled_from([1e300, float("inf"), 1e6, 86400.0]))
    session = draw(st.sampled_from(["s", "x" * 64, "x" * 65, "x" * 10_000]))
    ts = draw(EDGE_TIMES)
    return record, session, ts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_records())
def test_a_record_at_the_edge_of_any_field_never_takes_the_good_ones_with_it(
    hostile: tuple[dict[str, Any], str, str],
) -> None:
    record, session, ts = hostile
    with tempfile.TemporaryDirectory() as tmp:
        database = Path(tmp) / "greenfleet.db"
        open_db(database).conn.close()
        sink = Ingest(database)
        acks: list[str] = []
        items = [
            (p.topic("good-a", p.Channel.TELEMETRY), batch("sa", good_record(0))),
            (p.topic("hostile", p.Channel.TELEMETRY), batch(session, record, ts)),
            (p.topic("good-b", p.Channel.TELEMETRY), batch("sb", good_record(0))),
            (p.topic("good-a", p.Channel.TELEMETRY), batch("sa", good_record(1))),
        ]
        for topic, payload in items:  # one batch: queued before the writer starts
            sink._queue.put((topic, payload, lambda topic=topic: acks.append(topic)))
        sink.start()
        sink.stop()
        db = open_db(database)
        stored = db.execute(
            "SELECT device, seq FROM telemetry WHERE device != 'hostile' ORDER BY device, seq"
        ).fetchall()
        assert stored == [("good-a", 0), ("good-a", 1), ("good-b", 0)]
        assert len(acks) == len(items), "every message acknowledged: stored or refused alone"
        hostile_rows = db.execute("SELECT start, window_s FROM telemetry WHERE device = 'hostile'")
        for start, window_s in hostile_rows.fetchall():  # if stored, it is within the bounds
            assert "2000" <= start[:4] < "2100" and 0 < window_s <= 86400
        db.conn.close()
