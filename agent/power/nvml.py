"""NVIDIA GPU power through NVML (the ``pynvml`` module of the nvidia-ml-py package).

nvidia-ml-py is not a dependency of the agent: it is imported inside ``start()``, and its
absence makes the meter unavailable with the pip command that fixes it. Per GPU the meter
prefers the total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ since the driver
loaded; Volta and newer) and falls back to the instantaneous power sample
(``nvmlDeviceGetPowerUsage``, mW) where the counter is not supported. GPUs are summed.

NVML sees the GPUs only, not the CPU or the rest of the device: set ``power.meter_idle_w.nvml``
to the GPUs' idle power so energy per inference counts only the power above it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from agent.power.base import (
    MeterError,
    MeterUnavailable,
    PowerReading,
    WindowSkipped,
    attribute_energy,
)
from agent.protocol import PowerMethod

MIN_INTERVAL_S = 0.05  # the energy counter updates every few ms; shorter deltas are noise
INSTALL_HINT = "pip install nvidia-ml-py"


class _Gpu(msgspec.Struct):
    index: int
    handle: Any
    counter: bool  # True: total-energy counter (mJ); False: power sample (mW)
    last_mj: int = 0


class NvmlMeter:
    """Summed power of the NVIDIA GPUs: energy counters where supported, else samples."""

    method = PowerMethod.NVML

    def __init__(
        self,
        nvml: Any = None,
        *,
        idle_w: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nvml = nvml  # the pynvml module, or a stand-in with the same functions
        self.idle_w = idle_w
        self._clock = clock
        self.gpus: list[_Gpu] = []
        self._last_t = 0.0

    def start(self) -> None:
        """Load NVML, find the GPUs and take the baseline; MeterUnavailable says why not."""
        nvml = self.nvml
        if nvml is None:
            try:
                import pynvml  # type: ignore[import-not-found,unused-ignore]
            except ImportError as exc:
                raise MeterUnavailable("the pynvml module is not installed", INSTALL_HINT) from exc
            nvml = self.nvml = pynvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
            gpus = [self._probe(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
        except nvml.NVMLError as exc:
            raise MeterUnavailable(
                f"NVML cannot be used: {exc}",
                "it needs an NVIDIA GPU and its driver (libnvidia-ml.so)",
            ) from exc
        self.gpus = [gpu for gpu in gpus if gpu is not None]
        if not count:
            raise MeterUnavailable("NVML found no GPU")
        if not self.gpus:
            raise MeterUnavailable(f"none of the {count} GPUs reports energy or power usage")
        self._last_t = self._clock()

    def read(
        self, window_s: float, process_cpu_s: float, inference_cpu_s: float, inferences: int
    ) -> PowerReading:
        """Counter GPUs: energy since the last read over the time since; sampled GPUs: now."""
        if not self.gpus:
            raise MeterError("the NVML meter was not started")
        nvml = self.nvml
        now = self._clock()
        counted_mj = 0
        sampled_w = 0.0
        reset: list[str] = []
        for gpu in self.gpus:
            try:
                if gpu.counter:
                    value = int(nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle))
                    if value < gpu.last_mj:
                        reset.append(f"GPU {gpu.index} {gpu.last_mj} -> {value} mJ")
                    else:
                        counted_mj += value - gpu.last_mj
                    gpu.last_mj = value
                else:
                    sampled_w += nvml.nvmlDeviceGetPowerUsage(gpu.handle) / 1000
            except nvml.NVMLError as exc:
                raise MeterError(f"NVML failed reading GPU {gpu.index}: {exc}") from exc
        elapsed = now - self._last_t
        self._last_t = now
        if reset:
            raise WindowSkipped(
                f"NVML energy counter went backwards ({', '.join(reset)}); driver reloaded?"
            )
        if any(gpu.counter for gpu in self.gpus):
            if elapsed < MIN_INTERVAL_S:
                raise WindowSkipped(f"only {elapsed:.3f} s since the NVML baseline")
            sampled_w += counted_mj / 1000 / elapsed
        energy = attribute_energy(
            sampled_w, self.idle_w, window_s, process_cpu_s, inference_cpu_s, inferences
        )
        return PowerReading(round(sampled_w, 4), energy, self.method)

    def _probe(self, index: int, handle: Any) -> _Gpu | None:
        """How this GPU can be measured: counter if supported, else samples, else not at all."""
        nvml = self.nvml
        try:
            return _Gpu(index, handle, True, int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)))
        except nvml.NVMLError:
            pass
        try:
            nvml.nvmlDeviceGetPowerUsage(handle)
        except nvml.NVMLError:
            return None
        return _Gpu(index, handle, False)
