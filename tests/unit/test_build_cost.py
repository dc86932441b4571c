"""The cost of a build (``model_store.build_cost``): measured from RAPL where it can be read,
estimated from CPU time where it cannot, and labelled which."""

from __future__ import annotations

import time
from pathlib import Path

from model_store.build_cost import ASSUMED_W_PER_CORE, BuildCost, Meter, total


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_without_rapl_energy_is_estimated_from_cpu_time(tmp_path: Path) -> None:
    meter = Meter(tmp_path / "no-powercap")
    costs: list[BuildCost] = []
    with meter.measure(costs):
        _busy(0.05)
    (cost,) = costs
    assert cost.method == "estimate" and not cost.measured
    assert cost.cpu_s >= 0.05 and cost.wall_s >= 0.04
    assert (
        cost.energy_j == round(cost.cpu_s * ASSUMED_W_PER_CORE, 3)
        or abs(cost.energy_j - cost.cpu_s * ASSUMED_W_PER_CORE) < 0.01
    )
    assert "estimated" in cost.label()


def test_with_rapl_energy_is_measured_from_the_package_counters(tmp_path: Path) -> None:
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")
    counter = zone / "energy_uj"
    counter.write_text("1000000\n")
    clock = [0.0]
    meter = Meter(tmp_path, clock=lambda: clock[0])
    costs: list[BuildCost] = []
    with meter.measure(costs):
        counter.write_text("31000000\n")  # 30 J over the block
        clock[0] += 2.0
    (cost,) = costs
    assert cost.method == "rapl" and cost.measured and "measured" in cost.label()
    assert (cost.wall_s, cost.energy_j) == (2.0, 30.0)  # the counters' delta over the block


def test_a_total_is_measured_only_if_every_part_was() -> None:
    rapl = BuildCost(1.0, 2.0, 10.0, "rapl")
    guess = BuildCost(3.0, 1.0, 13.2, "estimate")
    assert total([rapl, rapl]) == BuildCost(2.0, 4.0, 20.0, "rapl")
    assert total([rapl, guess]).method == "estimate"
    assert total([rapl, guess]).energy_j == 23.2
