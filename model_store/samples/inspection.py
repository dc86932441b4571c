"""Simulated colour camera images of machined parts, for the visual-inspection sample model.

Each image is one 96x96 RGB view in [0, 1], channels first ``(3, 96, 96)``, as a line camera
over a conveyor would crop it: a metal of one of several finishes (bright steel, aluminium,
brass, blued or oiled steel) with a brushed texture at a random angle, uneven lighting (a
gradient and a soft specular highlight, tinted a little by the lamp) and sensor noise per
channel, plus at most one kind of defect:

* ``scratch``: a thin straight line segment, bright (it reflects) or dark;
* ``pit``: one to four small dark craters, each with a faint bright rim on the lit side;
* ``stain``: a larger irregular patch of rust (orange-brown) or oil (dark, slightly blue);
* ``crack``: a dark jagged line that wanders and may fork, thinner and darker than a scratch.

Defects are sized for the image, so the sensor-class :mod:`model_store.samples.surface`
(32x32 grayscale) and this generator share the ideas but not the numbers. Drawing order is
surface first, defect second, so two generators with the same seed draw the same part for
their first image whatever its class (the tests use the difference to check each class).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt

__all__ = ["CLASSES", "SIZE", "InspectionGenerator"]

CLASSES = ("ok", "scratch", "pit", "stain", "crack")
SIZE = 96

# Base colours of the finishes (linear RGB): bright steel, aluminium, brass, blued, oiled steel.
_FINISHES = np.array(
    [
        [0.58, 0.60, 0.63],
        [0.72, 0.72, 0.74],
        [0.72, 0.60, 0.34],
        [0.36, 0.42, 0.52],
        [0.45, 0.45, 0.43],
    ]
)
_RUST = np.array([0.55, 0.26, 0.10])
_OIL = np.array([0.10, 0.11, 0.16])


class InspectionGenerator:
    """Deterministic source of labelled part images for one seed."""

    CLASSES = CLASSES

    def __init__(self, seed: int | None = None, size: int = SIZE) -> None:
        if size < 32:
            raise ValueError(f"size must be at least 32 pixels, not {size}")
        self.size = int(size)
        self._rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        self._x = xx
        self._y = yy

    def sample(self, label: int) -> npt.NDArray[np.float32]:
        """One image of class ``label`` (an index into :data:`CLASSES`): float32 ``(3, s, s)``."""
        if not 0 <= int(label) < len(CLASSES):
            raise ValueError(f"label must be 0..{len(CLASSES) - 1}, not {label!r}")
        image = self._surface()
        if label == 1:
            image += self._scratch()[None]
        elif label == 2:
            image += self._pits()[None]
        elif label == 3:
            image = self._stain(image)
        elif label == 4:
            image += self._crack()[None]
        out: npt.NDArray[np.float32] = np.clip(image, 0.0, 1.0).astype(np.float32)
        return out

    def batch(self, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``n`` images ``(n, 3, s, s)`` and their labels ``(n,)``, classes balanced, shuffled."""
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        labels = self._rng.permutation(np.arange(n, dtype=np.int64) % len(CLASSES))
        images = np.empty((n, 3, self.size, self.size), dtype=np.float32)
        for i, label in enumerate(labels):
            images[i] = self.sample(int(label))
        return images, labels

    def _surface(self) -> npt.NDArray[np.float64]:
        """A defect-free part with its sensor noise, ``(3, s, s)`` float64, not yet clipped."""
        rng, s, x, y = self._rng, self.size, self._x, self._y
        finish = _FINISHES[int(rng.integers(len(_FINISHES)))]
        tint = finish * rng.uniform(0.8, 1.15) + rng.normal(0, 0.02, size=3)
        theta = rng.uniform(0, math.pi)
        across = -math.sin(theta) * x + math.cos(theta) * y + s * math.sqrt(2)
        fine = np.convolve(rng.standard_normal(3 * s), [0.25, 0.5, 0.25], mode="same")
        fine *= rng.uniform(0.02, 0.05)
        coarse = np.convolve(rng.standard_normal(3 * s), np.ones(9) / 9, mode="same")
        coarse *= rng.uniform(0.01, 0.04)
        grid = np.arange(3 * s, dtype=np.float64)
        streaks = np.interp(across, grid, fine) + np.interp(across, grid, coarse)
        phi = rng.uniform(0, 2 * math.pi)
        gradient = rng.uniform(0, 0.3) * ((math.cos(phi) * x + math.sin(phi) * y) / s - 0.5)
        cx, cy = rng.uniform(-0.25 * s, 1.25 * s, size=2)
        spread = rng.uniform(0.3, 0.7) * s
        highlight = rng.uniform(0, 0.2) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * spread**2))
        lamp = 1 + rng.normal(0, 0.04, size=3)
        luminance = 1 + (streaks + gradient) / 0.55
        image = tint[:, None, None] * luminance[None] + (highlight[None] * lamp[:, None, None])
        noise = rng.uniform(0.008, 0.025) * rng.standard_normal((3, s, s))
        surface: npt.NDArray[np.float64] = image + noise
        return surface

    def _line(self, points: npt.NDArray[np.float64], width: float) -> npt.NDArray[np.float64]:
        """A soft polyline through ``points`` (k, 2): 1 on the line, falling off over ``width``."""
        distance = np.full((self.size, self.size), np.inf)
        for (ax, ay), (bx, by) in itertools.pairwise(points):
            dx, dy = bx - ax, by - ay
            length2 = max(dx * dx + dy * dy, 1e-9)
            t = np.clip(((self._x - ax) * dx + (self._y - ay) * dy) / length2, 0.0, 1.0)
            distance = np.minimum(distance, np.hypot(self._x - ax - t * dx, self._y - ay - t * dy))
        line: npt.NDArray[np.float64] = np.exp(-0.5 * (distance / width) ** 2)
        return line

    def _scratch(self) -> npt.NDArray[np.float64]:
        """A thin straight segment at a random angle; bright (reflecting) or dark."""
        rng, s = self._rng, self.size
        cx, cy = rng.uniform(0.2 * s, 0.8 * s, size=2)
        angle = rng.uniform(0, math.pi)
        half = rng.uniform(0.2 * s, 0.45 * s) / 2
        d = np.array([math.cos(angle), math.sin(angle)]) * half
        centre = np.array([cx, cy])
        points = np.array([centre - d, centre + d])
        amplitude = rng.uniform(0.15, 0.35) * (1 if rng.random() < 0.6 else -1)
        scratch: npt.NDArray[np.float64] = amplitude * self._line(points, rng.uniform(0.7, 1.3))
        return scratch

    def _pits(self) -> npt.NDArray[np.float64]:
        """One to four small dark craters, each with a faint bright rim on the lit side."""
        rng, s = self._rng, self.size
        pits = np.zeros((s, s))
        for _ in range(int(rng.integers(1, 5))):
            cx, cy = rng.uniform(0.1 * s, 0.9 * s, size=2)
            radius = rng.uniform(1.2, 3.0)
            depth = rng.uniform(0.25, 0.5)
            pits -= depth * np.exp(-((self._x - cx) ** 2 + (self._y - cy) ** 2) / (2 * radius**2))
            rim = rng.uniform(0, 2 * math.pi)
            rx, ry = cx + radius * math.cos(rim), cy + radius * math.sin(rim)
            r2 = (self._x - rx) ** 2 + (self._y - ry) ** 2
            pits += 0.3 * depth * np.exp(-r2 / (2 * (0.6 * radius) ** 2))
        return pits

    def _stain(self, image: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Blend an irregular patch of rust or oil over ``image`` with a soft, definite edge."""
        rng, s = self._rng, self.size
        cx, cy = rng.uniform(0.25 * s, 0.75 * s, size=2)
        rx, ry = rng.uniform(0.1 * s, 0.25 * s, size=2)
        turn = rng.uniform(0, math.pi)
        px, py = self._x - cx, self._y - cy
        u = (px * math.cos(turn) + py * math.sin(turn)) / rx
        v = (-px * math.sin(turn) + py * math.cos(turn)) / ry
        rho = np.hypot(u, v)
        alpha = np.arctan2(v, u)
        boundary = np.ones_like(rho)
        for k in (2, 3, 5):
            boundary += rng.uniform(0, 0.2) * np.cos(k * alpha + rng.uniform(0, 2 * math.pi))
        mask = 1.0 / (1.0 + np.exp(-(boundary - rho) / rng.uniform(0.06, 0.2)))
        colour = _RUST if rng.random() < 0.6 else _OIL
        strength = rng.uniform(0.3, 0.7) * mask[None]
        stained: npt.NDArray[np.float64] = image * (1 - strength) + colour[:, None, None] * (
            strength * image.mean(axis=0, keepdims=True) / 0.55
        )
        return stained

    def _crack(self) -> npt.NDArray[np.float64]:
        """A dark, thin, jagged line that wanders from a random start and may fork once."""
        rng, s = self._rng, self.size
        start = rng.uniform(0.2 * s, 0.8 * s, size=2)
        heading = rng.uniform(0, 2 * math.pi)
        steps = int(rng.integers(6, 12))
        step = rng.uniform(0.04, 0.07) * s
        points = [start]
        for _ in range(steps):
            heading += rng.normal(0, 0.6)
            points.append(points[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
        width = rng.uniform(0.5, 0.9)
        crack = self._line(np.array(points), width)
        if rng.random() < 0.5:
            at = points[int(rng.integers(2, steps))]
            heading += rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
            branch = [at]
            for _ in range(int(rng.integers(2, 5))):
                heading += rng.normal(0, 0.5)
                branch.append(branch[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
            crack = np.maximum(crack, self._line(np.array(branch), 0.8 * width))
        out: npt.NDArray[np.float64] = -rng.uniform(0.25, 0.45) * crack
        return out
