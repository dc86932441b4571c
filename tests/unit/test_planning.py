"""The plan over a real catalog and device registry, and the energy report from telemetry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
import sqlite_utils

from agent import protocol as p
from controller import registry
from controller.config import ControllerConfig, SiteConfig, load_controller_config
from controller.db import open_db
from controller.energy import EnergyRow, energy_report, totals
from controller.errors import InvalidRequest
from controller.planning import (
    baseline_per_class,
    device_budgets,
    device_needs,
    fleet_saving,
    is_planned,
    measured,
    plan,
)
from device_configs.schema import load_profiles
from model_store import pipeline
from model_store.catalog import Catalog, Declared
from model_store.samples.calibration import calibration_set
from model_store.signing import Signer

SAMPLES = Path(__file__).parents[2] / "model_store" / "samples"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
HW = p.HardwareFacts(arch="aarch64", cores=4, memory_mb=4096, os="Linux", python="3.11")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Catalog]:
    home = tmp_path_factory.mktemp("plan")
    db = open_db(home / "greenfleet.db")  # the Home layout, for the CLI
    catalog = Catalog(db, home / "store")
    catalog.add(
        SAMPLES / "vibration-ae.onnx",
        "vib",
        "1.0.0",
        declared=Declared.from_json(SAMPLES / "vibration-ae.json"),
    )
    pipeline.compress(
        catalog,
        Signer.load_or_create(home / "keys"),
        "vib:1.0.0",
        calibration_set("vibration-ae", n=200),
        home / "work",
        only=["fp16", "int8-dynamic", "distill"],
        latency_runs=20,
    )
    for device, cls, runtimes in (
        ("pi-1", "rpi4", [p.ModelFormat.ONNX, p.ModelFormat.TFLITE]),
        ("tpu-1", "coral-dev-board", [p.ModelFormat.TFLITE]),
        ("odd-1", "toaster", [p.ModelFormat.ONNX]),
    ):
        birth = p.Birth(
            session="s",
            agent_version="0.1.0",
            device_class=cls,
            labels={"site": "plant-a"},
            runtimes=runtimes,
            hardware=HW,
        )
        registry.apply_birth(db, device, birth, NOW)
    return db, catalog


def test_plan_chooses_explains_and_refuses(fleet: tuple[object, Catalog]) -> None:
    db, catalog = fleet
    assert is_planned(catalog, "vib:1.0.0") and not is_planned(catalog, "vib:1.0.0+fp16")
    planned = {
        x.device: x.decision
        for x in plan(db, catalog, load_profiles(), registry.devices(db), "vib:1.0.0")
    }
    pi = planned["pi-1"]
    assert pi.chosen is not None and pi.chosen.startswith("vib:1.0.0+")
    assert pi.estimate is not None and pi.reference is not None
    # within 5% of the cheapest, the smaller file wins (NEAR_EQUAL)
    assert pi.estimate.energy_j <= pi.reference.energy_j * 1.05
    assert "least energy per inference" in pi.reason and pi.runners_up
    # an int8-only TFLite board: nothing ONNX runs there, and it is told why
    tpu = planned["tpu-1"]
    assert tpu.chosen is None and "no onnx runtime" in tpu.reason
    assert "unknown device class 'toaster'" in planned["odd-1"].reason
    saving = fleet_saving(
        list(plan(db, catalog, load_profiles(), registry.devices(db), "vib:1.0.0"))
    )
    assert saving is not None and saving.devices == 1
    assert -0.05 <= saving.saving < 1  # near-equal variants go to the smaller file


def test_energy_report_splits_measured_from_estimated_and_prices_co2(
    fleet: tuple[object, Catalog], tmp_path: Path
) -> None:
    db, catalog = fleet
    decisions = plan(db, catalog, load_profiles(), registry.devices(db), "vib:1.0.0")
    chosen = next(x.decision.chosen for x in decisions if x.device == "pi-1")
    assert chosen is not None
    rows = [
        {
            "device": "pi-1",
            "session": "s",
            "seq": seq,
            "start": f"2026-11-26T12:0{seq}:00+00:00",
            "window_s": 60.0,
            "model": chosen,
            "tier": "active",
            "inferences": 600,
            "errors": 0,
            "latency_p50_ms": 1.0,
            "latency_p95_ms": 1.5,
            "latency_p99_ms": 2.0,
            "cpu_s": 1.0,
            "power_w": 3.0,
            "energy_per_inference_j": 0.0002,
            "power_method": method,
            "received_at": "x",
        }
        for seq, method in ((0, "estimate"), (1, "rapl"))
    ]
    db.table("telemetry").insert_all(rows)  # type: ignore[attr-defined]
    config = ControllerConfig(sites={"plant-a": SiteConfig(grid_g_co2e_per_kwh=300)})
    baseline = baseline_per_class(catalog, load_profiles(), measured(db))
    (row,) = energy_report(db, config, baseline, site="plant-a")
    assert row.inferences == 1200
    assert row.device_j_estimated == pytest.approx(
        180.0
    ) and row.device_j_measured == pytest.approx(180.0)
    assert row.co2e_kg == pytest.approx(360 / 3.6e6 * 300 / 1000)
    assert row.j_per_inference == pytest.approx(0.0002)
    assert row.as_dict()["methods"] == ["estimate", "rapl"]
    assert energy_report(db, config, baseline, site="elsewhere") == []
    assert (
        energy_report(db, config, baseline, since="2026-11-26T12:01:00+00:00")[0].inferences == 600
    )
    assert totals([row])["measured_kwh"] == pytest.approx(180 / 3.6e6)


def test_controller_config_errors_name_the_key(tmp_path: Path) -> None:
    assert load_controller_config(tmp_path / "missing.yaml").grid_intensity("x") == 480.0
    bad = tmp_path / "controller.yaml"
    bad.write_text("sites:\n  plant-a: {grid: 300}\n")
    with pytest.raises(InvalidRequest, match=r"sites\.plant-a\.grid"):
        load_controller_config(bad)


def test_reconcile_deploys_the_plan_and_tells_a_device_with_no_fit_why(
    fleet: tuple[object, Catalog], tmp_path: Path
) -> None:
    from controller.daemon import Controller
    from controller.home import Home

    db, catalog = fleet
    registry.set_desired(db, ["pi-1", "tpu-1"], "vib:1.0.0")
    controller = Controller(Home(tmp_path / "home"))
    controller._db, controller._catalog = db, catalog  # the seams start() would open
    resolved = {v.id: v.desired_model for v in controller._resolve(registry.views(db))}
    assert (resolved["pi-1"] or "").startswith("vib:1.0.0+")
    assert resolved["tpu-1"] is None, "no fit: it keeps what it runs (nothing), no deploy"
    notes = {e["device"]: e for e in db.table("events").rows_where("session = 'controller'")}
    assert (
        notes["tpu-1"]["event"] == "plan_failed" and "no onnx runtime" in notes["tpu-1"]["message"]
    )
    assert notes["pi-1"]["event"] == "planned"
    controller._resolve(registry.views(db))
    assert db.table("events").count_where("session = 'controller'") == 2, (
        "said once, not every tick"
    )


def test_reconcile_stages_a_smaller_fallback_once_the_active_model_runs(
    fleet: tuple[object, Catalog], tmp_path: Path
) -> None:
    import threading
    from types import SimpleNamespace

    import sqlite_utils

    from controller.daemon import Controller
    from controller.home import Home
    from controller.planning import fallbacks

    db = cast(sqlite_utils.Database, fleet[0])
    catalog = fleet[1]
    sent: list[tuple[str, object]] = []
    controller = Controller(Home(tmp_path / "home"))
    controller._db, controller._catalog = db, catalog  # the seams start() would open
    connected = threading.Event()
    connected.set()
    controller.link = SimpleNamespace(  # type: ignore[assignment]
        connected=connected,
        publish=lambda topic, payload, qos: sent.append((topic, p.decode_command(payload))),
    )

    def deploys() -> list[p.Deploy]:
        found = [d for t, d in sent if t == p.topic("pi-2", p.Channel.CMD)]
        sent.clear()
        return [d for d in found if isinstance(d, p.Deploy)]

    def born(active: str, fallback: str | None = None) -> None:
        def model(ref: str) -> p.ActiveModel:
            v = catalog.get(ref)
            return p.ActiveModel(model=v.ref, sha256=v.sha256, format=v.format)

        birth = p.Birth(
            session="s",
            agent_version="0.1.0",
            device_class="rpi4",
            runtimes=[p.ModelFormat.ONNX, p.ModelFormat.TFLITE],
            hardware=HW,
            active=model(active) if active else None,
            fallback=model(fallback) if fallback else None,
        )
        registry.apply_birth(db, "pi-2", birth, NOW)

    reference = "vib:1.0.0+fp32"
    born("")
    registry.set_desired(db, ["pi-2"], reference)  # pinned: the largest variant
    controller.reconcile()
    (active,) = deploys()
    assert (active.model, active.slot) == (p.ModelRef.parse(reference), p.Slot.ACTIVE)
    controller.reconcile()
    assert deploys() == [], "no fallback while the active deploy is in flight"

    born(reference)  # the agent activated it
    choice = fallbacks(catalog, load_profiles(), [(registry.get_device(db, "pi-2"), reference)])
    small = choice["pi-2"].chosen
    assert small is not None and catalog.get(small).size < catalog.get(reference).size
    controller.reconcile()
    (staged,) = deploys()
    assert (str(staged.model), staged.slot, staged.rollback) == (small, p.Slot.FALLBACK, False)
    assert staged.manifest is not None and staged.artifact.sha256 == catalog.get(small).sha256
    row = next(db.table("deployments").rows_where("id = ?", [staged.id]))
    assert (row["slot"], row["status"]) == ("fallback", "sent")
    controller.reconcile()
    assert deploys() == [], "not re-sent at every tick"

    born(reference, fallback=small)  # staged: nothing more to do
    controller.reconcile()
    assert deploys() == []
    notes = list(db.table("events").rows_where("device = 'pi-2' AND event = 'fallback_planned'"))
    assert len(notes) == 1 and notes[0]["message"].startswith(small)


def test_plan_names_each_devices_fallback(
    fleet: tuple[object, Catalog], capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.cli import main

    _, catalog = fleet
    home = str(catalog.store.parent)
    capsys.readouterr()
    assert main(["--home", home, "plan", "--model", "vib:1.0.0", "--json"]) == 0
    rows = {d["device"]: d for d in json.loads(capsys.readouterr().out)["devices"]}
    pi, tpu = rows["pi-1"], rows["tpu-1"]
    assert pi["chosen"] and pi["fallback_reason"]
    if pi["fallback"] is not None:
        assert pi["fallback"] != pi["chosen"] and pi["fallback"].startswith("vib:1.0.0+")
        assert catalog.get(pi["fallback"]).size < catalog.get(pi["chosen"]).size
    assert (tpu["chosen"], tpu["fallback"], tpu["fallback_reason"]) == (None, None, None)
    assert main(["--home", home, "plan", "--model", "vib:1.0.0", "-v"]) == 0
    assert "pi-1: fallback " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("inference_j", "build_j", "saved_j", "payback"),
    [
        pytest.param(0.0004, 30.0, 0.6, 50_000, id="saves-0.6-mJ-an-inference"),
        pytest.param(0.0010, 30.0, 0.0, None, id="saves-nothing"),
        pytest.param(0.0012, 30.0, -0.2, None, id="costs-more-than-fp32"),
        pytest.param(0.0004, None, 0.6, None, id="build-not-known"),
    ],
)
def test_a_variant_pays_back_its_build_after_this_many_inferences(
    inference_j: float, build_j: float | None, saved_j: float, payback: float | None
) -> None:
    """1,000 inferences at ``inference_j`` each against fp32's 1 mJ: the joules saved, and the
    inferences after which they cover the build (issue 16)."""
    from controller.energy import EnergyRow

    row = EnergyRow("plant-a", "vib:1.0.0", "int8", inferences=1000, inference_j=inference_j * 1000)
    row.baseline_j, row.baseline_inferences = 1.0, 1000
    row.build_j, row.build_method = build_j, "estimated"
    assert row.saved_j == pytest.approx(saved_j)
    assert row.payback_inferences == (None if payback is None else pytest.approx(payback))
    assert row.as_dict()["payback_inferences"] == row.payback_inferences


@pytest.mark.parametrize(
    ("inference_j", "grid", "expected_g"),
    [
        # 1 mJ per inference, 1,000 inferences = 1 J = 1/3.6e6 kWh, at 400 g/kWh
        (1e-3, 400.0, 400.0 / 3.6e6),
        (2e-3, 0.0, 0.0),  # a site on carbon-free power
    ],
)
def test_sci_per_1000_inferences_is_energy_times_grid_intensity(
    inference_j: float, grid: float, expected_g: float
) -> None:
    from controller.energy import EnergyRow

    row = EnergyRow(
        "plant-a",
        "vib:1.0.0",
        "int8",
        inferences=500,
        inference_j=inference_j * 500,
        grid_g_per_kwh=grid,
    )
    assert row.sci_g_per_1000 == pytest.approx(expected_g)
    shown = row.as_dict()
    assert shown["sci_g_co2e_per_1000_inferences"] == pytest.approx(expected_g)
    assert shown["sci_embodied"].startswith("not known")
    assert EnergyRow("plant-a", "vib:1.0.0", "fp32").sci_g_per_1000 is None  # no inferences


def test_build_energy_charges_a_variant_its_builder_and_the_runs_shared_steps(
    fleet: tuple[object, Catalog],
) -> None:
    """The fixture's compress recorded its cost; a variant is charged its builder's step plus
    the reference and the profiling, as measured or estimated as they were."""
    from controller.energy import build_energy

    _db, catalog = fleet
    recorded = catalog.version("vib:1.0.0").build_cost
    assert recorded is not None and {"fp32", "int8-dynamic", "profile"} <= set(recorded["steps"])
    steps = recorded["steps"]
    cost = build_energy(catalog)
    joules, how = cost("vib:1.0.0+int8-dynamic") or (None, None)
    expected = sum(steps[name]["energy_j"] for name in ("int8-dynamic", "fp32", "profile"))
    assert joules == pytest.approx(expected) and joules > 0
    rapl = all(steps[name]["method"] == "rapl" for name in ("int8-dynamic", "fp32", "profile"))
    assert how == ("measured" if rapl else "estimated")
    assert cost("vib:1.0.0+no-such-variant") is None
    assert cost("other:1.0.0+x") is None


def test_the_plan_prices_each_candidate_as_the_models_page_and_report_do(
    fleet: tuple[object, Catalog],
) -> None:
    """After telemetry of one variant on rpi4, every estimate the plan weighs for pi-1 is the
    one controller.pricing gives the class, and the report's fp32 baseline is fp32's."""
    from controller.planning import candidates, class_needs, of_class
    from controller.pricing import class_prices

    db, catalog = cast(sqlite_utils.Database, fleet[0]), fleet[1]
    options = candidates(catalog, "vib:1.0.0")
    ran = next(c for c in options if c.precision == "fp16")
    db.table("telemetry").insert(
        {
            "device": "pi-1",
            "session": "s",
            "seq": 99,
            "start": "2026-11-26T13:00:00+00:00",
            "window_s": 60.0,
            "model": ran.id,
            "tier": "active",
            "inferences": 500,
            "errors": 0,
            "latency_p95_ms": 3.0,
            "power_w": 3.0,
            "energy_per_inference_j": 0.003,
            "power_method": "rapl",
            "received_at": "x",
        }
    )
    field = measured(db)
    (pi,) = [
        x
        for x in plan(db, catalog, load_profiles(), registry.devices(db), "vib:1.0.0")
        if x.device == "pi-1"
    ]
    rpi4 = class_needs("rpi4", load_profiles()["rpi4"])
    assert rpi4 is not None
    prices = class_prices(rpi4, options, of_class(field, "rpi4", options))
    assert pi.decision.estimates == prices
    assert prices[ran.id].source == "telemetry"
    assert any("(field cost per inference)" in p.source for p in prices.values()), prices
    fp32 = next(c for c in options if c.is_reference)
    baseline = baseline_per_class(catalog, load_profiles(), field)
    assert baseline("rpi4", ran.id) == prices[fp32.id].energy_j


def test_payback_and_daily_saving_run_at_the_periods_inference_rate(tmp_path: Path) -> None:
    """Two windows of pi-1 a minute apart (120 s of telemetry, 10 inferences a second) at
    0.2 mJ against fp32's 0.4 mJ, a 0.6 J build: 3,000 inferences to pay back, so 300 s. The
    period is the report's: the first window to the end of the last, of its site's devices."""
    db = open_db(tmp_path / "greenfleet.db")
    for device, site in (("pi-1", "plant-a"), ("pi-2", "plant-b")):
        birth = p.Birth(
            session="s",
            agent_version="0.1.0",
            device_class="rpi4",
            labels={"site": site},
            runtimes=[p.ModelFormat.ONNX],
            hardware=HW,
        )
        registry.apply_birth(db, device, birth, NOW)
    windows = [("pi-1", 0, "12:00:00"), ("pi-1", 1, "12:01:00"), ("pi-2", 0, "13:00:00")]
    db.table("telemetry").insert_all(
        {
            "device": device,
            "session": "s",
            "seq": seq,
            "start": f"2026-11-26T{at}.000+00:00",
            "window_s": 60.0,
            "model": "vib:1.0.0+int8",
            "tier": "active",
            "inferences": 600,
            "errors": 0,
            "power_w": 3.0,
            "energy_per_inference_j": 0.0002,
            "power_method": "rapl",
            "received_at": "x",
        }
        for device, seq, at in windows
    )
    config = ControllerConfig()

    def report(**kwargs: str) -> list[EnergyRow]:
        return energy_report(
            db, config, lambda _c, _v: 0.0004, build=lambda _v: (0.6, "measured"), **kwargs
        )

    (row,) = report(site="plant-a")
    assert row.period_s == pytest.approx(120.0, abs=1e-3)
    assert row.payback_inferences == pytest.approx(3000)
    assert row.payback_s == pytest.approx(300.0, rel=1e-5)
    assert row.daily_saving_j == pytest.approx(0.24 / 120 * 86_400, rel=1e-5)
    assert row.paid_back is False  # 0.24 J saved so far against 0.6 J
    assert row.as_dict()["payback_s"] == row.payback_s
    # a later start: only pi-1's second window, 60 s at the same rate
    (later,) = report(site="plant-a", since="2026-11-26T12:01:00")
    assert later.period_s == pytest.approx(60.0, abs=1e-3)
    assert later.payback_s == pytest.approx(300.0, rel=1e-5)
    # the whole fleet: 12:00 to 13:01, the same 1,200 inferences of plant-a spread thinner
    rows = {r.site: r for r in report()}
    assert rows["plant-a"].period_s == pytest.approx(3660.0, abs=1e-3)
    assert rows["plant-a"].payback_s == pytest.approx(3000 / (1200 / 3660), rel=1e-5)
    fleet = totals(list(rows.values()))
    assert fleet["daily_saving_j"] == pytest.approx(
        sum(r.saved_j or 0 for r in rows.values()) / 3660 * 86_400, rel=1e-5
    )
    cheap = energy_report(db, config, lambda _c, _v: 0.0004, build=lambda _v: (0.1, "measured"))
    assert all(r.paid_back for r in cheap) and all(r.payback_s for r in cheap)


@pytest.mark.parametrize(
    ("paid_back", "payback_s", "text"),
    [(True, 30.0, "paid"), (False, 11_520.0, "3.2 h"), (None, None, "-"), (False, None, "-")],
)
def test_the_report_table_says_paid_or_how_long(
    paid_back: bool | None, payback_s: float | None, text: str
) -> None:
    from controller.plan_commands import payback_text

    assert payback_text({"paid_back": paid_back, "payback_s": payback_s}) == text


@pytest.mark.parametrize(
    ("ran", "inferences", "expected"),
    [
        pytest.param("fp16", 500, "fp32's price", id="priced-by-its-telemetry"),
        pytest.param("fp16", 50, "the priced ratio", id="too-little-telemetry-to-price-by"),
        pytest.param("fp32", 50, "what it spent", id="fp32-early-saves-nothing"),
    ],
)
def test_the_reports_saving_is_the_priced_ratio_on_the_class(
    fleet: tuple[object, Catalog], ran: str, inferences: int, expected: str
) -> None:
    """fp32's baseline for a variant that ran 3 mJ an inference on rpi4: fp32's price there
    once the variant is priced by its telemetry; before that the saving is the one the Models
    page shows (its price against fp32's), not a measurement against a profile."""
    from controller.planning import priced_on_class
    from controller.selection import Measured

    _db, catalog = fleet
    variant = f"vib:1.0.0+{ran}"
    field = {("rpi4", variant): Measured(inferences, 0.003, 2.0)}
    prices = priced_on_class(catalog.variants("vib:1.0.0"), "rpi4", load_profiles()["rpi4"], field)
    fp32 = prices["vib:1.0.0+fp32"].energy_j
    baseline = baseline_per_class(catalog, load_profiles(), field)("rpi4", variant)
    assert baseline is not None
    saving = 1 - 0.003 / baseline
    if expected == "fp32's price":
        assert baseline == pytest.approx(fp32)
    elif expected == "the priced ratio":
        assert saving == pytest.approx(1 - prices[variant].energy_j / fp32)
    else:
        assert saving == pytest.approx(0.0)


@pytest.mark.parametrize(
    "labels, expected",
    [
        pytest.param({}, (50.0, "class rpi4", 7.5, "class rpi4"), id="the-class"),
        pytest.param(
            {"latency_budget_ms": "20", "power_budget_w": "4.5"},
            (20.0, "label latency_budget_ms", 4.5, "label power_budget_w"),
            id="labels-override",
        ),
        pytest.param(
            {"latency_budget_ms": "fast", "power_budget_w": "-1"},
            (50.0, "class rpi4", 7.5, "class rpi4"),
            id="a-label-that-is-no-budget-is-ignored",
        ),
        pytest.param(
            {"latency_budget_ms": "inf"}, (50.0, "class rpi4", 7.5, "class rpi4"), id="inf"
        ),
    ],
)
def test_device_budgets_come_from_the_class_and_labels_override_them(
    labels: dict[str, str], expected: tuple[object, ...]
) -> None:
    profile = load_profiles()["rpi4"]
    row = {"id": "gw-1", "device_class": "rpi4", "labels": json.dumps(labels)}
    budgets = device_budgets(row, profile)
    got = (budgets.latency_ms, budgets.latency_from, budgets.power_w, budgets.power_from)
    assert got == expected
    needs = device_needs(row, profile)
    assert needs is not None and needs.latency_budget_ms == expected[0], "selection agrees"
