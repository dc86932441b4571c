"""``greenfleet rollout ...`` and ``devices pin`` on a real SQLite home, and the daemon's rollout
job moving a rollout through its waves on telemetry written as ingest writes it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from agent import protocol as p
from controller import registry, rollout_store
from controller.cli import main
from controller.db import open_db
from controller.ingest import telemetry_rows
from controller.rollouts_job import RolloutsJob

SAMPLES = Path(__file__).parents[2] / "model_store" / "samples"
HW = p.HardwareFacts(arch="x86_64", cores=2, memory_mb=1024, os="Linux", python="3.11")
DEVICES = ["gw-1", "gw-2", "gw-3", "gw-4", "gw-5"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GREENFLEET_HOME", str(tmp_path / "home"))
    for version in ("1.0.0", "2.0.0"):
        onnx = str(SAMPLES / "vibration-ae.onnx")
        assert main(["models", "add", onnx, "--name", "vib", "--version", version]) == 0
    db = open_db(tmp_path / "home" / "greenfleet.db")
    for device in DEVICES:
        report(db, device, "vib:1.0.0", datetime.now(UTC))
    registry.apply_birth(db, "other", birth("vib:1.0.0", site="b"), datetime.now(UTC))
    return tmp_path / "home"


def birth(active: str | None, site: str = "a", session: str = "s1") -> p.Birth:
    model = None
    if active:
        model = p.ActiveModel(
            model=p.ModelRef.parse(active), sha256="a" * 64, format=p.ModelFormat.ONNX
        )
    return p.Birth(
        session=session,
        agent_version="0.1.0",
        device_class="x86-ipc",
        labels={"site": site},
        runtimes=[p.ModelFormat.ONNX],
        hardware=HW,
        active=model,
    )


def report(db: sqlite_utils.Database, device: str, active: str, now: datetime) -> None:
    registry.apply_birth(db, device, birth(active), now)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """Run a command with --json; its parsed output."""
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.startswith("greenfleet: ") and "Traceback" not in err
    return err


def desired(home: Path) -> dict[str, tuple[str | None, int | None]]:
    db = open_db(home / "greenfleet.db")
    return {r["id"]: (r["desired_model"], r["desired_rollback"]) for r in registry.devices(db)}


def test_create_list_show_pause_resume_abort(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pinned = run(capsys, "devices", "pin", "gw-5", "--reason", "line audit")
    assert pinned == {"device": "gw-5", "pinned": True, "reason": "line audit"}
    created = run(
        capsys,
        "rollout", "create", "vib:2.0.0", "--selector", "site=a", "--canary", "1",
        "--wave-size", "50%", "--soak", "2s", "--on-breach", "pause",
    )  # fmt: skip
    assert (created["id"], created["status"], created["wave"]) == ("r1", "running", 0)
    assert created["spec"]["soak_s"] == 2 and created["spec"]["gates"]["on_breach"] == "pause"
    members = {m["device"]: m for m in created["members"]}
    assert sorted(members) == DEVICES, "the selector's devices, not the other site's"
    assert members["gw-1"]["status"] == "updating" and members["gw-1"]["wave"] == 0
    assert members["gw-5"]["status"] == "skipped" and members["gw-5"]["reason"] == "pinned"
    assert [members[d]["status"] for d in ("gw-2", "gw-3", "gw-4")] == ["pending"] * 3
    assert created["waves"] == 3, "canary of 1, then 50% of 4 devices: 2 + 1"
    # only the canary's desired model is set; the daemon is not running and need not be
    assert desired(home)["gw-1"] == ("vib:2.0.0", 0)
    assert all(desired(home)[d][0] is None for d in ("gw-2", "gw-3", "gw-4", "gw-5"))

    (listed,) = run(capsys, "rollout", "list")
    assert {k: listed[k] for k in ("id", "model", "status", "updated", "total", "skipped")} == {
        "id": "r1",
        "model": "vib:2.0.0",
        "status": "running",
        "updated": 0,
        "total": 4,
        "skipped": 1,
    }
    assert main(["rollout", "list"]) == 0
    table = capsys.readouterr().out
    assert "r1" in table and "vib:2.0.0" in table and "canary/2" in table and "0/4" in table

    shown = run(capsys, "rollout", "show", "r1")
    assert [e["event"] for e in shown["events"]][-2:] == ["member_skipped", "rollout_started"]
    assert main(["rollout", "show", "r1"]) == 0
    out = capsys.readouterr().out
    assert "members" in out and "gw-5" in out and "skipped" in out and "gates" in out

    paused = run(capsys, "rollout", "pause", "r1", "--reason", "shift change")
    assert (paused["status"], paused["reason"]) == ("paused", "shift change")
    assert "is paused; only a running one can pause" in fails(capsys, "rollout", "pause", "r1")
    resumed = run(capsys, "rollout", "resume", "r1")
    assert (resumed["status"], resumed["reason"]) == ("running", "resumed by the operator")

    aborted = run(capsys, "rollout", "abort", "r1", "--reason", "wrong build")
    assert aborted["status"] == "aborting" and aborted["rollbacks"] == ["gw-1"]
    assert desired(home)["gw-1"] == ("vib:1.0.0", 1), "rolled back at once, explicitly"
    shown = run(capsys, "rollout", "show", "r1")
    states = {m["device"]: m["status"] for m in shown["members"]}
    assert states == {
        "gw-1": "rolling_back",
        "gw-2": "cancelled",
        "gw-3": "cancelled",
        "gw-4": "cancelled",
        "gw-5": "skipped",
    }
    kinds = [e["event"] for e in shown["events"]]
    assert {"rollout_paused", "rollout_resumed", "rollout_aborting"} <= set(kinds)
    assert "only a running or paused one" in fails(capsys, "rollout", "abort", "r1")
    # the member's rollout events show on the device too
    device = run(capsys, "devices", "show", "gw-1")
    assert "member_rolling_back" in [e["event"] for e in device["recent_events"]]


def test_create_refuses_what_it_cannot_do(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = fails(capsys, "rollout", "create", "vib:9.9.9", "--selector", "site=a")
    assert "no model vib:9.9.9 in the catalog; see `greenfleet models list`" in err
    assert "--selector" in fails(capsys, "rollout", "create", "vib:2.0.0")
    err = fails(capsys, "rollout", "create", "vib:2.0.0", "--selector", "site=a", "--canary", "0%")
    assert "canary" in err
    assert "no device matching site=z" in fails(
        capsys, "rollout", "create", "vib:2.0.0", "--selector", "site=z"
    )
    assert "no rollout 'r7'" in fails(capsys, "rollout", "show", "r7")
    assert "no device 'ghost'" in fails(capsys, "devices", "pin", "ghost")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: vib:2.0.0\nselector: {site: a}\nsoak: 5\n")
    assert "soak: unknown key" in fails(capsys, "rollout", "create", "--file", str(bad))
    assert open_db(home / "greenfleet.db")["rollouts"].count == 0


def test_a_file_with_flags_over_it(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "rollout.yaml"
    spec.write_text(
        "model: vib:2.0.0\nselector: {site: a}\ncanary: 2\nsoak_s: 60\n"
        "gates: {min_inferences: 10, max_latency_regression: null}\n"
    )
    created = run(capsys, "rollout", "create", "--file", str(spec), "--soak", "1m30s")
    assert created["spec"]["canary"] == 2 and created["spec"]["soak_s"] == 90
    assert created["spec"]["gates"]["min_inferences"] == 10
    assert created["spec"]["gates"]["max_latency_regression"] is None
    # one rollout per model per device: a second one of the same model name skips them
    second = run(capsys, "rollout", "create", "vib:1.0.0", "--selector", "class=x86-ipc")
    reasons = {m["device"]: m["reason"] for m in second["members"]}
    assert reasons["gw-1"] == "in rollout r1" and reasons["gw-5"] == "in rollout r1"
    assert reasons["other"] != "in rollout r1"


def test_pin_and_unpin(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "devices", "pin", "gw-2", "--reason", "line audit")["pinned"] is True
    listed = {d["id"]: d for d in run(capsys, "devices", "list")}
    assert listed["gw-2"]["pinned"] and listed["gw-2"]["pin_reason"] == "line audit"
    assert not listed["gw-1"]["pinned"]
    assert main(["devices", "show", "gw-2"]) == 0
    assert "pinned: rollouts skip it (line audit)" in capsys.readouterr().out
    assert run(capsys, "devices", "unpin", "gw-2") == {
        "device": "gw-2",
        "pinned": False,
        "was_pinned": True,
    }
    assert main(["devices", "unpin", "gw-2"]) == 0
    assert "was not pinned" in capsys.readouterr().out
    events = run(capsys, "devices", "show", "gw-2")["recent_events"]
    assert [e["event"] for e in events][:2] == ["device_unpinned", "device_pinned"]


def telemetry(
    db: sqlite_utils.Database, device: str, seq: int, at: datetime, model: str, n: int
) -> None:
    record = p.TelemetryRecord(
        seq=seq,
        start=at,
        window_s=0.5,
        model=p.ModelRef.parse(model),
        inferences=n,
        errors=0,
        latency_p95_ms=1.0,
        cpu_s=0.01,
        energy_per_inference_j=0.001,
    )
    batch = p.TelemetryBatch(session="s1", records=[record])
    db.table("telemetry").insert_all(telemetry_rows(device, batch, registry.iso(at)))


def test_the_job_moves_a_rollout_through_its_waves_and_watch_shows_it(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Devices report the model, telemetry arrives, the soak passes: wave after wave."""
    created = run(
        capsys,
        "rollout", "create", "vib:2.0.0", "--selector", "site=a", "--wave-size", "2",
        "--soak", "2s",
    )  # fmt: skip
    db = open_db(home / "greenfleet.db")
    job = RolloutsJob(db)
    start = datetime.fromisoformat(created["created"])
    clock = [start]

    def tick(seconds: float) -> Any:
        clock[0] += timedelta(seconds=seconds)
        job.tick(clock[0])
        return run(capsys, "rollout", "show", "r1")

    def serve(step: int) -> None:
        """Every device sends a window: the ones asked for the new model run it."""
        for device in DEVICES:
            row = registry.get_device(db, device)
            if row["desired_model"] and row["desired_model"] != row["active_model"]:
                report(db, device, row["desired_model"], clock[0])
            telemetry(
                db, device, step, clock[0], registry.get_device(db, device)["active_model"], 60
            )

    seq = 0
    passed: list[int] = []
    while tick(0.5)["status"] == "running" and seq < 40:
        seq += 1
        serve(seq)
        view = run(capsys, "rollout", "show", "r1")
        if view["wave"] not in passed:
            passed.append(view["wave"])
        if seq == 3:
            assert main(["rollout", "watch", "r1", "--once"]) == 0
            frame = capsys.readouterr().out
            assert "canary" in frame and "gates" in frame and "error_rate" in frame
    view = run(capsys, "rollout", "show", "r1")
    assert view["status"] == "completed", view["events"][:3]
    assert passed == [0, 1, 2], "canary of 1, then waves of 2 and 2, none skipped"
    assert {m["status"] for m in view["members"]} == {"updated"}
    assert all(d[0] == "vib:2.0.0" for k, d in desired(home).items() if k in DEVICES)
    assert view["gates"]["results"], "the last verdict stays visible"
    kinds = [e["event"] for e in reversed(view["events"])]
    assert kinds.count("wave_passed") == 3 and kinds[-1] == "rollout_completed"
    # a finished rollout is left alone
    before = rollout_store.revision(db, "r1")
    assert not job.tick(clock[0] + timedelta(seconds=5))
    assert rollout_store.revision(db, "r1") == before


def test_the_job_never_overwrites_an_operators_change(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A decision made from a state the operator changed meanwhile is dropped, not written."""
    run(capsys, "rollout", "create", "vib:2.0.0", "--selector", "site=a")
    db = open_db(home / "greenfleet.db")
    job = RolloutsJob(db)
    seen = rollout_store.revisions(db)
    (state,) = rollout_store.load_all(db, advancing=True)
    run(capsys, "rollout", "pause", "r1", "--reason", "hold it")
    now = datetime.now(UTC)
    report(db, "gw-1", "vib:2.0.0", now)  # the canary reports the model: a decision to make
    assert not job._advance(state, seen["r1"], now, None)
    after = rollout_store.load(db, "r1")
    assert (after.status.value, after.reason) == ("paused", "hold it")
    job.tick(now)  # from the paused state: the member catches up, the rollout stays paused
    after = rollout_store.load(db, "r1")
    assert after.status.value == "paused"
    assert {m.device: m.status.value for m in after.members}["gw-1"] == "updated"
