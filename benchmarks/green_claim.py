"""The Green AI claim on models of real size: what ``models compress`` buys, in one run.

Both real-size samples (``visual-inspection``, MobileNetV2 on 96x96 RGB; ``bearing-diagnosis``,
a 1-D CNN on 4096-sample windows) go through the model store as a user's would: ``models add``
with their metadata, ``compress`` with a calibration set, profiling and judging on its held-out
part. Then, against fp32 in the same run and the same runtime:

* the best int8 variant (eligible, smallest) of each: size and latency ratio (issue 16's target
  for the vision model: <= 0.27x size and <= 0.55x latency);
* the smallest eligible student: MACs ratio (target <= 0.2x at or above the accuracy floor);
* the fleet plan for one device of each of the nine classes and for the demo fleet, from the
  variants compress built alone (no imported file), predicted energy per inference against fp32
  everywhere (target: >= 60% less).

Width students and TFLite variants need TensorFlow: run it where the ``tflite-build`` extra is
installed to see them; without it they are listed as not built and the figures are what is left.
The plan's predictions are host latencies times each class's fp32 factor and, for int8, the
ratio of the build host's int8 gain to the class's (``device_configs/runtimes/kernel-gains.yaml``),
so they are only as good as both.

    python -m benchmarks.run green_claim [--quick]
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.planning import DEMO_FLEET, fleet_energy
from controller.db import open_db
from device_configs.schema import load_profiles
from model_store.catalog import Catalog, Declared, Variant
from model_store.pipeline import compress
from model_store.samples.calibration import calibration_set
from model_store.signing import Signer

if TYPE_CHECKING:
    from benchmarks.rig import Outcome

log = logging.getLogger(__name__)

NAME = "green_claim"
TITLE = "Compression on real-size samples: int8, students, fleet energy vs fp32"
SAMPLES_DIR = Path(__file__).resolve().parents[1] / "model_store" / "samples"
MODELS = ("visual-inspection", "bearing-diagnosis")
CALIBRATION = {"visual-inspection": 1500, "bearing-diagnosis": 1200}
QUICK_CALIBRATION = {"visual-inspection": 300, "bearing-diagnosis": 300}
INT8_SIZE, INT8_LATENCY, STUDENT_MACS, FLEET_SAVING = 0.27, 0.55, 0.2, 0.60
RUNTIME = {"onnx": "onnxruntime", "tflite": "litert"}
BASELINE = {"onnx": "fp32", "tflite": "tflite-fp32"}


def _p50(v: Variant) -> float | None:
    if v.profile is None:
        return None
    stats = v.profile.latency.get(RUNTIME[v.format.value])
    return None if stats is None else stats.p50_ms


def summarise(variants: list[Variant]) -> dict[str, Any]:
    """Each variant against fp32 of its own runtime, the best int8 and the smallest student."""
    by_name = {v.variant: v for v in variants if v.variant}
    rows: list[dict[str, Any]] = []
    for v in sorted(by_name.values(), key=lambda v: v.variant or ""):
        base = by_name.get(BASELINE[v.format.value])
        ms, base_ms = _p50(v), None if base is None else _p50(base)
        macs = v.profile.macs if v.profile else None
        base_macs = base.profile.macs if base is not None and base.profile else None
        fidelity = v.profile.fidelity if v.profile else None
        rows.append(
            {
                "variant": v.variant,
                "format": v.format.value,
                "precision": v.precision,
                "size_ratio": None if base is None else round(v.size / base.size, 3),
                "latency_ratio": None if ms is None or not base_ms else round(ms / base_ms, 3),
                "p50_ms": ms,
                "macs_ratio": None if not macs or not base_macs else round(macs / base_macs, 3),
                "accuracy": None if fidelity is None else fidelity.metric_value,
                "agreement": None if fidelity is None else fidelity.agreement,
                "eligible": v.eligible,
                "reason": v.reason,
            }
        )
    eligible = [r for r in rows if r["eligible"] and r["size_ratio"] is not None]
    int8 = [r for r in eligible if r["precision"] == "int8"]
    best_int8 = min(int8, key=lambda r: (r["latency_ratio"] or 9, r["size_ratio"]), default=None)
    students = [
        r
        for r in eligible
        if (r["variant"] or "").startswith("student") and r["macs_ratio"] is not None
    ]
    smallest = min(students, key=lambda r: r["macs_ratio"], default=None)
    return {"rows": rows, "best_int8": best_int8, "smallest_student": smallest}


def measure(quick: bool) -> dict[str, Any]:
    profiles = load_profiles()
    sizes = QUICK_CALIBRATION if quick else CALIBRATION
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gf-bench-green-") as tmp:
        root = Path(tmp)
        db = open_db(root / "greenfleet.db")
        catalog = Catalog(db, root / "store")
        signer = Signer.load_or_create(root / "keys")
        for name in MODELS:
            catalog.add(
                SAMPLES_DIR / f"{name}.onnx",
                name,
                "1.0.0",
                declared=Declared.from_json(SAMPLES_DIR / f"{name}.json"),
            )
            started = time.monotonic()
            report = compress(
                catalog,
                signer,
                f"{name}:1.0.0",
                calibration_set(name, n=sizes[name]),
                root / "work",
                latency_runs=20 if quick else 50,
            )
            seconds = time.monotonic() - started
            summary = summarise(catalog.variants(report.version.id))
            fleet = fleet_energy(db, catalog, profiles, f"{name}:1.0.0")
            out[name] = {
                **summary,
                "compress_s": round(seconds, 1),
                "not_built": [f"{n}: {why[:160]}" for n, why in report.failures],
                "fleet": {
                    "demo": fleet["demo_compressed_only"],
                    "all_classes": fleet["all_classes_compressed_only"],
                    "devices": fleet["devices_compressed_only"],
                },
            }
            log.info("%s: compress %.0f s", name, seconds)
        db.close()
    return out


def _f(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def report(results: dict[str, Any]) -> str:
    lines = []
    for name, r in results.items():
        lines += [
            f"{name} (compress {r['compress_s']:.0f} s), against fp32 of the same runtime:",
            "",
            "| variant | fmt | prec | size x | latency x | p50 ms | MACs x | accuracy | agree "
            "| ok |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['variant']} | {row['format']} | {row['precision']} "
                f"| {_f(row['size_ratio'])} | {_f(row['latency_ratio'])} | {_f(row['p50_ms'])} "
                f"| {_f(row['macs_ratio'])} | {_f(row['accuracy'])} | {_f(row['agreement'])} "
                f"| {'yes' if row['eligible'] else 'no'} |"
            )
        for line in r["not_built"]:
            lines.append(f"\nnot built: {line}")
        fleet = r["fleet"]
        lines += [
            "",
            "| fleet (compress-built variants only) | devices | saving vs fp32 everywhere |",
            "| --- | --- | --- |",
            f"| demo fleet ({', '.join(DEMO_FLEET)}) | {fleet['demo']['devices']} "
            f"| {_f(fleet['demo']['saving'], '{:.1%}')} |",
            f"| all nine classes | {fleet['all_classes']['devices']} "
            f"| {_f(fleet['all_classes']['saving'], '{:.1%}')} |",
            "",
            "| class | chosen | saving |",
            "| --- | --- | --- |",
        ]
        for d in fleet["devices"]:
            lines.append(
                f"| {d['class']} | {d['chosen'] or 'none'} | {_f(d['saving'], '{:.1%}')} |"
            )
        lines.append("")
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    vision = results["visual-inspection"]
    int8, student = vision["best_int8"], vision["smallest_student"]
    out = {
        "int8_size": int8 is not None and int8["size_ratio"] <= INT8_SIZE,
        "int8_latency": int8 is not None and (int8["latency_ratio"] or 9) <= INT8_LATENCY,
        "student_macs": student is not None and student["macs_ratio"] <= STUDENT_MACS,
    }
    for name, r in results.items():
        for fleet in ("demo", "all_classes"):
            saving = r["fleet"][fleet]["saving"]
            out[f"{name}_{fleet}_saving"] = saving is not None and saving >= FLEET_SAVING
    return out


def run(quick: bool) -> Outcome:
    from benchmarks.rig import outcome

    started = time.monotonic()
    results = measure(quick)
    print(report(results), end="\n\n", flush=True)
    met = verdicts(results)
    vision = results["visual-inspection"]
    int8, student = vision["best_int8"], vision["smallest_student"]
    saving = vision["fleet"]["all_classes"]["saving"]
    return outcome(
        NAME,
        TITLE,
        measured=(
            f"visual-inspection: best int8 {_f(int8 and int8['size_ratio'])}x size, "
            f"{_f(int8 and int8['latency_ratio'])}x latency; smallest student "
            f"{_f(student and student['macs_ratio'])}x MACs; nine classes "
            f"{_f(saving, '{:.1%}')} less energy (compress-built only)"
        ),
        baseline="fp32 of the same runtime, same run",
        ratio=float(int8["latency_ratio"] or 0) if int8 else 0.0,
        target=(
            f"int8 <= {INT8_SIZE}x size and <= {INT8_LATENCY}x latency; student <= "
            f"{STUDENT_MACS}x MACs; fleet >= {FLEET_SAVING:.0%} less"
        ),
        passed=all(met.values()),
        numbers={"seconds": round(time.monotonic() - started, 1), "met": met, **results},
    )
