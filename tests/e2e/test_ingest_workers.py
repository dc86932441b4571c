"""Ingest workers on an MQTT 5 shared subscription, with a real Mosquitto and the real
``greenfleet controller run --ingest-workers N`` (its own process, its workers child processes).

- A worker SIGKILLed in the middle of a telemetry burst loses nothing: it acknowledges only what
  SQLite committed, the pool restarts it under the same client id, and the broker sends again
  what it had not acknowledged. (Acknowledging on receipt instead lost 273 of 20,000 records in
  the same scenario while this test was written.)
- The same holds for a controller without workers, SIGKILLed while it drains a backlog.
- Going from 2 workers to none retires their broker sessions: records the broker had assigned
  to them while the controller was down are stored, and later records reach the controller,
  none left waiting for a worker that will never come back.

Each test has its own Mosquitto: worker client ids and the share group are fixed names, and a
broker keeps their persistent sessions.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol as p
from controller.broker import Mosquitto
from tests.conftest import Probe, Processes, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

DEVICES = 20


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mosq = Mosquitto(tmp_path / "broker").start()
    yield mosq
    mosq.stop()


class Publisher:
    """Single-record telemetry batches from DEVICES device ids, gapless (session, seq)."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-publisher")
        self.client.max_inflight_messages_set(500)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.sessions = [p.new_id()[:16] for _ in range(DEVICES)]
        self.start = p.utcnow()
        self.sent = 0

    def send(self, count: int) -> None:
        infos = []
        for _ in range(count):
            i, seq = self.sent % DEVICES, self.sent // DEVICES
            record = p.TelemetryRecord(
                seq=seq,
                start=self.start + timedelta(seconds=seq),
                window_s=1.0,
                model=None,
                inferences=5,
                errors=0,
                latency_p50_ms=1.0,
                latency_p95_ms=1.2,
                cpu_s=0.001,
                power_w=2.0,
            )
            batch = p.TelemetryBatch(session=self.sessions[i], records=[record])
            topic = p.topic(f"wk-{i:02d}", p.Channel.TELEMETRY)
            infos.append(self.client.publish(topic, p.encode(batch), qos=1))
            self.sent += 1
        for info in infos:
            info.wait_for_publish(timeout=60)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def rows(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
    except sqlite3.OperationalError:  # the controller has not made the table yet
        return 0
    finally:
        conn.close()


def controller(processes: Processes, port: int, workers: int) -> subprocess.Popen[bytes]:
    """The controller with ``workers`` workers, returned once it says "online" to agents:
    after its workers' subscriptions and its own (agents send telemetry only then)."""
    presence = Probe(port, p.CONTROLLER_TOPIC)
    mark = presence.mark()
    proc = processes.controller(port, "--ingest-workers", str(workers))

    def online(topic: str, payload: bytes) -> bool:
        state = p.decode(payload) if payload else None
        return isinstance(state, p.ControllerState) and state.online

    try:
        presence.wait_for(online, 60, "the controller online", since=mark)
    finally:
        presence.close()
    return proc


def workers_of(proc: subprocess.Popen[bytes]) -> dict[int, int]:
    """--index -> pid of the controller's ingest-worker children."""
    out = {}
    for child in psutil.Process(proc.pid).children():
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "ingest-worker" in cmd and "--retire" not in cmd:
            out[int(cmd[cmd.index("--index") + 1])] = child.pid
    return out


def test_a_killed_worker_loses_no_record(processes: Processes, broker: Mosquitto) -> None:
    db = Path(processes.env["GREENFLEET_HOME"]) / "greenfleet.db"
    ctl = controller(processes, broker.port, workers=2)
    log = lambda: processes.log("controller")  # noqa: E731
    first = wait_until(lambda: len(workers_of(ctl)) == 2 and workers_of(ctl), 30, "2 workers", log)

    publisher = Publisher(broker.port)
    total = 24_000
    burst = threading.Thread(target=publisher.send, args=(total,))
    burst.start()
    wait_until(lambda: rows(db) >= 3_000, 60, "the first records stored", log)
    assert rows(db) < total, "the burst ended before the kill: nothing to lose"
    psutil.Process(first[1]).send_signal(signal.SIGKILL)
    burst.join(timeout=90)
    publisher.close()

    wait_until(lambda: rows(db) >= total, 60, f"all {total} records stored", log)
    assert rows(db) == total  # none lost, none stored twice
    again = wait_until(lambda: workers_of(ctl).get(1), 30, "worker 1 restarted", log)
    assert again != first[1]
    assert f"ingest worker 1 (pid {first[1]}) exited" in log()

    ctl.send_signal(signal.SIGTERM)
    assert ctl.wait(timeout=30) == 0
    assert not any(psutil.pid_exists(pid) for pid in (again, first[2])), "workers outlived it"


def test_a_controller_killed_while_draining_a_backlog_loses_no_record(
    processes: Processes, broker: Mosquitto
) -> None:
    """Without workers the controller ingests, and acknowledges only what it stored too. A
    backlog (what a restart after an outage meets) fills its ingest queue at once: acked on
    receipt, that queue died with the process (seen while this test was written)."""
    db = Path(processes.env["GREENFLEET_HOME"]) / "greenfleet.db"
    log = lambda: processes.log("controller")  # noqa: E731
    ctl = controller(processes, broker.port, workers=0)
    ctl.send_signal(signal.SIGTERM)
    assert ctl.wait(timeout=30) == 0
    publisher = Publisher(broker.port)
    total = 30_000
    publisher.send(total)  # into the controller's session while it is down
    publisher.close()
    ctl = processes.controller(broker.port, "--ingest-workers", "0")
    wait_until(lambda: rows(db) >= 2_000, 60, "the first records of the backlog stored", log)
    ctl.kill()
    ctl.wait(timeout=10)
    assert rows(db) < total, "the backlog was stored before the kill: nothing to lose"
    ctl = controller(processes, broker.port, workers=0)
    wait_until(lambda: rows(db) >= total, 60, f"all {total} records stored", log)
    assert rows(db) == total
    ctl.send_signal(signal.SIGTERM)
    assert ctl.wait(timeout=30) == 0


def test_fewer_workers_retire_the_sessions_of_the_others(
    processes: Processes, broker: Mosquitto
) -> None:
    home = Path(processes.env["GREENFLEET_HOME"])
    db = home / "greenfleet.db"
    log = lambda: processes.log("controller")  # noqa: E731
    ctl = controller(processes, broker.port, workers=2)
    publisher = Publisher(broker.port)
    publisher.send(200)
    wait_until(lambda: rows(db) == 200, 30, "200 records stored by the workers", log)
    ctl.send_signal(signal.SIGTERM)
    assert ctl.wait(timeout=30) == 0

    # the controller is down: the broker assigns these to the two workers' sessions
    publisher.send(400)

    ctl = controller(processes, broker.port, workers=0)
    wait_until(lambda: rows(db) == 600, 60, "the records the sessions held", log)
    assert "retiring the session of ingest worker 2" in log()
    count = home / "ingest-workers.json"
    wait_until(lambda: count.read_text().strip() == '{"workers": 0}', 30, "the new count", log)

    publisher.send(400)  # now to the controller's own subscription, none to a retired session
    wait_until(lambda: rows(db) == 1_000, 30, "the records sent after the retirement", log)
    publisher.close()
    ctl.send_signal(signal.SIGTERM)
    assert ctl.wait(timeout=30) == 0
    assert rows(db) == 1_000


def test_a_negative_worker_count_is_refused(processes: Processes) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "controller.cli", "controller", "run", "--ingest-workers", "-1"],
        capture_output=True,
        text=True,
        env=processes.env,
        timeout=60,
    )
    assert done.returncode == 1
    assert "--ingest-workers must be 0" in done.stderr
