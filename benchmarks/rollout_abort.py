"""Rollout abort: a bad model in the canary, from the breached gate to the rollout stopped and
the canary back on the previous version (issue 6, "Figures").

The demo fleet (controller.demo.DEVICES: the same ids, classes, labels, input rpm and seeds) as
real agent subprocesses on a real Mosquitto, the controller in-process with a short reconcile
interval, every device on v1 (the sample vibration-ae). Each repetition creates a rollout of a
bad v2 (``sqrt(-mean(x^2))``: finite on the zero-input smoke test, so it activates; NaN on
every real window, so the agent falls to its last-good model after three errors) to the whole
fleet, canary 1, first with ``on_breach: abort``, then a second one with ``on_breach: pause``.
Every rollout's v2 has bytes of its own, so each canary fetches its model as a first rollout
would.

Timed, on the wall clock that the agents, the controller's database and this process share:

* *breach row*: when the first telemetry row that makes a gate breach was written to the
  database (``telemetry.received_at``, stamped by the controller's ingest just before it commits
  the batch). Found afterwards by replaying the controller's own gate evaluation
  (``rollouts_job.rollout_metrics`` + ``rollout.evaluate_gates``, on a copy of the database
  cut at each ``received_at`` in turn);
* *fall*: the agent's ``tier_changed`` event to ``last_good``: the third failed inference in a
  row, the first failure the agent acts on. The first failed inference itself is two input
  periods (100 ms at 20 Hz) earlier; its ``inference_error`` event is rate-limited to one a
  minute per agent, so only the first repetition would have one;
* *status*: when the rollouts tick that paused or aborted the rollout returned (its decision
  committed): the job's ``tick`` is wrapped to record when each call ends;
* *back on v1*: the arrival of the canary's birth reporting v1 active again (abort case).

Baselines, same run: detection, ``reconcile_interval_s + telemetry interval_s``, the least a
detection can take from a failure (the window with the failures has to end, then a tick has
to read it); rollback, after each pause run, a plain ``registry.set_desired(canary, v1,
rollback=True)`` as ``greenfleet rollback`` does it, after a random part of one reconcile
interval (an operator's command lands anywhere in the cycle), timed from its commit to the
same birth, on the same device in the same state (running v2, fallen to last-good).

Settings: reconcile 0.2 s and telemetry 0.5 s (judged; 10 repetitions, 3 in quick mode), then,
in full mode only, the demo's own 1 s and 2 s (one repetition) on a fresh fleet, because with
both clocks re-phased by the fall the detection time is set by how the two intervals line up.
"""

from __future__ import annotations

import json
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import onnx
import sqlite_utils
from onnx import TensorProto, helper

from agent import protocol as p
from benchmarks.rig import (
    AGENT_START_TIMEOUT_S,
    BirthWatcher,
    Outcome,
    agent_process,
    check_alive,
    median,
    mosquitto,
    outcome,
    percentile,
)
from controller import registry, rollout, rollout_store
from controller.config import load_controller_config
from controller.daemon import Controller
from controller.db import open_db
from controller.demo import DEVICES, write_agent_config
from controller.home import Home
from controller.rollout import (
    DeviceFacts,
    MemberStatus,
    RolloutSpec,
    RolloutState,
    Status,
)
from controller.rollouts_job import device_facts, rollout_metrics
from model_store.catalog import Catalog

NAME = "rollout_abort"
TITLE = "Bad model in the canary: breach -> paused/aborting -> back on v1"
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "model_store" / "samples" / "vibration-ae.onnx"
OLD = "vibration-ae:1.0.0"


@dataclass(frozen=True)
class Setting:
    """The controller's reconcile (and rollouts) interval and the agents' telemetry window."""

    name: str
    reconcile_s: float
    telemetry_s: float


SHORT = Setting("short", 0.2, 0.5)  # judged
DEMO = Setting("demo", 1.0, 2.0)  # what `greenfleet demo` runs (full mode only)
RATE_HZ = 20.0  # the demo's inference rate
MIN_INFERENCES = 5  # per judged group; one 0.5 s window at 20 Hz holds ~10
SOAK_S = 30.0  # never reached: the canary breaches first
EXPECTED_GATES = {"error_rate", "error_rate_increase", "fallback_rate"}
STEP_TIMEOUT_S = 30.0
POLL_S = 0.01
TARGET = "canary stopped and rolled back; v2 nowhere else"


# -- fleet ------------------------------------------------------------------------------------


def bad_model(path: Path, tag: str) -> Path:
    """``sqrt(-mean(x^2))``: 0 on zeros (staging passes), NaN on any real window; ``tag`` in
    the doc string gives every version bytes of its own."""
    nodes = [
        helper.make_node("Mul", ["window", "window"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[1], keepdims=1),
        helper.make_node("Neg", ["ms"], ["neg"]),
        helper.make_node("Sqrt", ["neg"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan-on-real-input",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    built.ir_version = 8
    built.doc_string = f"bench bad model {tag}"
    onnx.checker.check_model(built)
    onnx.save(built, path)
    return path


def wait_until(predicate: Callable[[], Any], what: str, check: Callable[[], None]) -> Any:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        check()
        time.sleep(POLL_S)
    raise TimeoutError(f"timed out after {STEP_TIMEOUT_S:.0f} s waiting for {what}")


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


@contextmanager
def timed_ticks(controller: Controller) -> Iterator[dict[str, float]]:
    """When each call of the controller's rollouts tick returned (wall clock), keyed by the
    ``now`` it was called with as the database stamps it (rollout events carry that stamp).
    The job is the daemon's own; only its ``tick`` is wrapped, for the measurement."""
    job = controller._rollouts
    original = job.tick
    ends: dict[str, float] = {}

    def tick(now: datetime) -> bool:
        changed = original(now)
        ends[registry.iso(now)] = time.time()
        return changed

    job.tick = tick  # type: ignore[method-assign]
    try:
        yield ends
    finally:
        job.tick = original  # type: ignore[method-assign]


# -- one rollout ------------------------------------------------------------------------------


@dataclass
class Run:
    kind: str  # "abort" or "pause"
    model: str
    rollout: str = ""
    created: float = 0.0
    status: str = ""
    v2_birth: float = 0.0  # the canary's birth with v2 active arrived
    back: float | None = None  # abort: the canary's birth with v1 active arrived
    plain_sent: float | None = None  # pause: set_desired(rollback=True) committed
    plain_back: float | None = None  # pause: ... and the birth with v1 arrived


def create_rollout(db: sqlite_utils.Database, home: Home, model: str, on_breach: str) -> str:
    """What ``greenfleet rollout create`` does (rollout_commands.cmd_create), in-process."""
    spec = RolloutSpec.parse(
        {
            "model": model,
            "selector": {},  # the whole demo fleet: its three devices share no label
            "canary": 1,
            "wave_size": 1,
            "soak_s": SOAK_S,
            "gates": {"min_inferences": MIN_INFERENCES, "on_breach": on_breach},
        },
        "bench rollout",
    )
    config = load_controller_config(home.config)
    now = p.utcnow()
    with rollout_store.write_transaction(db):
        rollout_id = rollout_store.next_id(db)
        facts = device_facts(db, rollout_id, spec, now, now, config)
        step = rollout.start(rollout_id, spec, list(facts.values()), now)
        rollout_store.commit_step(db, step, now, previous=None)
    return rollout_id


def abort_rollout(db: sqlite_utils.Database, rollout_id: str) -> None:
    """What ``greenfleet rollout abort`` does (rollout_commands._operate), in-process."""
    now = p.utcnow()
    with rollout_store.write_transaction(db):
        state = rollout_store.load(db, rollout_id)
        step = rollout.abort(state, "aborted by the benchmark", now)
        rollout_store.commit_step(db, step, now, previous=state)


def status_of(db: sqlite_utils.Database, rollout_id: str) -> str:
    row = db.execute("SELECT status FROM rollouts WHERE id = ?", [rollout_id]).fetchone()
    return str(row[0])


def one_rollout(
    db: sqlite_utils.Database,
    home: Home,
    catalog: Catalog,
    births: BirthWatcher,
    canary: str,
    run: Run,
    workdir: Path,
    check: Callable[[], None],
    phase: random.Random,
    reconcile_s: float,
) -> None:
    version = run.model.partition(":")[2]
    catalog.add(bad_model(workdir / f"bad-{version}.onnx", version), "vibration-ae", version)
    run.created = time.time()
    run.rollout = create_rollout(db, home, run.model, run.kind)
    run.status = wait_until(
        lambda: (s := status_of(db, run.rollout)) != Status.RUNNING.value and s,
        f"rollout {run.rollout} of {run.model} to stop",
        check,
    )
    run.v2_birth, _ = births.wait(canary, run.model, after=run.created, timeout=STEP_TIMEOUT_S)
    if run.kind == "abort":
        run.back, _ = births.wait(canary, OLD, after=run.v2_birth, timeout=STEP_TIMEOUT_S)
    else:
        # the baseline: the same device, in the state an abort finds it in (v2 active, fallen
        # to last-good), rolled back as `greenfleet rollback` does it. The pause was decided
        # just after a tick of the controller; an operator's command lands anywhere in its
        # reconcile cycle, so it waits a random part of one first.
        time.sleep(phase.uniform(0, reconcile_s))
        registry.set_desired(db, [canary], OLD, rollback=True)
        run.plain_sent = time.time()
        run.plain_back, _ = births.wait(canary, OLD, after=run.plain_sent, timeout=STEP_TIMEOUT_S)
        abort_rollout(db, run.rollout)  # the canary already runs v1: nothing to send
    wait_until(
        lambda: status_of(db, run.rollout) == Status.ABORTED.value,
        f"rollout {run.rollout} to be aborted",
        check,
    )


# -- what happened, from the database ---------------------------------------------------------


def rows(db: sqlite_utils.Database, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


class Replay:
    """The controller's gate evaluation, replayed on a copy of the database cut at a given
    ``received_at``: which telemetry row was the first to make a gate breach."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        memory = sqlite3.connect(":memory:")
        db.conn.backup(memory)
        memory.execute("CREATE TABLE all_telemetry AS SELECT * FROM telemetry")
        self.db = sqlite_utils.Database(memory)

    def first_breach(
        self, state: RolloutState, canary: str, updated: datetime, until: float
    ) -> tuple[str, list[str]] | None:
        """(received_at of the first row that makes a gate breach, the gates breached) for the
        state as it was before the decision: the canary UPDATED since ``updated``, the others
        PENDING (the control group), gates judged from ``metrics_since``."""
        members = tuple(
            replace(m, status=MemberStatus.UPDATED, since=updated)
            if m.device == canary
            else replace(m, status=MemberStatus.PENDING)
            for m in state.members
        )
        judged = replace(state, status=Status.RUNNING, members=members)
        wave = [m for m in members if m.device == canary]
        control = [m for m in members if m.device != canary]
        facts = {m.device: DeviceFacts(m.device, True, None) for m in members}
        since = registry.iso(judged.metrics_since or updated)
        stamps = [
            r[0]
            for r in self.db.execute(
                "SELECT DISTINCT received_at FROM all_telemetry WHERE received_at >= ? "
                "ORDER BY received_at",
                [since],
            ).fetchall()
            if epoch(r[0]) <= until
        ]
        for stamp in stamps:
            self.db.execute("DELETE FROM telemetry")
            self.db.execute(
                "INSERT INTO telemetry SELECT * FROM all_telemetry WHERE received_at <= ?", [stamp]
            )
            metrics = rollout_metrics(self.db, judged)
            gates = rollout.evaluate_gates(judged.spec.gates, wave, control, metrics, facts)
            breached = [g.name for g in gates if g.judged and g.breached]
            if breached:
                return stamp, breached
        return None


def analyse(
    db: sqlite_utils.Database, replay: Replay, run: Run, canary: str, ticks: dict[str, float]
) -> dict[str, Any]:
    """The chain of one rollout, every time in seconds since the fall of the canary."""
    state = rollout_store.load(db, run.rollout)
    events = rows(
        db,
        "SELECT ts, event, device, message FROM events WHERE rollout = ? ORDER BY ts, rowid",
        [run.rollout],
    )
    decided = next(e for e in events if e["event"] in ("rollout_paused", "rollout_aborting"))
    updated = next(e for e in events if e["event"] == "member_updated")
    status_at = ticks[decided["ts"]]
    agent_events = rows(
        db,
        "SELECT ts, event, detail FROM events WHERE device = ? AND session != 'controller' "
        "AND event IN ('activated', 'tier_changed') ORDER BY ts, rowid",
        [canary],
    )
    activated = next(
        e["ts"]
        for e in agent_events
        if e["event"] == "activated" and json.loads(e["detail"]).get("model") == run.model
    )
    fall = next(
        e["ts"]
        for e in agent_events
        if e["event"] == "tier_changed"
        and e["ts"] >= activated
        and json.loads(e["detail"]).get("to") == p.Tier.LAST_GOOD.value
    )
    sent = rows(
        db,
        "SELECT model, sent_at FROM deployments WHERE device = ? AND slot = 'active' "
        "AND sent_at >= ? ORDER BY sent_at",
        [canary, registry.iso(state.created)],
    )
    deploy_v2 = next(d["sent_at"] for d in sent if d["model"] == run.model)
    rollback = next((d["sent_at"] for d in sent if d["model"] == OLD), None)
    since = datetime.fromisoformat(updated["ts"])
    breach = replay.first_breach(state, canary, since, status_at)
    if breach is None:
        raise RuntimeError(f"rollout {run.rollout}: no telemetry row breaches a gate on replay")
    breach_at, breached = breach
    windows = rows(
        db,
        "SELECT start, window_s, tier, model, inferences, errors, received_at FROM telemetry "
        "WHERE device = ? AND received_at >= ? AND received_at <= ? ORDER BY start",
        [canary, activated, registry.iso(datetime.fromtimestamp(status_at, since.tzinfo))],
    )
    base = epoch(fall)
    # the window the fall opened (the agent cuts one at every tier change): counted by the
    # gates only when it started after the controller saw the canary run v2 (member since)
    fall_window = next((w for w in windows if abs(epoch(w["start"]) - base) < 0.05), None)
    delivery = [
        epoch(w["received_at"]) - epoch(w["start"]) - w["window_s"]
        for w in rows(
            db,
            "SELECT start, window_s, received_at FROM telemetry WHERE device = ? "
            "AND received_at >= ? AND received_at <= ?",
            [canary, registry.iso(state.created), decided["ts"]],
        )
    ]

    def rel(stamp: str | float | None) -> float | None:
        if stamp is None:
            return None
        return round((epoch(stamp) if isinstance(stamp, str) else stamp) - base, 4)

    # the row that tipped it (normally the canary's; a control group row can complete a
    # relative gate's sample)
    batch = rows(
        db,
        "SELECT device, start, window_s, tier, model, inferences, errors FROM telemetry "
        "WHERE received_at = ? ORDER BY device = ? DESC",
        [breach_at, canary],
    )
    breach_row = batch[0]
    gates = [g["name"] for g in rollout_store.gates(db, run.rollout)["results"] if g["breached"]]
    return {
        "rollout": run.rollout,
        "kind": run.kind,
        "status": run.status,
        "gates_breached": gates,
        "gates_breached_on_replay": breached,
        "t_created": rel(run.created),
        "t_deploy_sent": rel(deploy_v2),
        "t_activated": rel(activated),
        "t_v2_birth": rel(run.v2_birth),
        "t_member_updated": rel(updated["ts"]),
        "t_fall": 0.0,
        "fall_window_counted": (
            fall_window is not None and epoch(fall_window["start"]) >= since.timestamp()
        ),
        "t_breach_row_start": rel(breach_row["start"]),
        "t_breach_row_end": rel(epoch(breach_row["start"]) + breach_row["window_s"]),
        "t_breach_row_in_db": rel(breach_at),
        "breach_row": {
            k: breach_row[k] for k in ("device", "tier", "model", "inferences", "errors")
        },
        "t_decision_tick": rel(decided["ts"]),
        "t_status": rel(status_at),
        "t_rollback_sent": rel(rollback),
        "t_back": rel(run.back),
        "delivery_s": [round(x, 4) for x in delivery],
        "breach_to_status_s": round(status_at - epoch(breach_at), 4),
        "fall_to_status_s": round(status_at - base, 4),
        "status_to_back_s": None if run.back is None else round(run.back - status_at, 4),
        "breach_to_back_s": None if run.back is None else round(run.back - epoch(breach_at), 4),
        "fall_to_back_s": None if run.back is None else round(run.back - base, 4),
        "plain_rollback_s": (
            None
            if run.plain_back is None or run.plain_sent is None
            else round(run.plain_back - run.plain_sent, 4)
        ),
    }


# -- the benchmark ----------------------------------------------------------------------------


def start_fleet(
    workdir: Path, port: int, db: sqlite_utils.Database, agents: ExitStack, telemetry_s: float
) -> Callable[[], None]:
    """The demo fleet's agents, online and running v1; returns a check that raises (with the
    log's tail) if one of them died."""
    procs = []
    for seed, device in enumerate(DEVICES, start=1):
        log_path = workdir / f"{device.id}.log"
        config = write_agent_config(
            workdir, device, port, seed, None, rate_hz=RATE_HZ, telemetry_s=telemetry_s
        )
        procs.append((agents.enter_context(agent_process(config, log_path)), log_path))

    def check() -> None:
        for process, log_path in procs:
            check_alive(process, log_path)

    ids = {d.id for d in DEVICES}
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while not ids <= {r["id"] for r in registry.devices(db) if r["online"]}:
        check()
        if time.monotonic() > deadline:
            raise TimeoutError("the demo fleet did not come online")
        time.sleep(0.05)
    registry.set_desired(db, sorted(ids), OLD)
    wait_until(
        lambda: all(r["active_model"] == OLD for r in registry.devices(db) if r["id"] in ids),
        f"{OLD} active on the demo fleet",
        check,
    )
    return check


def events_in(db: sqlite_utils.Database, canary: str, runs: list[Run]) -> bool:
    """Whether the canary's events of every run have come through its outbox: the last
    activation of v2, and one return to the active tier per run (each rollback)."""
    count = "SELECT COUNT(*) FROM events WHERE device = ? AND event = ? AND detail LIKE ?"
    back = db.execute(count, [canary, "tier_changed", '%"to": "active"%']).fetchone()[0]
    last = db.execute(count, [canary, "activated", f'%"{runs[-1].model}"%']).fetchone()[0]
    return bool(back >= len(runs) and last)


def measure(
    workdir: Path, repeats: int, canary: str, setting: Setting
) -> tuple[list[dict[str, Any]], int, list[float]]:
    """Every run's chain, how many deploys of a v2 went to a device other than the canary, and
    the delivery time of every telemetry record (cut -> in the database)."""
    runs: list[Run] = []
    with mosquitto(workdir) as broker:
        home = Home(workdir / "home")
        controller = Controller(
            home,
            "127.0.0.1",
            broker.port,
            reconcile_interval_s=setting.reconcile_s,
            client_id="bench-rollout-controller",
        )
        controller.start()
        try:
            db = open_db(home.database)
            catalog = Catalog(db, home.store)
            catalog.add(SAMPLE, "vibration-ae", "1.0.0")
            with (
                timed_ticks(controller) as ticks,
                BirthWatcher(broker.port, "bench-rollout-births") as births,
                ExitStack() as agents,
            ):
                check = start_fleet(workdir, broker.port, db, agents, setting.telemetry_s)
                phase = random.Random(6)
                for _ in range(repeats):
                    for kind in ("abort", "pause"):
                        item = Run(kind, f"vibration-ae:2.0.{len(runs) + 1}")
                        one_rollout(
                            db,
                            home,
                            catalog,
                            births,
                            canary,
                            item,
                            workdir,
                            check,
                            phase,
                            setting.reconcile_s,
                        )
                        runs.append(item)
                wait_until(lambda: events_in(db, canary, runs), "the canary's events", check)
                elsewhere = db.execute(
                    "SELECT COUNT(*) FROM deployments WHERE model LIKE 'vibration-ae:2.%' "
                    "AND device != ?",
                    [canary],
                ).fetchone()[0]
                # every telemetry record's delivery: cut by the agent -> in the database
                delivery = [
                    epoch(received) - epoch(start) - window_s
                    for start, window_s, received in db.execute(
                        "SELECT start, window_s, received_at FROM telemetry"
                    ).fetchall()
                ]
                replay = Replay(db)
                found = [analyse(db, replay, r, canary, ticks) for r in runs]
                return found, int(elsewhere), delivery
        finally:
            controller.stop()


def spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def summary(
    setting: Setting, repeats: int, found: list[dict[str, Any]], delivery: list[float]
) -> dict[str, Any]:
    """One setting's figures (seconds) over its runs."""
    aborts = [f for f in found if f["kind"] == "abort"]
    pauses = [f for f in found if f["kind"] == "pause"]
    back = median([f["status_to_back_s"] for f in aborts])
    plain = median([f["plain_rollback_s"] for f in pauses])
    fall = median([f["fall_to_status_s"] for f in found])
    floor = setting.reconcile_s + setting.telemetry_s
    return {
        "reconcile_interval_s": setting.reconcile_s,
        "telemetry_interval_s": setting.telemetry_s,
        "repeats": repeats,
        "breach_to_status_s": spread([f["breach_to_status_s"] for f in found]),
        "breach_to_paused_s": spread([f["breach_to_status_s"] for f in pauses]),
        "breach_to_aborting_s": spread([f["breach_to_status_s"] for f in aborts]),
        "fall_to_status_s": spread([f["fall_to_status_s"] for f in found]),
        "detection_floor_s": floor,
        "detection_ratio": round(fall / floor, 4),
        "breach_to_back_s": spread([f["breach_to_back_s"] for f in aborts]),
        "fall_to_back_s": spread([f["fall_to_back_s"] for f in aborts]),
        "status_to_back_s": spread([f["status_to_back_s"] for f in aborts]),
        "plain_rollback_s": spread([f["plain_rollback_s"] for f in pauses]),
        "rollback_ratio": round(back / plain, 4),
        "fall_window_counted": sum(f["fall_window_counted"] for f in found),
        "telemetry_records": len(delivery),
        "telemetry_delivery_s": {
            **spread(delivery),
            "p95": round(percentile(delivery, 95), 4),
        },
        "runs": found,
    }


def healthy(found: list[dict[str, Any]], elsewhere: int) -> bool:
    """Every rollout stopped in its canary on the expected gates; no v2 outside the canary."""
    return (
        elsewhere == 0
        and all(
            f["status"] in (("aborting", "aborted") if f["kind"] == "abort" else ("paused",))
            for f in found
        )
        and all(f["gates_breached"] and set(f["gates_breached"]) <= EXPECTED_GATES for f in found)
    )


def run(quick: bool) -> Outcome:
    canary = min(d.id for d in DEVICES)  # rollouts order members by device id
    plan = [(SHORT, 3)] if quick else [(SHORT, 10), (DEMO, 1)]
    summaries: dict[str, dict[str, Any]] = {}
    ok = True
    for setting, repeats in plan:
        with tempfile.TemporaryDirectory(prefix="gf-bench-rollout-") as tmp:
            found, elsewhere, delivery = measure(Path(tmp), repeats, canary, setting)
        ok &= healthy(found, elsewhere)
        summaries[setting.name] = {
            **summary(setting, repeats, found, delivery),
            "v2_deploys_outside_canary": elsewhere,
        }
    short = summaries[SHORT.name]
    row = short["breach_to_status_s"]["p50"]
    fall = short["fall_to_status_s"]["p50"]
    back = short["breach_to_back_s"]["p50"]
    leg = short["status_to_back_s"]["p50"]
    plain = short["plain_rollback_s"]["p50"]
    measured = (
        f"breach row -> paused/aborting p50 {row * 1000:.0f} ms (fall -> {fall:.2f} s); "
        f"-> canary on v1 p50 {back:.2f} s (abort -> birth {leg * 1000:.0f} ms, "
        f"{short['rollback_ratio']:.2f}x plain)"
    )
    if DEMO.name in summaries:
        measured += (
            f"; demo intervals: breach row -> stopped "
            f"{summaries[DEMO.name]['breach_to_status_s']['p50']:.2f} s"
        )
    return outcome(
        NAME,
        TITLE,
        measured=measured,
        baseline=(
            f"reconcile + telemetry {short['detection_floor_s']:.1f} s; plain rollback -> birth "
            f"p50 {plain * 1000:.0f} ms"
        ),
        ratio=short["detection_ratio"],
        target=TARGET,
        passed=ok,
        numbers={
            "devices": [d.id for d in DEVICES],
            "canary": canary,
            "rate_hz": RATE_HZ,
            "min_inferences": MIN_INFERENCES,
            **summaries,
        },
    )
