"""Rollout state in SQLite, the soak metrics query and the device facts, on a real SQLite file."""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlite_utils

from agent import protocol as p
from controller import registry, rollout_store
from controller.db import open_db
from controller.errors import NotFound
from controller.rollout import (
    DesiredChange,
    GateResult,
    Gates,
    Member,
    MemberStatus,
    Metrics,
    RolloutEvent,
    RolloutSpec,
    RolloutState,
    Status,
    Step,
)
from controller.rollouts_job import device_facts, rollout_metrics, soak_metrics

NOW = datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)
HW = p.HardwareFacts(arch="x86_64", cores=2, memory_mb=1024, os="Linux", python="3.11")
SPEC = RolloutSpec(
    model="vib:2.0.0",
    selector={"site": "a"},
    canary="10%",
    wave_size=2,
    growth=2.0,
    soak_s=2.5,
    gates=Gates(min_inferences=10, max_latency_regression=None, on_breach="pause"),
)


def birth(labels: dict[str, str], active: str | None = None) -> p.Birth:
    model = None
    if active:
        name, _, version = active.partition(":")
        model = p.ActiveModel(
            model=p.ModelRef(name=name, version=version), sha256="a" * 64, format=p.ModelFormat.ONNX
        )
    return p.Birth(
        session="s1",
        agent_version="0.1.0",
        device_class="x86-ipc",
        labels=labels,
        runtimes=[p.ModelFormat.ONNX],
        hardware=HW,
        active=model,
    )


@pytest.fixture
def db(tmp_path: Path) -> sqlite_utils.Database:
    return open_db(tmp_path / "g.db")


def state(**changes: object) -> RolloutState:
    members = (
        Member("d1", 0, "vib:1.0.0", MemberStatus.UPDATED, NOW, "active"),
        Member("d2", 1, "vib:1.0.0", MemberStatus.UPDATING, NOW + timedelta(seconds=1)),
        Member("d3", 1, None, MemberStatus.PENDING),
        Member("d4", 2, "vib:0.9.0", MemberStatus.SKIPPED, None, "pinned: line audit"),
    )
    fields: dict[str, object] = {
        "id": "r1",
        "spec": SPEC,
        "status": Status.RUNNING,
        "created": NOW,
        "wave": 1,
        "waves": 3,
        "wave_started": NOW + timedelta(seconds=5),
        "soak_started": None,
        "metrics_since": NOW + timedelta(seconds=5),
        "members": members,
        "reason": "canary passed",
    }
    fields.update(changes)
    return RolloutState(**fields)  # type: ignore[arg-type]


def test_state_round_trips_through_its_rows(db: sqlite_utils.Database) -> None:
    original = state()
    with rollout_store.write_transaction(db):
        rollout_store.save(db, original, NOW)
    assert rollout_store.load(db, "r1") == original
    row = db.table("rollouts").get("r1")
    assert (row["model"], row["status"], row["wave"], row["waves"]) == (
        "vib:2.0.0",
        "running",
        1,
        3,
    )
    assert db["rollout_members"].count == 4
    # a later state: only what changed is written, and the revision always moves on
    first = rollout_store.revision(db, "r1")
    later = dataclasses.replace(
        original,
        status=Status.PAUSED,
        soak_started=NOW + timedelta(seconds=9),
        members=(*original.members[:3], dataclasses.replace(original.members[3], reason="x")),
    )
    with rollout_store.write_transaction(db):
        rollout_store.save(db, later, NOW, previous=original)  # same clock: still a new revision
    assert rollout_store.load(db, "r1") == later
    assert (rollout_store.revision(db, "r1") or "") > (first or "")
    assert [s.id for s in rollout_store.load_all(db, advancing=True)] == ["r1"]
    with rollout_store.write_transaction(db):
        rollout_store.save(db, dataclasses.replace(later, status=Status.COMPLETED), NOW, later)
    assert rollout_store.load_all(db, advancing=True) == []
    assert [s.status for s in rollout_store.load_all(db)] == [Status.COMPLETED]
    with pytest.raises(NotFound, match="rollout list"):
        rollout_store.load(db, "r9")


def test_fields_without_a_column_round_trip_through_extra(db: sqlite_utils.Database) -> None:
    """The rollout logic may grow fields; they are kept in the ``extra`` JSON columns."""

    @dataclasses.dataclass(frozen=True)
    class Grown(RolloutState):
        deadline: datetime | None = None
        retries: tuple[str, ...] = ()

    grown = Grown(**{f.name: getattr(state(), f.name) for f in dataclasses.fields(state())})
    grown = dataclasses.replace(grown, deadline=NOW, retries=("d2",))
    row = rollout_store._rollout_row(grown, NOW)
    assert set(json.loads(row["extra"])) == {"deadline", "retries"}
    assert rollout_store._from_extra(Grown, row["extra"]) == {"deadline": NOW, "retries": ("d2",)}


def test_a_step_commits_state_desired_models_gates_and_events_together(
    db: sqlite_utils.Database,
) -> None:
    for device in ("d1", "d2", "d3"):
        registry.apply_birth(db, device, birth({"site": "a"}, "vib:1.0.0"), NOW)
    before = state()
    after = dataclasses.replace(before, status=Status.ABORTING, reason="error rate 5% > 1%")
    gate = GateResult("error_rate", 0.05, 0.01, True, True, "wave 5% vs limit 1%")
    step = Step(
        after,
        changes=(
            DesiredChange("d1", "vib:1.0.0", rollback=True),
            DesiredChange("d2", "vib:1.0.0", rollback=True),
        ),
        events=(
            RolloutEvent("gate_breached", "error rate 5% > 1%"),
            RolloutEvent("member_failed", "d2 failed", device="d2"),
        ),
        gates=(gate,),
    )
    with rollout_store.write_transaction(db):
        assert rollout_store.commit_step(db, step, NOW, previous=None)
    assert rollout_store.load(db, "r1").status is Status.ABORTING
    rows = {r["id"]: r for r in registry.devices(db)}
    assert [(rows[d]["desired_model"], rows[d]["desired_rollback"]) for d in ("d1", "d2")] == [
        ("vib:1.0.0", 1),
        ("vib:1.0.0", 1),
    ]
    assert rows["d3"]["desired_model"] is None
    assert rollout_store.gates(db, "r1")["results"] == [dataclasses.asdict(gate)]
    events = rollout_store.events(db, "r1")
    assert {(e["device"], e["event"]) for e in events} == {
        (None, "gate_breached"),
        ("d2", "member_failed"),
    }
    shown = [e["event"] for e in db["events"].rows_where("device = ?", ["d2"])]
    assert shown == ["member_failed"], "devices show lists a member's rollout events"
    detail = json.loads(next(db["events"].rows_where("device = ''"))["detail"])
    assert detail == {"rollout": "r1", "model": "vib:2.0.0", "wave": 1}
    # a decision without gate results keeps the wave's last verdict on show
    with rollout_store.write_transaction(db):
        assert not rollout_store.commit_step(db, Step(after), NOW, previous=after)
    assert rollout_store.gates(db, "r1")["results"] == [dataclasses.asdict(gate)]


def test_a_failed_step_commits_nothing(db: sqlite_utils.Database) -> None:
    registry.apply_birth(db, "d1", birth({"site": "a"}), NOW)
    step = Step(
        state(),
        changes=(DesiredChange("d1", "vib:2.0.0"), DesiredChange("ghost", "vib:2.0.0")),
        events=(RolloutEvent("wave_started", "canary started"),),
    )
    with pytest.raises(NotFound), rollout_store.write_transaction(db):
        rollout_store.save(db, step.state, NOW)
        rollout_store.commit_step(db, step, NOW, previous=step.state)
    assert db["rollouts"].count == 0 and db["events"].count == 0
    assert registry.get_device(db, "d1")["desired_model"] is None


def test_writers_wait_for_each_other(tmp_path: Path) -> None:
    """The daemon and an operator's command never interleave a read-modify-write."""
    first, second = open_db(tmp_path / "g.db"), open_db(tmp_path / "g.db")
    order: list[str] = []
    inside = threading.Event()

    def other() -> None:
        inside.wait(5)
        with rollout_store.write_transaction(second):
            order.append("second")

    thread = threading.Thread(target=other)
    thread.start()
    with rollout_store.write_transaction(first):
        inside.set()
        thread.join(0.3)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]


def test_ids_are_short_and_sequential(db: sqlite_utils.Database) -> None:
    assert rollout_store.next_id(db) == "r1"
    for n in (1, 2, 10):
        rollout_store.save(db, state(id=f"r{n}"), NOW)
    assert rollout_store.next_id(db) == "r11"


def telemetry(
    db: sqlite_utils.Database,
    device: str,
    seq: int,
    start: datetime,
    model: str | None,
    inferences: int,
    *,
    errors: int = 0,
    p95: float | None = 1.0,
    energy: float | None = 0.01,
    tier: str = "active",
) -> None:
    record = p.TelemetryRecord(
        seq=seq,
        start=start,
        window_s=0.5,
        model=p.ModelRef.parse(model) if model else None,
        tier=p.Tier(tier),
        inferences=inferences,
        errors=errors,
        latency_p95_ms=p95,
        cpu_s=0.0,
        energy_per_inference_j=energy,
    )
    batch = p.TelemetryBatch(session="s1", records=[record])
    from controller.ingest import telemetry_rows

    db.table("telemetry").insert_all(telemetry_rows(device, batch, registry.iso(start)))


def test_soak_metrics_sum_and_weigh_the_soak_period(db: sqlite_utils.Database) -> None:
    since = NOW

    def t(seconds: float) -> datetime:
        return NOW + timedelta(seconds=seconds)

    # wave device: before the soak (ignored), the new model (a variant of the planned version),
    # then its fallback tier answering with the old model (counted as fallback inferences)
    telemetry(db, "w1", 0, t(-1), "vib:2.0.0+int8", 1000, p95=99.0)
    telemetry(db, "w1", 1, t(0), "vib:2.0.0+int8", 30, errors=3, p95=4.0, energy=0.02)
    telemetry(db, "w1", 2, t(0.5), "vib:2.0.0+int8", 10, p95=8.0, energy=0.04)
    telemetry(db, "w1", 3, t(1), "vib:1.0.0", 20, p95=1.0, energy=0.01, tier="last_good")
    telemetry(db, "w1", 4, t(1.5), "vib:1.0.0", 50, p95=1.0, tier="active")  # not the new model
    # control device: every window counts, whatever model, weighted by inferences
    telemetry(db, "c1", 0, t(0), "vib:1.0.0", 10, p95=2.0, energy=None)
    telemetry(db, "c1", 1, t(0.5), "vib:1.0.0", 30, p95=4.0, energy=0.02)
    telemetry(db, "c1", 2, t(1), None, 0, p95=None, energy=None, tier="none")
    telemetry(db, "x9", 0, t(0), "vib:2.0.0", 10)  # not asked for
    got = soak_metrics(db, "vib:2.0.0", wave={"w1": since, "w2": since}, control={"c1": since})
    assert sorted(got) == ["c1", "w1"]
    wave, control = got["w1"], got["c1"]
    assert (wave.inferences, wave.errors, wave.fallback_inferences) == (60, 3, 20)
    assert wave.judged_inferences == 40, "latency and energy weigh only the new model's windows"
    assert wave.latency_p95_ms == pytest.approx((30 * 4.0 + 10 * 8.0) / 40)
    assert wave.energy_per_inference_j == pytest.approx((30 * 0.02 + 10 * 0.04) / 40)
    assert (control.inferences, control.errors, control.fallback_inferences) == (40, 0, 0)
    assert control.latency_p95_ms == pytest.approx((10 * 2.0 + 30 * 4.0) / 40)
    assert control.energy_per_inference_j == pytest.approx(0.02)
    # a pinned variant matches only itself; timestamps compare as times, not as text
    exact = soak_metrics(db, "vib:2.0.0+fp32", wave={"w1": since.astimezone()}, control={})
    assert exact["w1"] == Metrics(
        inferences=20, fallback_inferences=20, errors=0, judged_inferences=0
    )
    assert soak_metrics(db, "vib:2.0.0", wave={"w1": t(10)}, control={"c1": t(10)}) == {}
    # each device from its own time
    later = soak_metrics(db, "vib:2.0.0", wave={"w1": t(0.5)}, control={"c1": t(1)})
    assert (later["w1"].inferences, later["c1"].inferences) == (30, 0)


def test_rollout_metrics_judge_members_sent_the_model_against_pending_ones(
    db: sqlite_utils.Database,
) -> None:
    telemetry(db, "d1", 0, NOW + timedelta(seconds=6), "vib:2.0.0", 10)
    telemetry(db, "d3", 0, NOW + timedelta(seconds=6), "vib:1.0.0", 20)
    telemetry(db, "d4", 0, NOW + timedelta(seconds=6), "vib:0.9.0", 30)
    got = rollout_metrics(db, state())  # since the wave started (NOW + 5 s)
    assert {d: m.inferences for d, m in got.items()} == {"d1": 10, "d3": 20}, "not the skipped"
    assert rollout_metrics(db, state(wave_started=None, metrics_since=None)) == {}
    resumed = NOW + timedelta(seconds=7)  # resume observes afresh: metrics_since moves on
    assert rollout_metrics(db, state(metrics_since=resumed)) == {}
    # an updated member counts from when it was seen on the model: the window it switched in
    # (old model, warm-up) is not the new model's
    seen = state().members[0]
    late = state(members=(dataclasses.replace(seen, since=NOW + timedelta(seconds=6.5)),))
    assert rollout_metrics(db, late) == {}


def test_device_facts(db: sqlite_utils.Database) -> None:
    for device, labels in (
        ("d1", {"site": "a"}),
        ("d2", {"site": "a"}),
        ("d3", {"site": "a"}),
        ("d4", {"site": "b"}),
        ("d5", {"site": "a"}),
    ):
        registry.apply_birth(db, device, birth(labels, "vib:1.0.0"), NOW)
    registry.set_pinned(db, "d2", True, "line audit", NOW)
    registry.apply_death(db, "d3", p.Death(session="s1"), NOW)
    # an older live rollout of the same model name holds d5; a newer one and a finished one
    # hold nothing for r1
    for rid, created, status, model in (
        ("r0", NOW - timedelta(hours=1), Status.PAUSED, "vib:3.0.0"),
        ("r7", NOW + timedelta(hours=1), Status.RUNNING, "vib:3.0.0"),
        ("r8", NOW - timedelta(hours=1), Status.COMPLETED, "vib:3.0.0"),
        ("r9", NOW - timedelta(hours=1), Status.RUNNING, "other:1.0.0"),
    ):
        spec = SPEC.model_copy(update={"model": model})
        members = (
            Member("d5", 0, "vib:1.0.0", MemberStatus.UPDATING),
            Member("d1", 0, None, MemberStatus.SKIPPED),
        )
        rollout_store.save(
            db, state(id=rid, spec=spec, created=created, status=status, members=members), NOW
        )
    # d1's newest deploy failed (the rollout logic judges whether it is its model, and new)
    for i, (device, model) in enumerate((("d1", "vib:2.0.0+int8"), ("d5", "vib:9.0.0"))):
        db.table("deployments").insert(
            {
                "id": f"c{i}",
                "device": device,
                "model": model,
                "sha256": "x",
                "status": "failed",
                "sent_at": registry.iso(NOW + timedelta(seconds=1)),
                "slot": "active",
            }
        )
    facts = device_facts(db, "r1", SPEC, NOW, NOW, members=["d4"])
    assert sorted(facts) == ["d1", "d2", "d3", "d4", "d5"], "the selector's devices and members"
    assert facts["d1"].deploy_failed == "vib:2.0.0+int8"
    assert facts["d1"].deploy_failed_at == NOW.replace(microsecond=123000) + timedelta(seconds=1)
    assert facts["d5"].deploy_failed == "vib:9.0.0" and facts["d4"].deploy_failed is None
    assert facts["d2"].pinned and not facts["d1"].pinned
    assert not facts["d3"].online and facts["d1"].online
    assert facts["d5"].other_rollout == "r0"
    assert facts["d1"].other_rollout is None, "skipped in r0: r0 does not hold it"
    assert facts["d1"].active_model == "vib:1.0.0" and facts["d1"].tier == "active"
    assert all(f.in_window for f in facts.values()), "no controller config: always open"
