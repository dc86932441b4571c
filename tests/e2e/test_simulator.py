"""The fleet simulator against a real Mosquitto and the real controller daemon (in-process):
20 simulated devices come online, their telemetry arrives without gaps, and a deploy of the
sample model reaches all of them."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from controller.cli import main as cli_main
from controller.daemon import Controller
from controller.home import Home
from simulator.fleet import Fleet, FleetThread, load_sim_profiles
from tests.conftest import SAMPLES, clear_controller_presence, unique, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

DEVICES = 20
MODEL = "vibration-ae:1.0.0"


def query(home: Home, sql: str, *params: Any) -> list[sqlite3.Row]:
    db = sqlite3.connect(home.database)
    db.row_factory = sqlite3.Row
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def test_simulated_fleet_comes_online_sends_gapless_telemetry_and_takes_a_deploy(
    mosquitto: Any, tmp_path: Path
) -> None:
    home = Home(tmp_path / "home")
    assert (
        cli_main(
            [
                "--home",
                str(home.root),
                "models",
                "add",
                str(SAMPLES / "vibration-ae.onnx"),
                "--name",
                "vibration-ae",
                "--version",
                "1.0.0",
            ]
        )
        == 0
    )
    controller = Controller(
        home,
        "127.0.0.1",
        mosquitto.port,
        reconcile_interval_s=0.5,
        client_id=f"gf-controller-{uuid.uuid4().hex[:6]}",
    )
    controller.start()
    prefix = unique("sim")
    line = unique("line")
    sim = FleetThread(
        lambda: Fleet(
            "127.0.0.1",
            mosquitto.port,
            DEVICES,
            load_sim_profiles(["rpi4", "x86-ipc"]),
            interval_s=0.2,
            prefix=prefix,
            labels={"line": line},
        )
    )
    try:
        assert controller.link.connected.wait(10)
        fleet = sim.start()
        ids = [d.id for d in fleet.devices]

        def online() -> int:
            placeholders = ",".join("?" * len(ids))
            rows = query(
                home, f"SELECT count(*) FROM devices WHERE online AND id IN ({placeholders})", *ids
            )
            return int(rows[0][0])

        wait_until(lambda: online() == DEVICES, 15, f"{DEVICES} simulated devices online")

        deploy = ["--home", str(home.root), "deploy", MODEL, "--selector", f"line={line}"]
        assert cli_main(deploy) == 0

        def converged() -> int:
            rows = query(
                home,
                "SELECT count(*) FROM devices WHERE active_model = ? AND id LIKE ?",
                MODEL,
                f"{prefix}-%",
            )
            return int(rows[0][0])

        wait_until(lambda: converged() == DEVICES, 20, f"{MODEL} active on {DEVICES} devices")
        assert sim.call(lambda: fleet.stats()["deploys_ok"]) == DEVICES
        wait_until(
            lambda: sim.call(lambda: min(d.seq for d in fleet.devices)) >= 10,
            10,
            "ten telemetry records from every device",
        )
    finally:
        sim.stop()
    published = fleet.published()
    assert min(published.values()) >= 10

    def rows_in() -> bool:
        got = query(
            home,
            "SELECT device, session, count(*), min(seq), max(seq) FROM telemetry "
            "WHERE device LIKE ? GROUP BY device, session",
            f"{prefix}-%",
        )
        return {(r[0], r[1]): (r[2], r[3], r[4]) for r in got} == {
            key: (n, 0, n - 1) for key, n in published.items()
        }

    try:
        wait_until(rows_in, 10, "every published telemetry record in the database, no gaps")
        models = query(
            home,
            "SELECT DISTINCT model FROM telemetry WHERE device LIKE ? AND model IS NOT NULL",
            f"{prefix}-%",
        )
        assert [r[0] for r in models] == [MODEL]
        # the clean stop's Death reached the controller
        wait_until(lambda: online() == 0, 10, "simulated devices offline after the stop")
    finally:
        controller.stop()
        clear_controller_presence(mosquitto.port)  # its retained "offline" would hold later agents
