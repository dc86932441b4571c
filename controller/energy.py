"""Energy accounting from telemetry: kWh and CO2e per site, model and variant, and the saving.

Device energy in a telemetry window is its mean power times the window; inference energy is
energy per inference times inferences. Both are split by how they were obtained, so a report
never mixes a measurement with an estimate without saying so. The saving compares the
inference energy actually spent with what the fp32 reference would have spent for the same
inferences on the same device classes (``baseline``, from the plan's estimates).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from controller.config import ControllerConfig
from model_store.catalog import Catalog
from model_store.errors import ModelStoreError

J_PER_KWH = 3.6e6
SECONDS_PER_DAY = 86_400.0


SCI_EMBODIED = "not known: no device profile states an embodied-carbon figure with a source"


@dataclass
class EnergyRow:
    """One (site, model version, variant) line of the report."""

    site: str
    model: str
    variant: str
    devices: set[str] = field(default_factory=set)
    inferences: int = 0
    device_j_measured: float = 0.0
    device_j_estimated: float = 0.0
    inference_j: float = 0.0
    baseline_j: float = 0.0  # fp32 on the same device classes, same inferences
    baseline_inferences: int = 0  # inferences for which a baseline was known
    methods: set[str] = field(default_factory=set)
    grid_g_per_kwh: float = 0.0
    build_j: float | None = None  # what making the variant cost (see build_energy)
    build_method: str | None = None  # "measured" (RAPL) or "estimated" (CPU time)
    period_s: float | None = None  # the report's period (report_period), for rates

    @property
    def device_kwh(self) -> float:
        return (self.device_j_measured + self.device_j_estimated) / J_PER_KWH

    @property
    def co2e_kg(self) -> float:
        return self.device_kwh * self.grid_g_per_kwh / 1000.0

    @property
    def j_per_inference(self) -> float | None:
        return self.inference_j / self.inferences if self.inferences else None

    @property
    def saving(self) -> float | None:
        """Share of inference energy saved against fp32 (only where a baseline was known)."""
        if not self.baseline_inferences or self.baseline_j <= 0:
            return None
        spent = self.inference_j * self.baseline_inferences / max(self.inferences, 1)
        return 1.0 - spent / self.baseline_j

    @property
    def saved_j(self) -> float | None:
        """Inference energy saved against fp32 in this report's period, in joules."""
        if not self.baseline_inferences or self.baseline_j <= 0:
            return None
        return self.baseline_j - self.inference_j * self.baseline_inferences / max(
            self.inferences, 1
        )

    @property
    def payback_inferences(self) -> float | None:
        """Inferences after which the saving has paid for the variant's build; None while the
        variant saves nothing (or its build cost is not known)."""
        saved = self.saved_j
        if self.build_j is None or saved is None or saved <= 0:
            return None
        return self.build_j / (saved / self.baseline_inferences)

    @property
    def payback_s(self) -> float | None:
        """Seconds of running at this row's rate over the report's period (its inferences per
        period second) after which the saving has paid for the build; None where
        payback_inferences is, or the period is not known."""
        payback = self.payback_inferences
        if payback is None or not self.period_s or not self.inferences:
            return None
        return payback * self.period_s / self.inferences

    @property
    def paid_back(self) -> bool | None:
        """Whether the joules saved in the report's period already cover the build; None while
        the build cost or the saving is not known."""
        saved = self.saved_j
        if self.build_j is None or saved is None:
            return None
        return saved >= self.build_j

    @property
    def daily_saving_j(self) -> float | None:
        """Joules a day this row saves against fp32 at the rate seen in the report's period."""
        saved = self.saved_j
        if saved is None or not self.period_s:
            return None
        return saved / self.period_s * SECONDS_PER_DAY

    @property
    def sci_g_per_1000(self) -> float | None:
        """Software Carbon Intensity per 1,000 inferences (ISO/IEC 21031:2024,
        (E x I) + M per functional unit), its operational part E x I: the inference energy
        of 1,000 inferences in kWh times the site's grid intensity, in g CO2e. M, the
        device's embodied carbon amortised over its inferences, is not included: no device
        profile states an embodied figure with a source (``sci_embodied`` says so)."""
        per = self.j_per_inference
        return None if per is None else per * 1000 / J_PER_KWH * self.grid_g_per_kwh

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "model": self.model,
            "variant": self.variant,
            "devices": len(self.devices),
            "inferences": self.inferences,
            "device_kwh": self.device_kwh,
            "measured_kwh": self.device_j_measured / J_PER_KWH,
            "estimated_kwh": self.device_j_estimated / J_PER_KWH,
            "co2e_kg": self.co2e_kg,
            "grid_g_co2e_per_kwh": self.grid_g_per_kwh,
            "j_per_inference": self.j_per_inference,
            "fp32_j_per_inference": self.baseline_j / self.baseline_inferences
            if self.baseline_inferences
            else None,
            "saving_vs_fp32": self.saving,
            "saved_j": self.saved_j,
            "build_j": self.build_j,
            "build_energy": self.build_method,
            "payback_inferences": self.payback_inferences,
            "period_s": self.period_s,
            "payback_s": self.payback_s,
            "paid_back": self.paid_back,
            "daily_saving_j": self.daily_saving_j,
            "sci_g_co2e_per_1000_inferences": self.sci_g_per_1000,
            "sci_embodied": SCI_EMBODIED,
            "methods": sorted(self.methods),
        }


def energy_report(
    db: sqlite_utils.Database,
    config: ControllerConfig,
    baseline: Callable[[str, str], float | None],
    *,
    site: str | None = None,
    since: str | None = None,
    build: Callable[[str], tuple[float, str] | None] = lambda _variant: None,
) -> list[EnergyRow]:
    """Aggregate telemetry (optionally of one site, from an ISO time on) into report rows.

    ``baseline(device_class, variant_id)`` is what fp32 would have spent per inference instead
    of that variant on that class (see controller.planning.baseline_per_class), or None.
    ``build(variant_id)`` is what making the variant cost, joules and how they were obtained
    (:func:`build_energy`), or None.
    """
    devices = {
        row["id"]: (json.loads(row["labels"] or "{}").get("site", "-"), row["device_class"])
        for row in db.table("devices").rows
    }
    params: list[str] = []
    if since:  # a time range: the windows themselves
        params.append(since)
        query = (
            "SELECT device, model, power_method, SUM(inferences), SUM(power_w * window_s), "
            "SUM(energy_per_inference_j * inferences) FROM telemetry "
            "WHERE model IS NOT NULL AND start >= ? GROUP BY device, model, power_method"
        )
    else:  # all time: the running totals a trigger keeps (controller.db, m8)
        query = (
            "SELECT device, model, NULLIF(power_method, ''), SUM(inferences), SUM(device_j), "
            "SUM(energy_j) FROM telemetry_totals WHERE model != '' "
            "GROUP BY device, model, power_method"
        )
    rows: dict[tuple[str, str, str], EnergyRow] = {}
    mine = [d for d, (where, _) in devices.items() if site is None or where == site]
    period_s = report_period(db, mine, since)
    for device, model, method, inferences, device_j, inference_j in db.execute(query, params):
        device_site, device_class = devices.get(device, ("-", "unknown"))
        if site is not None and device_site != site:
            continue
        base, _, variant = model.partition("+")
        key = (device_site, base, variant)
        row = rows.get(key)
        if row is None:
            row = rows[key] = EnergyRow(
                device_site,
                base,
                variant or "(source)",
                grid_g_per_kwh=config.grid_intensity(device_site),
                period_s=period_s,
            )
            made = build(model) if variant else None  # a source file was not built here
            if made is not None:
                row.build_j, row.build_method = made
        row.devices.add(device)
        row.inferences += inferences or 0
        if method == "estimate":
            row.device_j_estimated += device_j or 0.0
        else:
            row.device_j_measured += device_j or 0.0
        row.inference_j += inference_j or 0.0
        row.methods.add(method)
        fp32 = baseline(device_class, model)
        if fp32 is not None and inferences:
            row.baseline_j += fp32 * inferences
            row.baseline_inferences += inferences
    return sorted(rows.values(), key=lambda r: (r.site, r.model, r.variant))


def report_period(
    db: sqlite_utils.Database, devices: Collection[str], since: str | None
) -> float | None:
    """Seconds from the start of the first telemetry window of ``devices`` (at or after
    ``since``) to the end of the last one, or None without telemetry.

    The period rates are taken over (payback time, daily saving). It starts at the first
    window rather than at ``since`` and ends with the last window rather than now, so a fleet
    that began yesterday is not averaged over the 30 days asked for, nor a stopped fleet over
    the hours since it stopped. Two index lookups per device on telemetry(device, start).
    """
    wanted = set(devices)
    first: float | None = None
    last: float | None = None
    for device, start, end in db.execute(
        "SELECT d.id, (SELECT julianday(start) FROM telemetry WHERE device = d.id AND start >= ? "
        "ORDER BY start LIMIT 1), (SELECT julianday(start) + window_s / 86400.0 FROM telemetry "
        "WHERE device = d.id AND start >= ? ORDER BY start DESC LIMIT 1) FROM devices d",
        [since or "", since or ""],
    ):
        if device not in wanted or start is None or end is None:
            continue
        first = start if first is None else min(first, start)
        last = end if last is None else max(last, end)
    if first is None or last is None or last <= first:
        return None
    return (last - first) * SECONDS_PER_DAY


def build_energy(catalog: Catalog) -> Callable[[str], tuple[float, str] | None]:
    """``variant_id -> (joules, "measured" | "estimated")``: what the compress run that made
    the variant spent on it, its builder's step plus the steps every variant of the run needs
    (the fp32 reference and the profiling), from the version's recorded build cost. A builder
    that made several variants (int8-static: QDQ and QOperator) is charged to each in full,
    which errs towards a later payback, never an earlier one."""
    cache: dict[str, dict[str, Any] | None] = {}

    def cost(variant_id: str) -> tuple[float, str] | None:
        base = variant_id.partition("+")[0]
        if base not in cache:
            version = catalog.version_or_none(base)
            cache[base] = version.build_cost if version is not None else None
        recorded = cache[base]
        if recorded is None:
            return None
        try:
            builder = (catalog.get(variant_id).details or {}).get("built_by")
        except ModelStoreError:
            return None
        steps = recorded.get("steps", {})
        parts = [steps.get(name) for name in dict.fromkeys((builder, "fp32", "profile"))]
        if builder is None or any(part is None for part in parts):
            return None
        joules = sum(float(part["energy_j"]) for part in parts if part is not None)
        measured = all(part is not None and part["method"] == "rapl" for part in parts)
        return joules, "measured" if measured else "estimated"

    return cost


def totals(rows: list[EnergyRow]) -> dict[str, Any]:
    """The fleet line: totals and the overall saving where a baseline was known."""
    by_method: dict[str, float] = defaultdict(float)
    for row in rows:
        by_method["measured"] += row.device_j_measured
        by_method["estimated"] += row.device_j_estimated
    inferences = sum(r.inferences for r in rows)
    base_inf = sum(r.baseline_inferences for r in rows)
    base_j = sum(r.baseline_j for r in rows)
    spent = sum(r.inference_j * r.baseline_inferences / max(r.inferences, 1) for r in rows)
    daily = [r.daily_saving_j for r in rows if r.daily_saving_j is not None]
    return {
        "inferences": inferences,
        "device_kwh": sum(by_method.values()) / J_PER_KWH,
        "measured_kwh": by_method["measured"] / J_PER_KWH,
        "estimated_kwh": by_method["estimated"] / J_PER_KWH,
        "co2e_kg": sum(r.co2e_kg for r in rows),
        "saving_vs_fp32": (1.0 - spent / base_j) if base_inf and base_j > 0 else None,
        "period_s": rows[0].period_s if rows else None,  # one period for the whole report
        "daily_saving_j": sum(daily) if daily else None,
    }
