"""Planning: how the plan's cost grows with the fleet, and what the plan saves against fp32.

*Scaling.* N devices cycling through the nine hardware profiles (rows as the registry holds
them, turned into :class:`DeviceNeeds` by ``planning.device_needs``) and the same 20 synthetic
candidates for every device, chosen to reach every rule of selection (formats, precisions,
storage, memory, latency budget, ineligible, not profiled). Planned for N = 1,000 and 10,000 in
interleaved repetitions, medians compared: ``select_variant`` alone, the per-device loop of
``planning.plan`` (``device_needs`` + ``select_variant``), and ``planning.plan`` itself against
a real SQLite database and the catalog built below. 10x the devices should cost about 10x.

*Fleet energy.* The vibration-ae sample is put through the model store as ``greenfleet demo``
does (catalog, ``compress`` with 400 calibration windows, signing; the TFLite sample imported as
``+tflite``), and the plan's predicted energy per inference is compared with fp32 everywhere
(``planning.fleet_saving``) on the demo fleet (rpi4, jetson-orin-nano, x86-ipc) and on one
device of each of the nine classes; and once more with only the variants ``compress`` built, to
show what compression alone buys. Predictions come from latencies measured on this host times
each class's fp32 factor and, for int8, the ratio of this host's int8 gain to the class's
(``device_configs/runtimes/kernel-gains.yaml``), so they are only as good as both.

    python -m benchmarks.run planning [--quick]
"""

from __future__ import annotations

import gc
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils

from controller import planning
from controller.db import open_db
from controller.selection import Candidate, Decision, DeviceNeeds, select_variant
from device_configs.schema import DeviceProfile, load_profiles
from model_store.catalog import Catalog, Declared

if TYPE_CHECKING:
    from benchmarks.rig import Outcome

log = logging.getLogger(__name__)

NAME = "planning"
TITLE = "Plan cost at 1k and 10k devices; plan energy vs fp32 everywhere"
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "model_store" / "samples"
MODEL = "vibration-ae"
VERSION = f"{MODEL}:1.0.0"
SIZES = (1_000, 10_000)
VARIANTS = 20
TARGET_RATIO = 11.0  # t(10k) / t(1k): 10x the devices at most ~10x the time (10 +- 10%)
LINEAR_BAND = (9.0, 11.0)
TARGET_SAVING = 0.40  # the plan's fleet energy per inference at least 40% below fp32's
DEMO_FLEET = ("rpi4", "jetson-orin-nano", "x86-ipc")  # the classes of `greenfleet demo`


# ------------------------------------------------------------------------------------ scaling


def synthetic_candidates(count: int = VARIANTS) -> list[Candidate]:
    """``count`` variants of one model version that between them meet every selection rule.

    Formats alternate onnx/tflite, precisions cycle fp32/fp16/int8/mixed; sizes run from 40 KiB
    to ~2.7 GiB (past the storage of most classes), peak memory from 6 MiB to ~1.3 GiB (past
    their model memory), host latency from 0.3 to ~8 ms (past some latency budgets once scaled).
    Two are ineligible and one has no latency for its runtime.
    """
    precisions = ("fp32", "fp16", "int8", "mixed")
    found = []
    for i in range(count):
        fmt = "onnx" if i % 2 == 0 else "tflite"
        runtime = "onnxruntime" if fmt == "onnx" else "litert"
        found.append(
            Candidate(
                id=f"synthetic:1.0.0+v{i:02d}",
                format=fmt,
                precision="fp32" if i == 0 else precisions[i % 4],
                size_bytes=int(40 * 1024 * 1.8**i),
                peak_memory_mb=6.0 * 1.33**i,
                host_latency_ms={}
                if i == 13
                else {runtime: round(0.3 + 0.4 * ((i * 7) % count), 1)},
                eligible=i not in (5, 11),
                reason="accuracy 0.81 is below the accuracy floor 0.9" if i in (5, 11) else None,
                is_reference=i == 0,
            )
        )
    return found


def device_rows(count: int, profiles: Mapping[str, DeviceProfile]) -> list[dict[str, Any]]:
    """``count`` device rows as the registry holds them, cycling through the classes."""
    classes = sorted(profiles)
    rows = []
    for i in range(count):
        cls = classes[i % len(classes)]
        rows.append(
            {
                "id": f"dev-{i:05d}",
                "device_class": cls,
                "labels": "{}",
                "runtimes": json.dumps([r.value for r in profiles[cls].runtimes]),
                "active_model": None,
            }
        )
    return rows


def _timed(work: Callable[[], object], *, gc_paused: bool = False) -> tuple[float, int]:
    """Seconds one call of ``work`` takes, and how many full (generation 2) garbage
    collections ran meanwhile. Its result stays alive until the clock stops, as the plan's
    list of decisions does; ``gc_paused`` turns the cyclic collector off for the call."""
    gc.collect()
    full_before = gc.get_stats()[2]["collections"]
    if gc_paused:
        gc.disable()
    try:
        started = time.perf_counter()
        result = work()
        elapsed = time.perf_counter() - started
    finally:
        gc.enable()
    full = gc.get_stats()[2]["collections"] - full_before
    del result
    return elapsed, full


def _select_all(needs: Sequence[DeviceNeeds], candidates: Sequence[Candidate]) -> list[Decision]:
    return [select_variant(n, candidates, {}) for n in needs]


def _plan_loop(
    rows: Sequence[Mapping[str, Any]],
    profiles: Mapping[str, DeviceProfile],
    candidates: Sequence[Candidate],
) -> list[Decision]:
    """What ``planning.plan`` does per device, without the database and the catalog."""
    decisions = []
    for row in rows:
        needs = planning.device_needs(row, profiles.get(row["device_class"]))
        assert needs is not None
        decisions.append(select_variant(needs, candidates, {}))
    return decisions


def scaling(
    quick: bool,
    profiles: Mapping[str, DeviceProfile],
    db: sqlite_utils.Database,
    catalog: Catalog,
) -> dict[str, Any]:
    """Median seconds per method and fleet size, interleaved so that noise lands on both."""
    candidates = synthetic_candidates()
    rows = {n: device_rows(n, profiles) for n in SIZES}
    needs: dict[int, list[DeviceNeeds]] = {}
    for n in SIZES:
        built = [planning.device_needs(r, profiles[r["device_class"]]) for r in rows[n]]
        needs[n] = [x for x in built if x is not None]
    real = len(planning.candidates(catalog, VERSION))
    methods: dict[str, tuple[str, Callable[[int], object], bool]] = {
        "select_variant": (
            f"`select_variant`, {VARIANTS} synthetic variants, DeviceNeeds built beforehand",
            lambda n: _select_all(needs[n], candidates),
            False,
        ),
        "select_variant_gc_paused": (
            "the same with Python's cyclic GC paused",
            lambda n: _select_all(needs[n], candidates),
            True,
        ),
        "plan_loop": (
            f"`device_needs` + `select_variant` per row, {VARIANTS} synthetic variants",
            lambda n: _plan_loop(rows[n], profiles, candidates),
            False,
        ),
        "plan": (
            f"`planning.plan`: SQLite telemetry query, catalog read, {real} real variants",
            lambda n: planning.plan(db, catalog, profiles, rows[n], VERSION),
            False,
        ),
    }
    for _, work, _ in methods.values():  # warm up imports, caches and the allocator
        work(SIZES[0])
    reps = 3 if quick else 7
    times: dict[str, dict[int, list[float]]] = {m: {n: [] for n in SIZES} for m in methods}
    full_gcs: dict[str, dict[int, list[int]]] = {m: {n: [] for n in SIZES} for m in methods}
    for rep in range(reps):
        order = SIZES if rep % 2 == 0 else SIZES[::-1]
        for method, (_, work, paused) in methods.items():
            for n in order:
                seconds, full = _timed(partial(work, n), gc_paused=paused)
                times[method][n].append(seconds)
                full_gcs[method][n].append(full)
    result: dict[str, Any] = {"repetitions": reps, "variants": VARIANTS, "methods": {}}
    for method, (what, _, _) in methods.items():
        medians = {n: statistics.median(times[method][n]) for n in SIZES}
        small, large = SIZES
        result["methods"][method] = {
            "what": what,
            "median_s": {str(n): medians[n] for n in SIZES},
            "per_device_us": {str(n): medians[n] / n * 1e6 for n in SIZES},
            "runs_s": {str(n): times[method][n] for n in SIZES},
            "full_gcs": {str(n): full_gcs[method][n] for n in SIZES},
            "ratio": medians[large] / medians[small],
        }
    return result


def shape(ratio: float) -> str:
    low, high = LINEAR_BAND
    if ratio > high:
        return "worse than linear"
    return "linear" if ratio >= low else "sub-linear (fixed costs amortized)"


# ------------------------------------------------------------------------------- fleet energy


def build_samples(home: Path, quick: bool) -> tuple[sqlite_utils.Database, Catalog]:
    """The vibration-ae sample through the model store, as ``greenfleet demo`` puts it."""
    from model_store.pipeline import compress
    from model_store.samples.calibration import calibration_set
    from model_store.signing import Signer

    db = open_db(home / "controller.db")
    catalog = Catalog(db, home / "store")
    signer = Signer.load_or_create(home / "keys")
    catalog.add(
        SAMPLES_DIR / f"{MODEL}.onnx",
        MODEL,
        "1.0.0",
        declared=Declared.from_json(SAMPLES_DIR / f"{MODEL}.json"),
    )
    catalog.add(SAMPLES_DIR / f"{MODEL}.tflite", MODEL, "1.0.0+tflite")
    report = compress(
        catalog,
        signer,
        VERSION,
        calibration_set(MODEL, n=400),
        home / "scratch",
        latency_runs=50 if quick else 100,
    )
    for variant, why in report.failures:
        log.info("compress: %s not built: %s", variant, why)
    return db, catalog


def _class_rows(
    classes: Sequence[str], profiles: Mapping[str, DeviceProfile]
) -> list[dict[str, Any]]:
    """One device row per class, reporting every runtime its profile allows."""
    return [
        {
            "id": f"{cls}-01",
            "device_class": cls,
            "labels": "{}",
            "runtimes": json.dumps([r.value for r in profiles[cls].runtimes]),
            "active_model": None,
        }
        for cls in classes
    ]


def _per_device(planned: Sequence[planning.PlannedDevice]) -> list[dict[str, Any]]:
    out = []
    for p in planned:
        chosen, ref = p.decision.estimate, p.decision.reference
        out.append(
            {
                "class": p.device_class,
                "chosen": p.decision.chosen.partition("+")[2] if p.decision.chosen else None,
                "latency_ms": chosen.latency_ms if chosen else None,
                "energy_j": chosen.energy_j if chosen else None,
                "fp32_energy_j": ref.energy_j if ref else None,
                "saving": 1 - chosen.energy_j / ref.energy_j if chosen and ref else None,
                "reason": p.decision.reason,
            }
        )
    return out


def _saving(planned: Sequence[planning.PlannedDevice]) -> dict[str, Any]:
    """``planning.fleet_saving`` as plain numbers (None where no device has both figures)."""
    found = planning.fleet_saving(planned)
    if found is None:
        return {"devices": 0, "plan_j": None, "fp32_j": None, "saving": None}
    return {
        "devices": found.devices,
        "plan_j": found.plan_j,
        "fp32_j": found.fp32_j,
        "saving": found.saving,
    }


def fleet_energy(
    db: sqlite_utils.Database,
    catalog: Catalog,
    profiles: Mapping[str, DeviceProfile],
    version: str = VERSION,
) -> dict[str, Any]:
    """The plan against fp32 everywhere, with the catalog as built and with compression only."""
    every = sorted(profiles)
    planned = planning.plan(db, catalog, profiles, _class_rows(every, profiles), version)
    demo = [p for p in planned if p.device_class in DEMO_FLEET]
    # What compress built: neither the source file (plan never offers it once variants exist)
    # nor the imported TFLite sample.
    built = [
        planning.candidate(v)
        for v in catalog.variants(version)
        if v.variant and v.technique != "imported"
    ]
    compressed_only = []
    for row in _class_rows(every, profiles):
        needs = planning.device_needs(row, profiles[row["device_class"]])
        assert needs is not None
        compressed_only.append(
            planning.PlannedDevice(
                row["id"], row["device_class"], version, select_variant(needs, built, {})
            )
        )
    host = {
        c.id.partition("+")[2]: {
            "format": c.format,
            "precision": c.precision,
            "size_bytes": c.size_bytes,
            "host_ms": next(iter(c.host_latency_ms.values()), None),
            "eligible": c.eligible,
        }
        for c in planning.candidates(catalog, version)
    }
    return {
        "variants": host,
        "devices": _per_device(planned),
        "devices_compressed_only": _per_device(compressed_only),
        "demo": _saving(demo),
        "all_classes": _saving(planned),
        "demo_compressed_only": _saving(
            [p for p in compressed_only if p.device_class in DEMO_FLEET]
        ),
        "all_classes_compressed_only": _saving(compressed_only),
    }


# ------------------------------------------------------------------------------------ report


def _mj(joules: float | None) -> str:
    return "-" if joules is None else f"{joules * 1000:.4f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def report(scale: dict[str, Any], fleet: dict[str, Any]) -> str:
    """The results as Markdown tables, as the README shows them."""
    small, large = (str(n) for n in SIZES)
    lines = [
        f"Scaling ({scale['repetitions']} interleaved repetitions, medians):",
        "",
        f"| method | what is timed | {small} devices | {large} devices "
        f"| µs/device ({small} / {large}) | full GCs ({small} / {large}) | ratio | shape |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, m in scale["methods"].items():
        gcs = " / ".join(f"{statistics.median(m['full_gcs'][n]):g}" for n in (small, large))
        lines.append(
            f"| {method} | {m['what']} | {m['median_s'][small] * 1000:.1f} ms "
            f"| {m['median_s'][large] * 1000:.1f} ms | {m['per_device_us'][small]:.1f} / "
            f"{m['per_device_us'][large]:.1f} | {gcs} | {m['ratio']:.2f} | {shape(m['ratio'])} |"
        )
    lines += [
        "",
        f"Variants of {VERSION} as built and profiled on this host:",
        "",
        "| variant | format | precision | bytes | host p50 ms | eligible |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in fleet["variants"].items():
        host_ms = "-" if v["host_ms"] is None else f"{v['host_ms']:.4f}"
        lines.append(
            f"| {name} | {v['format']} | {v['precision']} | {v['size_bytes']} | {host_ms} "
            f"| {'yes' if v['eligible'] else 'no'} |"
        )
    lines += [
        "",
        "Plan per class (one device each):",
        "",
        "| class | chosen | predicted ms | mJ/inf | fp32 mJ/inf | saving "
        "| compress-only choice | its saving |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d, c in zip(fleet["devices"], fleet["devices_compressed_only"], strict=True):
        latency = "-" if d["latency_ms"] is None else f"{d['latency_ms']:.4f}"
        lines.append(
            f"| {d['class']}{' (demo)' if d['class'] in DEMO_FLEET else ''} "
            f"| {d['chosen'] or 'none'} | {latency} | {_mj(d['energy_j'])} "
            f"| {_mj(d['fp32_energy_j'])} | {_pct(d['saving'])} | {c['chosen'] or 'none'} "
            f"| {_pct(c['saving'])} |"
        )
    lines += [
        "",
        "| fleet | devices | plan mJ/inf | fp32 everywhere mJ/inf | saving | target |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, label in (
        ("demo", "demo fleet (rpi4, jetson-orin-nano, x86-ipc)"),
        ("all_classes", "all nine classes"),
        ("demo_compressed_only", "demo fleet, compress-built variants only"),
        ("all_classes_compressed_only", "all nine classes, compress-built variants only"),
    ):
        f = fleet[key]
        met = f["saving"] is not None and f["saving"] >= TARGET_SAVING
        lines.append(
            f"| {label} | {f['devices']} | {_mj(f['plan_j'])} | {_mj(f['fp32_j'])} "
            f"| {_pct(f['saving'])} | {'met' if met else 'not met'} |"
        )
    return "\n".join(lines)


def run(quick: bool) -> Outcome:
    from benchmarks.rig import outcome

    started = time.monotonic()
    profiles = load_profiles()
    with tempfile.TemporaryDirectory(prefix="gf-bench-planning-") as tmp:
        build_started = time.monotonic()
        db, catalog = build_samples(Path(tmp), quick)
        build_s = time.monotonic() - build_started
        fleet = fleet_energy(db, catalog, profiles)
        scale = scaling(quick, profiles, db, catalog)
        db.close()
    print(report(scale, fleet), end="\n\n", flush=True)
    primary = scale["methods"]["plan"]  # what the controller runs
    ratio = float(primary["ratio"])
    saving = fleet["demo"]["saving"]
    linear_ok = ratio <= TARGET_RATIO
    saving_ok = saving is not None and saving >= TARGET_SAVING
    small, large = (str(n) for n in SIZES)
    return outcome(
        NAME,
        TITLE,
        measured=(
            f"planning.plan, {large} devices "
            f"{primary['median_s'][large] * 1000:.0f} ms ({shape(ratio)}); demo fleet "
            f"{_pct(saving)} below fp32 (compress-only "
            f"{_pct(fleet['demo_compressed_only']['saving'])})"
        ),
        baseline=(
            f"{small} devices {primary['median_s'][small] * 1000:.1f} ms; fp32 everywhere "
            f"{_mj(fleet['demo']['fp32_j'])} mJ/inf"
        ),
        ratio=ratio,
        target=f"t(10k)/t(1k) <= {TARGET_RATIO:g}; saving >= {TARGET_SAVING:.0%}",
        passed=linear_ok and saving_ok,
        numbers={
            "seconds": round(time.monotonic() - started, 1),
            "build_s": round(build_s, 1),
            "linear": linear_ok,
            "saving_met": saving_ok,
            "scaling": scale,
            "fleet": fleet,
        },
    )
