"""The reconcile decision: which devices need a Deploy now. A pure function, tested without I/O.

The database holds each device's desired model; an agent reports what it runs in its birth.
Where they differ and the device is online, the controller sends Deploy, then waits: it re-sends
after ``resend_after`` if nothing changed (the agent resumes a transfer from where it was), and
after a failure reply it waits ``retry_failed_after`` so a broken model does not loop.
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


@dataclass(frozen=True, slots=True)
class LastDeploy:
    """The newest Deploy sent to a device."""

    model: str
    sent_at: datetime
    status: str  # "sent", "ok" or "failed"


@dataclass(frozen=True, slots=True)
class DeployDecision:
    device: str
    model: str


@dataclass(frozen=True, slots=True)
class Skip:
    device: str
    reason: str


def plan_deploys(
    devices: list[DeviceView],
    model_formats: Mapping[str, str],
    last_deploys: Mapping[str, LastDeploy],
    now: datetime,
    resend_after: timedelta = timedelta(seconds=30),
    retry_failed_after: timedelta = timedelta(minutes=5),
) -> tuple[list[DeployDecision], list[Skip]]:
    """Decide which devices get a Deploy now, and say why the others with a gap do not."""
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
        last = last_deploys.get(device.id)
        if last is not None and last.model == desired:
            wait = retry_failed_after if last.status == "failed" else resend_after
            if now - last.sent_at < wait:
                skips.append(Skip(device.id, f"deploy of {desired} {last.status}; waiting"))
                continue
        deploys.append(DeployDecision(device.id, desired))
    return deploys, skips
