"""Simulated camera patches of machined metal, with and without surface defects.

Each image is one 32x32 grayscale patch in [0, 1] as an inspection camera on a rolling or
grinding line would crop it: a brushed texture (fine parallel streaks at a random angle), uneven
lighting (a gradient and a soft specular highlight) and sensor noise, plus at most one kind of
defect: a scratch (a thin straight line, bright or dark), pits (one to three small dark spots)
or a stain / inclusion (a larger, irregular, low-contrast dark patch).

The surface and its noise are drawn before the defect, so two generators with the same seed
produce the same surface for their first sample whatever its class: the difference of the two
images is the defect alone, which the tests use to check that each class looks like its name.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["CLASSES", "SurfaceGenerator"]

CLASSES = ("ok", "scratch", "pit", "stain")


class SurfaceGenerator:
    """Deterministic source of labelled surface images for one seed."""

    CLASSES = CLASSES

    def __init__(self, seed: int | None = None, size: int = 32) -> None:
        if size < 16:
            raise ValueError(f"size must be at least 16 pixels, not {size}")
        self.size = int(size)
        self._rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        self._x = xx
        self._y = yy

    def sample(self, label: int) -> npt.NDArray[np.float32]:
        """One image of class ``label`` (an index into :data:`CLASSES`): float32 ``(1, s, s)``."""
        if not 0 <= int(label) < len(CLASSES):
            raise ValueError(f"label must be 0..{len(CLASSES) - 1}, not {label!r}")
        image = self._surface()
        if label == 1:
            image += self._scratch()
        elif label == 2:
            image += self._pits()
        elif label == 3:
            image += self._stain()
        out: npt.NDArray[np.float32] = np.clip(image, 0.0, 1.0).astype(np.float32)[None]
        return out

    def batch(self, n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``n`` images ``(n, 1, s, s)`` and their labels ``(n,)``, classes balanced, shuffled."""
        if n < 0:
            raise ValueError(f"n must be >= 0, not {n}")
        labels = self._rng.permutation(np.arange(n, dtype=np.int64) % len(CLASSES))
        images = np.empty((n, 1, self.size, self.size), dtype=np.float32)
        for i, label in enumerate(labels):
            images[i] = self.sample(int(label))
        return images, labels

    def _surface(self) -> npt.NDArray[np.float64]:
        """Defect-free surface with its sensor noise, float64, not yet clipped."""
        rng, s, x, y = self._rng, self.size, self._x, self._y
        level = rng.uniform(0.35, 0.65)
        # Brushing: a random 1-D profile across the brushing direction, constant along it.
        theta = rng.uniform(0, math.pi)
        across = -math.sin(theta) * x + math.cos(theta) * y + s * math.sqrt(2)
        fine = rng.standard_normal(3 * s)
        fine = np.convolve(fine, [0.25, 0.5, 0.25], mode="same") * rng.uniform(0.02, 0.05)
        coarse = np.convolve(rng.standard_normal(3 * s), np.ones(6) / 6, mode="same")
        coarse *= rng.uniform(0.01, 0.04)
        grid = np.arange(3 * s, dtype=np.float64)
        streaks = np.interp(across, grid, fine) + np.interp(across, grid, coarse)
        # Lighting: a linear gradient and a broad specular highlight, both bright and smooth.
        phi = rng.uniform(0, 2 * math.pi)
        gradient = rng.uniform(0, 0.25) * ((math.cos(phi) * x + math.sin(phi) * y) / s - 0.5)
        cx, cy = rng.uniform(-0.25 * s, 1.25 * s, size=2)
        spread = rng.uniform(0.3, 0.7) * s
        highlight = rng.uniform(0, 0.15) * np.exp(
            -((x - cx) ** 2 + (y - cy) ** 2) / (2 * spread**2)
        )
        noise = rng.uniform(0.008, 0.025) * rng.standard_normal((s, s))
        surface: npt.NDArray[np.float64] = level + streaks + gradient + highlight + noise
        return surface

    def _scratch(self) -> npt.NDArray[np.float64]:
        """A thin straight line segment at a random angle; bright (reflecting) or dark."""
        rng, s = self._rng, self.size
        cx, cy = rng.uniform(0.2 * s, 0.8 * s, size=2)
        angle = rng.uniform(0, math.pi)
        half = rng.uniform(0.2 * s, 0.5 * s) / 2
        dx, dy = math.cos(angle), math.sin(angle)
        width = rng.uniform(0.5, 0.9)
        amplitude = rng.uniform(0.15, 0.35) * (1 if rng.random() < 0.6 else -1)
        # Distance from each pixel to the segment.
        px, py = self._x - cx, self._y - cy
        along = np.clip(px * dx + py * dy, -half, half)
        distance = np.hypot(px - along * dx, py - along * dy)
        scratch: npt.NDArray[np.float64] = amplitude * np.exp(-0.5 * (distance / width) ** 2)
        return scratch

    def _pits(self) -> npt.NDArray[np.float64]:
        """One to three small dark spots, each with a faint bright rim on the lit side."""
        rng, s = self._rng, self.size
        pits = np.zeros((s, s))
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0.1 * s, 0.9 * s, size=2)
            radius = rng.uniform(0.7, 1.6)
            depth = rng.uniform(0.25, 0.5)
            pits -= depth * np.exp(-((self._x - cx) ** 2 + (self._y - cy) ** 2) / (2 * radius**2))
            rim = rng.uniform(0, 2 * math.pi)
            rx, ry = cx + radius * math.cos(rim), cy + radius * math.sin(rim)
            pits += 0.3 * depth * np.exp(-((self._x - rx) ** 2 + (self._y - ry) ** 2) / 2.0)
        return pits

    def _stain(self) -> npt.NDArray[np.float64]:
        """A larger irregular patch, darker by little, with a soft but definite edge."""
        rng, s = self._rng, self.size
        cx, cy = rng.uniform(0.25 * s, 0.75 * s, size=2)
        rx, ry = rng.uniform(0.12 * s, 0.26 * s, size=2)
        turn = rng.uniform(0, math.pi)
        px, py = self._x - cx, self._y - cy
        u = (px * math.cos(turn) + py * math.sin(turn)) / rx
        v = (-px * math.sin(turn) + py * math.cos(turn)) / ry
        rho = np.hypot(u, v)
        alpha = np.arctan2(v, u)
        boundary = np.ones_like(rho)
        for k in (2, 3, 5):
            boundary += rng.uniform(0, 0.15) * np.cos(k * alpha + rng.uniform(0, 2 * math.pi))
        edge = rng.uniform(0.08, 0.2)
        mask = 1.0 / (1.0 + np.exp(-(boundary - rho) / edge))
        stain: npt.NDArray[np.float64] = -rng.uniform(0.08, 0.2) * mask
        return stain
