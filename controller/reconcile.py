"""The reconcile decision: which devices need a Deploy now. A pure function, tested without I/O.

The database holds each device's desired model; an agent reports what it runs in its birth.
Where they differ and the device is online, the controller sends Deploy, then waits: it re-sends
after ``resend_after`` if nothing changed (the agent resumes a transfer from where it was), and
after a failure reply it waits before trying again (:func:`retry_wait`): a passing cause (a full
disk, a stalled transfer) is tried again after 30 s, doubling with every failure in a row up to
``retry_failed_after``; any other cause (a bad signature, a model that does not load) waits
``retry_failed_after`` at once, so a broken model does not loop. ``greenfleet deploy ...
--retry`` lets an operator try again now (status ``retry``).

Once a device runs its desired model, the controller also stages a smaller variant on it as the
agent's fallback tier (:func:`plan_fallback_deploys`): a Deploy with ``slot=fallback``, under the
same resend and retry rules, tracked separately from the active deploys.

A device outside its site's maintenance window (controller.windows) may fetch but not switch:
it gets the desired model with ``slot=preload`` (kept on disk, not activated), again under the
same rules and tracked per slot, and the active deploy once the window opens, which the agent
then serves from its local copy without a second transfer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What reconcile needs to know about one device."""

    id: str
    online: bool
    active_model: str | None
    desired_model: str | None
    runtimes: frozenset[str]
    fallback_model: str | None = None  # what the agent reports staged as its fallback tier
    desired_fallback: str | None = None  # what the controller chose for it (None: nothing)
    may_activate: bool = True  # inside its site's maintenance window (or the site has none)
    preloaded_model: str | None = None  # what the agent reports fetched, waiting for a window
    window_opens: str | None = None  # when the next window opens, for people


@dataclass(frozen=True, slots=True)
class LastDeploy:
    """The newest Deploy sent to a device."""

    model: str
    sent_at: datetime
    status: str  # "sent", "ok", "failed", or "retry" (an operator asked to try again now)
    error: str | None = None  # the agent's reply, for a failure
    failures: int = 1  # failed deploys of this model in a row, this one included


TRANSIENT = ("disk", "space", "stalled", "timed out", "timeout", "cannot store the download")
FIRST_RETRY = timedelta(seconds=30)


def retry_wait(last: LastDeploy, retry_failed_after: timedelta) -> timedelta:
    """How long after a failed deploy the controller tries again: a passing cause sooner, with
    backoff; anything else after ``retry_failed_after``."""
    error = (last.error or "").lower()
    if any(word in error for word in TRANSIENT):
        backoff: timedelta = FIRST_RETRY * 2 ** min(max(last.failures - 1, 0), 16)
        return min(backoff, retry_failed_after)
    return retry_failed_after


def next_try(last: LastDeploy | None, retry_failed_after: timedelta) -> datetime | None:
    """When a failed deploy is tried again (None: it did not fail)."""
    if last is None or last.status != "failed":
        return None
    return last.sent_at + retry_wait(last, retry_failed_after)


@dataclass(frozen=True, slots=True)
class DeployDecision:
    device: str
    model: str
    slot: str = "active"  # agent.protocol.Slot: "active", "fallback" or "preload"


@dataclass(frozen=True, slots=True)
class Skip:
    device: str
    reason: str


def _too_soon(
    last: LastDeploy | None,
    model: str,
    now: datetime,
    resend_after: timedelta,
    retry_failed_after: timedelta,
) -> bool:
    """The newest deploy of this slot sent ``model`` recently: wait (longer after a failure)."""
    if last is None or last.model != model or last.status == "retry":
        return False
    wait = retry_wait(last, retry_failed_after) if last.status == "failed" else resend_after
    return now - last.sent_at < wait


def plan_deploys(
    devices: list[DeviceView],
    model_formats: Mapping[str, str],
    last_deploys: Mapping[str, LastDeploy],
    now: datetime,
    resend_after: timedelta = timedelta(seconds=30),
    retry_failed_after: timedelta = timedelta(minutes=5),
    last_preloads: Mapping[str, LastDeploy] | None = None,
) -> tuple[list[DeployDecision], list[Skip]]:
    """Decide which devices get a Deploy now, and say why the others with a gap do not.

    A device outside its maintenance window (``may_activate`` false) gets a preload instead,
    unless it already reports the desired model preloaded; ``last_preloads`` are the newest
    preload deploys per device, under the same resend and retry rules as ``last_deploys``.
    """
    deploys: list[DeployDecision] = []
    skips: list[Skip] = []
    for device in devices:
        desired = device.desired_model
        if desired is None or desired == device.active_model:
            continue
        if not device.online:
            skips.append(Skip(device.id, "offline; will deploy when it reconnects"))
            continue
        fmt = model_formats.get(desired)
        if fmt is None:
            skips.append(Skip(device.id, f"desired model {desired} is not in the catalog"))
            continue
        if fmt not in device.runtimes:
            skips.append(Skip(device.id, f"device has no {fmt} runtime for {desired}"))
            continue
        slot, what, last = "active", "deploy", last_deploys.get(device.id)
        if not device.may_activate:
            if device.preloaded_model == desired:
                opens = device.window_opens or "its next opening"
                skips.append(
                    Skip(
                        device.id,
                        f"{desired} preloaded; waiting for the maintenance window at {opens}",
                    )
                )
                continue
            slot, what, last = "preload", "preload", (last_preloads or {}).get(device.id)
        if _too_soon(last, desired, now, resend_after, retry_failed_after):
            assert last is not None
            skips.append(Skip(device.id, f"{what} of {desired} {last.status}; waiting"))
            continue
        deploys.append(DeployDecision(device.id, desired, slot))
    return deploys, skips


def limit_transfers(
    decisions: list[DeployDecision], busy: set[str], limit: int
) -> tuple[list[DeployDecision], list[Skip]]:
    """Keep at most ``limit`` devices fetching at once; the rest wait for a later pass.

    ``busy``: devices with a Deploy sent and not yet answered (still fetching). A decision for
    one of them (a resend) does not take a new slot. Decisions keep their order, so the devices
    first in line go first. Why a limit: the broker buffers the chunks fanned out to every
    device that reads slower than they come (controller.config.DEFAULT_MAX_CONCURRENT_TRANSFERS).
    """
    free = limit - len(busy)
    kept: list[DeployDecision] = []
    skips: list[Skip] = []
    for decision in decisions:
        if decision.device in busy:
            kept.append(decision)
        elif free > 0:
            kept.append(decision)
            free -= 1
        else:
            skips.append(
                Skip(
                    decision.device,
                    f"{limit} devices are fetching a model (max_concurrent_transfers); waiting "
                    "for one to finish",
                )
            )
    return kept, skips


def plan_fallback_deploys(
    devices: list[DeviceView],
    model_formats: Mapping[str, str],
    last_active: Mapping[str, LastDeploy],
    last_fallback: Mapping[str, LastDeploy],
    now: datetime,
    resend_after: timedelta = timedelta(seconds=30),
    retry_failed_after: timedelta = timedelta(minutes=5),
) -> tuple[list[DeployDecision], list[Skip]]:
    """Decide which devices get their fallback variant staged now (``slot=fallback``).

    Only a device that already runs its desired model gets one, and not while an active deploy
    may still be in flight: the agent transfers one artifact at a time and a new deploy
    supersedes the one under way, so a fallback sent early would cancel the model that matters.
    An active deploy whose model the birth already reports active is finished (only its reply
    may be on the way), so it does not hold the fallback back. ``last_active`` and
    ``last_fallback`` are the newest deploys of each slot per device.
    """
    deploys: list[DeployDecision] = []
    skips: list[Skip] = []
    for device in devices:
        wanted = device.desired_fallback
        if wanted is None or wanted == device.fallback_model:
            continue
        if not device.online:
            skips.append(Skip(device.id, "offline; will stage the fallback when it reconnects"))
            continue
        if device.desired_model is None or device.active_model != device.desired_model:
            skips.append(
                Skip(device.id, f"fallback {wanted} waits until {device.desired_model} is active")
            )
            continue
        active = last_active.get(device.id)
        if (
            active is not None
            and active.status == "sent"
            and active.model != device.active_model  # reported active: done, the reply is due
            and now - active.sent_at < resend_after
        ):
            skips.append(Skip(device.id, f"active deploy of {active.model} in flight; waiting"))
            continue
        fmt = model_formats.get(wanted)
        if fmt is None:
            skips.append(Skip(device.id, f"fallback model {wanted} is not in the catalog"))
            continue
        if fmt not in device.runtimes:
            skips.append(Skip(device.id, f"device has no {fmt} runtime for fallback {wanted}"))
            continue
        last = last_fallback.get(device.id)
        if _too_soon(last, wanted, now, resend_after, retry_failed_after):
            assert last is not None
            skips.append(Skip(device.id, f"fallback deploy of {wanted} {last.status}; waiting"))
            continue
        deploys.append(DeployDecision(device.id, wanted, "fallback"))
    return deploys, skips
