"""One basis for a variant's energy per inference on a device class (controller.pricing)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from controller.pricing import class_prices, fleet_price, ratio
from controller.selection import Candidate, DeviceNeeds, Estimate, Measured, select_variant

# 1.0 W a core and speed 10x the host: a profile estimate is 0.01 J for every host ms
PI = DeviceNeeds(
    id="-",
    device_class="rpi4",
    runtimes=frozenset({"onnx", "tflite"}),
    precisions=frozenset({"fp32", "int8"}),
    model_memory_mb=200,
    storage_mb=500,
    latency_budget_ms=100.0,
    speed={"fp32": 10.0, "int8": 10.0},
    active_w_per_core=1.0,
)
FP32 = Candidate("m:1+fp32", "onnx", "fp32", 800, None, {"onnxruntime": 0.4}, True, None, True)
INT8 = Candidate("m:1+int8", "onnx", "int8", 200, None, {"onnxruntime": 0.2}, True)
TFLITE = Candidate("m:1+tflite", "tflite", "fp32", 700, None, {"litert": 0.1}, True)
UNPROFILED = Candidate("m:1+new", "onnx", "int8", 100, None, {}, True)
SOURCE = Candidate("m:1", "onnx", "fp32", 800, None, {"onnxruntime": 0.4}, True)
PLAN = [FP32, INT8, TFLITE, UNPROFILED]
ENOUGH = 200  # selection.MIN_MEASURED_INFERENCES


def measured(**by_variant: tuple[int, float]) -> dict[str, Measured]:
    """``int8=(inferences, joules)`` -> telemetry of ``m:1+int8`` (p95 1 ms)."""
    return {f"m:1+{name}": Measured(n, joules, 1.0) for name, (n, joules) in by_variant.items()}


TABLE = [
    pytest.param(
        {},
        {"fp32": (0.004, "profile"), "int8": (0.002, "profile"), "tflite": (0.001, "profile")},
        id="nothing-ran-plain-profiles",
    ),
    pytest.param(
        measured(int8=(ENOUGH, 0.005)),  # 3 mJ over its profile
        {
            "fp32": (0.007, "profile + 3.000 mJ (field cost per inference)"),
            "int8": (0.005, "telemetry"),
            "tflite": (0.004, "profile + 3.000 mJ (field cost per inference)"),
        },
        id="one-ran-the-rest-get-its-field-cost",
    ),
    pytest.param(
        measured(int8=(ENOUGH - 1, 0.005)),
        {"fp32": (0.004, "profile"), "int8": (0.002, "profile"), "tflite": (0.001, "profile")},
        id="too-few-inferences-count-for-nothing",
    ),
    pytest.param(
        measured(int8=(ENOUGH, 0.004), tflite=(5000, 0.004), fp32=(ENOUGH, 0.016)),
        {
            "fp32": (0.016, "telemetry"),
            "int8": (0.004, "telemetry"),
            "tflite": (0.004, "telemetry"),
        },
        id="all-ran-all-telemetry",
    ),
    pytest.param(
        measured(int8=(ENOUGH, 0.004), tflite=(ENOUGH, 0.004)),  # 2 and 3 mJ over: median 2.5
        {
            "fp32": (0.0065, "profile + 2.500 mJ (field cost per inference)"),
            "int8": (0.004, "telemetry"),
            "tflite": (0.004, "telemetry"),
        },
        id="the-median-field-cost-of-those-that-ran",
    ),
]


@pytest.mark.parametrize(("field", "expected"), TABLE)
def test_a_class_prices_every_variant_on_one_basis(
    field: Mapping[str, Measured], expected: dict[str, tuple[float, str]]
) -> None:
    prices = class_prices(PI, PLAN, field)
    assert set(prices) == {f"m:1+{name}" for name in expected}, "no profile, no price"
    for name, (joules, source) in expected.items():
        price = prices[f"m:1+{name}"]
        assert (price.energy_j, price.source) == (pytest.approx(joules), source), name


@pytest.mark.parametrize(("field", "expected"), TABLE)
def test_the_plan_prices_its_candidates_exactly_so(
    field: Mapping[str, Measured], expected: dict[str, tuple[float, str]]
) -> None:
    """select_variant keeps its own copy of the rule; this holds the two together."""
    assert select_variant(PI, PLAN, field).estimates == class_prices(PI, PLAN, field)


def test_the_source_file_is_priced_alike_but_does_not_move_the_correction() -> None:
    """The plan never deploys a compressed version's source file; telemetry of it (a device
    that ran the version before it was compressed) prices it, not its siblings."""
    field = {**measured(int8=(ENOUGH, 0.004)), "m:1": Measured(ENOUGH, 0.040, 1.0)}
    prices = class_prices(PI, PLAN, field, others=[SOURCE])
    assert prices["m:1"] == Estimate(1.0, 0.040, "telemetry", "200 inferences on the class")
    assert prices["m:1+fp32"].energy_j == pytest.approx(0.006), "int8's field cost alone"
    unmeasured = class_prices(PI, PLAN, measured(int8=(ENOUGH, 0.004)), others=[SOURCE])
    assert unmeasured["m:1"] == unmeasured["m:1+fp32"], "same file, same price"


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (["telemetry", "telemetry"], "telemetry"),
        (["profile", "profile"], "profile"),
        (
            ["profile + 0.100 mJ (field cost per inference)", "profile x0.50 (field: faster)"],
            "field-corrected profile",
        ),
        (["telemetry", "profile + 0.100 mJ (field cost per inference)"], "mixed"),
        (["profile", "profile + 0.100 mJ (field cost per inference)"], "mixed"),
    ],
)
def test_the_fleet_figure_is_the_plain_mean_of_the_classes(
    sources: list[str], expected: str
) -> None:
    """Each class once, whatever it ran: a variant that ran a lot on one class is not priced
    over other classes than the variants that did not run."""
    prices = [Estimate(1.0, 0.002, sources[0]), Estimate(3.0, 0.006, sources[1])]
    fleet = fleet_price(prices)
    assert fleet is not None
    assert (fleet.energy_j, fleet.latency_ms, fleet.source) == (
        pytest.approx(0.004),
        pytest.approx(2.0),
        expected,
    )
    assert fleet_price([]) is None


@pytest.mark.parametrize(
    ("energy", "reference", "expected"),
    [(0.5, 1.0, 0.5), (2.0, 1.0, 2.0), (None, 1.0, None), (1.0, None, None), (1.0, 0.0, None)],
)
def test_ratio_to_fp32(
    energy: float | None, reference: float | None, expected: float | None
) -> None:
    assert ratio(energy, reference) == expected
