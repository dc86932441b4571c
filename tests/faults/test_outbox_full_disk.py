"""The agent's state disk is full while the network is fine: no telemetry is lost (issue 15 (4)).

The agent's whole state dir (the outbox with it) lives on a small disk; another program fills
it. While the broker and the controller are up, every record the outbox can no longer store is
sent straight away, so the controller's database holds every seq of the session. Then the
gateway's uplink is cut as well: records that can be neither stored nor sent are dropped, and
the agent counts them; once the uplink is back, its next telemetry record carries the count and
the controller shows it (``devices show``, the API's ``outbox_dropped``, a ``telemetry_dropped``
event).

The small disk is a tmpfs mounted by the test, or one in the agent's own mount namespace
(tests/faults/test_disk_full.py says how either is chosen); where neither can be mounted, the
agent runs under a wrapper that makes the outbox's INSERTs fail with "database or disk is full"
(SQLITE_FULL, what a full disk gives) once the test says the disk is full: the same scenario at
the storage seam.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.activation import Activation
from controller.broker import Mosquitto
from tests.conftest import SAMPLES, Processes, agent_config, unique, wait_until
from tests.faults.proxy import TcpProxy
from tests.faults.test_disk_full import EXECVP, _mount, _umount, small_disk_mechanism

pytestmark = pytest.mark.e2e

SIZE = 4 * 1024 * 1024  # the 0.7 MB model, the outbox, and the runs and state files
HOW = {"simulated-enospc": "simulated-sqlite-full"}.get(
    small_disk_mechanism(), small_disk_mechanism()
)
MODEL = p.ModelRef(name="vibration-ae", version="1.0.0")

CAPPED = '''
"""greenfleet-agent whose outbox cannot store once FLAG exists (a full disk, simulated)."""
import os, sqlite3, sys
from agent import outbox

flag = sys.argv[1]


class FullDisk:
    """The outbox's connection on a full disk: every INSERT fails as SQLite fails then."""

    def __init__(self, db):
        self._db = db

    def execute(self, sql, *args):
        if sql.lstrip().upper().startswith("INSERT INTO MESSAGES"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._db, name)


real_put = outbox.Outbox.put


def put(self, *args, **kwargs):
    if os.path.exists(flag) and self._db is not None and not isinstance(self._db, FullDisk):
        self._db = FullDisk(self._db)
    return real_put(self, *args, **kwargs)


outbox.Outbox.put = put
sys.argv = ["greenfleet-agent", *sys.argv[2:]]
from agent.cli import main

sys.exit(main())
'''


def telemetry(processes: Processes, device: str) -> list[int]:
    database = Path(processes.env["GREENFLEET_HOME"]) / "greenfleet.db"
    if not database.exists():
        return []
    db = sqlite3.connect(database)
    try:
        return [r[0] for r in db.execute("SELECT seq FROM telemetry WHERE device = ? ORDER BY seq",
                                         [device])]  # fmt: skip
    except sqlite3.OperationalError:  # the controller has not migrated it yet
        return []
    finally:
        db.close()


def device_row(processes: Processes, device: str) -> dict[str, Any]:
    shown = processes.cli("devices", "show", device, "--json")
    return json.loads(shown.stdout) if shown.returncode == 0 else {}


def fill(disk: Path) -> None:
    """Another program takes every free byte of the disk at ``disk``."""
    block = b"\0" * 65536
    with (disk / "other-program.dat").open("wb", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    fh.write(block[:size])
            except OSError:
                pass


@pytest.mark.parametrize("how", [HOW])
def test_a_full_state_disk_loses_no_telemetry_while_connected_and_counts_drops_offline(
    processes: Processes, tmp_path: Path, how: str
) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    device = unique("full")
    state = tmp_path / "state"
    state.mkdir()
    mounted = False
    try:
        if how == "tmpfs":
            assert _mount(state, SIZE), "mount worked at collection but not now"
            mounted = True
        data = (SAMPLES / "vibration-ae.onnx").read_bytes()
        active = p.ActiveModel(
            model=MODEL, sha256=hashlib.sha256(data).hexdigest(), format=p.ModelFormat.ONNX
        )
        seed = tmp_path / "seed"
        activation = Activation(seed if how == "tmpfs-in-namespace" else state)
        activation.prepare()
        activation.artifact_path(active).write_bytes(data)
        activation.activate(active)
        processes.controller(broker.port)
        with TcpProxy(broker.port) as uplink:
            config = agent_config(
                tmp_path / f"{device}.yaml", device, uplink.port, interval_s=0.5,
                extra={"state_dir": str(state), "inference": {"rate_hz": 20,
                       "publish_results": False},
                       "broker": {"host": "127.0.0.1", "port": uplink.port,
                                  "reconnect_max_s": 1}},
            )  # fmt: skip
            run = ["-m", "agent.cli", "run", "--config", str(config)]
            view, flag = state, tmp_path / "disk-full"
            if how == "tmpfs-in-namespace":
                script = (
                    f"mount -t tmpfs -o size={SIZE} tmpfs {state} && cp -a {seed}/. {state}/ && "
                    f"exec {sys.executable} {' '.join(run)}"
                )
                proc = processes.start(
                    device, "-c", EXECVP, "unshare", "--user", "--map-root-user", "--mount",
                    "sh", "-c", script,
                )  # fmt: skip
                view = Path(f"/proc/{proc.pid}/root{state}")
            elif how == "tmpfs":
                processes.start(device, *run)
            else:
                wrapper = tmp_path / "capped_outbox.py"
                wrapper.write_text(CAPPED)
                processes.start(device, str(wrapper), str(flag), *run[2:])

            def logs() -> str:
                return "\n".join(
                    f"--- {n}\n{processes.log(n)[-3000:]}" for n in ("controller", device)
                )

            wait_until(lambda: len(telemetry(processes, device)) >= 3, 30, "telemetry", logs)
            # 1. the disk fills up; the network is fine: nothing may be lost
            if how == "simulated-sqlite-full":
                flag.touch()
            else:
                fill(view)
            full_at = len(telemetry(processes, device))
            wait_until(lambda: len(telemetry(processes, device)) >= full_at + 8, 30,
                       "telemetry while the disk is full", logs)  # fmt: skip
            wait_until(lambda: "sent it unstored" in processes.log(device), 20,
                       "a record the outbox could not store", logs)  # fmt: skip
            seqs = telemetry(processes, device)
            assert seqs == list(range(len(seqs))), f"records lost with a full disk: {seqs}"
            assert device_row(processes, device).get("outbox_dropped") == 0
            # 2. the uplink is cut too: what can be neither stored nor sent is dropped, counted
            uplink.drop()
            wait_until(lambda: "nor send it; dropped it" in processes.log(device), 20,
                       "a dropped record", logs)  # fmt: skip
            uplink.heal()
            wait_until(lambda: (device_row(processes, device).get("outbox_dropped") or 0) > 0,
                       30, "the controller to show the agent's drops", logs)  # fmt: skip
            shown = device_row(processes, device)
            events = [e["event"] for e in shown["recent_events"]]
            assert "telemetry_dropped" in events, events
    finally:
        processes.stop_all()
        broker.stop()
        if mounted:
            _umount(state)
