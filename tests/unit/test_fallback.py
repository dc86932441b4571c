"""The fallback ladder (streaks, skipping, probes, hysteresis) and the crash-loop run record.

The ladder is pure: every test drives it with plain float timestamps, never a sleep.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.config import FallbackConfig
from agent.fallback import ORDER, Ladder, Move, RunRecord, effective_budgets, with_budgets
from agent.protocol import Tier

A, LG, F, R = Tier.ACTIVE, Tier.LAST_GOOD, Tier.FALLBACK, Tier.RULES
ALL = frozenset(ORDER)

LATENCY_BUDGET_MS = 100.0
POWER_BUDGET_W = 10.0


def policy(**overrides: Any) -> FallbackConfig:
    fields: dict[str, Any] = {
        "errors_to_fall": 3,
        "latency_breaches_to_fall": 2,
        "power_windows_to_fall": 2,
        "probe_after_s": 30.0,
        "probe_max_s": 100.0,
        "probe_confirm_s": 10.0,
        "restart_budget": 2,
    }
    fields.update(overrides)
    return FallbackConfig(**fields)


def ladder(
    available: frozenset[Tier] = ALL,
    broken: frozenset[Tier] = frozenset(),
    floor: int = 0,
    **overrides: Any,
) -> Ladder:
    """A ladder started at t=0 at the first usable tier at or below ``ORDER[floor]``."""
    lad = Ladder(policy(**overrides), available=set(available), broken=set(broken))
    lad.start(0.0, floor)
    return lad


def apply(lad: Ladder, event: str, now: float) -> Move | None:
    """One piece of evidence: F failed, S fast, E exactly on budget, L slow, H hot, C cool,
    N power unknown."""
    match event:
        case "F":
            return lad.failed("boom", now)
        case "S":
            return lad.succeeded(LATENCY_BUDGET_MS / 10, now)
        case "E":
            return lad.succeeded(LATENCY_BUDGET_MS, now)
        case "L":
            return lad.succeeded(LATENCY_BUDGET_MS * 5, now)
        case "H":
            return lad.power(POWER_BUDGET_W * 2, now)
        case "C":
            return lad.power(POWER_BUDGET_W / 2, now)
        case "N":
            return lad.power(None, now)
    raise AssertionError(f"unknown event {event!r}")


def replay(lad: Ladder, events: str, start: float = 0.0) -> list[Move | None]:
    return [apply(lad, e, start + i + 1.0) for i, e in enumerate(events)]


LATENCY: dict[str, Any] = {"latency_budget_ms": LATENCY_BUDGET_MS}
POWER: dict[str, Any] = {"power_budget_w": POWER_BUDGET_W}


# -- falling: streaks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "events", "falls_at", "cause"),
    [
        # errors: errors_to_fall in a row; a success in between starts the streak again
        ({}, "F", None, ""),
        ({}, "FF", None, ""),
        ({}, "FFF", 3, "3 failed inferences in a row: boom"),
        ({}, "FFSFF", None, ""),
        ({}, "FFSFFF", 6, "3 failed inferences in a row"),
        ({}, "FLF", None, ""),  # a slow answer is still an answer
        ({"errors_to_fall": 1}, "F", 1, "1 failed inferences in a row"),
        ({"errors_to_fall": 5}, "FFFFSFFFFF", 10, "5 failed inferences"),
        # latency: latency_breaches_to_fall inferences over budget; one within resets
        (LATENCY, "L", None, ""),
        (LATENCY, "LL", 2, "2 inferences in a row over the 100 ms latency budget (last 500.0 ms)"),
        (LATENCY, "LSL", None, ""),
        (LATENCY, "LEL", None, ""),  # exactly on budget is within it
        (LATENCY, "LSLL", 4, "latency budget"),
        (LATENCY, "SSSSSS", None, ""),
        ({**LATENCY, "latency_breaches_to_fall": 1}, "SL", 2, "1 inferences"),
        ({}, "LLLLLLLLLL", None, ""),  # no budget: never falls on latency
        # power: power_windows_to_fall windows over budget; None is no evidence either way
        (POWER, "H", None, ""),
        (POWER, "HH", 2, "2 telemetry windows in a row over the 10 W power budget (last 20.00 W)"),
        (POWER, "HCH", None, ""),
        (POWER, "HNH", 3, "power budget"),
        (POWER, "NNNNNN", None, ""),
        (POWER, "HCHH", 4, "power budget"),
        ({}, "HHHHHHHH", None, ""),  # no budget: never falls on power
        # the streaks are separate: power windows do not break a latency streak and back
        ({**LATENCY, **POWER}, "LHL", 3, "latency budget"),
        ({**LATENCY, **POWER}, "HLSH", 4, "power budget"),
        ({**LATENCY, **POWER}, "FHLFC", None, ""),
    ],
)
def test_falls_only_after_a_streak(
    overrides: dict[str, Any], events: str, falls_at: int | None, cause: str
) -> None:
    lad = ladder(**overrides)
    moves = replay(lad, events)
    fell = [i + 1 for i, m in enumerate(moves) if m is not None]
    assert fell == ([] if falls_at is None else [falls_at])
    if falls_at is None:
        assert lad.tier is A and lad.since == 0.0
        return
    move = moves[falls_at - 1]
    assert move is not None
    assert move.to is LG and not move.probe
    assert cause in move.cause
    assert (lad.tier, lad.since, lad.probing) == (LG, float(falls_at), False)


def test_a_fall_starts_every_streak_again() -> None:
    lad = ladder(**LATENCY, **POWER)
    replay(lad, "LHFF")  # one slow, one hot, two failures: all short of a fall
    assert apply(lad, "L", 5.0) is not None  # the latency streak completes on A
    # on the new tier, one more of each is not enough
    assert replay(lad, "FLH", start=5.0) == [None, None, None]
    assert lad.tier is LG


# -- falling: skipping what is not there ---------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "broken", "floor", "lands_on"),
    [
        (ALL, set(), 0, LG),
        ({A, F, R}, set(), 0, F),  # no last-good model: straight to the fallback
        ({A, R}, set(), 0, R),  # nor a fallback: straight to the rules
        (ALL, {LG}, 0, F),
        (ALL, {LG, F}, 0, R),
        (ALL, set(), 1, F),
        ({A, LG, R}, set(), 1, R),
        (ALL, set(), 2, R),
    ],
)
def test_a_fall_skips_tiers_that_are_missing_or_broken(
    available: set[Tier], broken: set[Tier], floor: int, lands_on: Tier
) -> None:
    lad = ladder(frozenset(available), frozenset(broken), floor)
    start = lad.tier
    assert replay(lad, "FF") == [None, None]
    move = apply(lad, "F", 3.0)
    assert move is not None and move.to is lands_on and lad.tier is lands_on
    assert ORDER.index(lands_on) > ORDER.index(start)


@pytest.mark.parametrize(
    ("available", "broken", "floor", "stays_on"),
    [
        ({A}, set(), 0, A),
        (ALL, set(), 3, R),
        (ALL, {R}, 2, F),
        ({A, LG}, set(), 1, LG),
        (ALL, {LG, F, R}, 0, A),
    ],
)
def test_with_nothing_below_the_tier_stays(
    available: set[Tier], broken: set[Tier], floor: int, stays_on: Tier
) -> None:
    lad = ladder(frozenset(available), frozenset(broken), floor, **LATENCY, **POWER)
    assert lad.tier is stays_on
    for events in ("FFF", "FFFFFF", "LL", "HH"):
        assert replay(lad, events) == [None] * len(events)
        assert lad.tier is stays_on
    # the streak restarts after each fall that had nowhere to go: still no crash, still here
    assert lad.failed("boom", 99.0) is None and lad.tier is stays_on


@pytest.mark.parametrize(
    ("available", "floor", "breaks", "then_lands_on"),
    [
        (ALL, 0, LG, F),  # a tier below breaks: the next fall skips it
        (ALL, 0, F, LG),
        ({A, LG, R}, 0, LG, R),
        (ALL, 1, F, R),
    ],
)
def test_a_broken_tier_other_than_the_current_one_is_only_noted(
    available: set[Tier], floor: int, breaks: Tier, then_lands_on: Tier
) -> None:
    lad = ladder(frozenset(available), floor=floor)
    start = lad.tier
    assert lad.unusable(breaks, "does not load", 1.0) is None
    assert lad.tier is start and breaks in lad.broken and breaks not in lad.usable()
    replay(lad, "FFF", start=1.0)
    assert lad.tier is then_lands_on


@pytest.mark.parametrize(
    ("available", "floor", "lands_on"),
    [(ALL, 0, LG), ({A, F, R}, 0, F), ({A, R}, 0, R), (ALL, 2, R)],
)
def test_the_current_tier_breaking_falls_at_once(
    available: set[Tier], floor: int, lands_on: Tier
) -> None:
    lad = ladder(frozenset(available), floor=floor)
    broken = lad.tier
    move = lad.unusable(broken, "file is corrupt", 5.0)
    assert move == Move(lands_on, "file is corrupt")
    assert (lad.tier, lad.since) == (lands_on, 5.0)
    assert broken in lad.broken


def test_the_current_tier_breaking_with_nothing_below_reports_no_move() -> None:
    lad = ladder(frozenset({A}))
    assert lad.unusable(A, "file is corrupt", 5.0) is None
    assert A in lad.broken and lad.usable() == []


# -- going back up: probes and hysteresis --------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "broken", "floor", "probes"),
    [
        (ALL, set(), 1, A),
        (ALL, set(), 3, F),  # the nearest usable tier above, one rung at a time
        (ALL, {F}, 3, LG),
        (ALL, {F, LG}, 3, A),
        ({A, R}, set(), 3, A),
        ({A, F, R}, set(), 2, A),
        ({LG, F, R}, set(), 3, F),
    ],
)
def test_tick_probes_the_nearest_usable_tier_above_after_the_hold(
    available: set[Tier], broken: set[Tier], floor: int, probes: Tier
) -> None:
    lad = ladder(frozenset(available), frozenset(broken), floor)
    below = lad.tier
    assert ORDER.index(below) == floor and lad.hold_s == 30.0
    for now in (0.0, 1.0, 29.0, 29.999):
        assert lad.tick(now) is None
        assert lad.tier is below and not lad.probing
    move = lad.tick(30.0)
    assert move == Move(probes, "probing " + probes.value + " after 30 s", probe=True)
    assert (lad.tier, lad.since, lad.probing) == (probes, 30.0, True)


@pytest.mark.parametrize(
    ("available", "broken", "floor"),
    [
        (ALL, set(), 0),  # at the top already
        ({LG, F, R}, set(), 1),  # no active model: the last-good one is the top
        (ALL, {A, LG, F}, 3),  # everything above is broken
        (frozenset(), set(), 0),  # nothing at all (NONE)
    ],
)
def test_tick_never_probes_with_nothing_usable_above(
    available: set[Tier], broken: set[Tier], floor: int
) -> None:
    lad = ladder(frozenset(available), frozenset(broken), floor)
    tier = lad.tier
    for now in (30.0, 1_000.0, 1e9):
        assert lad.tick(now) is None
    assert lad.tier is tier and not lad.probing


def test_the_hold_counts_from_the_fall_not_from_the_start() -> None:
    lad = ladder()
    replay(lad, "FFF", start=100.0)  # falls to LG at t=103
    assert lad.since == 103.0
    assert lad.tick(132.9) is None
    move = lad.tick(133.0)
    assert move is not None and move.to is A and move.probe


def fail_probes(lad: Ladder, how: str, count: int) -> list[float]:
    """Let ``count`` probes of the tier above start and fall again; the hold after each."""
    holds: list[float] = []
    for _ in range(count):
        below = lad.tier
        probe_at = lad.since + lad.hold_s
        assert lad.tick(probe_at - 0.001) is None
        move = lad.tick(probe_at)
        assert move is not None and move.probe and lad.probing
        t = probe_at
        for event in how:
            t += 1.0
            assert lad.tick(t) is None  # not confirmed: probe_confirm_s has not passed
            last = apply(lad, event, t) if event != "U" else lad.unusable(lad.tier, "gone", t)
        assert last is not None and last.to is below and not last.probe
        assert lad.tier is below and not lad.probing
        holds.append(lad.hold_s)
    return holds


@pytest.mark.parametrize(
    ("overrides", "how", "holds"),
    [
        ({}, "FFF", [60.0, 100.0, 100.0, 100.0]),
        ({"probe_max_s": 1_000.0}, "FFF", [60.0, 120.0, 240.0, 480.0, 960.0, 1_000.0]),
        ({"probe_max_s": 30.0}, "FFF", [30.0, 30.0]),
        ({"probe_after_s": 5.0, "probe_max_s": 15.0}, "FFF", [10.0, 15.0, 15.0]),
        (LATENCY, "LL", [60.0, 100.0]),
        (POWER, "HH", [60.0, 100.0]),
        ({"errors_to_fall": 1}, "F", [60.0, 100.0]),
    ],
)
def test_a_probe_that_falls_again_doubles_the_hold_up_to_the_cap(
    overrides: dict[str, Any], how: str, holds: list[float]
) -> None:
    lad = ladder(floor=1, **overrides)
    assert lad.hold_s == lad.policy.probe_after_s
    assert fail_probes(lad, how, len(holds)) == holds


def test_a_probe_of_a_tier_that_no_longer_loads_doubles_the_hold_and_skips_it() -> None:
    lad = ladder(floor=3)
    assert fail_probes(lad, "U", 1) == [60.0]
    assert F in lad.broken
    move = lad.tick(lad.since + 60.0)
    assert move is not None and move.to is LG  # the broken fallback is skipped


def test_a_fall_that_is_not_a_probe_leaves_the_hold_alone() -> None:
    lad = ladder()
    replay(lad, "FFF")
    assert (lad.tier, lad.hold_s) == (LG, 30.0)
    replay(lad, "FFF", start=3.0)
    assert (lad.tier, lad.hold_s) == (F, 30.0)


@pytest.mark.parametrize(
    ("failed_probes", "lasts_s", "confirmed", "hold_after"),
    [
        (0, 9.999, False, 30.0),
        (0, 10.0, True, 30.0),
        (1, 9.0, False, 60.0),
        (1, 10.0, True, 30.0),
        (2, 10.0, True, 30.0),
        (3, 50.0, True, 30.0),
    ],
)
def test_a_probe_that_lasts_resets_the_hold(
    failed_probes: int, lasts_s: float, confirmed: bool, hold_after: float
) -> None:
    lad = ladder(floor=1)
    fail_probes(lad, "FFF", failed_probes)
    probe_at = lad.since + lad.hold_s
    assert lad.tick(probe_at) is not None and lad.tier is A and lad.probing
    assert lad.tick(probe_at + lasts_s) is None  # at the top: nothing more to probe
    assert lad.probing is not confirmed
    assert lad.hold_s == hold_after
    assert lad.tier is A


def test_after_a_confirmed_probe_a_fall_does_not_double_the_hold() -> None:
    lad = ladder(floor=1)
    fail_probes(lad, "FFF", 2)  # hold 100
    probe_at = lad.since + lad.hold_s
    lad.tick(probe_at)
    lad.tick(probe_at + 10.0)  # confirmed: hold back to 30
    replay(lad, "FFF", start=probe_at + 20.0)
    assert (lad.tier, lad.hold_s, lad.probing) == (LG, 30.0, False)


def test_a_confirmed_probe_goes_on_up_one_rung_per_hold() -> None:
    lad = ladder(floor=3)
    assert lad.tick(30.0) == Move(F, "probing fallback after 30 s", probe=True)
    assert lad.tick(40.0) is None and not lad.probing  # confirmed
    assert lad.tick(59.0) is None and lad.tier is F
    assert lad.tick(60.0) == Move(LG, "probing last_good after 30 s", probe=True)
    assert lad.tick(70.0) is None and not lad.probing
    assert lad.tick(90.0) == Move(A, "probing active after 30 s", probe=True)
    assert lad.tick(100.0) is None and (lad.tier, lad.probing) == (A, False)
    assert lad.tick(1e6) is None


# -- start and reset -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("available", "broken", "floor", "tier", "move_to"),
    [
        (ALL, set(), 0, A, None),
        (ALL, set(), 1, LG, LG),
        (ALL, set(), 2, F, F),
        (ALL, set(), 3, R, R),
        (ALL, set(), 7, R, R),  # a floor past the end: the last usable tier
        ({A, R}, set(), 1, R, R),
        ({A, LG}, set(), 3, LG, LG),  # nothing at or below the floor: the lowest there is
        ({A}, set(), 2, A, None),
        ({LG, F, R}, set(), 0, LG, LG),  # no active model
        ({A, F, R}, {A}, 0, F, F),
        (frozenset(), set(), 0, Tier.NONE, None),
        (frozenset(), set(), 2, Tier.NONE, None),
        ({A, R}, {A, R}, 0, Tier.NONE, None),
    ],
)
def test_start_picks_the_first_usable_tier_at_or_below_the_floor(
    available: set[Tier], broken: set[Tier], floor: int, tier: Tier, move_to: Tier | None
) -> None:
    lad = Ladder(policy(), available=set(available), broken=set(broken))
    lad.hold_s = 80.0  # from the run record: start keeps it
    move = lad.start(42.0, floor)
    assert lad.tier is tier
    assert (move.to if move else None) is move_to
    assert not lad.probing and lad.hold_s == 80.0
    if tier is not Tier.NONE:
        assert lad.since == 42.0


def test_start_passes_the_cause_on() -> None:
    lad = Ladder(policy(), available=set(ALL))
    assert lad.start(0.0, 2, "crash loop: 4 unclean restarts in a row") == Move(
        F, "crash loop: 4 unclean restarts in a row"
    )
    lad = Ladder(policy(), available={LG, R})
    assert lad.start(0.0) == Move(LG, "active model unavailable")


def test_a_ladder_with_no_tier_ignores_evidence() -> None:
    lad = ladder(frozenset(), **LATENCY, **POWER)
    assert lad.tier is Tier.NONE
    assert replay(lad, "FFFFLLLHHH") == [None] * 10
    assert lad.tick(1e6) is None and lad.tier is Tier.NONE


@pytest.mark.parametrize(
    ("available", "broken", "floor", "probe_failures"),
    [
        (ALL, {F}, 3, 2),
        ({R}, set(), 0, 0),  # only rules until now
        (frozenset(), set(), 0, 0),  # never had a model
        ({A, LG, F}, {A, LG}, 2, 0),
    ],
)
def test_reset_after_an_activation_serves_the_new_model_afresh(
    available: set[Tier], broken: set[Tier], floor: int, probe_failures: int
) -> None:
    lad = ladder(frozenset(available), frozenset(broken), floor)
    if probe_failures:
        fail_probes(lad, "FFF", probe_failures)
        assert lad.hold_s > 30.0
    replay(lad, "FF", start=500.0)  # a streak in progress on the old tier
    lad.reset(1_000.0)
    assert (lad.tier, lad.since, lad.probing, lad.hold_s) == (A, 1_000.0, False, 30.0)
    assert lad.broken == set() and A in lad.available
    assert lad.failed("boom", 1_001.0) is None  # the old streak is gone
    assert lad.tick(1_500.0) is None  # at the top


def test_reset_during_a_probe_ends_it() -> None:
    lad = ladder(floor=1)
    fail_probes(lad, "FFF", 1)
    assert lad.tick(lad.since + 60.0) is not None and lad.probing
    lad.reset(500.0)
    assert not lad.probing and lad.hold_s == 30.0
    replay(lad, "FFF", start=500.0)
    assert (lad.tier, lad.hold_s) == (LG, 30.0)  # not a failed probe: no doubling


# -- the run record ------------------------------------------------------------------------------


def record(path: Path, **overrides: Any) -> RunRecord:
    """A fresh RunRecord, as after a restart of the process."""
    return RunRecord(path, policy(**overrides))


def stored(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_a_clean_stop_then_a_start_is_floor_zero(tmp_path: Path) -> None:
    path = tmp_path / "runs.json"
    first = record(path)
    assert first.begin() == (0, "")  # no file yet
    assert stored(path) == {"running": True, "unclean": 0, "probing": None, "hold_s": 30.0}
    first.end()
    assert stored(path)["running"] is False
    for _ in range(3):
        again = record(path)
        assert again.begin() == (0, "")
        assert (again.unclean, again.probing, again.hold_s) == (0, None, 30.0)
        again.end()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("budget", "floors"),
    [
        # after run 1 (no record), each begin without an end is one more unclean restart
        (2, [0, 0, 0, 1, 2, 3, 3, 3]),
        (0, [0, 1, 2, 3, 3]),
        (1, [0, 0, 1, 2, 3, 3]),
        (5, [0, 0, 0, 0, 0, 0, 1, 2, 3]),
    ],
)
def test_a_crash_loop_raises_the_floor_one_tier_per_restart_past_the_budget(
    tmp_path: Path, budget: int, floors: list[int]
) -> None:
    path = tmp_path / "runs.json"
    for run, floor in enumerate(floors):
        rec = record(path, restart_budget=budget)
        got_floor, cause = rec.begin()  # and then the process dies: no end()
        assert rec.unclean == run
        assert got_floor == floor, f"run {run + 1}"
        assert floor <= len(ORDER) - 1
        if floor:
            assert cause == f"crash loop: {run} unclean restarts in a row"
        else:
            assert cause == ""
        assert stored(path) == {"running": True, "unclean": run, "probing": None, "hold_s": 30.0}
    # one clean stop ends the loop
    record(path, restart_budget=budget).end()
    rec = record(path, restart_budget=budget)
    assert rec.begin() == (0, "") and rec.unclean == 0


def test_healthy_ends_a_crash_loop(tmp_path: Path) -> None:
    path = tmp_path / "runs.json"
    for _ in range(5):
        rec = record(path)
        rec.begin()
    assert rec.unclean == 4
    rec.healthy()
    assert rec.unclean == 0 and stored(path)["unclean"] == 0
    assert stored(path)["running"] is True  # still running: a crash now is counted
    rec = record(path)
    assert rec.begin() == (0, "") and rec.unclean == 1
    rec.healthy()  # already healthy: nothing to change
    rec.healthy()
    assert stored(path)["unclean"] == 0


@pytest.mark.parametrize(
    ("probing", "hold_s", "floor", "hold_after"),
    [
        (A, 30.0, 1, 60.0),
        (LG, 30.0, 2, 60.0),
        (F, 60.0, 3, 100.0),  # doubled up to probe_max_s
        (A, 100.0, 1, 100.0),
    ],
)
def test_dying_while_probing_starts_below_the_probe_and_doubles_the_hold(
    tmp_path: Path, probing: Tier, hold_s: float, floor: int, hold_after: float
) -> None:
    path = tmp_path / "runs.json"
    rec = record(path)
    rec.begin()
    rec.probe(probing, hold_s)
    assert stored(path) == {
        "running": True,
        "unclean": 0,
        "probing": probing.value,
        "hold_s": hold_s,
    }
    rec = record(path)  # died while probing
    assert rec.begin() == (floor, f"the agent died while probing {probing.value}")
    assert (rec.unclean, rec.probing, rec.hold_s) == (1, None, hold_after)
    assert stored(path)["probing"] is None and stored(path)["hold_s"] == hold_after
    # the next crash, with no probe in progress, is an ordinary unclean restart
    rec = record(path)
    assert rec.begin() == (0, "") and rec.hold_s == hold_after and rec.unclean == 2
    # a clean stop forgets the hold
    rec.end()
    rec = record(path)
    assert rec.begin() == (0, "") and rec.hold_s == 30.0


def test_a_probe_that_ended_is_not_held_against_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "runs.json"
    rec = record(path)
    rec.begin()
    rec.probe(A, 60.0)
    rec.probe(None, 30.0)  # the probe lasted
    rec = record(path)
    assert rec.begin() == (0, "") and rec.hold_s == 30.0 and rec.unclean == 1


def test_the_deeper_of_crash_loop_and_failed_probe_wins(tmp_path: Path) -> None:
    path = tmp_path / "runs.json"
    for _ in range(4):  # unclean 3 after this: floor 1 from the loop
        record(path).begin()
    rec = record(path)
    rec.begin()
    rec.probe(LG, 30.0)
    rec = record(path)  # unclean 5: loop floor 3 beats the probe's 2
    assert rec.begin() == (3, "crash loop: 5 unclean restarts in a row")
    path.unlink()
    rec = record(path, restart_budget=10)
    rec.begin()
    rec.probe(LG, 30.0)
    rec = record(path, restart_budget=0)  # loop floor 1, probe floor 2
    assert rec.begin() == (2, "the agent died while probing last_good")


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b"42",
        b'"running"',
        b'{"running": true, "unclean": "many"}',
        b'{"running": true, "unclean": 7, "probing": "turbo"}',
        b'{"running": true, "unclean": 7, "hold_s": null}',
        b'{"running": true, "unclean": 7, "hold_s": "soon"}',
        b'{"running": true, "unclean": [1]}',
    ],
)
def test_an_unreadable_record_is_ignored_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    path = tmp_path / "runs.json"
    path.write_bytes(content)
    rec = record(path, restart_budget=0)
    with caplog.at_level(logging.ERROR, logger="agent.fallback"):
        assert rec.begin() == (0, "")
    assert (rec.unclean, rec.probing, rec.hold_s) == (0, None, 30.0)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "ignoring unreadable" in errors[0].getMessage()
    assert str(path) in errors[0].getMessage()
    # and it is replaced by a good one
    assert stored(path) == {"running": True, "unclean": 0, "probing": None, "hold_s": 30.0}


def test_a_record_that_is_a_directory_is_ignored_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runs.json"
    path.mkdir()
    rec = record(path)
    with caplog.at_level(logging.ERROR, logger="agent.fallback"):
        assert rec.begin() == (0, "")
        rec.end()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("ignoring unreadable" in m for m in messages)
    assert any("cannot record the run state" in m for m in messages)


@pytest.mark.parametrize("where", ["missing directory", "parent is a file"])
def test_a_record_that_cannot_be_written_does_not_stop_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    if where == "missing directory":
        path = tmp_path / "gone" / "runs.json"
    else:
        (tmp_path / "state").write_text("not a directory")
        path = tmp_path / "state" / "runs.json"
    rec = record(path)
    with caplog.at_level(logging.ERROR, logger="agent.fallback"):
        assert rec.begin() == (0, "")
        rec.probe(A, 30.0)
        rec.probe(None, 30.0)
        rec.unclean = 2
        rec.healthy()
        rec.end()
    assert rec.unclean == 0
    cannot = [r for r in caplog.records if "cannot record the run state" in r.getMessage()]
    assert len(cannot) == 5 and all(r.levelno == logging.ERROR for r in cannot)
    assert not path.exists()


# ------------------------------------------------------------- edges settled after review


def test_a_broken_lowest_tier_climbs_to_the_nearest_usable_one_above() -> None:
    lad = ladder(available=frozenset({A, R}))
    assert replay(lad, "FFF")[-1] == Move(R, "3 failed inferences in a row: boom")
    move = lad.unusable(R, "rules cannot serve: no manifest", 5.0)
    assert move == Move(A, "rules cannot serve: no manifest") and lad.tier is A


def test_with_every_tier_broken_the_ladder_says_none_until_one_is_usable_again() -> None:
    lad = ladder(available=frozenset({A}))
    assert lad.unusable(A, "does not load", 1.0) is None and lad.tier is Tier.NONE
    assert lad.tick(2.0) is None
    lad.broken.discard(A)  # re-deployed
    assert lad.tick(3.0) == Move(A, "active can serve again") and lad.tier is A


def test_one_probe_at_a_time_even_when_confirming_takes_longer_than_the_hold() -> None:
    lad = ladder(probe_after_s=5.0, probe_confirm_s=20.0)
    replay(lad, "FFF")  # active -> last_good at t=0.. (replay's clock)
    first = lad.tick(lad.since + 5.0)
    assert first is not None and first.probe and first.to is A
    assert lad.tick(lad.since + 10.0) is None, "no second probe while the first is unconfirmed"
    assert lad.probing


@pytest.mark.parametrize("hold", [-5, 0, "NaN", 1e12])
def test_a_hand_edited_hold_is_kept_within_the_policy(tmp_path: Path, hold: Any) -> None:
    path = tmp_path / "runs.json"
    path.write_text(
        json.dumps({"running": True, "unclean": 0, "hold_s": hold}).replace('"NaN"', "NaN")
    )
    rec = RunRecord(path, policy())
    rec.begin()
    assert 30.0 <= rec.hold_s <= 100.0


# ------------------------------------------------------------------ budgets: sent or local

SENT = p.Budgets(latency_ms=50.0, latency_from="class rpi4", power_w=7.5, power_from="class rpi4")


@pytest.mark.parametrize(
    "local, sent, expected",
    [
        pytest.param({}, None, (None, "", None, ""), id="nothing-sent-nothing-checked"),
        pytest.param({}, SENT, (50.0, "class rpi4", 7.5, "class rpi4"), id="the-controllers"),
        pytest.param(
            {"power_budget_w": 3.0},
            SENT,
            (50.0, "class rpi4", 3.0, "agent.yaml"),
            id="agent-yaml-wins-per-field",
        ),
        pytest.param(
            {"latency_budget_ms": 9.0},
            None,
            (9.0, "agent.yaml", None, ""),
            id="local-only",
        ),
    ],
)
def test_the_agent_falls_on_the_sent_budgets_unless_its_config_sets_one(
    local: dict[str, float], sent: p.Budgets | None, expected: tuple[object, ...]
) -> None:
    config = FallbackConfig(**local)  # type: ignore[arg-type]
    budgets = effective_budgets(config, sent)
    got = (budgets.latency_ms, budgets.latency_from, budgets.power_w, budgets.power_from)
    assert got == expected
    policy = with_budgets(config, budgets)
    assert (policy.latency_budget_ms, policy.power_budget_w) == (expected[0], expected[2])
    ladder = Ladder(policy)
    ladder.available = {Tier.ACTIVE, Tier.LAST_GOOD}
    ladder.start(0.0, 0, "")
    moves = [ladder.power(8.0, float(t)) for t in range(policy.power_windows_to_fall)]
    assert (moves[-1] is not None) == (expected[2] is not None and expected[2] < 8.0)
