"""The performance gate's lines and the ledger of benchmark figures (benchmarks/gate.py and
benchmarks/freshness.py): pure decisions in tables, and the README's ledger as CI reads it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks import freshness, gate
from benchmarks.run import BENCHMARKS


@pytest.mark.parametrize(
    ("name", "numbers", "ratio", "holds"),
    [
        ("model_push", {}, 0.85, True),  # after issue 14
        ("model_push", {}, 0.06, False),  # the regression issue 14 found
        ("model_push", {}, 0.40, True),  # on the line
        ("inference_overhead", {}, 1.3, True),
        ("inference_overhead", {}, 3.07, False),
        ("agent_memory", {"ratio_vs_bare_session": 1.29}, 1.29, True),  # msgspec
        ("agent_memory", {"ratio_vs_bare_session": 1.47}, 1.47, False),  # pydantic back
        ("agent_memory", {"ratio_vs_bare_session": 1.9}, 1.9, False),
    ],
)
def test_a_figure_holds_its_line_or_not(
    name: str, numbers: dict[str, float], ratio: float, holds: bool
) -> None:
    figure, ok = gate.verdict(name, {"ratio": ratio, "numbers": numbers})
    assert (figure, ok) == (ratio, holds)


def test_every_line_is_a_benchmark_between_target_and_regression() -> None:
    assert set(gate.LINES) <= set(BENCHMARKS)
    for line in gate.LINES.values():
        assert line.why, "a line says where it comes from"


LEDGER = f"""intro
{freshness.BEGIN}
| benchmark | last run | commit | figure | status |
| --- | --- | --- | --- | --- |
| `model_push` | 2026-12-07 | `abc1234` | 0.85 of raw paho | current |
| `variants` | 2026-11-26 | `002aeb7` | see Variants | **stale**: 3 change(s) since |
{freshness.END}
outro"""


def test_the_ledger_round_trips_and_names_what_disagrees_with_git() -> None:
    entries = freshness.parse_ledger(LEDGER)
    assert [(e.name, e.commit, e.status) for e in entries] == [
        ("model_push", "abc1234", "current"),
        ("variants", "002aeb7", "**stale**: 3 change(s) since"),
    ]
    rendered = f"{freshness.BEGIN}\n{freshness.render_ledger(entries)}\n{freshness.END}"
    assert freshness.parse_ledger(rendered) == entries
    worked_out = {"model_push": freshness.status(["f00d123"]), "variants": "current"}
    problems = freshness.disagreements(entries, worked_out)
    assert problems[0].startswith("model_push: the README says current")
    assert len(problems) == 1 + len(freshness.PATHS) - 2  # the rest have no row


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ([], "current"),
        (["b2", "b1"], "**stale**: 2 change(s) since, latest `b2`"),
        (None, "unknown (no git history of that commit)"),
    ],
)
def test_status_of_a_figure(changes: list[str] | None, expected: str) -> None:
    assert freshness.status(changes) == expected


def test_a_change_to_a_measured_path_makes_a_figure_stale(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "service.py").write_text("a\n")
    git("add", "-A")
    git("commit", "-qm", "measured here")
    measured = git("rev-parse", "--short", "HEAD")
    (tmp_path / "docs.md").write_text("unrelated\n")
    git("add", "-A")
    git("commit", "-qm", "docs")
    assert freshness.changes_since(measured, ("agent",), tmp_path) == []
    (tmp_path / "agent" / "service.py").write_text("b\n")
    git("commit", "-qam", "agent change")
    changed = git("rev-parse", "--short", "HEAD")
    assert freshness.changes_since(measured, ("agent",), tmp_path) == [changed]
    assert freshness.changes_since("0" * 40, ("agent",), tmp_path) is None


def test_the_readme_ledger_covers_every_benchmark() -> None:
    entries = freshness.parse_ledger(freshness.README.read_text())
    assert sorted(e.name for e in entries) == sorted(BENCHMARKS) == sorted(freshness.PATHS)
