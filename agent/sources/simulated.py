"""The simulated vibration sensor as an input source (see agent.sources.vibration)."""

from __future__ import annotations

from agent.config import VibrationInput
from agent.protocol import FaultKind, utcnow
from agent.sources.base import Reading
from agent.sources.vibration import VibrationSimulator


class SimulatedVibrationSource:
    """Produces a fresh window on every read; faults can be injected while running."""

    name = "vibration"

    def __init__(self, config: VibrationInput) -> None:
        self._sim = VibrationSimulator(
            sample_rate_hz=config.sample_rate_hz,
            window=config.window,
            rpm=config.rpm,
            fault=config.fault,
            severity=config.severity,
            seed=config.seed,
        )

    def read(self, timeout: float) -> Reading | None:
        return Reading(self._sim.read(), utcnow())

    def set_fault(self, fault: FaultKind, severity: float) -> None:
        self._sim.set_fault(fault, severity)
