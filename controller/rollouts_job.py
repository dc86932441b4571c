"""The daemon's rollout job: the I/O around :func:`controller.rollout.advance`.

At every tick, for each running, paused or aborting rollout: read what the rollout needs about
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
from collections.abc import Callable, Iterable
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
RELEASED = frozenset({MemberStatus.SKIPPED, MemberStatus.CANCELLED})


def model_name(model: str) -> str:
    return model.partition(":")[0]


def is_model(found: str | None, wanted: str) -> bool:
    """Whether ``found`` (what a device runs or was sent) is ``wanted``: the same string, or
    for a planned ``name:version``, any of its variants (``name:version+variant``)."""
    if found is None:
        return False
    return found == wanted or ("+" not in wanted and found.startswith(wanted + "+"))


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


_METRICS_SQL = """
SELECT device,
       COALESCE(SUM(inferences), 0),
       COALESCE(SUM(errors), 0),
       SUM(CASE WHEN {judged} AND latency_p95_ms IS NOT NULL
                THEN latency_p95_ms * inferences END)
         / NULLIF(SUM(CASE WHEN {judged} AND latency_p95_ms IS NOT NULL
                           THEN inferences END), 0),
       SUM(CASE WHEN {judged} AND energy_per_inference_j IS NOT NULL
                THEN energy_per_inference_j * inferences END)
         / NULLIF(SUM(CASE WHEN {judged} AND energy_per_inference_j IS NOT NULL
                           THEN inferences END), 0),
       COALESCE(SUM(CASE WHEN tier != 'active' THEN inferences ELSE 0 END), 0)
FROM telemetry
WHERE device IN ({devices}) AND julianday(start) >= julianday(:since) AND ({rows})
GROUP BY device
"""
# a row of the rollout's model: the model itself or, for a planned name:version, a variant
_IS_MODEL = (
    "(model = :model OR (:planned AND substr(model, 1, length(:model) + 1) = :model || '+'))"
)


def soak_metrics(
    db: sqlite_utils.Database,
    since: datetime,
    model: str,
    wave: Iterable[str],
    control: Iterable[str],
) -> dict[str, Metrics]:
    """Each device's telemetry from ``since`` (windows that started then or later).

    ``wave`` devices are judged on the rollout's ``model``: its windows, plus the windows a
    fallback tier answered instead (the agent names the fallback tier's own model in those,
    and they are what a failing new model costs). Their latency and energy come from the
    model's windows on the active tier only. ``control`` devices count every window.
    Latency and energy are inference-weighted means of the per-window figures.
    """
    out: dict[str, Metrics] = {}
    params: dict[str, Any] = {
        "since": since.isoformat(),
        "model": model,
        "planned": int("+" not in model),
    }
    for devices, rows, judged in (
        (list(wave), f"{_IS_MODEL} OR tier != 'active'", f"{_IS_MODEL} AND tier = 'active'"),
        (list(control), "1", "1"),
    ):
        if not devices:
            continue
        marks = {f"d{i}": d for i, d in enumerate(devices)}
        sql = _METRICS_SQL.format(
            judged=judged, rows=rows, devices=",".join(f":{k}" for k in marks)
        )
        for device, inferences, errors, p95, energy, fallback in db.execute(
            sql, {**params, **marks}
        ).fetchall():
            out[device] = Metrics(
                inferences=int(inferences),
                errors=int(errors),
                latency_p95_ms=p95,
                energy_per_inference_j=energy,
                fallback_inferences=int(fallback),
            )
    return out


def rollout_metrics(db: sqlite_utils.Database, state: RolloutState) -> dict[str, Metrics]:
    """The metrics :func:`rollout.advance` judges: since ``metrics_since`` (the current wave's
    start, or the last resume), members that were sent the model against the pending ones."""
    since = state.metrics_since or state.soak_started or state.wave_started
    if since is None:
        return {}
    wave = [m.device for m in state.members if m.status in TOUCHED]
    control = [m.device for m in state.members if m.status is MemberStatus.PENDING]
    return soak_metrics(db, since, state.spec.model, wave, control)


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
        for state in rollout_store.load_all(self.db, advancing=True):
            try:
                changed |= self._advance(state, now, config)
            except Exception as exc:  # one broken rollout must not stop the others
                if self._failing.get(state.id) != repr(exc):
                    self._failing[state.id] = repr(exc)
                    log.exception("rollout %s: cannot advance", state.id)
            else:
                self._failing.pop(state.id, None)
        return changed

    def _advance(self, state: RolloutState, now: datetime, config: ControllerConfig | None) -> bool:
        db = self.db
        seen = rollout_store.revision(db, state.id)
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
