"""Staged rollouts, table-driven: every decision is a pure function of state, facts, telemetry
and an explicit clock, so nothing here sleeps."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from controller.rollout import (
    NO_WAVE,
    DesiredChange,
    DeviceFacts,
    GateResult,
    Gates,
    Member,
    MemberStatus,
    Metrics,
    RolloutError,
    RolloutSpec,
    RolloutState,
    Status,
    Step,
    abort,
    advance,
    evaluate_gates,
    needs_advance,
    pause,
    plan_waves,
    resume,
    runs_model,
    start,
)

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
OLD = "m:1+int8"  # what the fleet runs before the rollout
MODEL = "m:2"  # what the rollout brings (the plan picks each device's variant)
NEW = "m:2+int8"  # what a device reports once it runs the rollout's model

S = MemberStatus
GOOD = Metrics(inferences=200, latency_p95_ms=10.0, energy_per_inference_j=0.05)


# ------------------------------------------------------------------------------------ helpers


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def ids(n: int) -> list[str]:
    return [f"d{i:02}" for i in range(n)]


def spec(**overrides: Any) -> RolloutSpec:
    """Canary of 1, waves of 2, ten-minute soak, an hour's offline deadline."""
    gates = overrides.pop("gates", {})
    fields: dict[str, Any] = {
        "model": MODEL,
        "canary": 1,
        "wave_size": 2,
        "soak_s": 600,
        "offline_deadline_s": 3600,
    }
    return RolloutSpec(**{**fields, **overrides}, gates=Gates(**gates))


def fleet(n: int, **changes: dict[str, Any]) -> dict[str, DeviceFacts]:
    """n online devices on OLD; ``changes`` maps a device id to the facts that differ."""
    devices = {d: DeviceFacts(d, online=True, active_model=OLD) for d in ids(n)}
    for device, fields in changes.items():
        devices[device] = replace(devices.get(device, DeviceFacts(device, True, OLD)), **fields)
    return devices


def on_new(devices: dict[str, DeviceFacts], *updated: str) -> dict[str, DeviceFacts]:
    return {d: replace(f, active_model=NEW) if d in updated else f for d, f in devices.items()}


def telemetry(devices: Iterable[str], wave: Iterable[str] = (), **bad: Any) -> dict[str, Metrics]:
    """GOOD telemetry for every device; the ``wave`` devices' metrics changed by ``bad``."""
    wave = set(wave)
    return {d: replace(GOOD, **bad) if d in wave else GOOD for d in devices}


def started(n: int = 5, **spec_overrides: Any) -> RolloutState:
    return start("r1", spec(**spec_overrides), list(fleet(n).values()), NOW).state


def member(device: str, status: MemberStatus, wave: int = 0, previous: str | None = OLD) -> Member:
    return Member(device, wave, previous, status, NOW)


def statuses(state: RolloutState) -> dict[str, MemberStatus]:
    return {m.device: m.status for m in state.members}


def kinds(step: Step) -> list[str]:
    return [e.kind for e in step.events]


def changed(step: Step) -> list[str]:
    return [c.device for c in step.changes]


def gate(step: Step, name: str) -> GateResult:
    return next(g for g in step.gates if g.name == name)


# ------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    "canary, wave_size, growth, n, sizes",
    [
        pytest.param(1, 2, 1.0, 7, [1, 2, 2, 2], id="counts"),
        pytest.param(1, 2, 1.0, 6, [1, 2, 2, 1], id="last-wave-takes-the-rest"),
        pytest.param(1, "25%", 1.0, 10, [1, 3, 3, 3], id="percent-rounds-up"),
        pytest.param("10%", "10%", 1.0, 30, [3] * 10, id="exact-percent-no-float-drift"),
        pytest.param("12.5%", "50%", 1.0, 16, [2, 8, 6], id="fractional-percent"),
        pytest.param(1, 1, 2.0, 10, [1, 1, 2, 4, 2], id="growth-doubles"),
        pytest.param(2, 2, 1.5, 12, [2, 2, 3, 5], id="growth-rounds-up"),
        pytest.param(1, 10, 1.1, 22, [1, 10, 11], id="growth-1.1-is-exact"),
        pytest.param("100%", 5, 1.0, 4, [4], id="canary-is-everything"),
        pytest.param(5, 1, 1.0, 3, [3], id="canary-larger-than-fleet"),
        pytest.param("1%", "1%", 1.0, 3, [1, 1, 1], id="tiny-percent-is-one-device"),
        pytest.param(1, "50%", 1.0, 1, [1], id="one-device"),
        pytest.param(1, 2, 1.0, 2, [1, 1], id="two-devices"),
        pytest.param("5", " 2 ", 1.0, 7, [5, 2], id="counts-as-text"),
        pytest.param(1, 1, 1.0, 0, [], id="no-devices"),
    ],
)
def test_plan_waves(
    canary: int | str, wave_size: int | str, growth: float, n: int, sizes: list[int]
) -> None:
    devices = ids(n)
    waves = plan_waves(spec(canary=canary, wave_size=wave_size, growth=growth), devices)
    assert [len(w) for w in waves] == sizes
    assert [d for w in waves for d in w] == devices  # in order, each exactly once


@pytest.mark.parametrize(
    "value, message",
    [
        ("abc", "expected a device count like 5 or a percentage like '10%', got 'abc'"),
        ("0%", "above 0% and at most 100%, got '0%'"),
        ("150%", "above 0% and at most 100%, got '150%'"),
        ("-5%", "above 0% and at most 100%"),
        ("x%", "got 'x%'"),
        (0, "needs at least 1 device, got 0"),
        (-3, "needs at least 1 device, got -3"),
        ("-3", "needs at least 1 device"),
        (True, "got True"),
        (2.5, "got 2.5"),
    ],
)
@pytest.mark.parametrize("key", ["canary", "wave_size"])
def test_bad_sizes_are_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(RolloutError) as caught:
        RolloutSpec.parse({"model": MODEL, key: value}, "flags")
    assert str(caught.value).startswith(f"flags: {key}: ")
    assert message in str(caught.value)
    # a spec built around validation still cannot be planned
    unchecked = RolloutSpec.model_construct(**{**spec().model_dump(), key: value})
    with pytest.raises(RolloutError, match=key):
        plan_waves(unchecked, ids(4))


# ------------------------------------------------------------------------------------- YAML


@pytest.mark.parametrize(
    "text, problem",
    [
        pytest.param("model: m:2\nselector: [\n", "is not valid YAML", id="bad-yaml"),
        pytest.param("", "got nothing", id="empty"),
        pytest.param("- model: m:2\n", "expected a mapping of rollout settings", id="a-list"),
        pytest.param("selector: {site: a}\n", "model: Field required", id="no-model"),
        pytest.param("model: m2\n", "model: model reference 'm2' must look like", id="bad-ref"),
        pytest.param(
            "model: m:2\ncanery: 1\n",
            "canery: unknown key; expected one of model, selector, canary,",
            id="unknown-key",
        ),
        pytest.param(
            "model: m:2\ngates:\n  max_latency: 0.2\n",
            "gates.max_latency: unknown key; expected one of max_install_failure_rate,",
            id="unknown-gate",
        ),
        pytest.param("model: m:2\nsoak_s: soon\n", "soak_s: Input should be", id="wrong-type"),
        pytest.param("model: m:2\ngrowth: 0.5\n", "growth: Input should be greater", id="shrink"),
        pytest.param(
            "model: m:2\ngates:\n  on_breach: panic\n", "gates.on_breach: Input", id="on-breach"
        ),
        pytest.param("model: m:2\ncanary: 0%\n", "canary: a percentage must be", id="0%"),
        pytest.param("model: m:2\nwave_size: abc\n", "wave_size: expected a device", id="abc"),
    ],
)
def test_from_yaml_errors_name_file_and_key(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text(text)
    with pytest.raises(RolloutError) as caught:
        RolloutSpec.from_yaml(path)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


def test_from_yaml_reads_a_full_definition(tmp_path: Path) -> None:
    path = tmp_path / "rollout.yaml"
    path.write_text(
        "model: m:2+int8\nselector: {site: plant-a, line: 3}\ncanary: 5%\nwave_size: 10\n"
        "growth: 1.5\nsoak_s: 900\ngates:\n  max_energy_regression: null\n  on_breach: pause\n"
    )
    loaded = RolloutSpec.from_yaml(path)
    assert loaded.selector == {"site": "plant-a", "line": "3"}  # YAML's int label is text
    assert (loaded.canary, loaded.wave_size, loaded.growth) == ("5%", 10, 1.5)
    assert loaded.gates.max_energy_regression is None and loaded.gates.on_breach == "pause"
    with pytest.raises(RolloutError, match="cannot read rollout file"):
        RolloutSpec.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "active, model, runs",
    [
        (NEW, MODEL, True),
        (MODEL, MODEL, True),
        (NEW, NEW, True),
        ("m:2+fp16", NEW, False),
        ("m:20+int8", MODEL, False),
        (OLD, MODEL, False),
        (None, MODEL, False),
    ],
)
def test_runs_model(active: str | None, model: str, runs: bool) -> None:
    assert runs_model(active, model) is runs


# ------------------------------------------------------------------------------------ start


@pytest.mark.parametrize(
    "devices, overrides, members, changes, events",
    [
        pytest.param(
            fleet(3),
            {},
            {"d00": (0, S.UPDATING), "d01": (1, S.PENDING), "d02": (1, S.PENDING)},
            ["d00"],
            ["rollout_started", "wave_started"],
            id="plain",
        ),
        pytest.param(
            fleet(4, d01={"pinned": True}),
            {},
            {"d00": (0, S.UPDATING), "d01": (NO_WAVE, S.SKIPPED), "d02": (1, S.PENDING)},
            ["d00"],
            ["rollout_started", "member_skipped", "wave_started"],
            id="pinned",
        ),
        pytest.param(
            fleet(3, d00={"other_rollout": "r0"}),
            {},
            {"d00": (NO_WAVE, S.SKIPPED), "d01": (0, S.UPDATING), "d02": (1, S.PENDING)},
            ["d01"],
            ["rollout_started", "member_skipped", "wave_started"],
            id="other-rollout",
        ),
        pytest.param(
            fleet(3, d00={"active_model": NEW}),
            {},
            {"d00": (0, S.UPDATED), "d01": (1, S.PENDING)},
            [],
            ["rollout_started", "wave_started", "wave_soaking"],
            id="canary-already-updated",
        ),
        pytest.param(
            fleet(3, d00={"active_model": "m:2+fp16"}),
            {"model": NEW},
            {"d00": (0, S.UPDATING)},
            ["d00"],
            ["rollout_started", "wave_started"],
            id="other-variant-is-not-the-model",
        ),
        pytest.param(
            fleet(1, d00={"active_model": None, "online": False}),
            {},
            {"d00": (0, S.UPDATING)},
            ["d00"],
            ["rollout_started", "wave_started"],
            id="offline-device-without-model",
        ),
    ],
)
def test_start(
    devices: dict[str, DeviceFacts],
    overrides: dict[str, Any],
    members: dict[str, tuple[int, MemberStatus]],
    changes: list[str],
    events: list[str],
) -> None:
    chosen = spec(**overrides)
    step = start("r1", chosen, list(reversed(devices.values())), NOW)
    state = step.state
    assert [m.device for m in state.members] == sorted(devices)  # id order
    got = {m.device: (m.wave, m.status) for m in state.members}
    assert {d: got[d] for d in members} == members
    assert step.changes == tuple(DesiredChange(d, chosen.model) for d in changes)
    assert kinds(step) == events
    assert (state.status, state.wave, state.wave_started, state.metrics_since) == (
        Status.RUNNING,
        0,
        NOW,
        NOW,
    )
    for m in state.members:
        assert m.previous_model == devices[m.device].active_model
        if m.status is S.SKIPPED:
            reason = "pinned" if devices[m.device].pinned else "in rollout r0"
            assert m.reason == reason


@pytest.mark.parametrize(
    "devices, message",
    [
        ({}, "no device matching site=a can take m:2"),
        (fleet(2, d00={"pinned": True}, d01={"pinned": True}), "2 skipped"),
    ],
)
def test_start_with_nothing_to_update_is_refused(
    devices: dict[str, DeviceFacts], message: str
) -> None:
    with pytest.raises(RolloutError, match=message):
        start("r1", spec(selector={"site": "a"}), list(devices.values()), NOW)


def test_started_event_says_the_plan() -> None:
    step = start("r1", spec(), list(fleet(6, d05={"pinned": True}).values()), NOW)
    assert step.events[0].message == (
        "rollout r1 of m:2 to 5 devices matching (all devices): canary of 1, then 2 waves "
        "(2, 2); 1 skipped (1 pinned, 0 in another rollout); soak 600 s per wave; "
        "a breached gate will abort it"
    )


# ------------------------------------------------------------------------------ progression

# A good model on five devices: canary d00, then d01-d02, then d03-d04; each wave soaks ten
# minutes after its last device settles. (t, devices on the new model, status, wave, changes,
# events)
PROGRESSION: list[tuple[float, set[str], Status, int, list[str], list[str]]] = [
    (30, set(), Status.RUNNING, 0, [], []),
    (60, {"d00"}, Status.RUNNING, 0, [], ["member_updated", "wave_soaking"]),
    (659, {"d00"}, Status.RUNNING, 0, [], []),  # soaking since 60: not yet
    (660, {"d00"}, Status.RUNNING, 1, ["d01", "d02"], ["wave_passed", "wave_started"]),
    (700, {"d00", "d01"}, Status.RUNNING, 1, [], ["member_updated"]),
    (1000, {"d00", "d01", "d02"}, Status.RUNNING, 1, [], ["member_updated", "wave_soaking"]),
    (1599, {"d00", "d01", "d02"}, Status.RUNNING, 1, [], []),
    (
        1600,
        {"d00", "d01", "d02"},
        Status.RUNNING,
        2,
        ["d03", "d04"],
        ["wave_passed", "wave_started"],
    ),
    (
        1700,
        {"d00", "d01", "d02", "d03", "d04"},
        Status.RUNNING,
        2,
        [],
        ["member_updated", "member_updated", "wave_soaking"],
    ),
    (2300, set(ids(5)), Status.COMPLETED, 2, [], ["wave_passed", "rollout_completed"]),
    (9999, set(ids(5)), Status.COMPLETED, 2, [], []),
]


def test_good_model_goes_from_canary_through_waves_to_completed() -> None:
    state = started(5)
    metrics = telemetry(ids(5))
    for t, updated, status, wave, changes, events in PROGRESSION:
        step = advance(state, on_new(fleet(5), *updated), metrics, at(t))
        assert (step.state.status, step.state.wave) == (status, wave), t
        assert step.changes == tuple(DesiredChange(d, MODEL) for d in changes), t
        assert kinds(step) == events, t
        state = step.state
    assert set(statuses(state).values()) == {S.UPDATED}
    assert state.soak_started == at(1700) and state.wave_started == at(1600)
    assert step.events == ()
    canary_soaking = advance(started(5), on_new(fleet(5), "d00"), metrics, at(60)).state
    passed = advance(canary_soaking, on_new(fleet(5), "d00"), metrics, at(660)).events[0]
    assert passed.message.startswith("canary passed after soaking 600 s: install failures 0 of 1")


@pytest.mark.parametrize(
    "n, overrides, batches",
    [
        pytest.param(5, {}, [1, 2, 2], id="waves-of-two"),
        pytest.param(10, {"canary": "10%", "wave_size": "20%", "growth": 2.0}, [1, 2, 4, 3]),
        pytest.param(1, {}, [1], id="single-device"),
        pytest.param(4, {"soak_s": 0}, [1, 2, 1], id="no-soak"),
        pytest.param(6, {"gates": {"min_inferences": 150}}, [1, 2, 2, 1], id="min-sample"),
    ],
)
def test_good_model_completes(n: int, overrides: dict[str, Any], batches: list[int]) -> None:
    """Devices take the model as soon as asked; each wave starts exactly once, soak_s apart."""
    step = start("r1", spec(**overrides), list(fleet(n).values()), NOW)
    seen = [changed(step)]
    updated: set[str] = set(changed(step))
    t = 0.0
    while step.state.status is Status.RUNNING:
        t += 10
        step = advance(step.state, on_new(fleet(n), *updated), telemetry(ids(n)), at(t))
        if step.changes:
            seen.append(changed(step))
            updated |= set(changed(step))
        assert t < 100_000
    assert step.state.status is Status.COMPLETED
    assert [len(batch) for batch in seen] == batches
    assert sorted(d for batch in seen for d in batch) == ids(n)


# ------------------------------------------------------------------------------------ gates

# One gate breached at a time in the canary (d00) of five; the control group (d01-d04) is GOOD.
# (gate, d00's facts, d00's metrics, the control's metrics, gate overrides, detail)
BREACHES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], str]] = [
    (
        "install_failure_rate",
        {"active_model": OLD, "deploy_failed": NEW},
        {},
        {},
        {},
        "install failures 1 of 1 devices (100%), limit 0%",
    ),
    (
        "error_rate",
        {},
        {"inferences": 190, "errors": 10},
        {"inferences": 190, "errors": 10},
        {},
        "error rate 5% (10 of 200 attempts), limit 1%",
    ),
    (
        "error_rate_increase",
        {},
        {"inferences": 992, "errors": 8},
        {},
        {"max_error_rate_increase": 0.005},
        "error rate 0.8% vs control 0% (+0.8 points), limit +0.5 points",
    ),
    (
        "latency_regression",
        {},
        {"latency_p95_ms": 20.0},
        {},
        {},
        "latency p95 20.0 ms vs control 10.0 ms (+100%), limit +50%",
    ),
    (
        "energy_regression",
        {},
        {"energy_per_inference_j": 0.08},
        {},
        {},
        "energy per inference 80 mJ vs control 50 mJ (+60%), limit +25%",
    ),
    (
        "fallback_rate",
        {},
        {"fallback_inferences": 20},
        {},
        {},
        "fallback rate 10% (20 of 200 inferences), limit 5%",
    ),
    (
        "offline_rate",
        {"online": False},
        {},
        {},
        {},
        "offline after updating: 1 of 1 wave devices (100%), limit 0%",
    ),
]


@pytest.mark.parametrize("on_breach", ["pause", "abort"])
@pytest.mark.parametrize("name, facts, wave_bad, control_bad, limits, detail", BREACHES)
def test_each_gate_breaches_alone(
    name: str,
    facts: dict[str, Any],
    wave_bad: dict[str, Any],
    control_bad: dict[str, Any],
    limits: dict[str, Any],
    detail: str,
    on_breach: str,
) -> None:
    state = started(5, gates={**limits, "on_breach": on_breach})
    devices = fleet(5, d00={"active_model": NEW, **facts})
    metrics = {**telemetry(ids(5), ids(5)[1:], **control_bad), "d00": replace(GOOD, **wave_bad)}
    step = advance(state, devices, metrics, at(60))

    assert [g.name for g in step.gates if g.breached] == [name]
    assert gate(step, name).judged
    breach = [e.message for e in step.events if e.kind == "gate_breached"]
    doing = "pausing" if on_breach == "pause" else "aborting"
    assert breach == [f"canary: {detail}: {doing}"]
    assert gate(step, name).limit == (limits.get(f"max_{name}") or getattr(Gates(), f"max_{name}"))
    if on_breach == "pause":
        assert step.state.status is Status.PAUSED
        assert step.state.reason == f"gate {name} breached in canary: {detail}"
        assert step.changes == ()
        assert kinds(step)[-1] == "rollout_paused"
    else:
        # a canary that never left the old model is back on it at once
        back = devices["d00"].active_model == OLD
        assert step.state.status is (Status.ABORTED if back else Status.ABORTING)
        assert step.changes == (DesiredChange("d00", OLD, rollback=True),)
        assert statuses(step.state) == {"d00": S.ROLLED_BACK if back else S.ROLLING_BACK} | (
            dict.fromkeys(ids(5)[1:], S.CANCELLED)
        )
        assert "rollout_aborting" in kinds(step)


# (wave members, control members, metrics, gate overrides, gate, judged, detail)
SAMPLES: list[tuple[list[Member], list[Member], dict[str, Metrics], dict[str, Any], str, bool, str]]
SAMPLES = [
    (
        [member("a", S.UPDATED)],
        [member("c", S.PENDING, 1)],
        {"a": replace(GOOD, inferences=40), "c": GOOD},
        {},
        "error_rate",
        False,
        "waiting: 40 of 100 inferences",
    ),
    (
        [member("a", S.UPDATED)],
        [member("c", S.PENDING, 1)],
        {"a": GOOD, "c": replace(GOOD, inferences=40)},
        {},
        "latency_regression",
        False,
        "waiting: control 40 of 100 inferences with latency readings",
    ),
    (
        [member("a", S.UPDATED)],
        [member("c", S.PENDING, 1)],
        {"a": GOOD, "c": replace(GOOD, inferences=40)},
        {},
        "error_rate_increase",
        False,
        "waiting: control 40 of 100 inferences",
    ),
    (
        [member("a", S.UPDATED), member("b", S.UPDATING)],
        [member("c", S.PENDING, 1)],
        {"a": GOOD, "c": GOOD},
        {"min_devices": 2},
        "error_rate",
        False,
        "waiting: 1 of 2 devices with data",
    ),
    (
        [member("a", S.UPDATED), member("b", S.MISSED)],
        [member("c", S.PENDING, 1)],
        {"a": GOOD, "c": GOOD},
        {"min_devices": 2},
        "error_rate",
        True,  # only one device can have data: the sample is capped at it
        "error rate 0% (0 of 200 attempts), limit 1%",
    ),
    (
        [member("a", S.UPDATED), member("b", S.UPDATING)],
        [],
        {},
        {"min_devices": 2},
        "install_failure_rate",
        False,
        "waiting: 1 of 2 devices settled",
    ),
    (
        [member("a", S.UPDATED)],
        [member("c", S.PENDING, 1)],
        {"a": replace(GOOD, energy_per_inference_j=None), "c": GOOD},
        {},
        "energy_regression",
        False,
        "waiting: 0 of 100 inferences with energy readings",
    ),
    (
        [member("a", S.UPDATED), member("b", S.UPDATED)],
        [member("c", S.PENDING, 1)],
        {
            "a": replace(GOOD, inferences=100, latency_p95_ms=30.0),
            "b": replace(GOOD, inferences=300, latency_p95_ms=10.0),
            "c": replace(GOOD, latency_p95_ms=None),
            "d": replace(GOOD, latency_p95_ms=10.0),
        },
        {},
        "latency_regression",
        False,  # the control's only device has no latency readings
        "waiting: control 0 of 100 inferences with latency readings",
    ),
    (
        [member("a", S.UPDATED), member("b", S.UPDATED)],
        [member("c", S.PENDING, 1), member("d", S.PENDING, 1)],
        {
            "a": replace(GOOD, inferences=100, latency_p95_ms=30.0),
            "b": replace(GOOD, inferences=300, latency_p95_ms=10.0),
            "c": replace(GOOD, latency_p95_ms=None),
            "d": replace(GOOD, latency_p95_ms=10.0),
        },
        {},
        "latency_regression",
        True,  # inference-weighted: (30*100 + 10*300) / 400 = 15
        "latency p95 15.0 ms vs control 10.0 ms (+50%), limit +50%",
    ),
    (
        [member("a", S.UPDATED)],
        [member("c", S.PENDING, 1)],
        {"a": Metrics(inferences=0, errors=150), "c": GOOD},
        {},
        "error_rate",
        True,  # a model that only errors is judged on its attempts
        "error rate 100% (150 of 150 attempts), limit 1%",
    ),
    (
        [member("a", S.UPDATED)],
        [],
        {"a": GOOD},
        {},
        "latency_regression",
        True,
        "no control group left; absolute limits only",
    ),
    (
        [member("a", S.UPDATED)],
        [],
        {"a": replace(GOOD, errors=50)},
        {},
        "error_rate_increase",
        True,
        "no control group left; absolute limits only",
    ),
    (
        [member("a", S.SKIPPED)],
        [member("c", S.PENDING, 1)],
        {},
        {},
        "error_rate",
        True,
        "no device in this wave to judge",
    ),
]


@pytest.mark.parametrize(
    "wave, control, metrics, limits, name, judged, detail",
    SAMPLES,
)
def test_gate_samples(
    wave: list[Member],
    control: list[Member],
    metrics: dict[str, Metrics],
    limits: dict[str, Any],
    name: str,
    judged: bool,
    detail: str,
) -> None:
    devices = {d: DeviceFacts(d, True, NEW) for d in "abcd"}
    results = evaluate_gates(Gates(**limits), wave, control, metrics, devices)
    result = next(g for g in results if g.name == name)
    assert (result.judged, result.detail) == (judged, detail)
    if not judged:
        assert result.value is None and not result.breached


@pytest.mark.parametrize(
    "wave_metrics, control_metrics, name, breached",
    [
        pytest.param(Metrics(900, 100), Metrics(910, 90), "error_rate_increase", False, id="at"),
        pytest.param(Metrics(899, 101), Metrics(910, 90), "error_rate_increase", True, id="over"),
        pytest.param(
            replace(GOOD, latency_p95_ms=15.0), GOOD, "latency_regression", False, id="+50%"
        ),
        pytest.param(
            replace(GOOD, latency_p95_ms=15.1), GOOD, "latency_regression", True, id="+51%"
        ),
    ],
)
def test_a_gate_breaches_only_above_its_limit(
    wave_metrics: Metrics, control_metrics: Metrics, name: str, breached: bool
) -> None:
    """0.10 - 0.09 is 0.010000000000000009 in floats: that is at the limit, not over it."""
    results = evaluate_gates(
        Gates(max_error_rate=None),
        [member("a", S.UPDATED)],
        [member("c", S.PENDING, 1)],
        {"a": wave_metrics, "c": control_metrics},
        {},
    )
    result = next(g for g in results if g.name == name)
    assert result.judged and result.breached is breached


def test_disabled_gates_are_not_reported() -> None:
    gates = Gates(max_energy_regression=None, max_offline_rate=None)
    results = evaluate_gates(gates, [member("a", S.UPDATED)], [], {}, {})
    assert [g.name for g in results] == [
        "install_failure_rate",
        "error_rate",
        "error_rate_increase",
        "latency_regression",
        "fallback_rate",
    ]


@pytest.mark.parametrize(
    "canary_metrics, control_metrics, passes",
    [
        pytest.param(GOOD, GOOD, True, id="enough-data"),
        pytest.param(replace(GOOD, inferences=40), GOOD, False, id="wave-too-few"),
        pytest.param(GOOD, replace(GOOD, inferences=20), False, id="control-too-few"),
    ],
)
def test_unjudged_gate_holds_the_wave_in_soak(
    canary_metrics: Metrics, control_metrics: Metrics, passes: bool
) -> None:
    devices = on_new(fleet(5), "d00")
    metrics = {**telemetry(ids(5), ids(5), **vars(control_metrics)), "d00": canary_metrics}
    soaking = advance(started(5), devices, metrics, at(60)).state
    step = advance(soaking, devices, metrics, at(60 + 3 * 600))
    assert (step.state.wave == 1) is passes
    assert ("wave_passed" in kinds(step)) is passes
    waiting = [g.detail for g in step.gates if not g.judged]
    assert bool(waiting) is not passes
    assert all(d.startswith("waiting: ") for d in waiting)


def test_last_wave_passes_on_absolute_limits_without_a_control_group() -> None:
    """Everything in the canary: no control group; a slow model passes the relative gates."""
    state = started(3, canary="100%")
    devices = on_new(fleet(3), *ids(3))
    metrics = telemetry(ids(3), ids(3), latency_p95_ms=99.0)
    soaking = advance(state, devices, metrics, at(60))
    assert gate(soaking, "latency_regression").detail == (
        "no control group left; absolute limits only"
    )
    done = advance(soaking.state, devices, metrics, at(660))
    assert done.state.status is Status.COMPLETED


# ---------------------------------------------------------------------------------- members


@pytest.mark.parametrize(
    "wave, waves, status, newcomers, joined, total_waves, events",
    [
        pytest.param(
            0, 3, Status.RUNNING, {"n1": {}}, {"n1": 2}, 3, ["member_joined"], id="last-unstarted"
        ),
        pytest.param(
            2,
            3,
            Status.RUNNING,
            {"n1": {}, "n2": {}},
            {"n1": 3, "n2": 3},
            4,
            ["member_joined"] * 2,
            id="all-started-one-new-final-wave",
        ),
        pytest.param(1, 3, Status.PAUSED, {"n1": {}}, {"n1": 2}, 3, ["member_joined"], id="paused"),
        pytest.param(
            0,
            3,
            Status.RUNNING,
            {"n1": {"pinned": True}},
            {"n1": NO_WAVE},
            3,
            ["member_skipped"],
            id="pinned",
        ),
        pytest.param(2, 3, Status.COMPLETED, {"n1": {}}, {}, 3, [], id="completed"),
        pytest.param(0, 3, Status.ABORTING, {"n1": {}}, {}, 3, [], id="aborting"),
    ],
)
def test_new_matching_device_joins(
    wave: int,
    waves: int,
    status: Status,
    newcomers: dict[str, dict[str, Any]],
    joined: dict[str, int],
    total_waves: int,
    events: list[str],
) -> None:
    """A device that starts matching joins the last wave not started, or a new final wave."""
    members = tuple(
        Member(d, w, OLD, S.UPDATING if w == wave else S.PENDING, NOW)
        for w, d in enumerate(ids(waves))
    )
    state = RolloutState("r1", spec(), status, NOW, wave, waves, NOW, None, members)
    step = advance(state, fleet(waves, **newcomers), {}, at(60))
    got = {m.device: m.wave for m in step.state.members if m.device in newcomers}
    assert got == joined
    assert step.state.waves == total_waves
    assert [k for k in kinds(step) if k.startswith("member_")] == events
    assert all(m.status in (S.PENDING, S.SKIPPED) for m in step.state.members if m.device in got)
    assert not [c for c in step.changes if c.device in newcomers]


@pytest.mark.parametrize(
    "seconds, facts, status, event",
    [
        pytest.param(3599, {"online": False}, S.UPDATING, None, id="offline-before-deadline"),
        pytest.param(3600, {"online": False}, S.MISSED, "member_missed", id="offline-deadline"),
        pytest.param(5000, {}, S.UPDATING, None, id="online-waits-for-its-window"),
        pytest.param(3600, None, S.MISSED, "member_missed", id="gone-from-selector"),
        pytest.param(10, {"active_model": NEW}, S.UPDATED, "member_updated", id="updated"),
        pytest.param(
            10, {"deploy_failed": "m:2+fp16"}, S.FAILED, "member_failed", id="variant-failed"
        ),
        pytest.param(
            10,
            {"deploy_failed": NEW, "deploy_failed_at": at(-60)},
            S.UPDATING,
            None,
            id="stale-failure-ignored",
        ),
        pytest.param(10, {"deploy_failed": "x:9"}, S.UPDATING, None, id="other-model-failed"),
    ],
)
def test_member_follows_its_device(
    seconds: float, facts: dict[str, Any] | None, status: MemberStatus, event: str | None
) -> None:
    state = started(5, gates={"max_install_failure_rate": None})
    devices = fleet(5, d00=facts or {})
    if facts is None:
        del devices["d00"]
    step = advance(state, devices, {}, at(seconds))
    assert statuses(step.state)["d00"] is status
    assert [e.kind for e in step.events if e.device == "d00"] == ([event] if event else [])
    if status is S.MISSED:
        assert "reconcile deploys when it returns" in step.state.members[0].reason
        assert "wave_soaking" in kinds(step)  # a missed device no longer holds the wave


@pytest.mark.parametrize(
    "before, facts, after",
    [
        pytest.param(S.MISSED, {"active_model": NEW}, S.UPDATED, id="missed-returns-updated"),
        pytest.param(S.MISSED, {"deploy_failed": NEW}, S.FAILED, id="missed-returns-fails"),
        pytest.param(S.FAILED, {"active_model": NEW}, S.UPDATED, id="failed-retried-ok"),
        pytest.param(S.UPDATED, {"active_model": OLD}, S.UPDATED, id="updated-stays"),
    ],
)
def test_settled_member_catches_up(
    before: MemberStatus, facts: dict[str, Any], after: MemberStatus
) -> None:
    state = started(5, gates={"on_breach": "pause", "max_install_failure_rate": None})
    state = replace(
        state, members=tuple(replace(m, status=before) if m.wave == 0 else m for m in state.members)
    )
    step = advance(state, fleet(5, d00=facts), {}, at(60))
    assert statuses(step.state)["d00"] is after


# ------------------------------------------------------------------------------------ abort


@pytest.mark.parametrize(
    "status, previous, after, change, reason",
    [
        (S.UPDATING, OLD, S.ROLLING_BACK, True, "back to m:1+int8"),
        (S.UPDATED, OLD, S.ROLLING_BACK, True, "back to m:1+int8"),
        (S.FAILED, OLD, S.ROLLING_BACK, True, "back to m:1+int8"),
        (S.MISSED, OLD, S.ROLLING_BACK, True, "back to m:1+int8"),
        (S.UPDATED, None, S.ROLLED_BACK, False, "had no model before; left on the new one"),
        (S.UPDATED, NEW, S.ROLLED_BACK, False, "ran m:2+int8 before the rollout; left on it"),
        (S.PENDING, OLD, S.CANCELLED, False, "rollout aborted before its wave"),
        (S.SKIPPED, OLD, S.SKIPPED, False, "pinned"),
    ],
)
def test_abort_rolls_back_exactly_the_touched_members(
    status: MemberStatus, previous: str | None, after: MemberStatus, change: bool, reason: str
) -> None:
    members = (
        Member("a", 0, previous, status, NOW, "pinned"),
        Member("z", 1, OLD, S.PENDING, NOW),
    )
    state = RolloutState("r1", spec(), Status.RUNNING, NOW, 0, 2, NOW, None, members)
    step = abort(state, "operator: bad output", at(60))
    got = step.state.members[0]
    assert (got.status, got.reason) == (after, reason)
    assert step.changes == ((DesiredChange("a", OLD, rollback=True),) if change else ())
    assert statuses(step.state)["z"] is S.CANCELLED
    assert step.events[0].kind == "rollout_aborting"
    assert "operator: bad output" in step.events[0].message
    # nobody left rolling back: aborted at once
    assert step.state.status is (Status.ABORTING if change else Status.ABORTED)


def test_bad_canary_is_rolled_back_and_no_later_wave_ever_gets_the_model() -> None:
    """Two canaries run the model 3x slower; the rollout aborts, they roll back, and not one
    desired-model change ever names a device outside the canary."""
    step = start("r1", spec(canary=2), list(fleet(6).values()), NOW)
    canary = {"d00", "d01"}
    all_changes = list(step.changes)
    on: set[str] = set()
    rolled: set[str] = set()
    for t in range(30, 6000, 30):
        on = (on | set(changed(step))) - {c.device for c in step.changes if c.rollback}
        rolled |= {c.device for c in step.changes if c.rollback}
        devices = on_new(fleet(6), *on)
        metrics = telemetry(ids(6), on, latency_p95_ms=30.0)
        step = advance(step.state, devices, metrics, at(t))
        all_changes += step.changes
        if step.state.status is Status.ABORTED:
            break
    assert step.state.status is Status.ABORTED
    assert {c.device for c in all_changes} == canary
    assert [c for c in all_changes if not c.rollback] == [
        DesiredChange(d, MODEL) for d in sorted(canary)
    ]
    assert sorted(c.device for c in all_changes if c.rollback) == sorted(canary)
    assert statuses(step.state) == dict.fromkeys(sorted(canary), S.ROLLED_BACK) | dict.fromkeys(
        ["d02", "d03", "d04", "d05"], S.CANCELLED
    )
    assert "latency p95 30.0 ms vs control 10.0 ms (+200%), limit +50%" in step.state.reason


def aborting(previous: str | None = OLD) -> RolloutState:
    members = (
        Member("d00", 0, previous, S.ROLLING_BACK, NOW, f"back to {previous}"),
        Member("d01", 1, OLD, S.CANCELLED, NOW),
    )
    return RolloutState("r1", spec(), Status.ABORTING, NOW, 0, 2, NOW, None, members, "gate x")


@pytest.mark.parametrize(
    "seconds, facts, member_status, reason, rollout, events",
    [
        pytest.param(
            60,
            {"active_model": OLD},
            S.ROLLED_BACK,
            "back on m:1+int8",
            Status.ABORTED,
            ["member_rolled_back", "rollout_aborted"],
            id="back",
        ),
        pytest.param(
            60,
            {"active_model": NEW},
            S.ROLLING_BACK,
            "back to m:1+int8",
            Status.ABORTING,
            [],
            id="not-yet",
        ),
        pytest.param(
            3599,
            {"online": False, "active_model": NEW},
            S.ROLLING_BACK,
            "back to m:1+int8",
            Status.ABORTING,
            [],
            id="offline-within-deadline",
        ),
        pytest.param(
            3600,
            {"online": False, "active_model": NEW},
            S.ROLLING_BACK,
            "offline; rollback pending on reconnect",
            Status.ABORTED,
            ["member_rollback_pending", "rollout_aborted"],
            id="offline-past-deadline",
        ),
        pytest.param(
            3600,
            {"active_model": NEW},
            S.ROLLING_BACK,
            "rollback to m:1+int8 not confirmed after 3600 s; pending",
            Status.ABORTED,
            ["member_rollback_pending", "rollout_aborted"],
            id="online-unconfirmed",
        ),
    ],
)
def test_aborting_becomes_aborted(
    seconds: float,
    facts: dict[str, Any],
    member_status: MemberStatus,
    reason: str,
    rollout: Status,
    events: list[str],
) -> None:
    step = advance(aborting(), fleet(2, d00=facts), {}, at(seconds))
    d00 = step.state.members[0]
    assert (d00.status, d00.reason) == (member_status, reason)
    assert step.state.status is rollout
    assert kinds(step) == events
    assert step.changes == ()


def test_aborted_rollout_records_late_rollbacks() -> None:
    offline = fleet(2, d00={"online": False, "active_model": NEW})
    aborted = advance(aborting(), offline, {}, at(3600)).state
    assert aborted.status is Status.ABORTED and needs_advance(aborted)
    back = advance(aborted, fleet(2), {}, at(9000))
    assert statuses(back.state)["d00"] is S.ROLLED_BACK
    assert kinds(back) == ["member_rolled_back"]
    assert not needs_advance(back.state)


# ------------------------------------------------------------------------------ pause/resume


@pytest.mark.parametrize(
    "command, status, result, event",
    [
        (pause, Status.RUNNING, Status.PAUSED, "rollout_paused"),
        (resume, Status.PAUSED, Status.RUNNING, "rollout_resumed"),
        (abort, Status.PAUSED, Status.ABORTING, "rollout_aborting"),
        (pause, Status.PAUSED, None, "is paused; only a running one can pause"),
        (pause, Status.ABORTING, None, "is aborting"),
        (resume, Status.RUNNING, None, "is running, not paused"),
        (abort, Status.COMPLETED, None, "is completed; only a running or paused one can abort"),
        (abort, Status.ABORTED, None, "is aborted"),
    ],
)
def test_operator_commands(command: Any, status: Status, result: Status | None, event: str) -> None:
    state = replace(started(5), status=status)
    if result is None:
        with pytest.raises(RolloutError, match=event):
            command(state, "operator", at(60))
        return
    step = command(state, "operator: night shift", at(60))
    assert step.state.status is result
    assert step.events[0].kind == event
    assert "operator: night shift" in step.events[0].message


def test_paused_rollout_keeps_settling_but_starts_nothing_and_resume_reobserves() -> None:
    devices = on_new(fleet(5), "d00")
    metrics = telemetry(ids(5))
    paused = pause(started(5), "operator: holiday", at(10)).state
    step = advance(paused, devices, metrics, at(60))
    assert statuses(step.state)["d00"] is S.UPDATED  # it finished activating
    assert step.state.soak_started == at(60)
    late = advance(step.state, devices, metrics, at(99_999))  # long past the soak
    assert (late.state.wave, late.changes, late.events) == (0, (), ())
    assert late.gates and all(g.judged for g in late.gates)
    resumed = resume(late.state, "operator: back", at(100_000)).state
    assert resumed.soak_started == resumed.metrics_since == at(100_000)
    assert advance(resumed, devices, metrics, at(100_599)).state.wave == 0
    assert advance(resumed, devices, metrics, at(100_600)).state.wave == 1


# ------------------------------------------------------------------------------- idempotence


def soaking() -> RolloutState:
    return advance(started(5), on_new(fleet(5), "d00"), telemetry(ids(5)), at(60)).state


# (state, devices, metrics, seconds): the first call decides something; a repeat adds nothing
REPEATS: dict[str, tuple[RolloutState, dict[str, DeviceFacts], dict[str, Metrics], float]] = {
    "canary-waiting": (started(5), fleet(5), {}, 30),
    "canary-settles": (started(5), on_new(fleet(5), "d00"), telemetry(ids(5)), 60),
    "wave-passes": (soaking(), on_new(fleet(5), "d00"), telemetry(ids(5)), 660),
    "gate-aborts": (
        started(5),
        on_new(fleet(5), "d00"),
        telemetry(ids(5), ["d00"], latency_p95_ms=50.0),
        60,
    ),
    "gate-pauses": (
        started(5, gates={"on_breach": "pause"}),
        on_new(fleet(5), "d00"),
        telemetry(ids(5), ["d00"], errors=100),
        60,
    ),
    "install-fails": (started(5), fleet(5, d00={"deploy_failed": NEW}), {}, 60),
    "missed": (started(5), fleet(5, d00={"online": False}), {}, 4000),
    "newcomer-joins": (started(5), fleet(6), {}, 60),
    "rolled-back": (aborting(), fleet(2), {}, 60),
    "rollback-pending": (aborting(), fleet(2, d00={"online": False}), {}, 4000),
}


@pytest.mark.parametrize("state, devices, metrics, seconds", REPEATS.values(), ids=REPEATS.keys())
def test_advance_is_idempotent(
    state: RolloutState,
    devices: dict[str, DeviceFacts],
    metrics: dict[str, Metrics],
    seconds: float,
) -> None:
    first = advance(state, devices, metrics, at(seconds))
    again = advance(first.state, devices, metrics, at(seconds))
    assert (again.changes, again.events) == ((), ())
    assert again.state == first.state
