"""What building a variant costs: CPU time and energy, measured where the host lets us.

The seed of this product counts the energy of making a model as well as of running it: a
variant pays for itself only once the fleet's daily saving has covered the energy its build
took. Every ``compress`` records, per builder and for the whole run:

- CPU seconds of this process and of the processes it waited for (``time.process_time`` and
  ``RUSAGE_CHILDREN``): measured;
- wall seconds: measured;
- energy: **measured** from the CPU packages' RAPL counters where they can be read (the whole
  host's packages over the build's wall time, so other work on the host is counted too), else
  **estimated** as CPU seconds x ``ASSUMED_W_PER_CORE``.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from agent.power.base import MeterError, MeterUnavailable, WindowSkipped
from agent.power.rapl import RaplMeter

# An assumption, not a measurement: a busy server core's share of its package's power, from
# the AMD EPYC 7763's 280 W TDP over its 64 cores (4.4 W). Builds on a laptop or an Arm host
# cost less per core second; where RAPL is readable the figure is measured instead.
ASSUMED_W_PER_CORE = 4.4


class BuildCost(msgspec.Struct, frozen=True):
    """The cost of one build (a builder, or a whole compress run)."""

    cpu_s: float
    wall_s: float
    energy_j: float
    method: str  # "rapl" (measured) or "estimate" (cpu_s x ASSUMED_W_PER_CORE)

    @property
    def measured(self) -> bool:
        return self.method == "rapl"

    def label(self) -> str:
        how = (
            "measured: RAPL, the host's CPU packages"
            if self.measured
            else f"estimated: {ASSUMED_W_PER_CORE:g} W per busy core, assumed"
        )
        return f"{self.cpu_s:.1f} s CPU, {self.wall_s:.1f} s wall, {self.energy_j:.0f} J ({how})"


def total(costs: list[BuildCost]) -> BuildCost:
    """The sum of several builds; measured only if every part was."""
    method = "rapl" if costs and all(c.measured for c in costs) else "estimate"
    return BuildCost(
        cpu_s=round(sum(c.cpu_s for c in costs), 3),
        wall_s=round(sum(c.wall_s for c in costs), 3),
        energy_j=round(sum(c.energy_j for c in costs), 3),
        method=method,
    )


def _cpu_s() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class Meter:
    """Measures what the code inside :meth:`measure` costs. Wall time and the RAPL counters
    share one clock, so a measured energy is exactly the counters' delta."""

    def __init__(
        self,
        powercap: Path = Path("/sys/class/powercap"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._rapl: RaplMeter | None = RaplMeter(powercap, clock=clock)
        try:
            self._rapl.start()
        except MeterUnavailable:
            self._rapl = None

    @contextmanager
    def measure(self, into: list[BuildCost]) -> Iterator[None]:
        """Append the cost of the block to ``into`` when it ends (also when it raises)."""
        cpu0, wall0 = _cpu_s(), self._clock()
        if self._rapl is not None:
            try:
                self._rapl.start()  # a fresh baseline for this block
            except MeterUnavailable:
                self._rapl = None
        try:
            yield
        finally:
            cpu, wall = _cpu_s() - cpu0, self._clock() - wall0
            energy, method = cpu * ASSUMED_W_PER_CORE, "estimate"
            if self._rapl is not None:
                try:
                    reading = self._rapl.read(wall, cpu, cpu, 1)
                    energy, method = reading.power_w * wall, "rapl"
                except (MeterError, WindowSkipped):
                    pass  # too short a block for the counters: the estimate stands
            into.append(BuildCost(round(cpu, 3), round(wall, 3), round(energy, 3), method))
