"""Calibration sets for the two sample models, from data their training never saw.

    python -m model_store.samples.calibration MODEL OUT.npz [--n N] [--seed S]

``vibration-ae``: raw 512-sample windows from simulated machines across the model's speed range,
about 70% from healthy machines (label 0) and the rest from machines with an outer-race,
inner-race or ball fault at severities 0.3 to 1.0 (label 1). Every window of a machine shares
its label, as in a plant. ``surface-cnn``: 32x32 patches with their class index, balanced.
``visual-inspection``: 96x96 RGB part images with their class, balanced. ``bearing-diagnosis``:
4096-sample windows, four from each machine, the four bearing conditions in turn.

Machine and generator seeds are derived from ``seed`` through a :class:`numpy.random.SeedSequence`
tagged for calibration, which lands far outside the small seeds the sample builders train and
evaluate on. The set is shuffled, so the first 70% (building) and the last 30% (held out) of
:class:`~model_store.variants.base.Calibration` both hold every kind of input.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from agent.protocol import FaultKind
from agent.sources.vibration import VibrationSimulator
from model_store.samples import build, build_diagnosis, build_surface
from model_store.samples.inspection import InspectionGenerator
from model_store.samples.surface import SurfaceGenerator
from model_store.variants.base import Calibration

MODELS = ("vibration-ae", "surface-cnn", "visual-inspection", "bearing-diagnosis")
HEALTHY_SHARE = 0.7
WINDOWS_PER_MACHINE = 10
FAULTS = (FaultKind.OUTER_RACE, FaultKind.INNER_RACE, FaultKind.BALL)
SEVERITY_RANGE = (0.3, 1.0)
# Mixed into every derived seed, so calibration streams never coincide with training streams.
_STREAM_TAG = 0xCA11B


def _seeds(seed: int, purpose: int, count: int) -> list[int]:
    """``count`` 31-bit seeds for one purpose; the build scripts' seeds are all below 10000."""
    state = np.random.SeedSequence([_STREAM_TAG, purpose, seed]).generate_state(count)
    return [10_000 + int(s) % (2**31 - 10_000) for s in state]


def vibration_windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows (n, 512) float32 and labels (n,): machines of 10 windows, ~70% healthy."""
    faulty = round(n * (1 - HEALTHY_SHARE))
    counts = [(0, n - faulty), (1, faulty)]
    rng = np.random.default_rng(_seeds(seed, 0, 1)[0])
    machine_seeds = iter(_seeds(seed, 1, 2 * math.ceil(n / WINDOWS_PER_MACHINE) + 2))
    windows = np.empty((n, build.WINDOW), dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    i = 0
    fault_index = 0
    for label, total in counts:
        for start in range(0, total, WINDOWS_PER_MACHINE):
            fault, severity = FaultKind.NONE, 0.0
            if label:
                fault = FAULTS[fault_index % len(FAULTS)]
                fault_index += 1
                severity = float(rng.uniform(*SEVERITY_RANGE))
            sim = VibrationSimulator(
                sample_rate_hz=build.SAMPLE_RATE_HZ,
                window=build.WINDOW,
                rpm=float(rng.uniform(*build.RPM_RANGE)),
                fault=fault,
                severity=severity,
                seed=next(machine_seeds),
            )
            for _ in range(min(WINDOWS_PER_MACHINE, total - start)):
                windows[i] = sim.read()
                labels[i] = label
                i += 1
    order = rng.permutation(n)
    return windows[order], labels[order]


def surface_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, 1, 32, 32) float32 and class labels (n,), balanced and shuffled."""
    generator = SurfaceGenerator(seed=_seeds(seed, 2, 1)[0], size=build_surface.SIZE)
    return generator.batch(n)


def inspection_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, 3, 96, 96) float32 and class labels (n,), balanced and shuffled."""
    return InspectionGenerator(seed=_seeds(seed, 3, 1)[0]).batch(n)


def diagnosis_windows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows (n, 4096) float32 and bearing conditions (n,): machines of 4 windows."""
    machines = -(-n // 4)
    inputs, labels = build_diagnosis.windows(_seeds(seed, 4, 1)[0], machines, 4)
    return inputs[:n], labels[:n]


def calibration_set(model: str, n: int = 600, seed: int = 1234) -> Calibration:
    """A labelled, shuffled calibration set for one of the sample models."""
    if n < 2:
        raise ValueError(f"n must be at least 2, not {n}")
    if model == "vibration-ae":
        inputs, labels = vibration_windows(n, seed)
    elif model == "surface-cnn":
        inputs, labels = surface_images(n, seed)
    elif model == "visual-inspection":
        inputs, labels = inspection_images(n, seed)
    elif model == "bearing-diagnosis":
        inputs, labels = diagnosis_windows(n, seed)
    else:
        raise ValueError(f"unknown sample model {model!r}; expected one of {', '.join(MODELS)}")
    return Calibration(inputs, labels)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m model_store.samples.calibration",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("model", choices=MODELS, help="sample model the set is for")
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("--n", type=int, default=600, help="number of inputs (default 600)")
    parser.add_argument("--seed", type=int, default=1234, help="seed (default 1234)")
    args = parser.parse_args(argv)
    calibration = calibration_set(args.model, args.n, args.seed)
    calibration.save(args.out)
    labels = calibration.labels if calibration.labels is not None else np.empty(0)
    values, counts_per_label = np.unique(labels, return_counts=True)
    counts = ", ".join(f"{int(k)}: {int(v)}" for k, v in zip(values, counts_per_label, strict=True))
    print(f"wrote {args.out}: inputs {list(calibration.inputs.shape)}, labels {{{counts}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
