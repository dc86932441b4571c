"""What every power meter provides, the reading it returns, and the errors it raises.

A meter measures (or estimates) the device's mean power over one telemetry window and turns it
into energy per inference. Constructors do no I/O: ``start()`` takes the first sample and says
whether the meter can work here at all, ``read()`` closes a window.

Error tree (OS and library errors are translated into these inside each meter)::

    AgentError                   agent.errors
     ├── MeterUnavailable        start(): this meter cannot work on this device (no such
     │                           hardware, no permission, library missing). ``reason`` says why,
     │                           ``hint`` what would make it work. The chain logs it once and
     │                           leaves the meter out.
     └── MeterError              read(): the meter failed mid-run (a file vanished, a command
         │                       failed). The chain drops it and falls back to the next meter.
         └── WindowSkipped       read(): this one window cannot be measured (a counter was reset
                                 or went backwards, no time since the baseline). The meter has
                                 re-baselined and will measure the next window; the chain uses
                                 the estimate for this one and keeps the meter.

Energy per inference of a measured meter (:func:`attribute_energy`): the window's energy above
idle, attributed to inference by the share of the process's CPU time spent inferring::

    (power_w - idle_w) * window_s * min(inference_cpu_s / process_cpu_s, 1) / inferences

``idle_w`` must be the idle power *as that meter sees it* (a RAPL package or a GPU idles far
below the whole device; see ``PowerConfig.meter_idle_w``). A window whose power is below idle
yields 0, not a negative energy. For the estimate, whose above-idle power is
``active_w_per_core * process_cpu_s / window_s``, the formula reduces to the estimate's own
``active_w_per_core * inference_cpu_s / inferences``, so both methods give comparable figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import msgspec

from agent.errors import AgentError
from agent.protocol import PowerMethod

_CPU_EPS_S = 1e-9


class MeterUnavailable(AgentError):
    """A meter cannot work on this device; ``reason`` says why and ``hint`` what to do."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(f"{reason}; {hint}" if hint else reason)
        self.reason = reason
        self.hint = hint


class MeterError(AgentError):
    """A meter that worked failed mid-run; the message says what it could not read."""


class WindowSkipped(MeterError):
    """One window cannot be measured (counter reset, no interval); the next one will be."""


class PowerReading(msgspec.Struct, frozen=True):
    """Power over one telemetry window, how it was obtained, and anything odd about it."""

    power_w: float
    energy_per_inference_j: float | None
    method: PowerMethod
    note: str | None = None


class Meter(Protocol):
    """A source of mean device power over a telemetry window."""

    @property
    def method(self) -> PowerMethod:
        """How this meter obtains power; every reading it returns carries it."""
        ...

    def start(self) -> None:
        """Take the first sample (the baseline); raise MeterUnavailable if it cannot work here.

        Calling it again re-baselines the meter.
        """
        ...

    def read(
        self, window_s: float, process_cpu_s: float, inference_cpu_s: float, inferences: int
    ) -> PowerReading:
        """Mean power since the last sample, and energy per inference; MeterError mid-run."""
        ...


def attribute_energy(
    power_w: float,
    idle_w: float,
    window_s: float,
    process_cpu_s: float,
    inference_cpu_s: float,
    inferences: int,
) -> float | None:
    """Energy (J) per inference from measured power: see the module docstring. None if none ran."""
    if inferences <= 0:
        return None
    share = min(max(inference_cpu_s, 0.0) / max(process_cpu_s, _CPU_EPS_S), 1.0)
    above_idle_j = max(power_w - idle_w, 0.0) * max(window_s, 0.0)
    return above_idle_j * share / inferences


def read_sysfs(path: Path) -> str:
    """The stripped text of a sysfs attribute (the default reader hardware meters inject)."""
    return path.read_text().strip()
