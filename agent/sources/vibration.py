"""A simulated accelerometer on a rotating machine whose rolling-element bearing can fail.

It stands in for a real vibration sensor on gateways that have none, drives the demo (a fault
injected over MQTT makes the anomaly score rise) and generates the data the sample model
``vibration-ae`` is trained on. numpy only, and cheap: one 512-sample window costs tens of
microseconds, so it never competes with inference on a small device.

The signal is the usual textbook picture of a machine with a 6205-type bearing: shaft
harmonics (1x from imbalance, 2x/3x from misalignment), a gear-mesh tone modulated by the shaft,
broadband noise, and for a damaged bearing a train of impacts at the defect frequency (BPFO,
BPFI or twice BSF) that rings a structural resonance near 3 kHz. Each seeded machine differs a
little (amplitudes, gear teeth, resonance, noise floor, load) and drifts slowly in speed and
load from window to window, so a model trained on a few machines must generalize, as in a plant.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import numpy.typing as npt

from agent.protocol import FaultKind

__all__ = ["BearingGeometry", "VibrationSimulator"]


class BearingGeometry(msgspec.Struct, frozen=True):
    """Rolling-element bearing dimensions; the defect frequencies follow from them.

    The defaults are the SKF 6205 deep-groove ball bearing used in the CWRU bearing data set.
    """

    balls: int = 9
    ball_diameter_mm: float = 7.94
    pitch_diameter_mm: float = 39.04
    contact_angle_deg: float = 0.0

    def _ratio(self) -> float:
        return (
            self.ball_diameter_mm
            / self.pitch_diameter_mm
            * math.cos(math.radians(self.contact_angle_deg))
        )

    def bpfo(self, shaft_hz: float) -> float:
        """Ball pass frequency, outer race: rate at which balls roll over an outer-race spall."""
        return self.balls / 2 * shaft_hz * (1 - self._ratio())

    def bpfi(self, shaft_hz: float) -> float:
        """Ball pass frequency, inner race: rate at which balls roll over an inner-race spall."""
        return self.balls / 2 * shaft_hz * (1 + self._ratio())

    def bsf(self, shaft_hz: float) -> float:
        """Ball spin frequency: how often a ball turns about its own axis."""
        r = self._ratio()
        return self.pitch_diameter_mm / (2 * self.ball_diameter_mm) * shaft_hz * (1 - r * r)

    def ftf(self, shaft_hz: float) -> float:
        """Fundamental train (cage) frequency: how fast the ball set orbits the shaft."""
        return shaft_hz / 2 * (1 - self._ratio())

    def impact_rate_hz(self, fault: FaultKind, shaft_hz: float) -> float:
        """Impacts per second a fault of this kind produces; 0 for a healthy bearing.

        A spalled ball strikes both races once per spin, hence twice BSF.
        """
        if fault is FaultKind.OUTER_RACE:
            return self.bpfo(shaft_hz)
        if fault is FaultKind.INNER_RACE:
            return self.bpfi(shaft_hz)
        if fault is FaultKind.BALL:
            return 2 * self.bsf(shaft_hz)
        return 0.0


# Peak acceleration (g) of one defect impact at severity 1 and unit load.
_IMPACT_G = 0.5
# Cycle-to-cycle slip of rolling elements: impacts are not perfectly periodic in real bearings.
_SLIP = 0.005
# Slow speed and load wander within one machine, as fractions of nominal, and how much of it
# survives from one window to the next (AR(1) coefficient).
_SPEED_WANDER = 0.002
_LOAD_WANDER = 0.03
_WANDER_MEMORY = 0.95


class VibrationSimulator:
    """One machine's accelerometer: each :meth:`read` returns the next window, in g.

    Phases, impact timing and resonance ringing carry over between reads, so consecutive windows
    join into one continuous signal. ``set_fault`` may be called from another thread (it swaps
    one attribute); ``read`` is meant for a single reader.
    """

    def __init__(
        self,
        *,
        sample_rate_hz: float = 12800.0,
        window: int = 512,
        rpm: float = 1800.0,
        fault: FaultKind = FaultKind.NONE,
        severity: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if sample_rate_hz <= 0 or window <= 0 or rpm <= 0:
            raise ValueError("sample_rate_hz, window and rpm must be positive")
        self.sample_rate_hz = float(sample_rate_hz)
        self.window = int(window)
        self.rpm = float(rpm)
        self.bearing = BearingGeometry()
        self._rng = np.random.default_rng(seed)
        self._fault: tuple[FaultKind, float] = (FaultKind.NONE, 0.0)
        self.set_fault(fault, severity)
        self._draw_machine()
        self._shaft_phase = float(self._rng.uniform(0, 2 * math.pi))
        self._cage_phase = float(self._rng.uniform(0, 2 * math.pi))
        self._speed_wander = 0.0
        self._load_wander = 0.0
        self._next_impact = 0.0  # samples from the start of the next window
        self._ring = np.zeros(self.window + self._kernel.size, dtype=np.float64)
        self._k = np.arange(self.window, dtype=np.float64)

    def _draw_machine(self) -> None:
        """Draw what makes this machine unlike its neighbours; fixed for its lifetime."""
        rng = self._rng
        self._harmonics_g = np.array(
            [rng.uniform(0.05, 0.15), rng.uniform(0.02, 0.06), rng.uniform(0.005, 0.02)]
        )
        self._harmonic_phases = rng.uniform(0, 2 * math.pi, size=3)
        self._gear_teeth = int(rng.integers(19, 30))
        self._gear_g = float(rng.uniform(0.02, 0.05))
        self._gear_phase = float(rng.uniform(0, 2 * math.pi))
        self._noise_g = float(rng.uniform(0.015, 0.03))
        self._load = float(rng.uniform(0.85, 1.15))
        self._load_zone = float(rng.uniform(0, 2 * math.pi))
        resonance_hz = float(np.clip(rng.normal(3000.0, 150.0), 2600.0, 3400.0))
        damping = float(rng.uniform(0.04, 0.06))
        # Impulse response of the structure: a damped sinusoid, cut where it has decayed to ~0.1%.
        omega = 2 * math.pi * resonance_hz
        decay = damping * omega
        length = math.ceil(7.0 / decay * self.sample_rate_hz)
        t = np.arange(length) / self.sample_rate_hz
        self._kernel = np.exp(-decay * t) * np.sin(omega * math.sqrt(1 - damping**2) * t)
        self._kernel /= np.abs(self._kernel).max()

    @property
    def fault(self) -> FaultKind:
        """The fault currently simulated."""
        return self._fault[0]

    @property
    def severity(self) -> float:
        """The severity of the current fault (0 for a healthy bearing)."""
        return self._fault[1]

    def set_fault(self, fault: FaultKind, severity: float = 1.0) -> None:
        """Switch the bearing's condition from the next window on; severity 0 means healthy."""
        if severity < 0 or not math.isfinite(severity):
            raise ValueError(f"severity must be a finite number >= 0, not {severity!r}")
        fault = FaultKind(fault)
        self._fault = (fault, 0.0 if fault is FaultKind.NONE else float(severity))

    def read(self) -> npt.NDArray[np.float32]:
        """The next window of acceleration in g: float32, shape ``(window,)``."""
        fault, severity = self._fault
        rng, n, fs = self._rng, self.window, self.sample_rate_hz

        a = _WANDER_MEMORY
        b = math.sqrt(1 - a * a)
        self._speed_wander = a * self._speed_wander + b * float(rng.standard_normal())
        self._load_wander = a * self._load_wander + b * float(rng.standard_normal())
        shaft_hz = self.rpm / 60.0 * (1 + _SPEED_WANDER * self._speed_wander)
        load = self._load * (1 + _LOAD_WANDER * self._load_wander)

        step = 2 * math.pi * shaft_hz / fs
        phase = self._shaft_phase + step * self._k
        h, p = self._harmonics_g, self._harmonic_phases
        signal = (
            h[0] * np.cos(phase + p[0])
            + h[1] * np.cos(2 * phase + p[1])
            + h[2] * np.cos(3 * phase + p[2])
            + self._gear_g
            * (1 + 0.3 * np.cos(phase))
            * np.cos(self._gear_teeth * phase + self._gear_phase)
        )
        signal *= load
        signal += self._noise_g * rng.standard_normal(n)

        ring = self._ring
        if severity > 0:
            self._add_impacts(fault, severity * load, shaft_hz)
        signal += ring[:n]
        # The part of the ringing that spills past this window starts the next one.
        tail = ring[n:].copy()
        ring[:] = 0.0
        ring[: tail.size] = tail

        self._shaft_phase = (self._shaft_phase + step * n) % (2 * math.pi)
        cage_step = 2 * math.pi * self.bearing.ftf(shaft_hz) / fs
        self._cage_phase = (self._cage_phase + cage_step * n) % (2 * math.pi)
        window: npt.NDArray[np.float32] = signal.astype(np.float32)
        return window

    def _add_impacts(self, fault: FaultKind, amplitude_g: float, shaft_hz: float) -> None:
        """Ring the structure once per defect strike that falls inside the coming window."""
        rng, n, fs = self._rng, self.window, self.sample_rate_hz
        period = fs / self.bearing.impact_rate_hz(fault, shaft_hz)
        shaft_step = 2 * math.pi * shaft_hz / fs
        cage_step = 2 * math.pi * self.bearing.ftf(shaft_hz) / fs
        kernel, size = self._kernel, self._kernel.size
        at = self._next_impact
        while at < n:
            start = int(at)
            if fault is FaultKind.INNER_RACE:
                # The spall turns with the shaft and is struck hard only inside the load zone.
                angle = self._shaft_phase + shaft_step * at - self._load_zone
                gain = 0.5 * (1 + math.cos(angle))
            elif fault is FaultKind.BALL:
                # The damaged ball orbits with the cage, in and out of the load zone.
                angle = self._cage_phase + cage_step * at - self._load_zone
                gain = 0.5 * (1 + math.cos(angle))
            else:
                gain = 1.0
            gain *= 1 + 0.1 * float(rng.standard_normal())
            self._ring[start : start + size] += amplitude_g * gain * kernel
            at += period * (1 + _SLIP * float(rng.standard_normal()))
        self._next_impact = at - n
