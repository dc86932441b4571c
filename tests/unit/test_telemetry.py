"""Telemetry windows and the labelled power estimate."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.power.estimate import EstimateMeter
from agent.protocol import PowerMethod
from agent.telemetry import TelemetryWindow, percentile

T0 = datetime(2026, 11, 26, tzinfo=UTC)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 99) == 99
    assert percentile([3.0], 99) == 3.0


def test_windows_are_numbered_without_gaps_and_reset() -> None:
    window = TelemetryWindow(T0, start_cpu_s=10.0)
    for ms in range(1, 101):
        window.observe(float(ms), 0.001)
    window.error()
    first = window.cut(
        T0 + timedelta(seconds=5), 10.5, None, "active", 3.0, 0.01, PowerMethod.ESTIMATE
    )
    assert (first.seq, first.inferences, first.errors) == (0, 100, 1)
    assert (first.latency_p50_ms, first.latency_p95_ms) == (50.0, 95.0)
    assert first.window_s == 5.0 and first.cpu_s == pytest.approx(0.5)
    second = window.cut(
        T0 + timedelta(seconds=10), 10.6, None, "active", None, None, PowerMethod.ESTIMATE
    )
    assert (second.seq, second.inferences, second.latency_p50_ms) == (1, 0, None)


def test_estimate_is_labelled_and_scales_with_cpu() -> None:
    meter = EstimateMeter(idle_w=3.0, active_w_per_core=2.0)
    reading = meter.read(window_s=10.0, process_cpu_s=5.0, inference_cpu_s=1.0, inferences=100)
    assert reading.method is PowerMethod.ESTIMATE
    assert reading.power_w == pytest.approx(3.0 + 2.0 * 0.5)
    assert reading.energy_per_inference_j == pytest.approx(2.0 * 1.0 / 100)
    assert meter.read(10.0, 0.0, 0.0, 0).energy_per_inference_j is None


def test_inference_cpu_is_estimated_from_sampled_inferences() -> None:
    """The thread CPU clock is read for the first 8 inferences of a window and every 32nd
    after them; the window's inference CPU is the sampled mean times the inferences."""
    window = TelemetryWindow(T0, start_cpu_s=0.0)
    sampled = []
    for i in range(70):
        sample = window.sample_cpu
        sampled.append(sample)
        window.observe(1.0, 0.002 + 0.001 * (i % 2) if sample else None)
    assert [i for i, s in enumerate(sampled) if s] == [0, 1, 2, 3, 4, 5, 6, 7, 32, 64]
    # samples: 0..7 (four of 0.002, four of 0.003), 32 and 64 (0.002): mean 0.0024
    assert window.inference_cpu_s == pytest.approx(0.024 / 10 * 70)
    window.cut(T0 + timedelta(seconds=1), 1.0, None, "active", None, None, PowerMethod.ESTIMATE)
    assert window.inference_cpu_s == 0.0 and window.sample_cpu, "a new window samples"
    window.error()
    assert window.sample_cpu, "a failed inference is not a sampled one"
