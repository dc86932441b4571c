"""The simulated vibration sensor: shape, determinism, continuity, faults that look like faults."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.protocol import FaultKind
from agent.sources.vibration import BearingGeometry, VibrationSimulator

FS = 12800.0
FAULTS = [FaultKind.OUTER_RACE, FaultKind.INNER_RACE, FaultKind.BALL]


def record(sim: VibrationSimulator, windows: int) -> np.ndarray:
    return np.concatenate([sim.read() for _ in range(windows)])


def kurtosis(x: np.ndarray) -> float:
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def envelope_spectrum_peak(signal: np.ndarray, low_hz: float, high_hz: float) -> float:
    """Frequency of the strongest line of the 2-4 kHz band's envelope, between low and high."""
    spectrum = np.fft.fft(signal - signal.mean())
    freqs = np.fft.fftfreq(signal.size, 1 / FS)
    # Analytic signal of the resonance band: keep positive 2-4 kHz, doubled, drop the rest.
    spectrum[(freqs < 2000) | (freqs > 4000)] = 0
    envelope = np.abs(np.fft.ifft(2 * spectrum))
    env_spectrum = np.abs(np.fft.rfft(envelope - envelope.mean()))
    env_freqs = np.fft.rfftfreq(envelope.size, 1 / FS)
    band = (env_freqs >= low_hz) & (env_freqs <= high_hz)
    return float(env_freqs[band][np.argmax(env_spectrum[band])])


def test_read_returns_float32_windows_of_the_configured_size() -> None:
    assert VibrationSimulator(seed=1).read().shape == (512,)
    window = VibrationSimulator(window=256, seed=1).read()
    assert window.dtype == np.float32
    assert window.shape == (256,)
    assert np.isfinite(window).all()


def test_same_seed_same_signal_other_seed_other_machine() -> None:
    a = record(VibrationSimulator(seed=42, fault=FaultKind.BALL), 5)
    b = record(VibrationSimulator(seed=42, fault=FaultKind.BALL), 5)
    c = record(VibrationSimulator(seed=43, fault=FaultKind.BALL), 5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_healthy_signal_is_plausible_in_g() -> None:
    x = record(VibrationSimulator(seed=3), 20)
    assert 0.02 < float(x.std()) < 0.5
    assert float(np.abs(x).max()) < 2.0


def test_windows_join_into_one_continuous_shaft_tone() -> None:
    """With phase carried across reads, 1x stays one sharp line over 32 windows."""
    rpm = 1800.0
    x = record(VibrationSimulator(rpm=rpm, seed=5), 32).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size))) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / FS)
    near = (freqs > 15) & (freqs < 45)
    line = np.abs(freqs - rpm / 60) < 2.5
    assert spectrum[near & line].sum() > 0.95 * spectrum[near].sum()


def test_bearing_defect_orders_match_the_6205_bearing() -> None:
    bearing = BearingGeometry()
    assert bearing.bpfo(1.0) == pytest.approx(3.5848, abs=1e-3)
    assert bearing.bpfi(1.0) == pytest.approx(5.4152, abs=1e-3)
    assert bearing.bsf(1.0) == pytest.approx(2.3570, abs=1e-3)
    assert bearing.ftf(1.0) == pytest.approx(0.3983, abs=1e-3)
    assert bearing.impact_rate_hz(FaultKind.NONE, 30.0) == 0.0


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_raises_energy_and_kurtosis(fault: FaultKind) -> None:
    healthy = record(VibrationSimulator(seed=11), 20)
    faulty = record(VibrationSimulator(seed=11, fault=fault, severity=1.0), 20)
    assert kurtosis(healthy) < 3.5
    assert kurtosis(faulty) > 2 * kurtosis(healthy)
    assert faulty.std() > 1.3 * healthy.std()


@pytest.mark.parametrize("fault", FAULTS)
def test_envelope_spectrum_peaks_at_the_defect_frequency(fault: FaultKind) -> None:
    rpm = 1800.0
    sim = VibrationSimulator(rpm=rpm, fault=fault, severity=1.0, seed=21)
    expected = BearingGeometry().impact_rate_hz(fault, rpm / 60)
    peak = envelope_spectrum_peak(record(sim, 32).astype(np.float64), 60.0, 400.0)
    assert peak == pytest.approx(expected, abs=1.5)


def test_set_fault_switches_the_condition_and_severity_zero_is_healthy() -> None:
    sim = VibrationSimulator(seed=8)
    healthy = record(sim, 10)
    sim.set_fault(FaultKind.OUTER_RACE, 2.0)
    assert (sim.fault, sim.severity) == (FaultKind.OUTER_RACE, 2.0)
    record(sim, 1)  # the window in which the fault starts
    assert record(sim, 10).std() > 1.5 * healthy.std()
    sim.set_fault(FaultKind.OUTER_RACE, 0.0)
    record(sim, 1)  # the last ringing fades
    assert kurtosis(record(sim, 10)) < 3.5
    sim.set_fault(FaultKind.INNER_RACE, 0.5)
    sim.set_fault(FaultKind.NONE, 1.0)
    assert sim.severity == 0.0


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        VibrationSimulator(rpm=0)
    with pytest.raises(ValueError):
        VibrationSimulator(seed=1).set_fault(FaultKind.BALL, -1.0)


def test_one_window_costs_well_under_a_millisecond() -> None:
    sim = VibrationSimulator(seed=2, fault=FaultKind.BALL)
    sim.read()
    start = time.perf_counter()
    for _ in range(200):
        sim.read()
    assert (time.perf_counter() - start) / 200 < 1e-3
