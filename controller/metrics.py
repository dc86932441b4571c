"""Prometheus metrics of the fleet, read from the controller database at scrape time.

:class:`FleetCollector` is a custom collector: nothing is counted in memory, every scrape
reads the registry, the newest telemetry window of each device, totals over all telemetry and
the rollouts. A controller restart therefore loses nothing, and any process that can read the
database (``greenfleet api run`` or the daemon with ``--api``) exposes the same numbers.

Families (labels; cardinality is bounded by devices x models they ran, never per window):

``greenfleet_device_up{device,site,line,device_class}`` gauge
    1 while the device is online (its birth seen, no death since), else 0.
``greenfleet_device_last_seen_timestamp_seconds{device}`` gauge
    Unix time the controller last heard from the device.
``greenfleet_device_tier{device,tier}`` gauge
    1 for the fallback tier the device answers from now, 0 for the other tiers.
``greenfleet_inference_latency_seconds{device}`` summary
    Agents report latency percentiles per telemetry window, not observations, so this is a
    summary assembled from them: the quantiles 0.5, 0.95 and 0.99 are those of the device's
    newest window (NaN when it had no inferences); ``_count`` is every inference the device
    reported; ``_sum`` approximates the total latency as the sum over windows of the window's
    p50 times its inferences (the median stands in for the mean, which agents do not send).
    ``rate(_sum) / rate(_count)`` is therefore an inference-weighted median latency.
``greenfleet_inferences_total{device,model,tier}`` counter
``greenfleet_inference_errors_total{device}`` counter
``greenfleet_energy_joules_total{device,method}`` counter
    Inference energy: the sum over windows of energy per inference times inferences, split by
    how power was obtained (``estimate`` or a meter: rapl, hwmon, pmic, nvml).
``greenfleet_power_watts{device,method}`` gauge
    Mean power of the device's newest telemetry window.
``greenfleet_rollout_state{rollout,model,state}`` gauge
    1 for the rollout's state (running, paused, aborting, aborted, completed), 0 for the others.
``greenfleet_rollout_devices{rollout,status}`` gauge
    Members of the rollout per member status (pending, updating, updated, failed, ...).

Counters are sums over the telemetry table: they only go down if telemetry rows are deleted,
which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import sqlite_utils
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.protocol import Tier
from controller import registry, rollout_store, views
from controller.rollout import MemberStatus, Status

LATENCY = "greenfleet_inference_latency_seconds"
QUANTILES = (("0.5", "latency_p50_ms"), ("0.95", "latency_p95_ms"), ("0.99", "latency_p99_ms"))


def _seconds(ms: float | None) -> float:
    return math.nan if ms is None else ms / 1000.0


def _timestamp(stamp: str | None) -> float | None:
    if not stamp:
        return None
    try:
        return registry.as_utc(datetime.fromisoformat(stamp)).timestamp()
    except ValueError:
        return None


def _device_families(devices: list[dict[str, Any]]) -> list[Metric]:
    up = GaugeMetricFamily(
        "greenfleet_device_up",
        "1 while the device is online, else 0.",
        labels=["device", "site", "line", "device_class"],
    )
    seen = GaugeMetricFamily(
        "greenfleet_device_last_seen_timestamp_seconds",
        "Unix time the controller last heard from the device.",
        labels=["device"],
    )
    tier = GaugeMetricFamily(
        "greenfleet_device_tier",
        "1 for the fallback tier the device answers from now (active, last_good, fallback, "
        "rules, none), 0 for the others.",
        labels=["device", "tier"],
    )
    rejected = CounterMetricFamily(
        "greenfleet_device_rejected_messages",
        "Messages of the device the controller refused (malformed, out of bounds, or failing "
        "to store on their own).",
        labels=["device"],
    )
    dropped = CounterMetricFamily(
        "greenfleet_device_outbox_dropped_messages",
        "Telemetry and events the agent dropped because it could neither store nor send them "
        "(as the agent reports it).",
        labels=["device"],
    )
    for row in devices:
        rejected.add_metric([row["id"]], float(row.get("rejected_messages") or 0))
        dropped.add_metric([row["id"]], float(row.get("outbox_dropped") or 0))
        labels = json.loads(row["labels"] or "{}")
        up.add_metric(
            [
                row["id"],
                str(labels.get("site", "")),
                str(labels.get("line", "")),
                row["device_class"] or "",
            ],
            1.0 if row["online"] else 0.0,
        )
        when = _timestamp(row["last_seen"])
        if when is not None:
            seen.add_metric([row["id"]], when)
        if row.get("tier"):
            for t in Tier:
                tier.add_metric([row["id"], t.value], 1.0 if row["tier"] == t.value else 0.0)
    return [up, seen, tier, rejected, dropped]


def _telemetry_families(
    db: sqlite_utils.Database, latest: dict[str, dict[str, Any]]
) -> list[Metric]:
    inferences = CounterMetricFamily(
        "greenfleet_inferences",
        "Inferences the device reported, by the model (NAME:VERSION+VARIANT) and fallback "
        "tier that answered.",
        labels=["device", "model", "tier"],
    )
    errors = CounterMetricFamily(
        "greenfleet_inference_errors", "Inferences that failed.", labels=["device"]
    )
    energy = CounterMetricFamily(
        "greenfleet_energy_joules",
        "Inference energy in joules (energy per inference x inferences), by how power was "
        "obtained: estimate or a meter.",
        labels=["device", "method"],
    )
    latency = Metric(
        LATENCY,
        "Inference latency: quantiles of the newest telemetry window; _count all inferences; "
        "_sum approximated as sum over windows of p50 x inferences.",
        "summary",
    )
    power = GaugeMetricFamily(
        "greenfleet_power_watts",
        "Mean power of the device in its newest telemetry window.",
        labels=["device", "method"],
    )
    counts: dict[tuple[str, str, str], float] = {}  # windows of several power methods add up
    per_device: dict[str, list[float]] = {}  # inferences, errors, latency sum (s)
    joules: dict[tuple[str, str], float] = {}
    for device, model, tier, method, n, failed, j, latency_ms in db.execute(
        # running totals kept by a trigger (controller.db, m8): no scan of the telemetry table
        "SELECT device, NULLIF(model, ''), NULLIF(tier, ''), NULLIF(power_method, ''), "
        "inferences, errors, energy_j, p50_x_n FROM telemetry_totals"
    ):
        key3 = (device, model or "", tier or "")
        counts[key3] = counts.get(key3, 0.0) + (n or 0)
        totals = per_device.setdefault(device, [0.0, 0.0, 0.0])
        totals[0] += n or 0
        totals[1] += failed or 0
        totals[2] += (latency_ms or 0.0) / 1000.0
        if j is not None:
            key2 = (device, method or "")
            joules[key2] = joules.get(key2, 0.0) + j
    for labels, value in sorted(counts.items()):
        inferences.add_metric(list(labels), value)
    for (device, method), value in sorted(joules.items()):
        energy.add_metric([device, method], value)
    for device, (n, failed, latency_s) in sorted(per_device.items()):
        errors.add_metric([device], failed)
        newest = latest.get(device, {})
        for quantile, column in QUANTILES:
            latency.add_sample(
                LATENCY, {"device": device, "quantile": quantile}, _seconds(newest.get(column))
            )
        latency.add_sample(f"{LATENCY}_count", {"device": device}, n)
        latency.add_sample(f"{LATENCY}_sum", {"device": device}, latency_s)
    for device, row in sorted(latest.items()):
        if row.get("power_w") is not None:
            power.add_metric([device, row.get("power_method") or ""], float(row["power_w"]))
    return [inferences, errors, latency, energy, power]


def _rollout_families(db: sqlite_utils.Database) -> list[Metric]:
    state = GaugeMetricFamily(
        "greenfleet_rollout_state",
        "1 for the rollout's state, 0 for the other states.",
        labels=["rollout", "model", "state"],
    )
    members = GaugeMetricFamily(
        "greenfleet_rollout_devices",
        "Devices of the rollout per member status.",
        labels=["rollout", "status"],
    )
    for rollout in rollout_store.load_all(db):
        for s in Status:
            state.add_metric(
                [rollout.id, rollout.spec.model, s.value], 1.0 if rollout.status is s else 0.0
            )
        for m in MemberStatus:
            count = sum(member.status is m for member in rollout.members)
            members.add_metric([rollout.id, m.value], float(count))
    return [state, members]


def fleet_metrics(db: sqlite_utils.Database) -> list[Metric]:
    """Every greenfleet metric family, as of now."""
    rows = registry.devices(db, revoked=True)
    revoked = {r["id"] for r in rows if r.get("revoked")}
    latest = {k: v for k, v in views.latest_telemetry(db).items() if k not in revoked}
    return [
        *_device_families(rows),  # a revoked device: up 0, no live figures
        *_telemetry_families(db, latest),
        *_rollout_families(db),
    ]


class FleetCollector(Collector):
    """Reads the controller database at each scrape (``connect`` opens a connection for the
    scraping thread and closes it after)."""

    def __init__(
        self, connect: Callable[[], AbstractContextManager[sqlite_utils.Database]]
    ) -> None:
        self._connect = connect

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not read the database

    def collect(self) -> Iterable[Metric]:
        with self._connect() as db:
            return fleet_metrics(db)
