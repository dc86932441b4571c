"""The plan: selection (controller.selection) applied to the fleet as the database sees it.

This module only gathers: device rows and their hardware profiles, the variants of a model
version with their profiles, and telemetry per (device class, variant). The choosing is done by
the pure :func:`controller.selection.select_variant`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from controller.selection import (
    Candidate,
    Decision,
    DeviceNeeds,
    Measured,
    estimate,
    select_variant,
)
from device_configs.schema import DeviceProfile
from model_store.catalog import Catalog, Variant

LATENCY_BUDGET_LABEL = "latency_budget_ms"  # a device label overrides its class's budget


@dataclass(frozen=True)
class PlannedDevice:
    """A device, the model version it should run, and the decision for it."""

    device: str
    device_class: str
    model: str  # the model version (name:version) being planned
    decision: Decision


def candidate(variant: Variant) -> Candidate:
    profile = variant.profile
    return Candidate(
        id=variant.id,
        format=variant.format.value,
        precision=variant.precision or "fp32",
        size_bytes=variant.size,
        peak_memory_mb=profile.peak_memory_mb if profile else None,
        host_latency_ms={k: s.p50_ms for k, s in profile.latency.items()} if profile else {},
        eligible=variant.eligible,
        reason=variant.reason,
        is_reference=variant.variant == "fp32",
    )


def candidates(catalog: Catalog, version_id: str) -> list[Candidate]:
    """Deployable variants of a version (the source file counts only if nothing was built)."""
    variants = catalog.variants(version_id)
    built = [v for v in variants if v.variant]
    return [candidate(v) for v in (built or variants)]


def is_planned(catalog: Catalog, desired: str) -> bool:
    """A desired ``name:version`` is chosen by the plan once the version has built variants;
    ``name:version+variant`` pins a variant, and an uncompressed version deploys as added."""
    if "+" in desired:
        return False
    version = catalog.version_or_none(desired)
    return version is not None and version.compressed is not None


def device_needs(row: Mapping[str, Any], profile: DeviceProfile | None) -> DeviceNeeds | None:
    """What selection needs from a device row and its class profile (None: unknown class)."""
    if profile is None:
        return None
    labels = json.loads(row.get("labels") or "{}")
    try:
        budget = float(labels.get(LATENCY_BUDGET_LABEL, profile.latency_budget_ms))
    except ValueError:
        budget = profile.latency_budget_ms
    reported = set(json.loads(row.get("runtimes") or "[]"))
    allowed = {r.value for r in profile.runtimes}
    return DeviceNeeds(
        id=row["id"],
        device_class=row["device_class"],
        runtimes=frozenset(reported & allowed if reported else allowed),
        precisions=frozenset(p.value for p in profile.precisions),
        model_memory_mb=profile.model_memory_mb,
        storage_mb=profile.storage_mb,
        latency_budget_ms=budget,
        speed=profile.speed.factors(),
        active_w_per_core=profile.power.active_w_per_core,
        current=row.get("active_model"),
    )


def measured(db: sqlite_utils.Database) -> dict[tuple[str, str], Measured]:
    """Telemetry per (device class, variant): inferences, J per inference, typical p95."""
    rows = db.execute(
        "SELECT d.device_class, t.model, SUM(t.inferences), "
        "SUM(t.energy_per_inference_j * t.inferences) / NULLIF(SUM(t.inferences), 0), "
        "SUM(t.latency_p95_ms * t.inferences) / NULLIF(SUM(t.inferences), 0) "
        "FROM telemetry t JOIN devices d ON d.id = t.device "
        "WHERE t.model IS NOT NULL AND t.inferences > 0 GROUP BY d.device_class, t.model"
    ).fetchall()
    return {(cls, model): Measured(n or 0, epi, p95) for cls, model, n, epi, p95 in rows}


def plan(
    db: sqlite_utils.Database,
    catalog: Catalog,
    profiles: Mapping[str, DeviceProfile],
    device_rows: Sequence[Mapping[str, Any]],
    model: str | None = None,
) -> list[PlannedDevice]:
    """Decide a variant for each device: of ``model``, or of the version it should run."""
    telemetry = measured(db)
    cache: dict[str, list[Candidate]] = {}
    planned = []
    for row in device_rows:
        version = model or (row.get("desired_model") or "").partition("+")[0]
        if not version:
            continue
        if version not in cache:
            cache[version] = candidates(catalog, version)
        profile = profiles.get(row["device_class"])
        needs = device_needs(row, profile)
        if needs is None:
            known = ", ".join(sorted(profiles))
            decision = Decision(
                row["id"],
                None,
                None,
                f"unknown device class {row['device_class']!r}; known classes: {known}",
            )
        else:
            by_variant = {
                c.id: telemetry[(needs.device_class, c.id)]
                for c in cache[version]
                if (needs.device_class, c.id) in telemetry
            }
            decision = select_variant(needs, cache[version], by_variant)
        planned.append(PlannedDevice(row["id"], row["device_class"], version, decision))
    return planned


def fleet_saving(planned: Sequence[PlannedDevice]) -> dict[str, float | int | None]:
    """Mean predicted energy per inference of the plan against fp32 everywhere."""
    pairs = [
        (p.decision.estimate.energy_j, p.decision.reference.energy_j)
        for p in planned
        if p.decision.estimate is not None and p.decision.reference is not None
    ]
    if not pairs:
        return {"devices": 0, "plan_j": None, "fp32_j": None, "saving": None}
    plan_j = sum(a for a, _ in pairs) / len(pairs)
    fp32_j = sum(b for _, b in pairs) / len(pairs)
    return {
        "devices": len(pairs),
        "plan_j": plan_j,
        "fp32_j": fp32_j,
        "saving": 1.0 - plan_j / fp32_j if fp32_j > 0 else None,
    }


def baseline_per_class(
    catalog: Catalog,
    profiles: Mapping[str, DeviceProfile],
    telemetry: Mapping[tuple[str, str], Measured],
) -> Callable[[str, str], float | None]:
    """``(device class, model version) -> fp32 J per inference`` for the energy report."""
    cache: dict[tuple[str, str], float | None] = {}

    def lookup(device_class: str, version: str) -> float | None:
        key = (device_class, version)
        if key not in cache:
            cache[key] = None
            fp32 = next((c for c in candidates(catalog, version) if c.is_reference), None)
            profile = profiles.get(device_class)
            if fp32 is not None and profile is not None:
                needs = device_needs(
                    {"id": "-", "device_class": device_class, "labels": "{}", "runtimes": "[]"},
                    profile,
                )
                if needs is not None:
                    guess = estimate(needs, fp32, telemetry.get((device_class, fp32.id)))
                    cache[key] = guess.energy_j if guess else None
        return cache[key]

    return lookup
