"""The broker crashes and comes back under a real controller and a real agent.

Once in the middle of a model transfer, once during steady inference. What the operator must
see afterwards: the deploy completed (the device runs the model it was sent), and the
controller's database holds every telemetry record the agent made, once each. The agent's own
count comes from the line it logs when it stops cleanly (SIGTERM), the user-visible account a
site engineer would compare with what ``greenfleet devices show`` and the database say.

The broker is Mosquitto as the tests configure it (no persistence), so a restart forgets every
session and subscription, and its PUBACK proves nothing: the agent deletes a record only when
the controller says it stored it (protocol.Stored) and sends again what it did not. Who comes
back first matters, so each test fixes the order with a proxy instead of leaving it to the
reconnect backoffs:

- the controller first (it usually sits next to the broker; gateways are further away): nothing
  may be lost. The agent's proxy is also slow (150 kB/s, a gateway's uplink) so that the 0.7 MB
  model takes seconds to arrive and the first crash lands in the middle of it;
- the agent first: what it replays before the controller has subscribed again reaches nobody;
  the agent holds its outbox while the controller's retained presence
  (protocol.ControllerState) says it is offline, and sends everything unacknowledged again
  when a new connection of the controller appears.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.broker import Mosquitto
from tests.conftest import SAMPLES, Processes, agent_config, unique, wait_until
from tests.faults.proxy import TcpProxy

pytestmark = pytest.mark.e2e

MODEL = "vibration-ae:1.0.0"
STOPPED = re.compile(
    r"agent stopped: session (?P<session>\S+) produced (?P<records>\d+) telemetry records "
    r"\(seq (?P<seqs>[^)]*)\) and (?P<events>\d+) events; (?P<dropped>\d+) dropped from the "
    r"outbox, (?P<left>\d+) still in it"
)


def device_row(processes: Processes, device: str) -> dict[str, Any]:
    shown = processes.cli("devices", "show", device, "--json")
    if shown.returncode != 0:
        return {}
    row: dict[str, Any] = json.loads(shown.stdout)
    return row


def telemetry(processes: Processes, device: str, session: str | None = None) -> list[sqlite3.Row]:
    database = Path(processes.env["GREENFLEET_HOME"]) / "greenfleet.db"
    if not database.exists():  # the controller has not created it yet
        return []
    db = sqlite3.connect(database)
    db.row_factory = sqlite3.Row
    try:
        sql = "SELECT session, seq, inferences FROM telemetry WHERE device = ?"
        args = [device]
        if session is not None:
            sql += " AND session = ?"
            args.append(session)
        return db.execute(sql + " ORDER BY seq", args).fetchall()
    except sqlite3.OperationalError as exc:  # the file exists, the migration has not run yet
        if "no such table" not in str(exc):
            raise
        return []
    finally:
        db.close()


def caught_up(processes: Processes, device: str, at_least: int) -> bool:
    """The controller holds seqs 0..N-1 of the agent's session without a gap, N >= at_least."""
    seqs = [r["seq"] for r in telemetry(processes, device)]
    return len(seqs) >= at_least and seqs == list(range(len(seqs)))


def crash(broker: Mosquitto) -> None:
    """SIGKILL the broker: a crash, not a clean shutdown."""
    assert broker.process is not None
    broker.process.kill()
    broker.process.wait(5)


def restart(broker: Mosquitto) -> Mosquitto:
    """A new Mosquitto on the same port, knowing nothing of the old one's sessions."""
    return Mosquitto(broker.workdir, broker.port).start()


def reconnects(processes: Processes, name: str) -> int:
    return processes.log(name).count("reconnected to broker")


def add_model(processes: Processes) -> None:
    added = processes.cli(
        "models", "add", str(SAMPLES / "vibration-ae.onnx"), "--name", "vibration-ae",
        "--version", "1.0.0",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


def stop_and_account(
    processes: Processes, agent: subprocess.Popen[bytes], device: str, logs: Callable[[], str]
) -> tuple[str, int, list[int]]:
    """SIGTERM the agent; return its session, the records it says it made, and the seqs of that
    session the controller stored (waiting a little for ingest to catch up)."""
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0, logs()
    found = STOPPED.search(processes.log(device))
    assert found, f"the agent logs its account when it stops\n{logs()}"
    session, made = found["session"], int(found["records"])
    assert found["seqs"] == f"0..{made - 1}", found[0]
    assert int(found["dropped"]) == 0 and int(found["left"]) == 0, found[0]
    deadline = time.monotonic() + 10
    while len(telemetry(processes, device, session)) < made and time.monotonic() < deadline:
        time.sleep(0.2)
    return session, made, [r["seq"] for r in telemetry(processes, device, session)]


def test_broker_crashes_mid_transfer_and_mid_inference_lose_nothing(
    processes: Processes, tmp_path: Path
) -> None:
    """The controller, next to the broker, is back before the gateway's link each time."""
    broker = Mosquitto(tmp_path / "broker").start()
    device = unique("crash")
    state = tmp_path / f"{device}-state"
    try:
        add_model(processes)
        processes.controller(broker.port)
        with TcpProxy(broker.port, rate_bps=150_000) as uplink:
            config = agent_config(
                tmp_path / f"{device}.yaml",
                device,
                uplink.port,
                interval_s=0.5,
                extra={"broker": {"host": "127.0.0.1", "port": uplink.port, "reconnect_max_s": 2}},
            )
            agent = processes.agent(config)

            def logs() -> str:
                return "\n".join(
                    f"--- {name}\n{processes.log(name)[-2500:]}" for name in ("controller", device)
                )

            def crash_and_restart(down_s: float) -> Mosquitto:
                before = reconnects(processes, "controller")
                crash(broker)
                uplink.drop()  # the gateway stays cut off until the controller is back
                time.sleep(down_s)
                restarted = restart(broker)
                wait_until(
                    lambda: reconnects(processes, "controller") > before,
                    30,
                    "the controller to reconnect",
                    logs,
                )
                # no wait for its SUBSCRIBEs: the agent deletes nothing the controller did not
                # acknowledge as stored (protocol.Stored), whichever arrives first
                uplink.heal()
                return restarted

            wait_until(lambda: device_row(processes, device).get("online"), 30, "online", logs)

            # 1. a crash in the middle of the transfer
            deployed = processes.cli("deploy", MODEL, "--device", device)
            assert deployed.returncode == 0, deployed.stderr
            # the first of 3 chunks is on disk (the sidecar says so), the others on their way
            wait_until(lambda: list((state / "downloads").glob("*.chunks")), 20, "a chunk", logs)
            assert not list((state / "models").iterdir()), "the crash comes mid-transfer"
            broker = crash_and_restart(down_s=1.0)
            wait_until(
                lambda: device_row(processes, device).get("active_model") == MODEL,
                45,
                f"{MODEL} active after the crash mid-transfer",
                logs,
            )

            # 2. a crash during steady inference
            wait_until(
                lambda: sum(1 for r in telemetry(processes, device) if r["inferences"]) >= 3,
                20,
                "telemetry from the new model",
                logs,
            )
            broker = crash_and_restart(down_s=2.0)
            before = len(telemetry(processes, device))
            wait_until(
                lambda: len(telemetry(processes, device)) >= before + 8,
                30,
                "telemetry flowing again after the second crash",
                logs,
            )

            # 3. the agent's own account against the controller's database
            session, made, seqs = stop_and_account(processes, agent, device, logs)
        assert made >= 20, made
        assert len(seqs) == len(set(seqs)), "a record stored twice"
        assert seqs == list(range(made)), (
            f"the agent made seqs 0..{made - 1}; the controller has {seqs}"
        )
        detail = device_row(processes, device)
        assert detail["active_model"] == MODEL and detail["session"] == session
    finally:
        processes.stop_all()
        broker.stop()


def test_telemetry_replayed_before_the_controller_is_back_is_not_lost(
    processes: Processes, tmp_path: Path
) -> None:
    """The other order: the broker restarts and the agent is back before the controller."""
    broker = Mosquitto(tmp_path / "broker").start()
    device = unique("first")
    try:
        with TcpProxy(broker.port) as controller_link:
            processes.controller(controller_link.port)
            agent = processes.agent(
                agent_config(
                    tmp_path / f"{device}.yaml",
                    device,
                    broker.port,
                    interval_s=0.5,
                    extra={
                        "broker": {"host": "127.0.0.1", "port": broker.port, "reconnect_max_s": 2}
                    },
                )
            )

            def logs() -> str:
                return "\n".join(
                    f"--- {name}\n{processes.log(name)[-2500:]}" for name in ("controller", device)
                )

            wait_until(lambda: len(telemetry(processes, device)) >= 3, 30, "telemetry", logs)
            crash(broker)
            controller_link.drop()
            time.sleep(1.0)
            broker = restart(broker)
            before = reconnects(processes, device)
            wait_until(lambda: reconnects(processes, device) > before, 20, "agent back", logs)
            time.sleep(2.0)  # the agent reports with nobody to store it (the scenario's point)
            before_heal = len(telemetry(processes, device))
            controller_link.heal()
            wait_until(lambda: reconnects(processes, "controller") >= 1, 30, "controller", logs)
            wait_until(
                lambda: caught_up(processes, device, at_least=before_heal + 4),
                30,
                "the controller to store what the agent held and what came after",
                logs,
            )
            _, made, seqs = stop_and_account(processes, agent, device, logs)
        assert seqs == list(range(made)), f"the agent made 0..{made - 1}; the controller has {seqs}"
    finally:
        processes.stop_all()
        broker.stop()
