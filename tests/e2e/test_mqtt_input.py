"""The MQTT input source: windows published by a third party on a local broker are scored."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import protocol as p
from agent.sources.vibration import VibrationSimulator
from controller.broker import Mosquitto
from tests.conftest import Probe, Processes, agent_config, unique
from tests.e2e.fake_controller import MODEL, FakeController

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("separate_broker", [False, True], ids=["fleet-broker", "local-broker"])
def test_readings_on_a_topic_are_scored_and_bad_ones_are_reported(
    mosquitto: Mosquitto,
    processes: Processes,
    probe_factory: Callable[..., Probe],
    tmp_path: Path,
    separate_broker: bool,
) -> None:
    device = unique("mqttin")
    sensor_topic = f"plant/{device}/vibration"
    local = Mosquitto(tmp_path / "local").start() if separate_broker else mosquitto
    try:
        input_config: dict[str, object] = {"type": "mqtt", "topic": sensor_topic}
        if separate_broker:
            input_config["broker"] = {"host": "127.0.0.1", "port": local.port}
        config = agent_config(
            tmp_path / f"{device}.yaml", device, mosquitto.port, extra={"input": input_config}
        )
        probe = probe_factory(f"gf/v1/{device}/#")
        sensor = Probe(local.port) if separate_broker else probe
        processes.agent(config)
        probe.wait_for(lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "birth")
        ctl = FakeController(probe, device)
        assert ctl.reply_to(ctl.deploy(MODEL, "1.0.0")).ok

        sim = VibrationSimulator(seed=3)
        captured = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
        since = probe.mark()
        reading = p.SensorReading(ts=captured, values=sim.read().tolist(), sample_rate_hz=12800)
        sensor.publish(sensor_topic, p.encode(reading))
        sensor.publish(sensor_topic, json.dumps(sim.read().tolist()).encode())  # a bare array

        def result(topic: str, payload: bytes) -> bool:
            return topic.endswith("/results") and isinstance(p.decode(payload), p.Result)

        _, first = probe.wait_for(result, 10, "a result for the published window", since=since)
        decoded = p.decode(first)
        assert isinstance(decoded, p.Result) and decoded.input_ts == captured
        assert 0 < decoded.outputs["score"][0] < 5
        seen = []

        def second_result(topic: str, payload: bytes) -> bool:
            if result(topic, payload):
                seen.append(payload)
            return len(seen) >= 2

        probe.wait_for(second_result, 10, "a result for the bare-array window too", since=since)

        since = probe.mark()
        sensor.publish(sensor_topic, b'"not a window"')  # dropped with a log line
        sensor.publish(sensor_topic, json.dumps([0.1] * 100).encode())  # wrong length
        event = ctl.event(p.EventKind.INPUT_ERROR, since)
        assert "100 values" in event.message and "(1, 512)" in event.message
        sensor.publish(sensor_topic, json.dumps(sim.read().tolist()).encode())
        probe.wait_for(result, 10, "results after bad readings", since=since)
        assert "ignored reading" in processes.log(device)
        ctl.close()
        if separate_broker:
            sensor.close()
    finally:
        if separate_broker:
            processes.stop_all()
            local.stop()
