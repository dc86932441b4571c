"""``greenfleet plan`` and ``energy report``: what the fleet should run, and what it cost."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rich.markup import escape
from rich.table import Table

from controller import registry
from controller.config import load_controller_config
from controller.db import open_db
from controller.energy import SCI_EMBODIED, build_energy, energy_report, totals
from controller.errors import InvalidRequest
from controller.output import console, duration_text, emit, fmt
from controller.planning import (
    baseline_per_class,
    fallbacks,
    field_checks,
    fleet_saving,
    measured,
    plan,
)
from device_configs.schema import load_profiles
from model_store.catalog import Catalog


def _mj(joules: float | None) -> str:
    return "-" if joules is None else f"{joules * 1000:.3f}"


def _render_field_check(checks: list[dict[str, Any]]) -> None:
    """The plan's estimates against what each class measured (selection.field_check)."""
    table = Table(
        "class",
        "variant",
        "inferences",
        "measured mJ",
        "profile mJ",
        "error",
        "corrected mJ",
        "error",
        title="prediction against the field (corrected: from the class's other variants)",
        title_justify="left",
    )
    for c in checks:
        corrected = c["corrected_error"]
        table.add_row(
            c["class"],
            c["variant"],
            f"{c['inferences']:,}",
            _mj(c["measured_j"]),
            _mj(c["profile_j"]),
            f"{c['profile_error']:+.0%}",
            _mj(c["corrected_j"]),
            "-" if corrected is None else f"{corrected:+.0%}",
        )
    console.print(table)


def cmd_plan(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    catalog = Catalog(db, args.home.store)
    rows = registry.devices(db)
    if args.selector:
        wanted = set(registry.matching(db, registry.parse_selector(args.selector)))
        rows = [r for r in rows if r["id"] in wanted]
    if args.model:
        catalog.version(args.model)
    profiles = load_profiles()
    planned = plan(db, catalog, profiles, rows, args.model)
    if not planned:
        raise InvalidRequest(
            "nothing to plan: no device has a desired model; pass --model NAME:VERSION"
        )
    fleet = fleet_saving(planned)
    by_id = {r["id"]: r for r in rows}
    spare = fallbacks(  # the small variant each device keeps staged for its fallback tier
        catalog,
        profiles,
        [(by_id[i.device], i.decision.chosen) for i in planned if i.decision.chosen],
    )
    data: dict[str, Any] = {
        "devices": [
            {
                "device": item.device,
                "class": item.device_class,
                "model": item.model,
                "chosen": item.decision.chosen,
                "latency_ms": item.decision.estimate.latency_ms if item.decision.estimate else None,
                "energy_j": item.decision.estimate.energy_j if item.decision.estimate else None,
                "source": item.decision.estimate.source if item.decision.estimate else None,
                "basis": item.decision.estimate.basis if item.decision.estimate else None,
                "fp32_energy_j": item.decision.reference.energy_j
                if item.decision.reference
                else None,
                "reason": item.decision.reason,
                "runners_up": [
                    {"variant": v, "energy_j": e.energy_j, "latency_ms": e.latency_ms}
                    for v, e in item.decision.runners_up
                ],
                "ruled_out": [{"variant": v, "why": w} for v, w in item.decision.ruled_out],
                "fallback": spare[item.device].chosen if item.device in spare else None,
                "fallback_reason": spare[item.device].reason if item.device in spare else None,
            }
            for item in planned
        ],
        "fleet": None if fleet is None else {**asdict(fleet), "saving": fleet.saving},
        "field_check": [
            {
                "class": device_class,
                "variant": check.variant,
                "inferences": check.inferences,
                "measured_j": check.measured_j,
                "profile_j": check.profile_j,
                "profile_error": check.profile_error,
                "corrected_j": check.corrected_j,
                "corrected_error": check.corrected_error,
            }
            for device_class, check in field_checks(catalog, profiles, measured(db))
            if args.model is None or check.variant.partition("+")[0] == args.model
        ],
    }

    def render() -> None:
        table = Table(
            "device",
            "class",
            "chosen variant",
            "ms",
            "mJ/inf",
            "fp32 mJ",
            "from",
            "reason",
            title="plan",
            title_justify="left",
        )
        for d in data["devices"]:
            table.add_row(
                d["device"],
                d["class"],
                d["chosen"] or "[red]none[/]",
                fmt(d["latency_ms"], 3),
                _mj(d["energy_j"]),
                _mj(d["fp32_energy_j"]),
                d["source"] or "-",
                escape(d["reason"]),
            )
        console.print(table)
        if args.verbose:
            for d in data["devices"]:
                if d["basis"]:
                    console.print(f"  {d['device']}: estimate from {escape(d['basis'])}")
                if d["fallback_reason"]:
                    console.print(
                        f"  {d['device']}: fallback {d['fallback'] or 'none'}: "
                        f"{escape(d['fallback_reason'])}"
                    )
                for r in d["ruled_out"]:
                    console.print(f"  {d['device']}: {r['variant']} ruled out: {escape(r['why'])}")
        if fleet is not None:
            console.print(
                f"fleet: {fleet.devices} devices, predicted {_mj(fleet.plan_j)} mJ per "
                f"inference against {_mj(fleet.fp32_j)} mJ for fp32 everywhere "
                f"({fleet.saving:.0%} less)"
            )
        if data["field_check"]:
            _render_field_check(data["field_check"])

    emit(args, data, render)
    return 0


def payback_text(row: dict[str, Any]) -> str:
    """A report row's payback for the table: "paid" once the period's saving covers the
    build, else the time it takes at the period's rate ("3.2 h"), "-" when it never does or
    the build cost is not known."""
    if row["paid_back"]:
        return "paid"
    return duration_text(row["payback_s"])


def cmd_energy_report(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    catalog = Catalog(db, args.home.store)
    config = load_controller_config(args.home.config)
    baseline = baseline_per_class(catalog, load_profiles(), measured(db))
    rows = energy_report(
        db, config, baseline, site=args.site, since=args.since, build=build_energy(catalog)
    )
    data: dict[str, Any] = {"rows": [r.as_dict() for r in rows], "total": totals(rows)}

    def render() -> None:
        table = Table(
            "site",
            "model",
            "variant",
            "devices",
            "inferences",
            "kWh",
            "measured kWh",
            "CO2e g",
            "mJ/inf",
            "fp32 mJ/inf",
            "saving",
            "build J",
            "payback",
            "saved J/day",
            "SCI g/1k inf",
            title="energy",
            title_justify="left",
        )
        for r in data["rows"]:
            table.add_row(
                r["site"],
                r["model"],
                r["variant"],
                str(r["devices"]),
                f"{r['inferences']:,}",
                f"{r['device_kwh']:.6f}",
                f"{r['measured_kwh']:.6f}",
                f"{r['co2e_kg'] * 1000:.2f}",
                _mj(r["j_per_inference"]),
                _mj(r["fp32_j_per_inference"]),
                "-" if r["saving_vs_fp32"] is None else f"{r['saving_vs_fp32']:.0%}",
                "-"
                if r["build_j"] is None
                else f"{r['build_j']:.0f}" + ("" if r["build_energy"] == "measured" else " est."),
                payback_text(r),
                "-" if r["daily_saving_j"] is None else f"{r['daily_saving_j']:,.0f}",
                "-"
                if r["sci_g_co2e_per_1000_inferences"] is None
                else f"{r['sci_g_co2e_per_1000_inferences']:.2g}",
            )
        console.print(table)
        t = data["total"]
        saving = "-" if t["saving_vs_fp32"] is None else f"{t['saving_vs_fp32']:.0%}"
        daily = "" if t["daily_saving_j"] is None else f", {t['daily_saving_j']:,.0f} J a day"
        console.print(
            f"total: {t['inferences']:,} inferences, {t['device_kwh']:.6f} kWh "
            f"({t['measured_kwh']:.6f} measured, {t['estimated_kwh']:.6f} estimated), "
            f"{t['co2e_kg'] * 1000:.2f} g CO2e; inference energy saved against fp32: "
            f"{saving}{daily}"
        )
        console.print(
            f"payback and J/day at the inference rate of the report's period "
            f"({duration_text(t['period_s'])}, first telemetry window to last)"
        )
        console.print(
            f"SCI per 1,000 inferences is E x I only; M (embodied carbon) is {SCI_EMBODIED}"
        )

    emit(args, data, render)
    return 0


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    planner = add(sub, "plan", cmd_plan, "the variant each device should run, and why", True)
    planner.add_argument("selector", nargs="?", help="label selector, e.g. site=plant-a")
    planner.add_argument("--model", help="plan this NAME:VERSION (default: each device's desired)")
    planner.add_argument("-v", "--verbose", action="store_true", help="show ruled-out variants")
    energy = sub.add_parser("energy", help="energy accounting").add_subparsers(
        dest="sub", required=True
    )
    report = add(
        energy,
        "report",
        cmd_energy_report,
        "kWh and CO2e per site, model and variant, and the saving against fp32",
        True,
    )
    report.add_argument("--site")
    report.add_argument("--since", help="ISO time, e.g. 2026-11-01")
