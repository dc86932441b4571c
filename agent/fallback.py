"""The fallback chain: which tier answers, decided from evidence, with hysteresis.

Tiers, best first: the active model, the last-good model, a small fallback variant the
controller staged in advance, and the rule baseline from the manifest (numpy only, so it keeps
answering when the inference runtime itself is what fails). A factory line must never go silent,
so a failing tier is replaced by the next one that exists rather than retried in place.

:class:`Ladder` is pure: the agent feeds it each inference's outcome, each telemetry window's
power and the clock, and applies the :class:`Move` it returns. It never moves on one bad
inference: a fall needs a streak (``errors_to_fall`` failures, ``latency_breaches_to_fall``
inferences over budget, ``power_windows_to_fall`` windows over budget). Going back up is a
probe of the next tier after ``hold`` seconds: a probe that falls again doubles the hold (a
model that fails every time is tried ever more rarely), one that lasts ``probe_confirm_s``
resets it. That gap between the fall and the rise is the hysteresis.

:class:`RunRecord` is the part that must outlive the process: whether the last run ended
cleanly, how many in a row did not (a crash loop starts a tier lower per restart beyond the
budget), and whether the process died while probing (that probe failed: start below it).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import msgspec
import msgspec.json

from agent.config import FallbackConfig
from agent.protocol import Budgets, Tier

log = logging.getLogger(__name__)

ORDER: tuple[Tier, ...] = (Tier.ACTIVE, Tier.LAST_GOOD, Tier.FALLBACK, Tier.RULES)


def effective_budgets(config: FallbackConfig, sent: Budgets | None) -> Budgets:
    """The budgets this device falls on: its own config's where set (a local decision wins),
    else what the controller sent with the active deploy (its class, or a label's override),
    else none (not checked)."""
    sent = sent or Budgets()
    latency = (
        (config.latency_budget_ms, "agent.yaml")
        if config.latency_budget_ms is not None
        else (sent.latency_ms, sent.latency_from if sent.latency_ms is not None else "")
    )
    power = (
        (config.power_budget_w, "agent.yaml")
        if config.power_budget_w is not None
        else (sent.power_w, sent.power_from if sent.power_w is not None else "")
    )
    return Budgets(
        latency_ms=latency[0], latency_from=latency[1], power_w=power[0], power_from=power[1]
    )


def with_budgets(config: FallbackConfig, budgets: Budgets) -> FallbackConfig:
    """``config`` with the effective budgets (:func:`effective_budgets`) in place."""
    return msgspec.structs.replace(
        config, latency_budget_ms=budgets.latency_ms, power_budget_w=budgets.power_w
    )


class Move(msgspec.Struct, frozen=True):
    """Switch to ``to`` because of ``cause``; ``probe``: an attempt to go back up."""

    to: Tier
    cause: str
    probe: bool = False


class Ladder(msgspec.Struct):
    """Where on the chain the agent is and what would move it. No I/O, no clock of its own."""

    policy: FallbackConfig
    tier: Tier = Tier.NONE
    available: set[Tier] = msgspec.field(default_factory=set)
    broken: set[Tier] = msgspec.field(
        default_factory=set
    )  # failed to load or stage; until re-deployed
    since: float = 0.0  # when the current tier started serving
    hold_s: float = 0.0  # wait below before the next probe
    probing: bool = False
    _errors: int = 0
    _slow: int = 0
    _hot: int = 0

    def __post_init__(self) -> None:
        self.hold_s = self.policy.probe_after_s

    # -- what exists ---------------------------------------------------------------------------

    def usable(self) -> list[Tier]:
        return [t for t in ORDER if t in self.available and t not in self.broken]

    def start(self, now: float, floor: int = 0, cause: str = "") -> Move | None:
        """Pick the first usable tier at or below ``ORDER[floor]`` (a crash loop raises floor)."""
        usable = self.usable()
        below = [t for t in usable if ORDER.index(t) >= floor] or usable[-1:]
        if not below:
            self.tier = Tier.NONE
            return None
        self._enter(below[0], now)
        if ORDER.index(below[0]) > 0:
            return Move(below[0], cause or f"{ORDER[0].value} model unavailable")
        return None

    def reset(self, now: float) -> None:
        """A new model was activated: it serves, and every tier gets a fresh chance."""
        self.broken.clear()
        self.available.add(Tier.ACTIVE)
        self.hold_s = self.policy.probe_after_s
        self._enter(Tier.ACTIVE, now)

    # -- evidence ------------------------------------------------------------------------------

    def succeeded(self, latency_ms: float, now: float) -> Move | None:
        """One inference answered in ``latency_ms``."""
        self._errors = 0
        budget = self.policy.latency_budget_ms
        if budget is None or latency_ms <= budget:
            self._slow = 0
            return None
        self._slow += 1
        if self._slow < self.policy.latency_breaches_to_fall:
            return None
        return self._fall(
            now,
            f"{self._slow} inferences in a row over the {budget:g} ms latency budget "
            f"(last {latency_ms:.1f} ms)",
        )

    def failed(self, reason: str, now: float) -> Move | None:
        """One inference raised or returned NaN/infinity."""
        self._errors += 1
        if self._errors < self.policy.errors_to_fall:
            return None
        return self._fall(now, f"{self._errors} failed inferences in a row: {reason}")

    def power(self, watts: float | None, now: float) -> Move | None:
        """One telemetry window's mean power (None: not known, no evidence either way)."""
        budget = self.policy.power_budget_w
        if budget is None or watts is None:
            return None
        if watts <= budget:
            self._hot = 0
            return None
        self._hot += 1
        if self._hot < self.policy.power_windows_to_fall:
            return None
        return self._fall(
            now,
            f"{self._hot} telemetry windows in a row over the {budget:g} W power budget "
            f"(last {watts:.2f} W)",
        )

    def unusable(self, tier: Tier, reason: str, now: float) -> Move | None:
        """``tier`` cannot serve (its file does not load or stage); skip it until re-deployed."""
        self.broken.add(tier)
        if tier != self.tier:
            return None
        move = self._fall(now, reason)
        if move is not None:
            return move
        usable = self.usable()  # nothing below: the nearest tier above beats no answer at all
        above = [t for t in usable if ORDER.index(t) < ORDER.index(tier)]
        if not above:
            self.tier = Tier.NONE
            return None
        self._enter(above[-1], now)
        return Move(above[-1], reason)

    def tick(self, now: float) -> Move | None:
        """Confirm a probe that lasted, or start one when the hold below has passed."""
        if self.probing:
            if now - self.since < self.policy.probe_confirm_s:
                return None  # one probe at a time
            self.probing = False
            self.hold_s = self.policy.probe_after_s
        usable = self.usable()
        if self.tier is Tier.NONE and usable:  # something became usable (a deploy, a staging)
            self._enter(usable[0], now)
            return Move(usable[0], f"{usable[0].value} can serve again")
        if self.tier not in usable:
            return None
        above = [t for t in usable if ORDER.index(t) < ORDER.index(self.tier)]
        if not above or now - self.since < self.hold_s:
            return None
        target = above[-1]
        self._enter(target, now)
        self.probing = True
        return Move(target, f"probing {target.value} after {self.hold_s:g} s", probe=True)

    # -- moving --------------------------------------------------------------------------------

    def _fall(self, now: float, cause: str) -> Move | None:
        usable = self.usable()
        below = [t for t in usable if ORDER.index(t) > ORDER.index(self.tier)]
        self._errors = self._slow = self._hot = 0
        if self.probing:  # the probe failed: wait twice as long before the next one
            self.hold_s = min(self.hold_s * 2, self.policy.probe_max_s)
            self.probing = False
        if not below:
            return None  # nothing below: keep answering with what there is, and say so
        self._enter(below[0], now)
        return Move(below[0], cause)

    def _enter(self, tier: Tier, now: float) -> None:
        self.tier = tier
        self.since = now
        self.probing = False
        self._errors = self._slow = self._hot = 0


class RunRecord:
    """``runs.json`` in the state directory: how the previous runs of the agent ended.

    Written at start (running), when a probe starts and ends, when the agent has been healthy
    for a while, and at a clean stop, each time by one atomic rename.
    """

    def __init__(self, path: Path, policy: FallbackConfig) -> None:
        self.path = path
        self.policy = policy
        self.unclean = 0
        self.probing: Tier | None = None
        self.hold_s = policy.probe_after_s

    def begin(self) -> tuple[int, str]:
        """Count the previous run if it died; return the floor tier index to start at and why."""
        running, probing = False, None
        try:
            raw = msgspec.json.decode(self.path.read_bytes())
            # parse every field before using any: a half-read record is not "ignored"
            read = (
                bool(raw.get("running")),
                int(raw.get("unclean", 0)),
                Tier(raw["probing"]) if raw.get("probing") else None,
                float(raw.get("hold_s", self.policy.probe_after_s)),
            )
            running, self.unclean, probing, self.hold_s = read
            self.unclean = max(self.unclean, 0)
            if not math.isfinite(self.hold_s):  # a hand-edited record must not probe every tick
                self.hold_s = self.policy.probe_after_s
            self.hold_s = min(max(self.hold_s, self.policy.probe_after_s), self.policy.probe_max_s)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.error("ignoring unreadable %s (%s)", self.path, exc)
        floor, cause = 0, ""
        if running:
            self.unclean += 1
            if probing is not None and probing in ORDER:
                # died while probing: that probe failed, stay below it and wait longer
                floor = ORDER.index(probing) + 1
                self.hold_s = min(self.hold_s * 2, self.policy.probe_max_s)
                cause = f"the agent died while probing {probing.value}"
            budget = self.policy.restart_budget
            if self.unclean > budget:
                loop_floor = min(self.unclean - budget, len(ORDER) - 1)
                if loop_floor > floor:
                    floor = loop_floor
                    cause = f"crash loop: {self.unclean} unclean restarts in a row"
        else:
            self.unclean = 0
            self.hold_s = self.policy.probe_after_s
        self.probing = None
        self._write(running=True)
        return floor, cause

    def probe(self, tier: Tier | None, hold_s: float) -> None:
        """Note a probe of ``tier`` in progress (None: it ended) and the ladder's hold."""
        self.probing = tier
        self.hold_s = hold_s
        self._write(running=True)

    def healthy(self) -> None:
        """The agent served long enough without falling: the crash loop, if any, is over."""
        if self.unclean:
            self.unclean = 0
            self._write(running=True)

    def end(self) -> None:
        """A clean stop."""
        self.probing = None
        self._write(running=False)

    def _write(self, *, running: bool) -> None:
        record = {
            "running": running,
            "unclean": self.unclean,
            "probing": self.probing.value if self.probing else None,
            "hold_s": self.hold_s,
        }
        tmp = self.path.with_suffix(".json.tmp")
        try:
            tmp.write_bytes(msgspec.json.encode(record))
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not stop inference
            log.error("cannot record the run state in %s: %s", self.path, exc)
