"""A small fleet in a real controller home, for the HTTP API and /metrics tests.

Everything goes through the controller's own write paths: models through the catalog, agent
messages (births, telemetry, events, a death) through controller.ingest as the daemon receives
them, a rollout through ``greenfleet rollout create`` and its gate results through
controller.rollout_store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from agent import protocol as p
from controller import rollout_store
from controller.cli import main
from controller.db import open_db
from controller.home import Home
from controller.ingest import Ingest
from controller.rollout import GateResult
from model_store.catalog import Catalog, Declared

SAMPLES = Path(__file__).parents[2] / "model_store" / "samples"
INT8 = "vib:1.0.0+int8-dynamic"
FP32 = "vib:1.0.0+fp32"
HW = p.HardwareFacts(arch="x86_64", cores=4, memory_mb=4096, os="Linux", python="3.11")


@dataclass(frozen=True)
class Window:
    device: str
    seq: int
    minutes_ago: float
    model: str
    inferences: int
    errors: int
    p50: float
    p95: float
    p99: float
    power_w: float
    energy_j: float
    method: str
    tier: str = "active"
    window_s: float = 60.0


WINDOWS = (
    Window("gw-1", 0, 180, INT8, 100, 0, 2.0, 3.0, 4.0, 5.0, 0.010, "estimate"),
    Window("gw-1", 1, 50, INT8, 120, 1, 1.0, 2.0, 3.0, 6.0, 0.020, "estimate"),
    Window("gw-1", 2, 30, INT8, 150, 0, 1.5, 2.5, 3.5, 6.5, 0.025, "estimate"),
    Window("gw-1", 3, 10, INT8, 200, 2, 1.2, 2.2, 3.2, 7.0, 0.030, "estimate", "fallback"),
    Window("gw-2", 0, 20, FP32, 300, 0, 4.0, 6.0, 8.0, 3.0, 0.050, "rapl"),
    Window("gw-2", 1, 5, FP32, 250, 5, 5.0, 7.0, 9.0, 3.5, 0.060, "rapl"),
)


@dataclass
class Fleet:
    home: Home
    now: datetime
    windows: tuple[Window, ...] = WINDOWS
    rollout: dict[str, object] = field(default_factory=dict)

    def of(self, device: str) -> list[Window]:
        return [w for w in self.windows if w.device == device]


def _ref(model: str) -> p.ModelRef:
    return p.ModelRef.parse(model)


def _profile(p50: float, metric: float) -> p.Profile:
    return p.Profile(
        size_bytes=1000,
        parameters=250,
        macs=5000,
        latency={"onnxruntime": p.LatencyStats(p50_ms=p50, p95_ms=p50 * 1.5, runs=20)},
        fidelity=p.Fidelity(samples=100, agreement=0.99, metric="roc_auc", metric_value=metric),
    )


def _models(home: Home) -> None:
    db = open_db(home.database)
    catalog = Catalog(db, home.store)
    onnx = SAMPLES / "vibration-ae.onnx"
    declared = Declared.from_json(SAMPLES / "vibration-ae.json")
    catalog.add(onnx, "vib", "1.0.0", declared=declared)
    catalog.add(onnx, "vib", "2.0.0", declared=declared)
    version = catalog.version("vib:1.0.0")
    for name, precision, p50, metric, eligible in (
        ("fp32", "fp32", 0.50, 0.97, True),
        ("int8-dynamic", "int8", 0.25, 0.96, True),
        ("int8-pruned", "int8", 0.20, 0.80, False),
    ):
        catalog.put_variant(
            version,
            name,
            onnx,
            p.ModelFormat.ONNX,
            precision=precision,
            technique="test",
            eligible=eligible,
            reason=None if eligible else "AUC 0.800 is below the accuracy floor",
            notes=(),
            details={},
            profile=_profile(p50, metric),
        )
    catalog.update_version("vib:1.0.0", compressed="2026-01-01T00:00:00+00:00")
    db.conn.close()


def _agent_messages(now: datetime) -> list[tuple[str, bytes]]:
    def active(model: str) -> p.ActiveModel:
        return p.ActiveModel(model=_ref(model), sha256="a" * 64, format=p.ModelFormat.ONNX)

    messages: list[tuple[str, bytes]] = []
    for device, device_class, site, line, model in (
        ("gw-1", "x86-ipc", "a", "1", INT8),
        ("gw-2", "rpi4", "b", "2", FP32),
    ):
        birth = p.Birth(
            session=f"{device}-s",
            agent_version="0.1.0",
            device_class=device_class,
            labels={"site": site, "line": line},
            runtimes=[p.ModelFormat.ONNX],
            hardware=HW,
            active=active(model),
            ts=now - timedelta(hours=4),
        )
        messages.append((p.topic(device, p.Channel.STATE), p.encode(birth)))
    for w in WINDOWS:
        record = p.TelemetryRecord(
            seq=w.seq,
            start=now - timedelta(minutes=w.minutes_ago),
            window_s=w.window_s,
            model=_ref(w.model),
            tier=p.Tier(w.tier),
            inferences=w.inferences,
            errors=w.errors,
            latency_p50_ms=w.p50,
            latency_p95_ms=w.p95,
            latency_p99_ms=w.p99,
            cpu_s=0.1,
            power_w=w.power_w,
            energy_per_inference_j=w.energy_j,
            power_method=p.PowerMethod(w.method),
        )
        batch = p.TelemetryBatch(session=f"{w.device}-s", records=[record])
        messages.append((p.topic(w.device, p.Channel.TELEMETRY), p.encode(batch)))
    for event in (
        p.Event(
            event=p.EventKind.ACTIVATED,
            session="gw-1-s",
            message=f"activated {INT8}",
            ts=now - timedelta(minutes=55),
        ),
        p.Event(
            event=p.EventKind.TIER_CHANGED,
            session="gw-1-s",
            detail={"from": "active", "to": "fallback", "cause": "latency budget breached"},
            ts=now - timedelta(minutes=9, seconds=30),
        ),
    ):
        messages.append((p.topic("gw-1", p.Channel.EVENTS), p.encode(event)))
    death = p.Death(session="gw-2-s", ts=now - timedelta(minutes=1))
    messages.append((p.topic("gw-2", p.Channel.STATE), p.encode(death)))
    return messages


def build_fleet(root: Path) -> Fleet:
    home = Home(root).prepare()
    now = p.utcnow()
    _models(home)
    ingest = Ingest(home.database)
    ingest.start()
    for topic, payload in _agent_messages(now):
        ingest.offer(topic, payload)
    ingest.stop()  # drains the queue first
    assert (
        main(["--home", str(root), "rollout", "create", "vib:2.0.0", "--selector", "site=a"]) == 0
    )
    db = open_db(home.database)
    with rollout_store.write_transaction(db):
        rollout_store.save_gates(
            db,
            "r1",
            0,
            (
                GateResult("error_rate", 0.01, 0.05, True, False, "2 of 200 inferences"),
                GateResult("latency_regression", None, 0.2, False, False, "waiting: no control"),
            ),
            p.utcnow(),
        )
    detail = json.loads(db.execute("SELECT gates FROM rollouts WHERE id = 'r1'").fetchone()[0])
    db.conn.close()
    return Fleet(home, now, rollout={"gates": detail})
