"""Maintenance windows: when a site lets a device switch models.

A window is a cron expression (5 fields: minute hour day-of-month month day-of-week) that says
when it opens, a duration, and the IANA time zone the cron is read in::

    sites:
      plant-a:
        maintenance:
          - {cron: "0 22 * * *", duration: "2h", timezone: "Europe/Berlin"}

Models may be fetched at any time (a ``slot=preload`` deploy); activation waits for a window
(controller.reconcile.plan_deploys). A site with no windows is always open.

The cron is read by APScheduler 3 (``CronTrigger.from_crontab``), with one correction: in the
day-of-week field, numbers mean what they mean to cron (0 and 7 are Sunday, 1 is Monday), not
APScheduler 3's Monday-based numbering. A window lasts ``duration`` of real time from the moment
it opens, so a window that spans a daylight-saving change is not shortened or lengthened by it;
an opening time that does not exist on the day clocks go forward opens an hour later by the
wall clock, and one that happens twice when clocks go back opens twice.

Everything here is pure: ``now`` is always passed in.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, PrivateAttr, field_validator

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_DAY_ITEM = re.compile(r"(\*|[0-7a-z]+)(?:-([0-7a-z]+))?(?:/(\d+))?")
DURATION_EXPECTED = 'a duration like "90m", "2h", "1h30m" or a number of seconds, above zero'
CRON_EXPECTED = (
    'a cron expression of 5 fields (minute hour day-of-month month day-of-week), e.g. "0 22 * * *"'
)


def parse_duration(value: Any) -> timedelta:
    """``"90m"``, ``"2h"``, ``"1h30m"``, ``"1d"``, ``"45s"``, or seconds (a number or digits)."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"expected {DURATION_EXPECTED}, got {value!r}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        match = _DURATION.fullmatch(text)
        if text.replace(".", "", 1).isdigit():
            seconds = float(text)
        elif text and match is not None:
            d, h, m, s = (int(g or 0) for g in match.groups())
            seconds = ((d * 24 + h) * 60 + m) * 60 + s
        else:
            raise ValueError(f"expected {DURATION_EXPECTED}, got {value!r}")
    else:
        raise ValueError(f"expected {DURATION_EXPECTED}, got {value!r}")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"expected {DURATION_EXPECTED}, got {value!r}")
    return timedelta(seconds=seconds)


def _cron_day(token: str) -> int:
    if token.isdigit():
        return int(token) % 7  # 7 is Sunday too
    if token[:3] in _DAYS:
        return _DAYS.index(token[:3])
    raise ValueError(f"unknown day of week {token!r}")


def _day_of_week(field: str) -> str:
    """Rewrite a cron day-of-week field for APScheduler 3 as day names (0 and 7 are Sunday).

    A field that is not a list of ``*``, days and ranges with an optional step is left as it is
    for APScheduler to judge.
    """
    if field == "*" or not any(c.isdigit() for c in field):
        return field
    days: set[int] = set()
    for item in field.lower().split(","):
        match = _DAY_ITEM.fullmatch(item)
        if match is None:
            return field
        first, last, step = match.groups()
        try:
            if first == "*":
                start, end = 0, 6
            else:
                start = _cron_day(first)
                end = (7 if last == "7" else _cron_day(last)) if last else start
        except ValueError:
            return field
        if end < start or (step is not None and int(step) < 1):
            return field
        if last is None and first != "*" and step is not None:
            end = 6  # "1/2": from Monday, every other day
        days.update(d % 7 for d in range(start, end + 1, int(step or 1)))
    return ",".join(_DAYS[d] for d in sorted(days))


def _trigger(cron: str, zone: ZoneInfo) -> CronTrigger:
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(f"got {len(fields)} fields")
    fields[4] = _day_of_week(fields[4])
    return CronTrigger.from_crontab(" ".join(fields), timezone=zone)


class Window(BaseModel):
    """One maintenance window of a site (controller.yaml ``sites.<site>.maintenance[i]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cron: str
    duration: timedelta
    timezone: str

    _trigger: CronTrigger = PrivateAttr()

    @field_validator("cron", mode="before")
    @classmethod
    def _check_cron(cls, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected {CRON_EXPECTED}, got {value!r}")
        try:
            trigger = _trigger(value, ZoneInfo("UTC"))
        except ValueError as exc:
            raise ValueError(f"expected {CRON_EXPECTED}; {value!r}: {exc}") from exc
        if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
            raise ValueError(f"cron expression {value!r} never fires (a date that never comes?)")
        return " ".join(value.split())

    @field_validator("duration", mode="before")
    @classmethod
    def _check_duration(cls, value: Any) -> timedelta:
        return parse_duration(value)

    @field_validator("timezone", mode="before")
    @classmethod
    def _check_timezone(cls, value: Any) -> str:
        expected = 'an IANA time zone name such as "Europe/Berlin" or "UTC"'
        if not isinstance(value, str):
            raise ValueError(f"expected {expected}, got {value!r}")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"unknown time zone {value!r}: expected {expected}") from exc
        return value

    def model_post_init(self, context: Any, /) -> None:
        self._trigger = _trigger(self.cron, ZoneInfo(self.timezone))

    def last_opening(self, now: datetime) -> datetime | None:
        """When the window that contains ``now`` opened (UTC), or None if ``now`` is outside.

        The window is [opening, opening + duration): the newest opening is the first one after
        ``now - duration`` (cron times are whole seconds, hence the rounding), if it is not
        after ``now``.
        """
        now = now.astimezone(UTC)
        opened: datetime | None = self._trigger.get_next_fire_time(
            None, now - self.duration + timedelta(microseconds=1)
        )
        if opened is None or opened.astimezone(UTC) > now:
            return None
        return opened.astimezone(UTC)

    def next_opening(self, now: datetime) -> datetime | None:
        """The first opening after ``now``, in the window's time zone (None: it never opens)."""
        after = now.astimezone(UTC) + timedelta(microseconds=1)
        opening: datetime | None = self._trigger.get_next_fire_time(None, after)
        return opening


def inside(windows: Sequence[Window], now: datetime) -> bool:
    """Whether ``now`` is inside one of ``windows``; no windows at all means always inside."""
    return not windows or any(w.last_opening(now) is not None for w in windows)


def next_opening(windows: Sequence[Window], now: datetime) -> datetime | None:
    """The soonest opening of any of ``windows`` after ``now`` (in that window's time zone),
    or None when there are no windows or none ever opens again."""
    openings = [o for o in (w.next_opening(now) for w in windows) if o is not None]
    return min(openings, key=lambda o: o.astimezone(UTC)) if openings else None


def describe(opening: datetime | None) -> str:
    """An opening for people: ``2026-11-26 22:00 Europe/Berlin``."""
    if opening is None:
        return "a window that never opens"
    zone = opening.tzinfo
    name = zone.key if isinstance(zone, ZoneInfo) else opening.strftime("%Z")
    return f"{opening:%Y-%m-%d %H:%M} {name}"
