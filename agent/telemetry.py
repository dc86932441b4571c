"""Telemetry windows: what the agent measured between two reports, cut into records.

The inference loop calls :meth:`TelemetryWindow.observe` once per inference; every
``interval_s`` it calls :meth:`TelemetryWindow.cut`, which returns a record with latency
percentiles, counts, CPU time and the power reading for that window, and starts a new one.
Records are numbered per session without gaps so the controller can de-duplicate replays.
"""

from __future__ import annotations

from datetime import datetime

from agent.protocol import ModelRef, PowerMethod, TelemetryRecord, Tier

MAX_SAMPLES = 20_000  # latencies kept per window; beyond that every other one is dropped
CPU_SAMPLE_FIRST = 8  # the thread CPU time of the first inferences of a window is read,
CPU_SAMPLE_EVERY = 32  # and after them, of one inference in this many


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


class TelemetryWindow:
    """Accumulates one window of inference measurements."""

    def __init__(self, start: datetime, start_cpu_s: float) -> None:
        self.seq = 0
        self.start = start
        self.start_cpu_s = start_cpu_s
        self._latencies_ms: list[float] = []
        self._stride = 1  # one latency kept in this many inferences
        self.inferences = 0
        self.errors = 0
        self._cpu_s = 0.0  # CPU time of the sampled inferences
        self._cpu_samples = 0
        # Whether to read the CPU time of the next inference: for the first CPU_SAMPLE_FIRST
        # of a window and one in CPU_SAMPLE_EVERY after them (an attribute, set by observe, so
        # the inference loop does not pay a call to ask). Reading a thread's CPU clock is a
        # system call (~1.5 us on a 2-core EPYC, two per inference, ~5 us right after a model
        # run), a large share of what the agent may add to a small model; inputs of one model
        # cost alike, so a sample estimates the window's total. A slow window (10 Hz, 5 s)
        # still gets 9 samples; a fast one reads the clock for ~3% of its inferences.
        self.sample_cpu = True

    @property
    def inference_cpu_s(self) -> float:
        """CPU time the window's inferences took (estimated from the sampled ones)."""
        if not self._cpu_samples:
            return 0.0
        return self._cpu_s / self._cpu_samples * self.inferences

    def observe(self, latency_ms: float, cpu_s: float | None) -> None:
        """Record one successful inference: wall latency, and the CPU time of the calling
        thread if it was sampled (:attr:`sample_cpu`)."""
        n = self.inferences = self.inferences + 1
        if cpu_s is not None:
            self._cpu_s += cpu_s
            self._cpu_samples += 1
        self.sample_cpu = n < CPU_SAMPLE_FIRST or n % CPU_SAMPLE_EVERY == 0
        if self._stride == 1 or n % self._stride == 0:
            latencies = self._latencies_ms
            latencies.append(latency_ms)
            if len(latencies) >= MAX_SAMPLES:
                self._latencies_ms = latencies[::2]
                self._stride *= 2

    def error(self) -> None:
        self.errors += 1

    def cut(
        self,
        now: datetime,
        cpu_s: float,
        model: ModelRef | None,
        tier: Tier,
        power_w: float | None,
        energy_per_inference_j: float | None,
        method: PowerMethod,
        outbox_dropped: int | None = None,
    ) -> TelemetryRecord:
        """Close the window at ``now`` (process CPU time ``cpu_s``) and start the next one."""
        window_s = max((now - self.start).total_seconds(), 1e-6)
        lat = sorted(self._latencies_ms)
        record = TelemetryRecord(
            seq=self.seq,
            start=self.start,
            window_s=window_s,
            model=model,
            tier=tier,
            inferences=self.inferences,
            errors=self.errors,
            latency_p50_ms=percentile(lat, 50) if lat else None,
            latency_p95_ms=percentile(lat, 95) if lat else None,
            latency_p99_ms=percentile(lat, 99) if lat else None,
            cpu_s=max(cpu_s - self.start_cpu_s, 0.0),
            power_w=power_w,
            energy_per_inference_j=energy_per_inference_j,
            power_method=method,
            outbox_dropped=outbox_dropped,
        )
        self.seq += 1
        self.start = now
        self.start_cpu_s = cpu_s
        self._latencies_ms = []
        self._stride = 1
        self.inferences = 0
        self.errors = 0
        self._cpu_s = 0.0
        self._cpu_samples = 0
        self.sample_cpu = True
        return record
