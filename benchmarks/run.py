"""Run greenfleet's benchmarks and print each against its same-run baseline.

    python -m benchmarks.run [--quick] [--json PATH] [--check | --gate] [NAME ...]

Exit status: 0 when every benchmark ran (targets missed or not, unless ``--check``), 1 with
``--check`` when a target was missed, or with ``--gate`` when a figure crossed its regression
line twice in a row (benchmarks/gate.py; ``make bench-check``), 2 when a benchmark could not run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

import psutil

from benchmarks import gate
from benchmarks.rig import Outcome

BENCHMARKS: dict[str, str] = {
    "model_push": "benchmarks.model_push",
    "inference_overhead": "benchmarks.inference_overhead",
    "agent_memory": "benchmarks.agent_memory",
    "variants": "benchmarks.variants",
    "planning": "benchmarks.planning",
    "green_claim": "benchmarks.green_claim",
    "large_compress": "benchmarks.large_compress",
    "resilience": "benchmarks.resilience",
    "rollout_abort": "benchmarks.rollout_abort",
    "ingest": "benchmarks.ingest",
    "fleet_rollout": "benchmarks.fleet_rollout",
    "telemetry_reads": "benchmarks.telemetry_reads",
    "blob_budget": "benchmarks.blob_budget",
}


def run_one(name: str, quick: bool) -> tuple[Outcome | None, float, str | None]:
    """Run one benchmark; return its outcome (or None and the error) and how long it took."""
    started = time.monotonic()
    try:
        result: Outcome = importlib.import_module(BENCHMARKS[name]).run(quick)
    except Exception:
        return None, time.monotonic() - started, traceback.format_exc()
    return result, time.monotonic() - started, None


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="one round, fewer iterations")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    mode.add_argument(
        "--gate",
        action="store_true",
        help=f"exit 1 if a figure crosses its regression line twice (default names: "
        f"{', '.join(gate.LINES)})",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    names = args.names or list(gate.LINES if args.gate else BENCHMARKS)
    machine = (
        f"{platform.machine()}, {psutil.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"greenfleet benchmarks ({'quick' if args.quick else 'full'}) on {machine}", flush=True)

    rows = [["benchmark", "measured", "baseline (same run)", "ratio", "target", "result", "time"]]
    results: list[dict[str, object]] = []
    gated = [["benchmark", "gated figure", "line", "runs", "result"]]
    crashed = missed = crossed = False
    for name in names:
        print(f"running {name} ...", flush=True)
        result, seconds, error = run_one(name, args.quick)
        if args.gate and result is not None and name in gate.LINES:
            figures = [gate.verdict(name, dict(result))]
            while not figures[-1][1] and len(figures) <= gate.RETRIES:
                print(f"{name} crossed its line ({figures[-1][0]:.3g}); running it again")
                again, more, error = run_one(name, args.quick)
                seconds += more
                if again is None:
                    result = None
                    break
                result = again
                figures.append(gate.verdict(name, dict(result)))
            if result is not None:
                held = figures[-1][1]
                crossed |= not held
                gated.append(
                    [
                        name,
                        ", ".join(f"{f:.3g}" for f, _ in figures),
                        gate.LINES[name].describe(),
                        str(len(figures)),
                        "ok" if held else "REGRESSION",
                    ]
                )
        if result is None:
            crashed = True
            print(error, file=sys.stderr)
            rows.append([name, "-", "-", "-", "-", "ERROR", f"{seconds:.0f}s"])
            results.append({"name": name, "error": error, "seconds": round(seconds, 1)})
            continue
        missed |= not result["passed"]
        rows.append(
            [
                name,
                result["measured"],
                result["baseline"],
                f"{result['ratio']:.2f}",
                result["target"],
                "PASS" if result["passed"] else "FAIL",
                f"{seconds:.0f}s",
            ]
        )
        results.append({**result, "seconds": round(seconds, 1)})
    print()
    print(table(rows))
    if args.gate:
        print("\nperformance gate (benchmarks/gate.py: regression lines, not targets)")
        print(table(gated) if len(gated) > 1 else "no gated benchmark ran")
    if args.json is not None:
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine,
            "mode": "quick" if args.quick else "full",
            "results": results,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    if crashed:
        return 2
    return 1 if (args.check and missed) or (args.gate and crossed) else 0


if __name__ == "__main__":
    sys.exit(main())
