"""The daemon's rollout job: the I/O around :func:`controller.rollout.advance`.

At every tick, for each rollout that needs it (running, paused, aborting, or aborted with
rollbacks unconfirmed: rollout.needs_advance): read what the rollout needs about
its devices (:func:`device_facts`) and their telemetry over the current soak period
(:func:`soak_metrics`), decide, and commit the decision (controller.rollout_store). All of a
rollout's state is in SQLite, so a restarted controller carries on from the last committed
decision: desired models already set are not set again (reconcile does not re-send a Deploy
within ``resend_after`` of the last one, which the deployments table remembers), and a wave
whose decision was not committed is decided again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import sqlite_utils

from controller import registry, rollout, rollout_store
from controller.config import ControllerConfig
from controller.rollout import DeviceFacts, MemberStatus, Metrics, RolloutSpec, RolloutState
from controller.windows import inside

log = logging.getLogger(__name__)

# Members whose devices run (or were sent) the rollout's model: judged on its telemetry.
TOUCHED = frozenset(
    {
        MemberStatus.UPDATING,
        MemberStatus.UPDATED,
        MemberStatus.FAILED,
        MemberStatus.MISSED,
        MemberStatus.ROLLING_BACK,
    }
)
# Members that do not hold their device for the rollout (another rollout may take it).
RELEASED = frozenset({MemberStatus.SKIPPED, MemberStatus.CANCELLED, MemberStatus.ROLLED_BACK})


def model_name(model: str) -> str:
    return model.partition(":")[0]


# ------------------------------------------------------------------------------ device facts


def device_facts(
    db: sqlite_utils.Database,
    rollout_id: str,
    spec: RolloutSpec,
    created: datetime,
    now: datetime,
    config: ControllerConfig | None = None,
    members: Iterable[str] = (),
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, DeviceFacts]:
    """Facts about every device matching the rollout's selector now, and its members (a
    member relabelled out of the selector still has to be followed, e.g. rolled back).

    ``other_rollout`` names an older live rollout of the same model name that holds the device
    (one rollout per model per device: the older one keeps it). ``deploy_failed`` is the model
    of the device's newest active deploy when that one failed; ``in_window`` whether its site's
    maintenance window is open (``config``; None: always).
    """
    rows = registry.devices(db) if rows is None else rows
    wanted = set(members)
    chosen = [r for r in rows if r["id"] in wanted or registry.matches(r, spec.selector)]
    if not chosen:
        return {}
    holders = _older_holders(db, rollout_id, spec, created)
    last = registry.last_deploys(db, "active")
    facts = {}
    for row in chosen:
        deploy = last.get(row["id"])
        failed = deploy if deploy is not None and deploy.status == "failed" else None
        site = json.loads(row["labels"] or "{}").get("site")
        facts[row["id"]] = DeviceFacts(
            id=row["id"],
            online=bool(row["online"]),
            active_model=row["active_model"],
            pinned=bool(row.get("pinned")),
            other_rollout=holders.get(row["id"]),
            deploy_failed=failed.model if failed else None,
            # when the failed deploy was sent (the controller's clock, like Member.since):
            # the failure of a deploy sent before the member was asked is not the rollout's
            deploy_failed_at=failed.sent_at if failed else None,
            tier=row.get("tier"),
            in_window=True if config is None else inside(config.windows(site), now),
        )
    return facts


def _older_holders(
    db: sqlite_utils.Database, rollout_id: str, spec: RolloutSpec, created: datetime
) -> dict[str, str]:
    """Device -> id of the oldest other live rollout of the same model name holding it."""
    live = [s.value for s in rollout_store.LIVE]
    rows = db.execute(
        "SELECT r.id, r.model, r.created, m.device, m.status FROM rollouts r "
        "JOIN rollout_members m ON m.rollout = r.id "
        f"WHERE r.id != ? AND (r.status IN ({','.join('?' * len(live))}) "
        "OR (r.status = 'aborted' AND m.status = 'rolling_back')) "  # rollback not confirmed
        "ORDER BY r.created, r.id",
        [rollout_id, *live],
    ).fetchall()
    holders: dict[str, str] = {}
    for other, model, other_created, device, status in rows:
        if model_name(model) != model_name(spec.model) or status in RELEASED:
            continue
        if (datetime.fromisoformat(other_created), other) < (created, rollout_id):
            holders.setdefault(device, other)
    return holders


# ---------------------------------------------------------------------------------- metrics


# a row of the rollout's model: the model itself or, for a planned name:version, a variant
_IS_MODEL = (
    "(t.model = :model OR (:planned AND substr(t.model, 1, length(:model) + 1) = :model || '+'))"
)
_JUDGED = f"(NOT a.on_model OR ({_IS_MODEL} AND t.tier = 'active'))"  # latency and energy
_METRICS_SQL = f"""
WITH asked(device, since, on_model) AS (VALUES {{values}})
SELECT t.device,
       COALESCE(SUM(t.inferences), 0),
       COALESCE(SUM(t.errors), 0),
       SUM(CASE WHEN {_JUDGED} AND t.latency_p95_ms IS NOT NULL
                THEN t.latency_p95_ms * t.inferences END)
         / NULLIF(SUM(CASE WHEN {_JUDGED} AND t.latency_p95_ms IS NOT NULL
                           THEN t.inferences END), 0),
       SUM(CASE WHEN {_JUDGED} AND t.energy_per_inference_j IS NOT NULL
                THEN t.energy_per_inference_j * t.inferences END)
         / NULLIF(SUM(CASE WHEN {_JUDGED} AND t.energy_per_inference_j IS NOT NULL
                           THEN t.inferences END), 0),
       COALESCE(SUM(CASE WHEN t.tier != 'active' THEN t.inferences ELSE 0 END), 0),
       COALESCE(SUM(CASE WHEN {_JUDGED} THEN t.inferences ELSE 0 END), 0)
FROM asked a
JOIN telemetry t ON t.device = a.device AND julianday(t.start) >= julianday(a.since)
WHERE NOT a.on_model OR {_IS_MODEL} OR t.tier != 'active'
GROUP BY t.device
"""
_BATCH = 500  # devices per query: three parameters each, well below SQLite's limit


def soak_metrics(
    db: sqlite_utils.Database,
    model: str,
    wave: Mapping[str, datetime],
    control: Mapping[str, datetime],
) -> dict[str, Metrics]:
    """Each device's telemetry in the windows that started at or after its own time.

    ``wave`` devices are judged on the rollout's ``model``: its windows, plus the windows a
    fallback tier answered instead (the agent names the fallback tier's own model in those,
    and they are what a failing new model costs). Their latency and energy come from the
    model's windows on the active tier only. ``control`` devices count every window.
    Latency and energy are inference-weighted means of the per-window figures.
    """
    asked = [(d, since, True) for d, since in wave.items()]
    asked += [(d, since, False) for d, since in control.items()]
    out: dict[str, Metrics] = {}
    for first in range(0, len(asked), _BATCH):
        batch = asked[first : first + _BATCH]
        params: dict[str, Any] = {"model": model, "planned": int("+" not in model)}
        for i, (device, since, on_model) in enumerate(batch):
            params.update({f"d{i}": device, f"s{i}": since.isoformat(), f"m{i}": int(on_model)})
        values = ",".join(f"(:d{i}, :s{i}, :m{i})" for i in range(len(batch)))
        rows = db.execute(_METRICS_SQL.format(values=values), params).fetchall()
        for device, inferences, errors, p95, energy, fallback, judged in rows:
            out[device] = Metrics(
                inferences=int(inferences),
                errors=int(errors),
                latency_p95_ms=p95,
                energy_per_inference_j=energy,
                fallback_inferences=int(fallback),
                judged_inferences=int(judged),
            )
    return out


def rollout_metrics(db: sqlite_utils.Database, state: RolloutState) -> dict[str, Metrics]:
    """The metrics :func:`rollout.advance` judges, from ``metrics_since`` (the current wave's
    start, or the last resume): the pending members (the control group), and the members that
    were sent the model, each from when it entered its status (for an updated one: when it
    was seen running the model, so the window in which it switched models, warm-up included,
    is not taken for the new model's)."""
    since = state.metrics_since or state.wave_started
    if since is None:
        return {}
    wave = {m.device: max(since, m.since or since) for m in state.members if m.status in TOUCHED}
    control = {m.device: since for m in state.members if m.status is MemberStatus.PENDING}
    return soak_metrics(db, state.spec.model, wave, control)


# ---------------------------------------------------------------------------------- the job


class RolloutsJob:
    """Advances every rollout that needs it (rollout.needs_advance) once per :meth:`tick`."""

    def __init__(
        self, db: sqlite_utils.Database, config: Callable[[], ControllerConfig] | None = None
    ) -> None:
        self.db = db
        self._config = config
        self._failing: dict[str, str] = {}  # rollout -> the error logged, logged once

    def tick(self, now: datetime) -> bool:
        """Advance each live rollout; True when desired models changed (reconcile has work)."""
        changed = False
        config = self._config() if self._config else None
        # revisions first: a rollout written after this read is skipped, never overwritten
        seen = rollout_store.revisions(self.db)
        for state in rollout_store.load_all(self.db, advancing=True):
            try:
                changed |= self._advance(state, seen.get(state.id), now, config)
            except Exception as exc:  # one broken rollout must not stop the others
                if self._failing.get(state.id) != repr(exc):
                    self._failing[state.id] = repr(exc)
                    log.exception("rollout %s: cannot advance", state.id)
            else:
                self._failing.pop(state.id, None)
        return changed

    def _advance(
        self,
        state: RolloutState,
        seen: str | None,
        now: datetime,
        config: ControllerConfig | None,
    ) -> bool:
        """Decide from ``state`` (read at revision ``seen``) and commit, unless it changed."""
        db = self.db
        facts = device_facts(
            db,
            state.id,
            state.spec,
            state.created,
            now,
            config,
            members=[m.device for m in state.members],
        )
        step = rollout.advance(state, facts, rollout_metrics(db, state), now)
        with rollout_store.write_transaction(db):
            if rollout_store.revision(db, state.id) != seen:
                return False  # an operator changed it meanwhile: decide again next tick
            changed = rollout_store.commit_step(db, step, now, previous=state)
        for event in step.events:
            log.info("rollout %s: %s", state.id, event.message)
        return changed
