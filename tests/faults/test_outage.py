"""A broker outage during steady inference: telemetry buffers on disk and arrives complete."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent import protocol as p
from controller.broker import Mosquitto
from tests.conftest import Probe, Processes, agent_config, unique

pytestmark = pytest.mark.e2e


def telemetry_seqs(probes: list[Probe], session: str) -> list[int]:
    seqs = []
    history = [item for probe in probes for item in list(probe.history)]
    for topic, payload in history:
        if topic.endswith("/telemetry"):
            batch = p.decode(payload)
            if isinstance(batch, p.TelemetryBatch) and batch.session == session:
                seqs.extend(r.seq for r in batch.records)
    return seqs


def test_no_telemetry_record_is_lost_across_a_broker_restart(
    processes: Processes, tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    device = unique("outage")
    processes.agent(agent_config(tmp_path / f"{device}.yaml", device, broker.port, interval_s=0.5))
    probe = Probe(broker.port, f"gf/v1/{device}/#")
    probe.client.reconnect_delay_set(1, 2)
    try:
        _, birth = probe.wait_for(
            lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "birth"
        )
        session = p.decode(birth).session  # type: ignore[union-attr]
        probe.wait_for(lambda t, m: t.endswith("/telemetry"), 20, "telemetry before the outage")
        broker.stop()
        time.sleep(4)  # ~8 telemetry windows with nowhere to go
        broker = Mosquitto(tmp_path / "broker", broker.port).start()
        # subscribed before the agent's reconnect backoff (>= 1 s) ends, so nothing is missed
        after = Probe(broker.port, f"gf/v1/{device}/#")
        probes = [probe, after]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            seqs = sorted(set(telemetry_seqs(probes, session)))
            if len(seqs) >= 14 and seqs == list(range(seqs[-1] + 1)):
                break
            time.sleep(0.3)
        after.close()
        seqs = sorted(set(telemetry_seqs(probes, session)))
        assert seqs == list(range(seqs[-1] + 1)), f"gaps in {seqs}"
        assert len(seqs) >= 14, "records from the outage were replayed"
    finally:
        probe.close()
        processes.stop_all()
        broker.stop()
