"""The power estimate used when no meter can be read: CPU time times the profile's figures.

Whole-device power is ``idle_w + active_w_per_core * busy_cores``; energy per inference is the
dynamic part only (``active_w_per_core * inference CPU seconds / inferences``), because that is
what differs between model variants. Every figure is labelled ``estimate``. It reads nothing, so
it never fails: it is the chain's last resort.
"""

from __future__ import annotations

import msgspec

from agent.power.base import PowerReading
from agent.protocol import PowerMethod

__all__ = ["EstimateMeter", "PowerReading"]


class EstimateMeter(msgspec.Struct, frozen=True):
    """Estimates power from CPU time and the device profile's idle and per-core power."""

    idle_w: float
    active_w_per_core: float
    method: PowerMethod = PowerMethod.ESTIMATE

    def start(self) -> None:
        """Nothing to sample: the estimate works everywhere."""

    def read(
        self, window_s: float, process_cpu_s: float, inference_cpu_s: float, inferences: int
    ) -> PowerReading:
        busy_cores = process_cpu_s / window_s if window_s > 0 else 0.0
        power = self.idle_w + self.active_w_per_core * busy_cores
        per_inference = (
            self.active_w_per_core * inference_cpu_s / inferences if inferences else None
        )
        return PowerReading(round(power, 4), per_inference, self.method)
