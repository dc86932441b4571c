"""Choosing a variant for a device: hard constraints, then least energy per inference.

A pure function of (device, candidate variants, measured telemetry): no database, no clock, no
I/O, so every rule is tested table-driven. For each candidate it predicts latency and energy
per inference on the device (from telemetry of the same device class when enough has arrived,
else from the variant's profile on the controller host scaled by the class's speed factor),
rules out what cannot or must not run there, and picks the least energy within the latency
budget. Every decision says why, lists the runners-up, and names the constraint that ruled
each other candidate out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Precisions a variant needs the device to support ("mixed" = int8 kernels with fp32 parts).
REQUIRED_PRECISIONS: Mapping[str, frozenset[str]] = {
    "fp32": frozenset({"fp32"}),
    "fp16": frozenset({"fp16"}),
    "int8": frozenset({"int8"}),
    "mixed": frozenset({"int8", "fp32"}),
}
# The host runtime whose latency stands for each model format.
RUNTIME_OF_FORMAT: Mapping[str, str] = {"onnx": "onnxruntime", "tflite": "litert"}
MIN_MEASURED_INFERENCES = 200  # telemetry replaces the profile estimate from this many on
SWITCH_MARGIN = 0.10  # a running variant is replaced only by one at least 10% cheaper
# Profiles are noisy by a few percent: among variants this close in energy, the smaller file
# wins (less to download and store), so plans do not flip with measurement noise.
NEAR_EQUAL = 0.05


@dataclass(frozen=True)
class DeviceNeeds:
    """What selection needs to know about one device (its profile, its agent, its limits)."""

    id: str
    device_class: str
    runtimes: frozenset[str]  # what the agent reported it can load
    precisions: frozenset[str]  # what the hardware class should run
    model_memory_mb: float
    storage_mb: float
    latency_budget_ms: float
    speed: Mapping[str, float]  # precision -> latency multiplier against the controller host
    active_w_per_core: float
    current: str | None = None  # the variant it runs now


@dataclass(frozen=True)
class Candidate:
    """A variant of the model version, as measured by the model store."""

    id: str
    format: str
    precision: str
    size_bytes: int
    peak_memory_mb: float | None
    host_latency_ms: Mapping[str, float]  # runtime -> p50 on the controller host
    eligible: bool
    reason: str | None = None
    is_reference: bool = False  # the fp32 baseline savings are measured against
    macs: int | None = None  # multiply-accumulates per inference, from the profile


@dataclass(frozen=True)
class Measured:
    """Telemetry of one variant on one device class."""

    inferences: int
    energy_per_inference_j: float | None
    latency_p95_ms: float | None


@dataclass(frozen=True)
class Estimate:
    latency_ms: float
    energy_j: float
    source: str  # "profile" or "telemetry"


@dataclass(frozen=True)
class Decision:
    """The choice for one device, with everything an operator needs to trust it."""

    device: str
    chosen: str | None
    estimate: Estimate | None
    reason: str
    runners_up: tuple[tuple[str, Estimate], ...] = ()
    ruled_out: tuple[tuple[str, str], ...] = ()
    reference: Estimate | None = None  # fp32 on this device, for the saving
    estimates: Mapping[str, Estimate] = field(default_factory=dict)


def speed_factor(device: DeviceNeeds, precision: str) -> float:
    """How much slower than the controller host this device runs a variant of ``precision``."""
    slowest = max(device.speed.values(), default=1.0)  # no factor declared: assume the worst
    if precision == "mixed":
        return max(device.speed.get("int8", slowest), device.speed.get("fp32", slowest))
    return device.speed.get(precision, slowest)


def estimate(
    device: DeviceNeeds, candidate: Candidate, measured: Measured | None
) -> Estimate | None:
    """Predicted latency and energy per inference of ``candidate`` on ``device``."""
    if (
        measured is not None
        and measured.inferences >= MIN_MEASURED_INFERENCES
        and measured.energy_per_inference_j is not None
        and measured.latency_p95_ms is not None
    ):
        return Estimate(measured.latency_p95_ms, measured.energy_per_inference_j, "telemetry")
    host = candidate.host_latency_ms.get(RUNTIME_OF_FORMAT.get(candidate.format, ""))
    if host is None:
        return None
    latency_ms = host * speed_factor(device, candidate.precision)
    # One core busy for the inference: the same model the agent's estimate meter uses.
    energy_j = device.active_w_per_core * latency_ms / 1000.0
    return Estimate(latency_ms, energy_j, "profile")


def field_correction(
    device: DeviceNeeds, candidates: Sequence[Candidate], measured: Mapping[str, Measured]
) -> tuple[float, float]:
    """(energy, latency) factors from profile estimates to what this class really measured.

    Profiles are timed in a tight loop on the controller; devices infer now and then, with cold
    caches and other work beside them, so every variant costs more in the field. Comparing one
    variant's telemetry with another's profile would then always favour the unmeasured one
    and the plan would hop from variant to variant. Scaling profile estimates by the median
    measured/profile ratio of the variants that have telemetry keeps the comparison fair.
    """
    energy: list[float] = []
    latency: list[float] = []
    for candidate in candidates:
        seen = measured.get(candidate.id)
        if seen is None:
            continue
        guess = estimate(device, candidate, None)
        observed = estimate(device, candidate, seen)
        if guess is None or observed is None or observed.source != "telemetry":
            continue
        if guess.energy_j > 0:
            energy.append(observed.energy_j / guess.energy_j)
        if guess.latency_ms > 0:
            latency.append(observed.latency_ms / guess.latency_ms)
    return _median(energy), _median(latency)


def _median(values: list[float]) -> float:
    if not values:
        return 1.0
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def constraint(device: DeviceNeeds, candidate: Candidate) -> str | None:
    """The first hard constraint ``candidate`` breaks on ``device``, or None."""
    if not candidate.eligible:
        return f"ineligible: {candidate.reason or 'below the accuracy floor'}"
    if candidate.format not in device.runtimes:
        return f"no {candidate.format} runtime on the device"
    needed = REQUIRED_PRECISIONS.get(candidate.precision, frozenset({candidate.precision}))
    if not needed <= device.precisions:
        missing = ", ".join(sorted(needed - device.precisions))
        return f"{candidate.precision} needs {missing}, which {device.device_class} does not run"
    if candidate.size_bytes / 2**20 > device.storage_mb:
        return (
            f"{candidate.size_bytes / 2**20:.1f} MiB does not fit {device.storage_mb:g} MiB storage"
        )
    if candidate.peak_memory_mb is not None and candidate.peak_memory_mb > device.model_memory_mb:
        return (
            f"needs {candidate.peak_memory_mb:.1f} MiB at run time, "
            f"{device.model_memory_mb:g} MiB available"
        )
    return None


def select_variant(
    device: DeviceNeeds,
    candidates: Sequence[Candidate],
    measured: Mapping[str, Measured],
) -> Decision:
    """The least-energy variant within the device's limits; ``measured`` is keyed by variant id."""
    ruled_out: list[tuple[str, str]] = []
    fitting: list[tuple[str, Estimate]] = []
    estimates: dict[str, Estimate] = {}
    reference: Estimate | None = None
    energy_factor, latency_factor = field_correction(device, candidates, measured)
    fallback_reference: Estimate | None = None
    for candidate in candidates:
        guess = estimate(device, candidate, measured.get(candidate.id))
        corrected = (energy_factor, latency_factor) != (1.0, 1.0)
        if guess is not None and guess.source == "profile" and corrected:
            guess = Estimate(
                guess.latency_ms * latency_factor,
                guess.energy_j * energy_factor,
                f"profile x{energy_factor:.2f} (field correction)",
            )
        problem = constraint(device, candidate)
        if guess is not None:
            estimates[candidate.id] = guess
            # fp32 as the device would run it: the reference if it can, else an fp32 of a
            # format it has (a TFLite build on a TFLite-only gateway)
            runnable = problem is None and guess.latency_ms <= device.latency_budget_ms
            if candidate.is_reference and runnable:
                reference = guess
            elif reference is None and candidate.precision == "fp32" and runnable:
                fallback_reference = fallback_reference or guess
        if problem is None and guess is None:
            problem = f"not profiled on {RUNTIME_OF_FORMAT.get(candidate.format, candidate.format)}"
        if problem is None and guess is not None and guess.latency_ms > device.latency_budget_ms:
            problem = (
                f"predicted {guess.latency_ms:.2f} ms exceeds the "
                f"{device.latency_budget_ms:g} ms latency budget"
            )
        if problem is not None:
            ruled_out.append((candidate.id, problem))
        elif guess is not None:
            fitting.append((candidate.id, guess))
    reference = reference or fallback_reference
    if not fitting:
        return Decision(
            device.id,
            None,
            None,
            "no variant fits: " + "; ".join(f"{c}: {why}" for c, why in ruled_out)
            if ruled_out
            else "no variants to choose from",
            ruled_out=tuple(ruled_out),
            reference=reference,
            estimates=estimates,
        )
    fitting.sort(key=lambda item: (item[1].energy_j, item[1].latency_ms, item[0]))
    sizes = {c.id: c.size_bytes for c in candidates}
    cheapest = fitting[0][1].energy_j
    near = [item for item in fitting if item[1].energy_j <= cheapest * (1 + NEAR_EQUAL)]
    best_id, best = min(near, key=lambda item: (sizes[item[0]], item[1].energy_j, item[0]))
    reason = (
        f"least energy per inference ({best.energy_j * 1000:.3f} mJ, {best.source}) within "
        f"{device.latency_budget_ms:g} ms"
    )
    current = next(((c, e) for c, e in fitting if c == device.current), None)
    saving_too_small = current is not None and best.energy_j > current[1].energy_j * (
        1 - SWITCH_MARGIN
    )
    if current is not None and current[0] != best_id and saving_too_small:
        best_id, best = current
        reason = (
            f"keeps {best_id}: the cheapest alternative saves less than "
            f"{SWITCH_MARGIN:.0%} energy per inference"
        )
    runners_up = tuple(item for item in fitting if item[0] != best_id)
    return Decision(
        device.id,
        best_id,
        best,
        reason,
        runners_up=runners_up,
        ruled_out=tuple(ruled_out),
        reference=reference,
        estimates=estimates,
    )


@dataclass(frozen=True)
class FallbackDecision:
    """The variant a device keeps staged as its fallback tier, or None, and why."""

    device: str
    chosen: str | None
    reason: str


def footprint(device: DeviceNeeds, candidate: Candidate) -> tuple[float, float, float]:
    """How heavy a variant is on ``device``: file size, then MACs, then predicted latency.

    The fallback tier serves when the active model broke the latency or power budget, errored,
    or crash-looped; what makes it likely to survive there is being small and cheap to run.
    Unknown MACs or latency sort last.
    """
    guess = estimate(device, candidate, None)
    return (
        float(candidate.size_bytes),
        float(candidate.macs) if candidate.macs is not None else math.inf,
        guess.latency_ms if guess is not None else math.inf,
    )


def select_fallback(
    device: DeviceNeeds, candidates: Sequence[Candidate], active: str
) -> FallbackDecision:
    """The smallest variant ``device`` can run that is strictly lighter than ``active``.

    ``candidates`` are the variants of the version ``active`` belongs to. The hard constraints
    are select_variant's (eligibility, runtime, precision, storage, memory); the latency
    budget and energy are not, because the fallback tier only has to answer, and cheaper than
    the active one. A variant no lighter than the active one would not help when the active
    one is too slow or too hungry, so then there is no fallback (None) and the agent goes
    straight from last-good to the rule baseline. The rule baseline itself is never chosen:
    it has no file (size 0); the agent gets it in every manifest.
    """
    by_id = {c.id: c for c in candidates}
    current = by_id.get(active)
    if current is None:
        return FallbackDecision(
            device.id, None, f"the active {active} is not a variant of its model version"
        )
    ceiling = footprint(device, current)
    lighter: list[tuple[tuple[float, float, float], str]] = []
    skipped: list[str] = []
    for candidate in candidates:
        if candidate.id == active or candidate.size_bytes <= 0:
            continue
        problem = constraint(device, candidate)
        if problem is not None:
            skipped.append(f"{candidate.id}: {problem}")
            continue
        weight = footprint(device, candidate)
        if weight < ceiling:
            lighter.append((weight, candidate.id))
    if not lighter:
        why = f"no runnable variant is smaller than the active {active}"
        return FallbackDecision(
            device.id, None, why + ("; " + "; ".join(skipped) if skipped else "")
        )
    (size, macs, _), chosen = min(lighter)
    detail = f"{size / 1024:.0f} KiB" + ("" if math.isinf(macs) else f", {macs:,.0f} MACs")
    return FallbackDecision(
        device.id,
        chosen,
        f"smallest variant it can run ({detail}; active {current.size_bytes / 1024:.0f} KiB)",
    )
