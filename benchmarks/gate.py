"""The performance gate of CI (``make bench-check``): regression lines, not targets.

A target says where a figure should be; a regression line says where a change has made it
worse than it was, with room for the noise of a shared 2-core machine. Each line sits between
the target and the figure that made us draw it (issue 14: model push had fallen to 0.06 of raw
paho and nothing failed), so the gate catches that kind of fall and does not flake on noise.
Every line is a ratio against a baseline measured in the same run, never an absolute time.

A benchmark that crosses its line is run once more (``RETRIES``); the gate fails only if the
second run crosses it too: one slow run on a busy machine is noise, two are a regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RETRIES = 1


@dataclass(frozen=True)
class Line:
    """``metric`` is a key of the outcome's ``numbers`` (or ``ratio``); the run passes while
    it stays on the good side of ``limit``."""

    metric: str
    limit: float
    higher_is_better: bool
    why: str

    def holds(self, value: float) -> bool:
        return value >= self.limit if self.higher_is_better else value <= self.limit

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.limit:g}"


# The quick benchmarks: the paths every device pays for on every deploy and every inference.
LINES: dict[str, Line] = {
    "model_push": Line(
        "ratio",
        0.4,
        True,
        "transfer MB/s over raw paho: target 0.8, 0.61-0.87 after issue 14, 0.06 before it",
    ),
    "inference_overhead": Line(
        "ratio",
        2.0,
        False,
        "agent p50 over bare session.run p50: 1.23-1.34 after issue 14, 3.0-3.3 before it",
    ),
    "agent_memory": Line(
        "ratio_vs_bare_session",
        1.40,
        False,
        "agent peak RSS (MQTT input) over a bare process holding a session: target 1.25, "
        "1.28-1.29 with msgspec, 1.47 with pydantic back; any import of 6 MiB crosses it",
    ),
}


def value_of(outcome: dict[str, Any], metric: str) -> float:
    """The gated figure of one outcome."""
    if metric == "ratio":
        return float(outcome["ratio"])
    return float(outcome["numbers"][metric])


def verdict(name: str, outcome: dict[str, Any]) -> tuple[float, bool]:
    """(figure, whether it holds its line) for a benchmark with a line."""
    line = LINES[name]
    figure = value_of(outcome, line.metric)
    return figure, line.holds(figure)
