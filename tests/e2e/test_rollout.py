"""Staged rollouts end to end: real Mosquitto, a real controller process, four real agents.

Every device first runs vibration-ae:1.0.0 (the sample model). Version 2.0.0 is the same
network with other bytes (a good model); version 3.0.0 returns ``sqrt(-mean(x^2))``: finite on
the zero-input smoke test, so it activates, and NaN on every real window, so the agent falls
back to its last-good model after three errors (a bad model the gates must catch).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from agent import protocol as p
from controller.broker import Mosquitto
from tests.conftest import SAMPLES, Probe, Processes, agent_config, unique, wait_until

pytestmark = pytest.mark.e2e

OLD, GOOD, BAD = "vibration-ae:1.0.0", "vibration-ae:2.0.0", "vibration-ae:3.0.0"
AGENTS = 4


def good_model(path: Path) -> Path:
    graph = onnx.load(SAMPLES / "vibration-ae.onnx")
    graph.doc_string = "the same network, rebuilt"
    onnx.save(graph, path)
    return path


def bad_model(path: Path) -> Path:
    """``sqrt(mean(x^2) - 0.1)``: finite on the golden cases `models add` signs (seeded random
    normal inputs, mean square about 1), NaN on every real sensor window (mean square about
    0.003). It passes staging and fails in production: only the health gates can catch it."""
    nodes = [
        helper.make_node("Mul", ["window", "window"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["ms", "c"], ["d"]),
        helper.make_node("Sqrt", ["d"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan-on-real-input",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor("c", TensorProto.FLOAT, [], [0.1])],
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    built.ir_version = 8
    onnx.checker.check_model(built)
    onnx.save(built, path)
    return path


@dataclass
class Fleet:
    procs: Processes
    devices: list[str]  # sorted: the first is the canary
    site: str
    probe: Probe
    tmp: Path

    def cli(self, *args: str) -> Any:
        result = self.procs.cli("--log-level", "WARNING", *args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def active(self) -> dict[str, str | None]:
        return {
            d["id"]: d["active_model"]
            for d in self.cli("devices", "list")
            if d["id"] in self.devices
        }

    def show(self, rollout: str) -> dict[str, Any]:
        return self.cli("rollout", "show", rollout)  # type: ignore[no-any-return]

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n{self.procs.log(name)[-2500:]}" for name in ["controller", *self.devices]
        )

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(Path(self.procs.env["GREENFLEET_HOME"]) / "greenfleet.db")

    def events(self, rollout: str) -> list[tuple[str, str, str]]:
        """(ts, event, device) of every event of the rollout, oldest first."""
        with self.db() as db:
            return db.execute(
                "SELECT ts, event, device FROM events WHERE rollout = ? ORDER BY ts, rowid",
                [rollout],
            ).fetchall()

    def deployments(self, model: str) -> dict[str, int]:
        """Active-slot deploys of ``model`` sent, per device."""
        with self.db() as db:
            rows = db.execute(
                "SELECT device, COUNT(*) FROM deployments WHERE model = ? AND slot = 'active' "
                "GROUP BY device",
                [model],
            ).fetchall()
        return dict(rows)

    def create(self, model: str, **spec: Any) -> str:
        path = self.tmp / f"rollout-{unique('spec')}.yaml"
        gates = {
            "min_inferences": 10,
            # four agents, a controller and a broker share two CPU cores here: the p95 of a
            # sub-millisecond inference, and the CPU-based energy estimate, swing several-fold
            # between devices running the same network; the gates are judged, loosely
            "max_latency_regression": 20.0,
            "max_energy_regression": 20.0,
            **spec.pop("gates", {}),
        }
        path.write_text(
            yaml.safe_dump(
                {"model": model, "selector": {"site": self.site}, "gates": gates, **spec}
            )
        )
        created = self.cli("rollout", "create", "--file", str(path))
        assert created["members"][0]["device"] == self.devices[0]
        return str(created["id"])


@pytest.fixture
def fleet(
    mosquitto: Mosquitto, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> Iterator[Fleet]:
    """Four agents on one site, all running vibration-ae:1.0.0, and 2.0.0 / 3.0.0 in the
    catalog."""
    for version, path in (
        ("1.0.0", SAMPLES / "vibration-ae.onnx"),
        ("2.0.0", good_model(tmp_path / "good.onnx")),
        ("3.0.0", bad_model(tmp_path / "bad.onnx")),
    ):
        added = processes.cli(
            "models", "add", str(path), "--name", "vibration-ae", "--version", version
        )
        assert added.returncode == 0, added.stderr
    site = unique("site")
    devices = sorted(unique("gw") for _ in range(AGENTS))
    probe = probe_factory(p.subscription(p.Channel.STATE), p.subscription(p.Channel.BLOB_REQ))
    processes.controller(mosquitto.port)
    for device in devices:
        processes.agent(
            agent_config(
                tmp_path / f"{device}.yaml",
                device,
                mosquitto.port,
                interval_s=0.5,
                extra={"labels": {"site": site}},
            )
        )
    ours = Fleet(processes, devices, site, probe, tmp_path)
    wait_until(lambda: len(ours.active()) == AGENTS, 40, "agents online", ours.logs)
    deployed = processes.cli("deploy", OLD, "--selector", f"site={site}")
    assert deployed.returncode == 0, deployed.stderr
    wait_until(
        lambda: set(ours.active().values()) == {OLD}, 40, f"{OLD} active everywhere", ours.logs
    )
    yield ours


def test_a_good_model_rolls_out_through_canary_and_waves(fleet: Fleet) -> None:
    rollout = fleet.create(GOOD, canary=1, wave_size=2, soak_s=2)
    view = wait_until(
        lambda: (v := fleet.show(rollout))["status"] in ("completed", "paused", "aborting") and v,
        50,
        "the rollout to finish",
        fleet.logs,
    )
    assert view["status"] == "completed", [e["message"] for e in view["events"]]
    assert set(fleet.active().values()) == {GOOD}
    assert view["waves"] == 3 and {m["status"] for m in view["members"]} == {"updated"}
    assert {m["previous_model"] for m in view["members"]} == {OLD}
    kinds = [event for _, event, _ in fleet.events(rollout)]
    assert kinds.count("wave_started") == 3 and kinds.count("wave_passed") == 3
    assert fleet.deployments(GOOD) == dict.fromkeys(fleet.devices, 1), "one deploy each"
    judged = {g["name"]: g for g in view["gates"]["results"]}
    assert judged["error_rate"]["judged"] and judged["error_rate"]["value"] == 0


def test_a_bad_model_trips_the_canary_gate_and_only_the_canary_ever_saw_it(
    fleet: Fleet,
) -> None:
    canary, others = fleet.devices[0], fleet.devices[1:]
    since = fleet.probe.mark()
    rollout = fleet.create(BAD, canary=1, wave_size=1, soak_s=2)
    view = wait_until(
        lambda: (v := fleet.show(rollout))["status"] not in ("running",) and v,
        40,
        "a gate to stop the rollout",
        fleet.logs,
    )
    assert view["status"] in ("aborting", "aborted"), [e["message"] for e in view["events"]]
    breached = [g["name"] for g in view["gates"]["results"] if g["breached"]]
    assert breached and set(breached) <= {"error_rate", "error_rate_increase", "fallback_rate"}
    assert "breached in canary" in view["reason"]
    # the canary goes back to the previous model (an explicit rollback from its local copy)
    view = wait_until(
        lambda: (v := fleet.show(rollout))["status"] == "aborted" and v,
        30,
        "the canary back on the previous model",
        fleet.logs,
    )
    states = {m["device"]: m["status"] for m in view["members"]}
    assert states == {canary: "rolled_back", **dict.fromkeys(others, "cancelled")}
    assert fleet.active() == dict.fromkeys(fleet.devices, OLD)
    # no device outside the canary ever received it: not sent, not fetched, never active
    assert fleet.deployments(BAD) == {canary: 1}
    with fleet.db() as db:
        bad_sha = db.execute("SELECT sha256 FROM models WHERE id = ?", [BAD]).fetchone()[0]
        rollback = db.execute(
            "SELECT desired_model, desired_rollback FROM devices WHERE id = ?", [canary]
        ).fetchone()
    assert rollback == (OLD, 1), "an explicit rollback"
    fetched, ran = set(), set()
    for topic, payload in fleet.probe.history[since:]:
        device = p.parse_topic(topic).device
        message = p.decode(payload)
        if isinstance(message, p.BlobRequest) and message.sha256 == bad_sha:
            fetched.add(device)
        if isinstance(message, p.Birth) and message.active and str(message.active.model) == BAD:
            ran.add(device)
    assert fetched <= {canary} and ran == {canary}


def test_a_controller_killed_mid_rollout_resumes_without_resending_or_skipping(
    fleet: Fleet, mosquitto: Mosquitto
) -> None:
    rollout = fleet.create(GOOD, canary=1, wave_size=1, soak_s=2)
    controller = fleet.procs.procs[0][0]
    view = wait_until(
        lambda: ((v := fleet.show(rollout))["wave"] >= 1 or v["status"] != "running") and v,
        30,
        "the canary to pass",
        fleet.logs,
    )
    assert view["status"] == "running", [e["message"] for e in view["events"]]
    controller.send_signal(signal.SIGKILL)
    controller.wait(10)
    time.sleep(2)  # the fleet carries on without a controller
    fleet.procs.controller(mosquitto.port)
    view = wait_until(
        lambda: (v := fleet.show(rollout))["status"] != "running" and v,
        50,
        "the rollout to finish after the restart",
        fleet.logs,
    )
    assert view["status"] == "completed", [e["message"] for e in view["events"]]
    assert set(fleet.active().values()) == {GOOD}
    # nothing re-sent: one deploy of the new model per device, before and after the restart
    assert fleet.deployments(GOOD) == dict.fromkeys(fleet.devices, 1)
    # nothing skipped: every wave started once, in order, after the one before passed
    events = fleet.events(rollout)
    passed = [ts for ts, event, _ in events if event == "wave_passed"]
    order = [event for _, event, _ in events if event in ("wave_started", "wave_passed")]
    assert view["waves"] == AGENTS and order == ["wave_started", "wave_passed"] * AGENTS
    with fleet.db() as db:
        sent = dict(
            db.execute(
                "SELECT device, sent_at FROM deployments WHERE model = ? AND slot = 'active'",
                [GOOD],
            ).fetchall()
        )
    waves = {m["device"]: m["wave"] for m in view["members"]}
    for wave in range(1, AGENTS):
        (device,) = [d for d, w in waves.items() if w == wave]
        assert sent[device] >= passed[wave - 1], f"wave {wave} sent before the last passed"
