"""End to end: real Mosquitto, controller and two agents as processes, the real sample model."""

from __future__ import annotations

import gc
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from controller.broker import EmbeddedBroker
from tests.conftest import SAMPLES, Probe, Processes, agent_config, unique, wait_until

pytestmark = pytest.mark.e2e


def fleet(procs: Processes) -> dict[str, dict[str, Any]]:
    result = procs.cli("devices", "list", "--json")
    assert result.returncode == 0, result.stderr
    return {d["id"]: d for d in json.loads(result.stdout)}


def telemetry_rows(procs: Processes, device: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(Path(procs.env["GREENFLEET_HOME"]) / "greenfleet.db")
    db.row_factory = sqlite3.Row
    try:
        return db.execute(
            "SELECT * FROM telemetry WHERE device = ? ORDER BY seq", [device]
        ).fetchall()
    finally:
        db.close()


def is_result(device: str, model: str) -> Callable[[str, bytes], bool]:
    def check(topic: str, payload: bytes) -> bool:
        if p.parse_topic(topic).device != device:
            return False
        message = p.decode(payload)
        return isinstance(message, p.Result) and str(message.model) == model

    return check


def test_deploy_delivers_results_and_telemetry_and_a_second_deploy_replaces_it(
    mosquitto: Any, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> None:
    line = unique("line")
    devices = [unique("gw"), unique("gw")]
    add = processes.cli(
        "models",
        "add",
        str(SAMPLES / "vibration-ae.onnx"),
        "--name",
        "vibration-ae",
        "--version",
        "1.0.0",
    )
    assert add.returncode == 0, add.stderr
    add = processes.cli(
        "models",
        "add",
        str(SAMPLES / "vibration-ae.tflite"),
        "--name",
        "vibration-ae",
        "--version",
        "1.1.0",
    )
    assert add.returncode == 0, add.stderr
    processes.controller(mosquitto.port)
    for device in devices:
        processes.agent(
            agent_config(
                tmp_path / f"{device}.yaml",
                device,
                mosquitto.port,
                extra={"labels": {"line": line}},
            )
        )
    logs = lambda: "\n".join(processes.log(n)[-3000:] for n in ["controller", *devices])  # noqa: E731
    wait_until(
        lambda: all(fleet(processes).get(d, {}).get("online") for d in devices),
        30,
        "agents online",
        logs,
    )
    probe = probe_factory(p.subscription(p.Channel.RESULTS), p.subscription(p.Channel.EVENTS))

    def deploy_and_wait(model: str, *target: str) -> None:
        deploy = processes.cli("deploy", model, *target)
        assert deploy.returncode == 0, deploy.stderr
        wait_until(
            lambda: all(fleet(processes)[d]["active_model"] == model for d in devices),
            30,
            f"{model} active on {devices}",
            logs,
        )

    deploy_and_wait("vibration-ae:1.0.0", "--selector", f"line={line}")
    for device in devices:
        _, payload = probe.wait_for(
            is_result(device, "vibration-ae:1.0.0"), what=f"a result from {device}"
        )
        result = p.decode(payload)
        assert isinstance(result, p.Result) and result.tier == "active"
        assert 0 < result.outputs["score"][0] < 5, "a healthy machine scores low"
    rows = wait_until(
        lambda: [r for r in telemetry_rows(processes, devices[0]) if r["inferences"]],
        20,
        "telemetry rows",
        logs,
    )
    row = rows[-1]
    assert row["model"] == "vibration-ae:1.0.0"
    assert row["latency_p50_ms"] > 0 and row["latency_p95_ms"] >= row["latency_p50_ms"]
    assert row["power_method"] == "estimate" and row["energy_per_inference_j"] > 0
    assert row["cpu_s"] > 0

    # the second deploy (the TFLite build) replaces the first, and results say so
    deploy_and_wait("vibration-ae:1.1.0", "--device", devices[0], "--device", devices[1])
    for device in devices:
        probe.wait_for(
            is_result(device, "vibration-ae:1.1.0"), what=f"a TFLite result from {device}"
        )

    def activated_from_previous(topic: str, payload: bytes) -> bool:
        event = p.decode(payload)
        return isinstance(event, p.Event) and event.detail.get("previous") == "vibration-ae:1.0.0"

    probe.wait_for(activated_from_previous, what="an activation event naming the previous model")
    status = json.loads(processes.cli("status", "--json").stdout)
    ours = [d for d in status["devices"] if d["id"] in devices]
    assert all(d["desired_model"] == d["active_model"] == "vibration-ae:1.1.0" for d in ours)

    # rollback: back to the last-good model, from the copy still on the device (no transfer)
    assert fleet(processes)[devices[0]].get("active_model") == "vibration-ae:1.1.0"
    since = probe.mark()
    rolled = processes.cli("rollback", devices[0], "--json")
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["model"] == "vibration-ae:1.0.0"
    wait_until(
        lambda: fleet(processes)[devices[0]]["active_model"] == "vibration-ae:1.0.0",
        30,
        "rollback to the last-good model",
        logs,
    )
    probe.wait_for(
        is_result(devices[0], "vibration-ae:1.0.0"), what="results after rollback", since=since
    )
    rows = (
        sqlite3.connect(Path(processes.env["GREENFLEET_HOME"]) / "greenfleet.db")
        .execute(
            "SELECT detail FROM replies WHERE device = ? ORDER BY ts DESC LIMIT 1", [devices[0]]
        )
        .fetchone()
    )
    assert "activated from the local copy" in rows[0]

    # an agent that stops says so, and the registry shows it offline
    processes.procs[1][0].terminate()
    wait_until(
        lambda: not fleet(processes)[devices[0]]["online"],
        15,
        "the stopped agent to show offline",
        logs,
    )


# amqtt leaves stream writers of closed client connections to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_smoke_on_the_embedded_broker(
    processes: Processes, probe_factory: Any, tmp_path: Path
) -> None:
    """The demo's fallback broker carries the same flow (it is not used for any guarantee)."""
    broker = EmbeddedBroker().start()
    try:
        device = unique("emb")
        assert (
            processes.cli(
                "models",
                "add",
                str(SAMPLES / "vibration-ae.onnx"),
                "--name",
                "vibration-ae",
                "--version",
                "1.0.0",
            ).returncode
            == 0
        )
        processes.controller(broker.port)
        processes.agent(agent_config(tmp_path / f"{device}.yaml", device, broker.port))
        logs = lambda: processes.log("controller")[-2000:] + processes.log(device)[-2000:]  # noqa: E731
        wait_until(lambda: fleet(processes).get(device, {}).get("online"), 30, "agent online", logs)
        assert processes.cli("deploy", "vibration-ae:1.0.0", "--device", device).returncode == 0
        wait_until(
            lambda: fleet(processes)[device]["active_model"] == "vibration-ae:1.0.0",
            30,
            "model active",
            logs,
        )
        wait_until(
            lambda: [r for r in telemetry_rows(processes, device) if r["inferences"]],
            20,
            "telemetry",
            logs,
        )
    finally:
        processes.stop_all()
        broker.stop()
        gc.collect()  # collect amqtt's leftovers here, where their warnings are filtered
