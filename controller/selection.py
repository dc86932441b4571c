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

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from device_configs.kernels import KernelTable, carry_ratio

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
    speed: Mapping[str, float]  # fp32 (and measured overrides) -> latency multiplier
    active_w_per_core: float
    current: str | None = None  # the variant it runs now
    arch: str = "unknown"  # the class's CPU, for its int8/fp16 kernel gains
    features: frozenset[str] = frozenset()
    kernels: KernelTable = field(default_factory=KernelTable)  # gains per (runtime, ...)


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
    host_arch: str = "unknown"  # the CPU its latency was measured on
    host_features: frozenset[str] | None = None  # None: not recorded (older profiles)
    # runtime -> p50 on the build host of the fp32 variant of the same runtime (the version's
    # fp32 ONNX, its fp32 TFLite): how much this variant gained there
    fp32_host_ms: Mapping[str, float] = field(default_factory=dict)


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
    basis: str = ""  # what a profile estimate rests on: factors and where they come from


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


def speed_factor(device: DeviceNeeds, candidate: Candidate) -> tuple[float, str]:
    """How much slower than its build host ``device`` runs ``candidate``, and why.

    fp32 moves by the class's fp32 factor. int8 (and "mixed", int8 kernels with fp32 parts)
    and fp16 also move by gain(host CPU) / gain(device CPU) for the variant's runtime
    (device_configs.kernels): a host without an int8 dot product measured int8 near fp32's
    speed, a class with one runs it faster, and the other way round. A factor the class
    declares for the precision (measured there) replaces the derivation.
    """
    slowest = max(device.speed.values(), default=1.0)  # no factor declared: assume the worst
    fp32 = device.speed.get("fp32", slowest)
    precision = "int8" if candidate.precision == "mixed" else candidate.precision
    if precision == "fp32":
        return fp32, _class_basis("fp32", fp32)
    if precision in device.speed:
        return device.speed[precision], _class_basis(precision, device.speed[precision])
    runtime = RUNTIME_OF_FORMAT.get(candidate.format, "")
    host_gain, device_gain, basis = device.kernels.carry(
        fp32,
        runtime,
        precision,
        (candidate.host_arch, candidate.host_features),
        (device.arch, device.features),
    )
    mine, base = candidate.host_latency_ms.get(runtime), candidate.fp32_host_ms.get(runtime)
    if mine is None or base is None or mine <= 0 or base <= 0:
        return fp32 * host_gain / device_gain, basis  # no fp32 to compare with: in proportion
    here = mine / base
    return fp32 * carry_ratio(here, host_gain, device_gain) / here, basis


@functools.cache
def _class_basis(precision: str, factor: float) -> str:
    return f"{precision} x{factor:g} (class)"


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
        return Estimate(
            measured.latency_p95_ms,
            measured.energy_per_inference_j,
            "telemetry",
            f"{measured.inferences} inferences on the class",
        )
    host = candidate.host_latency_ms.get(RUNTIME_OF_FORMAT.get(candidate.format, ""))
    if host is None:
        return None
    factor, basis = speed_factor(device, candidate)
    latency_ms = host * factor
    # One core busy for the inference: the same model the agent's estimate meter uses.
    energy_j = device.active_w_per_core * latency_ms / 1000.0
    return Estimate(latency_ms, energy_j, "profile", basis)


@dataclass(frozen=True)
class Correction:
    """How a class's field differs from profile estimates, learned from the variants of one
    version that have run there.

    Profiles are timed in a tight loop on the build host; a device also pays, per inference, a
    cost no variant changes: reading and shaping the input, the runtime call, cold caches.
    That cost adds to every variant alike, so the correction adds it (``energy_j``,
    ``latency_ms``: the median of measured minus profile). Scaling instead would claim the
    profile's ratio between two variants in the field, which overstates every saving: in the
    demo (2026-12-08) bearing-diagnosis fp32 and int8 on one class measured 4.55 and 3.01 mJ
    against profiles of 2.90 and 1.44 (field minus profile 1.66 and 1.57); corrected by the
    other's telemetry, the additive rule predicted each within 3%, the scaling one 25-33% off
    (a second run, with int8 in QDQ form: -14% and +21%).
    Where the field is cheaper than the profile (the class is faster than its fp32 factor,
    which no fixed cost explains) the correction scales instead (``scale``).
    """

    ran: int = 0  # variants it was learned from; 0: no correction
    energy_j: float = 0.0
    latency_ms: float = 0.0
    scale: float | None = None  # energy and latency factor, when the field is the cheaper

    def apply(self, guess: Estimate) -> Estimate:
        if self.ran == 0 or guess.source != "profile":
            return guess
        if self.scale is not None:
            return Estimate(
                guess.latency_ms * self.scale,
                guess.energy_j * self.scale,
                f"profile x{self.scale:.2f} (field: the class is faster than its profile)",
                guess.basis,
            )
        return Estimate(
            guess.latency_ms + self.latency_ms,
            guess.energy_j + self.energy_j,
            f"profile + {self.energy_j * 1000:.3f} mJ (field cost per inference)",
            guess.basis,
        )


def field_correction(
    device: DeviceNeeds, candidates: Sequence[Candidate], measured: Mapping[str, Measured]
) -> Correction:
    """The :class:`Correction` of ``device``'s class from the variants with telemetry there.

    Comparing one variant's telemetry with another's bare profile would always favour the
    unmeasured one, and the plan would hop from variant to variant; correcting the profiles
    by what the class measured keeps the comparison fair.
    """
    extra_j: list[float] = []
    extra_ms: list[float] = []
    ratio: list[float] = []
    for candidate in candidates:
        seen = measured.get(candidate.id)
        if seen is None:
            continue
        guess = estimate(device, candidate, None)
        observed = estimate(device, candidate, seen)
        if guess is None or observed is None or observed.source != "telemetry":
            continue
        extra_j.append(observed.energy_j - guess.energy_j)
        extra_ms.append(observed.latency_ms - guess.latency_ms)
        if guess.energy_j > 0:
            ratio.append(observed.energy_j / guess.energy_j)
    if not extra_j:
        return Correction()
    offset = _median(extra_j)
    if offset < 0 and ratio:
        return Correction(len(extra_j), scale=_median(ratio))
    return Correction(len(extra_j), max(offset, 0.0), max(_median(extra_ms), 0.0))


@dataclass(frozen=True)
class FieldCheck:
    """How well the plan predicted one variant the class has run (telemetry as the truth).

    ``profile_j`` is the bare profile estimate; ``corrected_j`` the estimate corrected by the
    class's other variants alone (:func:`field_correction` without this one's own telemetry),
    i.e. what the plan would have said before this variant ran, had the others run first;
    None where no other variant of the version has run on the class.
    """

    variant: str
    inferences: int
    measured_j: float
    profile_j: float
    corrected_j: float | None

    @property
    def profile_error(self) -> float:
        return self.profile_j / self.measured_j - 1

    @property
    def corrected_error(self) -> float | None:
        return None if self.corrected_j is None else self.corrected_j / self.measured_j - 1


def field_check(
    device: DeviceNeeds, candidates: Sequence[Candidate], measured: Mapping[str, Measured]
) -> list[FieldCheck]:
    """Each variant with enough telemetry on ``device``'s class, against what was predicted."""
    checks: list[FieldCheck] = []
    for candidate in candidates:
        seen = measured.get(candidate.id)
        observed = estimate(device, candidate, seen)
        guess = estimate(device, candidate, None)
        if seen is None or observed is None or observed.source != "telemetry" or guess is None:
            continue
        if observed.energy_j <= 0:
            continue
        others = {k: m for k, m in measured.items() if k != candidate.id}
        correction = field_correction(device, candidates, others)
        checks.append(
            FieldCheck(
                candidate.id,
                seen.inferences,
                observed.energy_j,
                guess.energy_j,
                correction.apply(guess).energy_j if correction.ran else None,
            )
        )
    return checks


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
    correction = field_correction(device, candidates, measured)
    fallback_reference: Estimate | None = None
    for candidate in candidates:
        guess = estimate(device, candidate, measured.get(candidate.id))
        if guess is not None:
            guess = correction.apply(guess)
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
