"""Staged rollouts: canary, waves, soak, health gates, automatic abort. A pure function.

A rollout moves a model onto the devices matching a label selector, a few at a time. Each
wave's devices get the new model as their desired model (reconcile does the sending; inside
their site's maintenance window only, see controller.windows); once every device of the wave
has settled (active, failed, or offline past its deadline) the wave *soaks* for ``soak_s``
while its gates are evaluated against the devices still on the previous version (the control
group) and against absolute limits. A breached gate pauses or aborts the rollout; abort sets
every device it touched back to the model it ran before (an explicit rollback: the agent
re-activates its last-good copy from disk, no transfer).

:func:`advance` is the whole decision: given the rollout's state, the devices, their telemetry
for the current soak period and the clock, it returns the next state, the desired-model changes
to make and the events to record. The daemon (controller.rollouts_job) does the I/O around it;
nothing here sleeps, reads a clock or touches the database, so every rule is tested table-driven
(tests/unit/test_rollout.py).

The rules it implements (sizes, waves, members, joining, soak, gates, breach, abort, the
ABORTING state, idempotence) are written out in docs/rollouts.md, one paragraph per rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.protocol import ModelRef, ProtocolError
from controller.errors import InvalidRequest

# ------------------------------------------------------------------------------ the definition


class Gates(BaseModel):
    """Limits judged per wave during its soak. Rates are fractions (0.01 = 1%); regressions are
    relative to the control group (0.25 = 25% worse); None switches a gate off."""

    model_config = ConfigDict(extra="forbid")

    max_install_failure_rate: float | None = Field(
        default=0.0, ge=0, le=1, description="Wave devices whose deploy/activation failed."
    )
    max_error_rate: float | None = Field(
        default=0.01, ge=0, le=1, description="Inference errors / attempts on the new model."
    )
    max_error_rate_increase: float | None = Field(
        default=0.01, ge=0, le=1, description="New error rate minus the control group's."
    )
    max_latency_regression: float | None = Field(
        default=0.5, ge=0, description="p95 latency vs the control group's, minus 1."
    )
    max_energy_regression: float | None = Field(
        default=0.25, ge=0, description="Energy per inference vs the control group's, minus 1."
    )
    max_fallback_rate: float | None = Field(
        default=0.05, ge=0, le=1, description="Inferences answered by a fallback tier."
    )
    max_offline_rate: float | None = Field(
        default=0.0, ge=0, le=1, description="Wave devices gone offline during the soak."
    )
    min_devices: int = Field(default=1, ge=1, description="Wave devices with data to judge.")
    min_inferences: int = Field(default=100, ge=1, description="Inferences per judged group.")
    on_breach: Literal["pause", "abort"] = "abort"


class RolloutSpec(BaseModel):
    """What an operator writes (``rollout create`` flags or a YAML file)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="NAME:VERSION (the plan picks each device's variant) or NAME:VERSION+VARIANT."
    )
    selector: dict[str, str] = Field(default_factory=dict, description="Device labels to match.")
    canary: int | str = Field(default=1, description="Devices in wave 0: a count or 'N%'.")
    wave_size: int | str = Field(default="25%", description="Devices per wave: count or 'N%'.")
    growth: float = Field(default=1.0, ge=1.0, description="Each wave is this times the last.")
    soak_s: float = Field(default=300.0, ge=0, description="Soak time per wave, seconds.")
    offline_deadline_s: float = Field(
        default=3600.0, gt=0, description="How long a wave waits for an offline device."
    )
    gates: Gates = Field(default_factory=Gates)

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        try:
            ModelRef.parse(value)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("selector", mode="before")
    @classmethod
    def _labels_as_text(cls, value: object) -> object:
        # YAML reads ``line: 3`` as an int; labels are text
        if isinstance(value, dict):
            return {
                k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v
                for k, v in value.items()
            }
        return value

    @field_validator("canary", "wave_size", mode="before")
    @classmethod
    def _check_size(cls, value: object) -> object:
        _parse_size(value)
        if isinstance(value, str) and value.strip().isdigit():
            return int(value.strip())
        return value

    @classmethod
    def from_yaml(cls, path: Path) -> RolloutSpec:
        """Read a rollout file; RolloutError names the file, the key and what is expected."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise RolloutError(f"cannot read rollout file {path}: {exc.strerror or exc}") from exc
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RolloutError(f"rollout file {path} is not valid YAML: {exc}") from exc
        return cls.parse(raw, f"rollout file {path}")

    @classmethod
    def parse(cls, raw: object, source: str = "rollout") -> RolloutSpec:
        """Validate a mapping (a parsed file, or CLI flags); RolloutError names ``source`` and
        every bad key."""
        if not isinstance(raw, dict):
            got = "nothing" if raw is None else f"a {type(raw).__name__}"
            raise RolloutError(
                f"{source}: expected a mapping of rollout settings (model: NAME:VERSION, "
                f"selector: ..., canary: ..., ...), got {got}"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise RolloutError(f"{source}: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            known = (
                Gates.model_fields if error["loc"][:1] == ("gates",) else RolloutSpec.model_fields
            )
            problems.append(f"{loc}: unknown key; expected one of {', '.join(known)}")
            continue
        message = str(error["msg"]).removeprefix("Value error, ")
        given = error.get("input")
        if error["type"] != "missing" and isinstance(given, str | int | float | bool):
            message += f" (got {given!r})"
        problems.append(f"{loc}: {message}")
    return "; ".join(problems)


class RolloutError(InvalidRequest):
    """A rollout definition or command that cannot be carried out; says what to fix."""


def _parse_size(value: object) -> tuple[bool, Fraction]:
    """A canary or wave size: (is a percentage, amount). ValueError says what is wrong."""
    expected = "expected a device count like 5 or a percentage like '10%'"
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{expected}, got {value!r}")
    text = str(value).strip()
    if text.endswith("%"):
        try:
            percent = Fraction(text[:-1].strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{expected}, got {value!r}") from None
        if not 0 < percent <= 100:
            raise ValueError(f"a percentage must be above 0% and at most 100%, got {value!r}")
        return True, percent
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{expected}, got {value!r}") from None
    if count < 1:
        raise ValueError(f"needs at least 1 device, got {value!r}")
    return False, Fraction(count)


def _resolve_size(value: int | str, total: int, key: str) -> int:
    """A size as a device count for ``total`` devices (rounded up, at least 1)."""
    try:
        percent, amount = _parse_size(value)
    except ValueError as exc:
        raise RolloutError(f"{key}: {exc}") from None
    if not percent:
        return int(amount)
    return max(1, math.ceil(amount * total / 100))


# ------------------------------------------------------------------------------------- state


class Status(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTING = "aborting"  # rollbacks sent, waiting for devices to report the previous model
    ABORTED = "aborted"
    COMPLETED = "completed"


class MemberStatus(StrEnum):
    PENDING = "pending"  # its wave has not started (a member of the control group)
    UPDATING = "updating"  # desired model set; waiting for the device to report it active
    UPDATED = "updated"  # runs the rollout's model
    FAILED = "failed"  # its deploy or activation failed
    MISSED = "missed"  # offline past offline_deadline_s during its wave
    SKIPPED = "skipped"  # pinned, or in another rollout of the same model; never touched
    ROLLING_BACK = "rolling_back"  # abort: desired set back to previous_model
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"  # abort before its wave: never touched


NO_WAVE = -1  # Member.wave of a member skipped when it joined: it belongs to no wave

SETTLED = frozenset(
    {MemberStatus.UPDATED, MemberStatus.FAILED, MemberStatus.MISSED, MemberStatus.SKIPPED}
)
# given the new model as desired: what abort rolls back
TOUCHED = frozenset(
    {MemberStatus.UPDATING, MemberStatus.UPDATED, MemberStatus.FAILED, MemberStatus.MISSED}
)


@dataclass(frozen=True)
class Member:
    device: str
    wave: int  # NO_WAVE for a member skipped when it joined
    previous_model: str | None  # what it ran when its wave started (or when it joined)
    status: MemberStatus = MemberStatus.PENDING
    since: datetime | None = None  # when it entered this status
    reason: str = ""


@dataclass(frozen=True)
class RolloutState:
    id: str
    spec: RolloutSpec
    status: Status
    created: datetime
    wave: int = 0  # the current wave (0: canary)
    waves: int = 1  # how many waves there are now (grows when new devices match)
    wave_started: datetime | None = None  # when the current wave's desired models were set
    soak_started: datetime | None = None  # when its last member settled
    members: tuple[Member, ...] = ()
    reason: str = ""  # why it is in its status (a breached gate, an operator's pause ...)
    # telemetry for the gates is summed from here: the current wave's start, or the last resume
    metrics_since: datetime | None = None


# ------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class DeviceFacts:
    """What the rollout needs to know about one device matching the selector, now."""

    id: str
    online: bool
    active_model: str | None  # name:version+variant as the agent reports it
    pinned: bool = False
    other_rollout: str | None = None  # id of another live rollout of the same model name
    deploy_failed: str | None = None  # the model of its newest deploy, if that one failed
    tier: str | None = None  # fallback tier it reports
    in_window: bool = True  # inside its site's maintenance window (may activate now)
    # when that deploy failed; a failure from before the member was asked is ignored
    deploy_failed_at: datetime | None = None


@dataclass(frozen=True)
class Metrics:
    """One device's telemetry over the current soak period (sums, and inference-weighted
    means of the per-window p95 and energy)."""

    inferences: int = 0
    errors: int = 0
    latency_p95_ms: float | None = None
    energy_per_inference_j: float | None = None
    fallback_inferences: int = 0  # inferences answered by a tier other than "active"
    judged_inferences: int | None = None  # those behind latency/energy (None: all of them)


# ----------------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class GateResult:
    name: str  # install_failure_rate, error_rate, error_rate_increase, latency_regression, ...
    value: float | None  # None: not judged yet, or nothing to compare (no control group)
    limit: float
    judged: bool  # enough devices and inferences to judge
    breached: bool
    detail: str  # e.g. "wave 12 ms vs control 8 ms (+50%)", "waiting: 40 of 100 inferences"


@dataclass(frozen=True)
class DesiredChange:
    device: str
    model: str
    rollback: bool = False


@dataclass(frozen=True)
class RolloutEvent:
    kind: str  # rollout_started, wave_started, wave_soaking, wave_passed, gate_breached,
    #            rollout_paused, rollout_resumed, rollout_aborting, rollout_aborted,
    #            rollout_completed, member_failed, member_missed, member_skipped,
    #            member_updated, member_joined, member_rolling_back, member_rolled_back,
    #            member_rollback_pending
    message: str  # for people: says what happened and why
    device: str | None = None


@dataclass(frozen=True)
class Step:
    state: RolloutState
    changes: tuple[DesiredChange, ...] = ()
    events: tuple[RolloutEvent, ...] = ()
    gates: tuple[GateResult, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------------------- decisions


def runs_model(active: str | None, model: str) -> bool:
    """Whether a device reporting ``active`` runs ``model``: the same, or any variant of it
    when ``model`` names none (``m:2`` is run by ``m:2+int8``)."""
    if active is None:
        return False
    return active == model or ("+" not in model and active.partition("+")[0] == model)


def needs_advance(state: RolloutState) -> bool:
    """Whether the daemon should keep calling :func:`advance` for this rollout."""
    if state.status in (Status.RUNNING, Status.PAUSED, Status.ABORTING):
        return True
    return state.status is Status.ABORTED and any(
        m.status is MemberStatus.ROLLING_BACK for m in state.members
    )


def plan_waves(spec: RolloutSpec, devices: list[str]) -> list[list[str]]:
    """Split the matching devices (in this order) into canary + waves."""
    total = len(devices)
    if total == 0:
        return []
    canary = min(total, _resolve_size(spec.canary, total, "canary"))
    waves = [devices[:canary]]
    base = _resolve_size(spec.wave_size, total, "wave_size")
    growth = Fraction(repr(spec.growth))  # 1.1 as 11/10, not 1.100000000000000088...
    size = Fraction(base)
    taken = canary
    while taken < total:
        count = math.ceil(size)
        waves.append(devices[taken : taken + count])
        taken += count
        size *= growth
    return waves


def start(rollout_id: str, spec: RolloutSpec, devices: list[DeviceFacts], now: datetime) -> Step:
    """A new rollout: members in waves (pinned / other-rollout devices skipped, with reasons)."""
    skipped: list[Member] = []
    eligible: list[DeviceFacts] = []
    for facts in sorted(devices, key=lambda d: d.id):
        reason = _skip_reason(facts)
        if reason:
            skipped.append(
                Member(facts.id, NO_WAVE, facts.active_model, MemberStatus.SKIPPED, now, reason)
            )
        else:
            eligible.append(facts)
    selector = _selector_text(spec.selector)
    if not eligible:
        why = f": {len(skipped)} skipped (pinned or in another rollout)" if skipped else ""
        raise RolloutError(f"no device matching {selector} can take {spec.model}{why}")
    plan = plan_waves(spec, [d.id for d in eligible])
    active = {d.id: d.active_model for d in eligible}
    planned = [Member(d, w, active[d], since=now) for w, ids in enumerate(plan) for d in ids]
    state = RolloutState(
        id=rollout_id,
        spec=spec,
        status=Status.RUNNING,
        created=now,
        waves=len(plan),
        members=tuple(sorted([*skipped, *planned], key=lambda m: m.device)),
    )
    draft = _Draft.of(state)
    sizes = ", ".join(str(len(ids)) for ids in plan[1:]) or "none"
    pinned = sum(1 for m in skipped if m.reason == "pinned")
    draft.emit(
        "rollout_started",
        f"rollout {rollout_id} of {spec.model} to {len(eligible)} devices matching {selector}: "
        f"canary of {len(plan[0])}, then {len(plan) - 1} waves ({sizes}); "
        f"{len(skipped)} skipped ({pinned} pinned, {len(skipped) - pinned} in another rollout); "
        f"soak {_seconds(spec.soak_s)} per wave; a breached gate will {spec.gates.on_breach} it",
    )
    for m in skipped:
        draft.emit("member_skipped", f"{m.device} skipped: {m.reason}", m.device)
    _start_wave(draft, 0, {d.id: d for d in devices}, now)
    return draft.step()


def advance(
    state: RolloutState,
    devices: dict[str, DeviceFacts],
    metrics: dict[str, Metrics],
    now: datetime,
) -> Step:
    """One decision; see the module doc. ``devices`` holds every device matching the selector
    now (new ones join the rollout); ``metrics`` the soak-period telemetry per device."""
    draft = _Draft.of(state)
    if state.status is Status.COMPLETED:
        return draft.step()
    if state.status in (Status.ABORTING, Status.ABORTED):
        _follow_rollbacks(draft, devices, now)
        return draft.step()

    _follow_members(draft, devices, now)
    _admit_newcomers(draft, devices, now)
    _note_settled(draft, now)
    wave = draft.wave_members(draft.state.wave)
    control = [m for m in draft.members.values() if m.status is MemberStatus.PENDING]
    gates = evaluate_gates(draft.state.spec.gates, wave, control, metrics, devices)
    if draft.state.status is not Status.RUNNING:
        return draft.step(gates)

    label = _wave_label(draft.state)
    breached = [g for g in gates if g.judged and g.breached]
    if breached:
        action = draft.state.spec.gates.on_breach
        for g in breached:
            draft.emit("gate_breached", f"{label}: {g.detail}: {_DOING[action]}")
        reason = "; ".join(f"gate {g.name} breached in {label}: {g.detail}" for g in breached)
        if action == "pause":
            draft.update(status=Status.PAUSED, reason=reason)
            draft.emit("rollout_paused", f"rollout {state.id} paused: {reason}")
        else:
            _abort(draft, reason, now)
            _follow_rollbacks(draft, devices, now)  # members that never left the old model
        return draft.step(gates)

    soak_started = draft.state.soak_started
    if soak_started is None or not all(g.judged for g in gates):
        return draft.step(gates)
    soaked = now - soak_started >= timedelta(seconds=draft.state.spec.soak_s)
    if not soaked and any(m.status in TOUCHED for m in wave):
        return draft.step(gates)
    verdicts = "; ".join(g.detail for g in gates) or "no gates enabled"
    draft.emit(
        "wave_passed",
        f"{label} passed after soaking {_seconds((now - soak_started).total_seconds())}: "
        f"{verdicts}",
    )
    if draft.state.wave + 1 < draft.state.waves:
        _start_wave(draft, draft.state.wave + 1, devices, now)
    else:
        draft.update(status=Status.COMPLETED, reason=f"{label} passed")
        counts = _count(draft.members.values())
        draft.emit(
            "rollout_completed",
            f"rollout {state.id} completed: {counts[MemberStatus.UPDATED]} devices on "
            f"{draft.state.spec.model}, {counts[MemberStatus.FAILED]} failed, "
            f"{counts[MemberStatus.MISSED]} missed (reconcile deploys when they return), "
            f"{counts[MemberStatus.SKIPPED]} skipped",
        )
    return draft.step(gates)


def evaluate_gates(
    gates: Gates,
    wave: list[Member],
    control: list[Member],
    metrics: dict[str, Metrics],
    devices: dict[str, DeviceFacts],
) -> list[GateResult]:
    """Every gate's value, limit and verdict for the current wave against the control group."""
    enabled: list[tuple[str, float]] = [
        (name.removeprefix("max_"), limit)
        for name, limit in (
            ("max_install_failure_rate", gates.max_install_failure_rate),
            ("max_error_rate", gates.max_error_rate),
            ("max_error_rate_increase", gates.max_error_rate_increase),
            ("max_latency_regression", gates.max_latency_regression),
            ("max_energy_regression", gates.max_energy_regression),
            ("max_fallback_rate", gates.max_fallback_rate),
            ("max_offline_rate", gates.max_offline_rate),
        )
        if limit is not None
    ]
    touched = [m for m in wave if m.status in TOUCHED]
    if not touched:
        return [
            GateResult(name, None, limit, True, False, "no device in this wave to judge")
            for name, limit in enabled
        ]
    updated = [m for m in wave if m.status is MemberStatus.UPDATED]
    reachable = sum(1 for m in wave if m.status in (MemberStatus.UPDATED, MemberStatus.UPDATING))
    judge = _Judge(
        gates,
        _Sample.of(updated, metrics),
        _Sample.of(control, metrics) if control else None,
        need_devices=max(1, min(gates.min_devices, reachable)),
    )
    results = []
    for name, limit in enabled:
        if name == "install_failure_rate":
            results.append(_install_gate(gates, touched, limit))
        elif name == "offline_rate":
            offline = sum(1 for m in updated if not _online(devices.get(m.device)))
            value = offline / len(touched)
            detail = (
                f"offline after updating: {offline} of {len(touched)} wave devices "
                f"({_pct(value)}), limit {_pct(limit)}"
            )
            results.append(GateResult(name, value, limit, True, _over(value, limit), detail))
        else:
            results.append(judge.telemetry(name, limit))
    return results


def pause(state: RolloutState, reason: str, now: datetime) -> Step:
    """Hold a running rollout: members keep settling, but no wave starts and nothing is sent."""
    if state.status is not Status.RUNNING:
        raise RolloutError(f"rollout {state.id} is {state.status}; only a running one can pause")
    draft = _Draft.of(state)
    draft.update(status=Status.PAUSED, reason=reason)
    draft.emit("rollout_paused", f"rollout {state.id} paused in {_wave_label(state)}: {reason}")
    return draft.step()


def resume(state: RolloutState, reason: str, now: datetime) -> Step:
    """Run a paused rollout again; the current wave is observed afresh from ``now``."""
    if state.status is not Status.PAUSED:
        raise RolloutError(f"rollout {state.id} is {state.status}, not paused")
    draft = _Draft.of(state)
    restart = state.soak_started is not None
    draft.update(
        status=Status.RUNNING,
        reason=reason,
        metrics_since=now,
        soak_started=now if restart else None,
    )
    soak = f", soak of {_seconds(state.spec.soak_s)} restarts" if restart else ""
    draft.emit(
        "rollout_resumed",
        f"rollout {state.id} resumed in {_wave_label(state)}: {reason}; "
        f"gates judge telemetry from now{soak}",
    )
    return draft.step()


def abort(state: RolloutState, reason: str, now: datetime) -> Step:
    """Roll back every member that was touched; cancel the ones never touched."""
    if state.status not in (Status.RUNNING, Status.PAUSED):
        raise RolloutError(
            f"rollout {state.id} is {state.status}; only a running or paused one can abort"
        )
    draft = _Draft.of(state)
    _abort(draft, reason, now)
    return draft.step()


# ---------------------------------------------------------------------------------- internals


@dataclass
class _Draft:
    """The next state as it is being decided, with the changes and events so far."""

    state: RolloutState
    members: dict[str, Member]
    changes: list[DesiredChange] = field(default_factory=list)
    events: list[RolloutEvent] = field(default_factory=list)

    @classmethod
    def of(cls, state: RolloutState) -> _Draft:
        return cls(state, {m.device: m for m in state.members})

    def move(self, member: Member, status: MemberStatus, now: datetime, reason: str) -> Member:
        moved = replace(member, status=status, since=now, reason=reason)
        self.members[member.device] = moved
        return moved

    def emit(self, kind: str, message: str, device: str | None = None) -> None:
        self.events.append(RolloutEvent(kind, message, device))

    def update(self, **fields: Any) -> None:
        self.state = replace(self.state, **fields)

    def wave_members(self, wave: int) -> list[Member]:
        return [m for m in self.members.values() if m.wave == wave]

    def step(self, gates: list[GateResult] | None = None) -> Step:
        members = tuple(sorted(self.members.values(), key=lambda m: m.device))
        state = replace(self.state, members=members)
        return Step(state, tuple(self.changes), tuple(self.events), tuple(gates or ()))


def _skip_reason(facts: DeviceFacts) -> str:
    if facts.pinned:
        return "pinned"
    if facts.other_rollout:
        return f"in rollout {facts.other_rollout}"
    return ""


def _online(facts: DeviceFacts | None) -> bool:
    return facts is not None and facts.online


def _failed_here(facts: DeviceFacts, model: str, asked: datetime | None) -> bool:
    """Whether the device's newest deploy, of this model, failed after it was asked."""
    if facts.deploy_failed is None or not runs_model(facts.deploy_failed, model):
        return False
    return facts.deploy_failed_at is None or asked is None or facts.deploy_failed_at >= asked


def _start_wave(draft: _Draft, wave: int, devices: dict[str, DeviceFacts], now: datetime) -> None:
    """Set the wave's members to the new model (and record what they ran before)."""
    draft.update(wave=wave, wave_started=now, soak_started=None, metrics_since=now)
    model = draft.state.spec.model
    label = _wave_label(draft.state)
    asked = already = skipped = 0
    for member in draft.wave_members(wave):
        if member.status is not MemberStatus.PENDING:
            continue
        facts = devices.get(member.device)
        reason = "no longer matches the selector" if facts is None else _skip_reason(facts)
        if facts is None or reason:
            draft.move(member, MemberStatus.SKIPPED, now, reason)
            draft.emit(
                "member_skipped", f"{member.device} skipped in {label}: {reason}", member.device
            )
            skipped += 1
            continue
        member = replace(member, previous_model=facts.active_model)
        if runs_model(facts.active_model, model):
            draft.move(member, MemberStatus.UPDATED, now, f"already ran {facts.active_model}")
            already += 1
        else:
            draft.move(member, MemberStatus.UPDATING, now, f"desired model set to {model}")
            draft.changes.append(DesiredChange(member.device, model))
            asked += 1
    draft.emit(
        "wave_started",
        f"{label} started: {asked} devices set to {model}, {already} already ran it, "
        f"{skipped} skipped",
    )
    _note_settled(draft, now)


def _follow_members(draft: _Draft, devices: dict[str, DeviceFacts], now: datetime) -> None:
    """Members catch up with what their devices report: updated, failed or missed."""
    spec = draft.state.spec
    deadline = timedelta(seconds=spec.offline_deadline_s)
    waiting = (MemberStatus.UPDATING, MemberStatus.MISSED, MemberStatus.FAILED)
    for member in list(draft.members.values()):
        if member.status not in waiting:
            continue
        facts = devices.get(member.device)
        if facts is not None and runs_model(facts.active_model, spec.model):
            draft.move(member, MemberStatus.UPDATED, now, f"runs {facts.active_model}")
            draft.emit(
                "member_updated",
                f"{member.device} runs {facts.active_model} (was {member.previous_model})",
                member.device,
            )
        elif (
            facts is not None
            and member.status is not MemberStatus.FAILED
            and _failed_here(facts, spec.model, member.since)
        ):
            reason = f"deploy of {facts.deploy_failed} failed; still on {facts.active_model}"
            draft.move(member, MemberStatus.FAILED, now, reason)
            draft.emit("member_failed", f"{member.device}: {reason}", member.device)
        elif member.status is MemberStatus.UPDATING and not _online(facts):
            asked = member.since or draft.state.wave_started or now
            if now - asked < deadline:
                continue
            where = "offline" if facts is not None else "gone from the selector"
            reason = (
                f"{where} for {_seconds(spec.offline_deadline_s)} after it was asked; "
                "its desired model stays set, reconcile deploys when it returns"
            )
            draft.move(member, MemberStatus.MISSED, now, reason)
            draft.emit("member_missed", f"{member.device} missed: {reason}", member.device)


def _admit_newcomers(draft: _Draft, devices: dict[str, DeviceFacts], now: datetime) -> None:
    """Devices that match now but are not members join the last wave not started yet."""
    for device in sorted(set(devices) - set(draft.members)):
        facts = devices[device]
        reason = _skip_reason(facts)
        if reason:
            draft.members[device] = Member(
                device, NO_WAVE, facts.active_model, MemberStatus.SKIPPED, now, reason
            )
            draft.emit(
                "member_skipped", f"{device} matches the selector; skipped: {reason}", device
            )
            continue
        last = draft.state.waves - 1
        if last > draft.state.wave:
            where = f"wave {last}, not started yet"
        else:
            last = draft.state.waves
            draft.update(waves=last + 1)
            where = f"new final wave {last}, as every wave has started"
        draft.members[device] = Member(device, last, facts.active_model, since=now)
        draft.emit("member_joined", f"{device} matches the selector; joins {where}", device)


def _note_settled(draft: _Draft, now: datetime) -> None:
    """Start the soak once every member of the current wave has settled."""
    if draft.state.soak_started is not None:
        return
    wave = draft.wave_members(draft.state.wave)
    if not all(m.status in SETTLED for m in wave):
        return
    draft.update(soak_started=now)
    counts = _count(wave)
    draft.emit(
        "wave_soaking",
        f"{_wave_label(draft.state)} settled ({counts[MemberStatus.UPDATED]} updated, "
        f"{counts[MemberStatus.FAILED]} failed, {counts[MemberStatus.MISSED]} missed, "
        f"{counts[MemberStatus.SKIPPED]} skipped); soaking {_seconds(draft.state.spec.soak_s)}",
    )


def _abort(draft: _Draft, reason: str, now: datetime) -> None:
    model = draft.state.spec.model
    rolling: list[Member] = []
    kept: list[tuple[Member, str]] = []
    cancelled = 0
    for member in list(draft.members.values()):
        previous = member.previous_model
        if member.status is MemberStatus.PENDING:
            draft.move(member, MemberStatus.CANCELLED, now, "rollout aborted before its wave")
            cancelled += 1
        elif member.status not in TOUCHED:
            continue
        elif previous is None:
            kept.append((member, "had no model before; left on the new one"))
        elif runs_model(previous, model):
            kept.append((member, f"ran {previous} before the rollout; left on it"))
        else:
            rolling.append(
                draft.move(member, MemberStatus.ROLLING_BACK, now, f"back to {previous}")
            )
            draft.changes.append(DesiredChange(member.device, previous, rollback=True))
    draft.update(status=Status.ABORTING, reason=reason)
    draft.emit(
        "rollout_aborting",
        f"rollout {draft.state.id} aborting in {_wave_label(draft.state)}: {reason}; "
        f"rolling back {len(rolling)} devices to their previous model, {len(kept)} have nothing "
        f"to go back to, cancelling {cancelled} that never got it",
    )
    for member in rolling:
        draft.emit(
            "member_rolling_back",
            f"{member.device} rolling back to {member.previous_model}",
            member.device,
        )
    for member, why in kept:
        draft.move(member, MemberStatus.ROLLED_BACK, now, why)
        draft.emit(
            "member_rolled_back",
            f"{member.device} {why} ({model} stays its desired model; nothing to go back to)",
            member.device,
        )
    _finish_abort(draft, now)


def _follow_rollbacks(draft: _Draft, devices: dict[str, DeviceFacts], now: datetime) -> None:
    """ROLLING_BACK members that report their previous model are rolled back; the ones past
    the deadline stop holding the rollout."""
    deadline = timedelta(seconds=draft.state.spec.offline_deadline_s)
    for member in list(draft.members.values()):
        if member.status is not MemberStatus.ROLLING_BACK:
            continue
        facts = devices.get(member.device)
        if facts is not None and facts.active_model == member.previous_model:
            draft.move(member, MemberStatus.ROLLED_BACK, now, f"back on {member.previous_model}")
            draft.emit(
                "member_rolled_back",
                f"{member.device} is back on {member.previous_model}",
                member.device,
            )
            continue
        if draft.state.status is not Status.ABORTING or now - (member.since or now) < deadline:
            continue
        if _online(facts):
            pending = (
                f"rollback to {member.previous_model} not confirmed after "
                f"{_seconds(draft.state.spec.offline_deadline_s)}; pending"
            )
        else:
            pending = "offline; rollback pending on reconnect"
        if member.reason != pending:
            draft.members[member.device] = replace(member, reason=pending)
            draft.emit("member_rollback_pending", f"{member.device}: {pending}", member.device)
    if draft.state.status is Status.ABORTING:
        _finish_abort(draft, now)


def _finish_abort(draft: _Draft, now: datetime) -> None:
    """ABORTED once no member is rolling back within its deadline."""
    deadline = timedelta(seconds=draft.state.spec.offline_deadline_s)
    rolling = [m for m in draft.members.values() if m.status is MemberStatus.ROLLING_BACK]
    if any(now - (m.since or now) < deadline for m in rolling):
        return
    draft.update(status=Status.ABORTED)
    counts = _count(draft.members.values())
    draft.emit(
        "rollout_aborted",
        f"rollout {draft.state.id} aborted ({draft.state.reason}): "
        f"{counts[MemberStatus.ROLLED_BACK]} rolled back or left as they were, "
        f"{len(rolling)} rollbacks pending until the devices report back, "
        f"{counts[MemberStatus.CANCELLED]} cancelled",
    )


def _install_gate(gates: Gates, touched: list[Member], limit: float) -> GateResult:
    name = "install_failure_rate"
    failed = sum(1 for m in touched if m.status is MemberStatus.FAILED)
    settled = sum(1 for m in touched if m.status in SETTLED)
    need = min(gates.min_devices, len(touched))
    if settled < need:
        return GateResult(
            name, None, limit, False, False, f"waiting: {settled} of {need} devices settled"
        )
    value = failed / len(touched)
    detail = (
        f"install failures {failed} of {len(touched)} devices ({_pct(value)}), limit {_pct(limit)}"
    )
    return GateResult(name, value, limit, True, _over(value, limit), detail)


@dataclass(frozen=True)
class _Sample:
    """One group's telemetry, summed over its devices."""

    attempts: int  # inferences + errors
    errors: int
    inferences: int
    fallback: int
    devices_with_attempts: int
    devices_with_inferences: int
    means: dict[str, tuple[float | None, int, int]]  # metric: (mean, weight, devices)

    @classmethod
    def of(cls, members: list[Member], metrics: dict[str, Metrics]) -> _Sample:
        rows = [metrics.get(m.device, Metrics()) for m in members]
        means: dict[str, tuple[float | None, int, int]] = {}
        for metric in ("latency_p95_ms", "energy_per_inference_j"):
            pairs = [
                (
                    getattr(r, metric),
                    r.inferences if r.judged_inferences is None else r.judged_inferences,
                )
                for r in rows
            ]
            weighted = [(v, w) for v, w in pairs if v is not None and w > 0]
            weight = sum(w for _, w in weighted)
            mean = sum(v * w for v, w in weighted) / weight if weight else None
            means[metric] = (mean, weight, len(weighted))
        return cls(
            attempts=sum(r.inferences + r.errors for r in rows),
            errors=sum(r.errors for r in rows),
            inferences=sum(r.inferences for r in rows),
            fallback=sum(r.fallback_inferences for r in rows),
            devices_with_attempts=sum(1 for r in rows if r.inferences + r.errors > 0),
            devices_with_inferences=sum(1 for r in rows if r.inferences > 0),
            means=means,
        )

    @property
    def error_rate(self) -> float:
        return self.errors / self.attempts if self.attempts else 0.0


_DOING = {"pause": "pausing", "abort": "aborting"}

_RELATIVE = {
    "latency_regression": ("latency_p95_ms", "latency p95", "latency readings"),
    "energy_regression": ("energy_per_inference_j", "energy per inference", "energy readings"),
}


@dataclass(frozen=True)
class _Judge:
    """The telemetry gates of one wave against its control group (None: no control left)."""

    gates: Gates
    wave: _Sample
    control: _Sample | None
    need_devices: int

    def telemetry(self, name: str, limit: float) -> GateResult:
        def waiting(detail: str) -> GateResult:
            return GateResult(name, None, limit, False, False, f"waiting: {detail}")

        def verdict(value: float, detail: str) -> GateResult:
            return GateResult(name, value, limit, True, _over(value, limit), detail)

        least = self.gates.min_inferences
        wave, control = self.wave, self.control
        if name in ("error_rate", "error_rate_increase"):
            have, devices, what = wave.attempts, wave.devices_with_attempts, "inferences"
        elif name == "fallback_rate":
            have, devices, what = wave.inferences, wave.devices_with_inferences, "inferences"
        else:
            metric, _, readings = _RELATIVE[name]
            _, have, devices = wave.means[metric]
            what = f"inferences with {readings}"
        relative = name in ("error_rate_increase", *_RELATIVE)
        if relative and control is None:
            return GateResult(
                name, None, limit, True, False, "no control group left; absolute limits only"
            )
        if have < least:
            return waiting(f"{have} of {least} {what}")
        if devices < self.need_devices:
            return waiting(f"{devices} of {self.need_devices} devices with data")

        if name == "error_rate":
            value = wave.error_rate
            return verdict(
                value,
                f"error rate {_pct(value)} ({wave.errors} of {wave.attempts} attempts), "
                f"limit {_pct(limit)}",
            )
        if name == "fallback_rate":
            value = wave.fallback / wave.inferences
            return verdict(
                value,
                f"fallback rate {_pct(value)} ({wave.fallback} of {wave.inferences} "
                f"inferences), limit {_pct(limit)}",
            )
        assert control is not None
        if name == "error_rate_increase":
            if control.attempts < least:
                return waiting(f"control {control.attempts} of {least} inferences")
            value = wave.error_rate - control.error_rate
            return verdict(
                value,
                f"error rate {_pct(wave.error_rate)} vs control {_pct(control.error_rate)} "
                f"({_points(value)}), limit {_points(limit)}",
            )
        metric, label, readings = _RELATIVE[name]
        wave_mean, _, _ = wave.means[metric]
        control_mean, control_weight, _ = control.means[metric]
        if control_weight < least or wave_mean is None or control_mean is None:
            return waiting(f"control {control_weight} of {least} inferences with {readings}")
        if control_mean > 0:
            value = wave_mean / control_mean - 1
        else:
            value = 0.0 if wave_mean <= 0 else math.inf
        unit = _ms if metric == "latency_p95_ms" else _joules
        return verdict(
            value,
            f"{label} {unit(wave_mean)} vs control {unit(control_mean)} ({_pct(value, True)}), "
            f"limit {_pct(limit, True)}",
        )


def _over(value: float, limit: float) -> bool:
    """Breached: above the limit by more than float rounding (0.1 - 0.09 is not over 0.01)."""
    return value > limit + 1e-9


def _count(members: Iterable[Member]) -> dict[MemberStatus, int]:
    counts = dict.fromkeys(MemberStatus, 0)
    for m in members:
        counts[m.status] += 1
    return counts


def _wave_label(state: RolloutState) -> str:
    return "canary" if state.wave == 0 else f"wave {state.wave} of {state.waves - 1}"


def _selector_text(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in selector.items()) or "(all devices)"


def _number(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _pct(fraction: float, signed: bool = False) -> str:
    sign = "+" if signed and fraction >= 0 else ""
    return f"{sign}{_number(fraction * 100)}%"


def _points(fraction: float) -> str:
    return f"{'+' if fraction >= 0 else ''}{_number(fraction * 100)} points"


def _seconds(seconds: float) -> str:
    return f"{seconds:g} s"


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def _joules(value: float) -> str:
    return f"{value * 1000:.3g} mJ" if value < 1 else f"{value:.3g} J"
