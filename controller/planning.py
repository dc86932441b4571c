"""The plan: selection (controller.selection) applied to the fleet as the database sees it.

This module only gathers: device rows and their hardware profiles, the variants of a model
version with their profiles, and telemetry per (device class, variant). The choosing is done by
the pure :func:`controller.selection.select_variant`.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from agent import protocol as p
from controller.pricing import class_prices
from controller.selection import (
    Candidate,
    Decision,
    DeviceNeeds,
    Estimate,
    FallbackDecision,
    FieldCheck,
    Measured,
    field_check,
    select_fallback,
    select_variant,
)
from device_configs.kernels import load_kernel_gains, parse_host
from device_configs.schema import DeviceProfile
from model_store.catalog import Catalog, Variant

LATENCY_BUDGET_LABEL = "latency_budget_ms"  # a device label overrides its class's budget
POWER_BUDGET_LABEL = "power_budget_w"


@dataclass(frozen=True)
class PlannedDevice:
    """A device, the model version it should run, and the decision for it."""

    device: str
    device_class: str
    model: str  # the model version (name:version) being planned
    decision: Decision


def candidate(variant: Variant, fp32_ms: Mapping[str, float] | None = None) -> Candidate:
    """``variant`` as selection sees it; ``fp32_ms``: the p50 of each runtime's fp32 variant
    of the same version on the build host (:func:`fp32_latencies`)."""
    profile = variant.profile
    host_arch, host_features = parse_host(profile.host if profile else "")
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
        macs=profile.macs if profile else None,
        host_arch=host_arch,
        host_features=host_features,
        fp32_host_ms=dict(fp32_ms or {}),
    )


FP32_OF_RUNTIME = {"onnxruntime": ("fp32",), "litert": ("tflite-fp32", "tflite")}


def fp32_latencies(variants: Sequence[Variant]) -> dict[str, float]:
    """runtime -> build-host p50 of the version's fp32 variant in that runtime (the fp32 ONNX
    reference, the TFLite build or the imported TFLite file)."""
    by_name = {v.variant: v for v in variants}
    out: dict[str, float] = {}
    for runtime, names in FP32_OF_RUNTIME.items():
        for name in names:
            found = by_name.get(name)
            stats = found.profile.latency.get(runtime) if found and found.profile else None
            if stats is not None:
                out[runtime] = stats.p50_ms
                break
    return out


def deployable(variants: Sequence[Variant]) -> list[Variant]:
    """The variants the plan chooses among: the built ones (the source file counts only if
    nothing was built)."""
    built = [v for v in variants if v.variant]
    return built or list(variants)


def candidates(catalog: Catalog, version_id: str) -> list[Candidate]:
    """Deployable variants of a version, as selection sees them."""
    variants = catalog.variants(version_id)
    fp32_ms = fp32_latencies(variants)
    return [candidate(v, fp32_ms) for v in deployable(variants)]


def is_planned(catalog: Catalog, desired: str) -> bool:
    """A desired ``name:version`` is chosen by the plan once the version has built variants;
    ``name:version+variant`` pins a variant, and an uncompressed version deploys as added."""
    if "+" in desired:
        return False
    version = catalog.version_or_none(desired)
    return version is not None and version.compressed is not None


def _label_number(labels: Mapping[str, Any], key: str) -> float | None:
    """A positive finite number from a label, or None (absent or not a number)."""
    try:
        value = float(labels[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def device_budgets(row: Mapping[str, Any], profile: DeviceProfile) -> p.Budgets:
    """The latency and power budgets of a device: its class profile's, each overridden by a
    label (``latency_budget_ms``, ``power_budget_w``) where one is set. Selection chooses
    against the latency budget; active deploys carry both, so the agent falls on them."""
    labels = json.loads(row.get("labels") or "{}")
    latency = _label_number(labels, LATENCY_BUDGET_LABEL)
    power = _label_number(labels, POWER_BUDGET_LABEL)
    here = f"class {profile.name}"
    return p.Budgets(
        latency_ms=latency if latency is not None else profile.latency_budget_ms,
        latency_from=f"label {LATENCY_BUDGET_LABEL}" if latency is not None else here,
        power_w=power if power is not None else profile.power.budget_w,
        power_from=f"label {POWER_BUDGET_LABEL}" if power is not None else here,
    )


def device_needs(row: Mapping[str, Any], profile: DeviceProfile | None) -> DeviceNeeds | None:
    """What selection needs from a device row and its class profile (None: unknown class)."""
    if profile is None:
        return None
    budget = device_budgets(row, profile).latency_ms
    assert budget is not None
    reported = set(json.loads(row.get("runtimes") or "[]"))
    allowed = {r.value for r in profile.runtimes}
    return DeviceNeeds(
        id=row["id"],
        device_class=row["device_class"],
        runtimes=frozenset(reported & allowed if reported else allowed),
        precisions=frozenset(x.value for x in profile.precisions),
        model_memory_mb=profile.model_memory_mb,
        storage_mb=profile.storage_mb,
        latency_budget_ms=budget,
        speed=profile.speed.factors(),
        active_w_per_core=profile.power.active_w_per_core,
        current=row.get("active_model"),
        arch=profile.cpu.arch.value if profile.cpu.arch else "unknown",
        features=frozenset(f.value for f in profile.cpu.features),
        kernels=load_kernel_gains(),
    )


def class_needs(device_class: str, profile: DeviceProfile | None) -> DeviceNeeds | None:
    """A device of ``device_class`` with no labels or runtime report of its own: enough to
    price variants there, since estimates depend only on the class's speed and power."""
    row = {"id": "-", "device_class": device_class, "labels": "{}", "runtimes": "[]"}
    return device_needs(row, profile)


def of_class(
    telemetry: Mapping[tuple[str, str], Measured],
    device_class: str,
    options: Sequence[Candidate],
) -> dict[str, Measured]:
    """The telemetry of ``options`` on ``device_class``, by variant id (what selection takes)."""
    return {
        c.id: telemetry[(device_class, c.id)] for c in options if (device_class, c.id) in telemetry
    }


def priced_on_class(
    variants: Sequence[Variant],
    device_class: str,
    profile: DeviceProfile | None,
    telemetry: Mapping[tuple[str, str], Measured],
) -> dict[str, Estimate]:
    """Every variant of one version priced on ``device_class`` by variant id
    (controller.pricing.class_prices): the plan's candidates set the class's field correction,
    and the source file of a compressed version is priced alongside. Empty for an unknown
    class."""
    needs = class_needs(device_class, profile)
    if needs is None:
        return {}
    chosen_among = {v.id for v in deployable(variants)}
    fp32_ms = fp32_latencies(variants)
    options = [candidate(v, fp32_ms) for v in variants if v.id in chosen_among]
    others = [candidate(v, fp32_ms) for v in variants if v.id not in chosen_among]
    return class_prices(needs, options, of_class(telemetry, device_class, options), others)


def measured(db: sqlite_utils.Database) -> dict[tuple[str, str], Measured]:
    """Telemetry per (device class, variant): inferences, J per inference, typical p95."""
    rows = db.execute(  # running totals kept by a trigger (controller.db, m8)
        "SELECT d.device_class, t.model, SUM(t.inferences), "
        "SUM(t.energy_j) / NULLIF(SUM(t.inferences), 0), "
        "SUM(t.p95_x_n) / NULLIF(SUM(t.inferences), 0) "
        "FROM telemetry_totals t JOIN devices d ON d.id = t.device "
        "WHERE t.model != '' AND t.inferences > 0 GROUP BY d.device_class, t.model"
    ).fetchall()
    return {(cls, model): Measured(n or 0, epi, p95) for cls, model, n, epi, p95 in rows}


def plan(
    db: sqlite_utils.Database,
    catalog: Catalog,
    profiles: Mapping[str, DeviceProfile],
    device_rows: Sequence[Mapping[str, Any]],
    model: str | None = None,
    telemetry: Mapping[tuple[str, str], Measured] | None = None,
) -> list[PlannedDevice]:
    """Decide a variant for each device: of ``model``, or of the version it should run.

    ``telemetry`` (from :func:`measured`) can be passed by a caller that plans repeatedly.
    """
    if telemetry is None:
        telemetry = measured(db)
    cache: dict[str, list[Candidate]] = {}
    planned: list[PlannedDevice] = []
    # Each decision keeps a few dozen small objects alive; past ~5,000 devices the cyclic
    # collector's full passes would make planning quadratic-looking. Nothing here makes cycles.
    collecting = gc.isenabled()
    gc.disable()
    try:
        _plan_rows(device_rows, model, catalog, profiles, telemetry, cache, planned)
    finally:
        if collecting:
            gc.enable()
    return planned


def _plan_rows(
    device_rows: Sequence[Mapping[str, Any]],
    model: str | None,
    catalog: Catalog,
    profiles: Mapping[str, DeviceProfile],
    telemetry: Mapping[tuple[str, str], Measured],
    cache: dict[str, list[Candidate]],
    planned: list[PlannedDevice],
) -> None:
    for row in device_rows:
        desired = row.get("desired_model") or ""
        if model is None and "+" in desired:
            pinned = Decision(row["id"], desired, None, "pinned by deploy NAME:VERSION+VARIANT")
            planned.append(PlannedDevice(row["id"], row["device_class"], desired, pinned))
            continue
        version = model or desired
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
            by_variant = of_class(telemetry, needs.device_class, cache[version])
            decision = select_variant(needs, cache[version], by_variant)
        planned.append(PlannedDevice(row["id"], row["device_class"], version, decision))


def fallbacks(
    catalog: Catalog,
    profiles: Mapping[str, DeviceProfile],
    targets: Sequence[tuple[Mapping[str, Any], str]],
) -> dict[str, FallbackDecision]:
    """The fallback variant of each ``(device row, active variant id)``, by device id.

    The candidates are the variants of the active variant's model version (a pinned
    ``name:version+variant`` included), read once per version.
    """
    cache: dict[str, list[Candidate]] = {}
    out: dict[str, FallbackDecision] = {}
    for row, active in targets:
        needs = device_needs(row, profiles.get(row["device_class"]))
        if needs is None:
            out[row["id"]] = FallbackDecision(
                row["id"], None, f"unknown device class {row['device_class']!r}"
            )
            continue
        version = active.partition("+")[0]
        if version not in cache:
            cache[version] = candidates(catalog, version)
        out[row["id"]] = select_fallback(needs, cache[version], active)
    return out


@dataclass(frozen=True)
class FleetSaving:
    """The plan's mean predicted energy per inference against fp32 everywhere."""

    devices: int
    plan_j: float
    fp32_j: float

    @property
    def saving(self) -> float:
        return 1.0 - self.plan_j / self.fp32_j if self.fp32_j > 0 else 0.0


def fleet_saving(planned: Sequence[PlannedDevice]) -> FleetSaving | None:
    """None when no device has both a choice and an fp32 estimate."""
    pairs = [
        (item.decision.estimate.energy_j, item.decision.reference.energy_j)
        for item in planned
        if item.decision.estimate is not None and item.decision.reference is not None
    ]
    if not pairs:
        return None
    return FleetSaving(
        len(pairs), sum(a for a, _ in pairs) / len(pairs), sum(b for _, b in pairs) / len(pairs)
    )


def field_checks(
    catalog: Catalog,
    profiles: Mapping[str, DeviceProfile],
    telemetry: Mapping[tuple[str, str], Measured],
) -> list[tuple[str, FieldCheck]]:
    """(device class, check) for every variant a class has run enough of: the plan's
    prediction against the field, bare and corrected by the class's other variants
    (controller.selection.field_check). Sorted by class and variant."""
    by_group: dict[tuple[str, str], dict[str, Measured]] = {}
    for (device_class, variant_id), seen in telemetry.items():
        version = variant_id.partition("+")[0]
        by_group.setdefault((device_class, version), {})[variant_id] = seen
    out: list[tuple[str, FieldCheck]] = []
    for (device_class, version), ran in sorted(by_group.items()):
        row = {"id": "-", "device_class": device_class, "labels": "{}", "runtimes": "[]"}
        needs = device_needs(row, profiles.get(device_class))
        if needs is None or catalog.version_or_none(version) is None:
            continue
        options = candidates(catalog, version)
        out.extend((device_class, check) for check in field_check(needs, options, ran))
    return out


def baseline_per_class(
    catalog: Catalog,
    profiles: Mapping[str, DeviceProfile],
    telemetry: Mapping[tuple[str, str], Measured],
) -> Callable[[str, str], float | None]:
    """``(device class, variant id) -> J per inference fp32 would have spent instead``.

    fp32's figure on that class as the plan and the Models page price it
    (controller.pricing.class_prices): its own telemetry there when there is enough, else its
    profile estimate corrected by what the class measured (its field cost per inference),
    because profiles are timed in a tight loop and understate what any variant costs in the
    field. While the variant that ran has too little telemetry on the class to be priced by it,
    what it spent is measured but its price is an estimate; the baseline is then fp32's price in
    the proportion of the variant's measured figure to its price, so the saving is the priced
    ratio the Models page shows (and fp32, early on, saves nothing against itself). None when
    the version has no fp32 variant, the class is unknown, or fp32 has no profile.
    """
    prices: dict[tuple[str, str], dict[str, Estimate]] = {}
    cache: dict[tuple[str, str], float | None] = {}

    def lookup(device_class: str, variant_id: str) -> float | None:
        key = (device_class, variant_id)
        if key not in cache:
            version = variant_id.partition("+")[0]
            if (device_class, version) not in prices:
                prices[(device_class, version)] = priced_on_class(
                    catalog.variants(version), device_class, profiles.get(device_class), telemetry
                )
            priced = prices[(device_class, version)]
            fp32 = priced.get(f"{version}+fp32")
            ran = priced.get(variant_id)
            seen = telemetry.get(key)
            if fp32 is None:
                cache[key] = None
            elif (
                ran is None
                or ran.source == "telemetry"
                or ran.energy_j <= 0
                or not (seen and seen.energy_per_inference_j)
            ):
                cache[key] = fp32.energy_j
            else:
                cache[key] = fp32.energy_j * seen.energy_per_inference_j / ran.energy_j
        return cache[key]

    return lookup
