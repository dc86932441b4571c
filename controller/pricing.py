"""Energy per inference of a model version's variants on a device class, on one basis.

The plan (controller.selection.select_variant), the energy report's fp32 baseline
(controller.planning.baseline_per_class) and the Models page (controller.api.variant_energy)
all price variants. Priced three ways, the product contradicted itself: a variant that ran was
shown dearer than fp32 priced from its profile while the report said it saved 46% against fp32.
This module is the one way: a variant's own telemetry on the class where there is enough of it,
else its profile estimate corrected by what the class measured (the plan's rule, reusing
controller.selection.estimate and field_correction). Pure: no database, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller.selection import (
    Candidate,
    DeviceNeeds,
    Estimate,
    Measured,
    estimate,
    field_correction,
)

TELEMETRY = "telemetry"
PROFILE = "profile"
CORRECTED = "field-corrected profile"
MIXED = "mixed"


def class_prices(
    device: DeviceNeeds,
    candidates: Sequence[Candidate],
    measured: Mapping[str, Measured],
    others: Sequence[Candidate] = (),
) -> dict[str, Estimate]:
    """Latency and energy per inference of each variant on ``device``'s class, by variant id.

    ``candidates`` are the variants the plan chooses among; their telemetry (``measured``, by
    variant id, of this class only) sets the class's field correction, so the figures equal the
    plan's ``Decision.estimates``. ``others`` (the source file of a compressed version, which the
    plan never deploys) are priced on the same basis without informing the correction. A
    variant with no profile for its format's runtime and too little telemetry is left out.
    Sources: "telemetry", "profile + 0.960 mJ (field cost per inference)" (or "profile x0.50
    (field: ...)" where the class is faster than its profile), or "profile" when the class has
    no telemetry to correct by.
    """
    correction = field_correction(device, candidates, measured)
    prices: dict[str, Estimate] = {}
    for option in (*candidates, *others):
        guess = estimate(device, option, measured.get(option.id))
        if guess is not None:
            prices[option.id] = correction.apply(guess)
    return prices


@dataclass(frozen=True)
class FleetPrice:
    """One figure for the fleet: the plain mean of a variant's per-class figures."""

    energy_j: float
    latency_ms: float
    source: str  # telemetry, profile, field-corrected profile, or mixed


def fleet_price(by_class: Sequence[Estimate]) -> FleetPrice | None:
    """The mean over the fleet's classes, each class counted once (not by its inferences), so
    every variant of a version is priced over the same classes and two variants compare like
    for like. None for no classes."""
    if not by_class:
        return None
    kinds = {_kind(e.source) for e in by_class}
    return FleetPrice(
        sum(e.energy_j for e in by_class) / len(by_class),
        sum(e.latency_ms for e in by_class) / len(by_class),
        kinds.pop() if len(kinds) == 1 else MIXED,
    )


def _kind(source: str) -> str:
    if source == TELEMETRY:
        return TELEMETRY
    return PROFILE if source == PROFILE else CORRECTED


def ratio(energy_j: float | None, reference_j: float | None) -> float | None:
    """``energy_j`` against the fp32 reference's (0.54: 46% less); None when either is unknown."""
    if energy_j is None or reference_j is None or reference_j <= 0:
        return None
    return energy_j / reference_j
