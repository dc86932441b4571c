"""How the CLI words figures for people (controller.output)."""

from __future__ import annotations

import pytest

from controller.output import duration_text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0.0, "0 s"),
        (42.0, "42 s"),
        (90.0, "1.5 min"),
        (3_600.0, "1 h"),
        (11_520.0, "3.2 h"),
        (4 * 86_400.0, "4 d"),
        (4.3 * 86_400.0, "4.3 d"),
        (20 * 86_400.0, "20 d"),
        (400 * 86_400.0, "1.1 y"),
        (50_000 * 365 * 86_400.0, "50,000 y"),  # a sensor that infers once a minute
    ],
)
def test_durations_read_in_the_largest_unit_they_fill(seconds: float | None, text: str) -> None:
    assert duration_text(seconds) == text
