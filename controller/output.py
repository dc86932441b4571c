"""How the CLI prints: rich tables for people, JSON for scripts, shared by every command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Piped output (logs, CI) gets wide lines instead of truncated columns.
console = Console(width=None if sys.stdout.isatty() else 160)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def energy_mj(joules: float | None) -> str:
    return "-" if joules is None else f"{joules * 1000:.3f}"


# Largest unit first: a duration is shown in the largest unit it fills at least once.
DURATION_UNITS = (("y", 365 * 86_400.0), ("d", 86_400.0), ("h", 3_600.0), ("min", 60.0))


def duration_text(seconds: float | None) -> str:
    """``11520`` -> ``3.2 h``: a duration as people say it, for payback times that range from
    minutes on a busy line to years on a sensor that infers once a minute. Two significant
    digits below 10 of a unit, whole units above; "-" when not known."""
    if seconds is None:
        return "-"
    value, unit = seconds, "s"
    for name, size in DURATION_UNITS:
        if seconds >= size:
            value, unit = seconds / size, name
            break
    if value < 9.95:
        return f"{value:.1f}".removesuffix(".0") + f" {unit}"
    return f"{value:,.0f} {unit}"


# How each fallback tier looks in tables: anything below the active model is worth a glance.
TIER_STYLE = {
    "active": "green",
    "last_good": "yellow",
    "fallback": "yellow",
    "rules": "red",
    "none": "red",
}


def tier_text(tier: Any) -> str:
    """A tier name for a rich table, coloured by how far down the fallback chain it is."""
    if not tier:
        return "-"
    return f"[{TIER_STYLE.get(str(tier), 'white')}]{escape(str(tier))}[/]"


def fleet_table(rows: list[dict[str, Any]], title: str = "fleet") -> Table:
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("device", "left"),
        ("class", "left"),
        ("labels", "left"),
        ("state", "left"),
        ("active", "left"),
        ("tier", "left"),
        ("desired", "left"),
        ("inf/s", "right"),
        ("p50 ms", "right"),
        ("p95 ms", "right"),
        ("errors", "right"),
        ("power W", "right"),
        ("mJ/inf", "right"),
        ("method", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        rate = r["inferences"] / r["window_s"] if r.get("window_s") else None
        table.add_row(
            r["id"],
            r["device_class"],
            ",".join(f"{k}={v}" for k, v in r["labels"].items()),
            "[magenta]revoked[/]"
            if r.get("revoked")
            else ("[green]online[/]" if r["online"] else "[red]offline[/]"),
            r["active_model"] or "-",
            tier_text(r.get("tier")),
            (r["desired_model"] or "-") + (" [yellow](pinned)[/]" if r.get("pinned") else ""),
            fmt(rate, 1),
            fmt(r["latency_p50_ms"], 3),
            fmt(r["latency_p95_ms"], 3),
            fmt(r["errors"]),
            fmt(r["power_w"]),
            energy_mj(r["energy_per_inference_j"]),
            r["power_method"] or "-",
        )
    return table


def emit(args: argparse.Namespace, data: Any, render: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        render()


def stage_progress(bar: Progress) -> Callable[[str, int, int, str], None]:
    """A ``(stage, done, total, label)`` callback that keeps one bar per stage."""
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int, label: str) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(f"{stage:8}", total=total, label=label)
        bar.update(tasks[stage], completed=done, total=total, label=label)

    return update


def progress_bar(title: str, *, disable: bool = False, transient: bool = False) -> Progress:
    """The bar long jobs show: title, bar, count, current item, elapsed time, and the time
    left at the pace so far (a ResNet-50-sized compress runs for minutes)."""
    return Progress(
        TextColumn(title),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[label]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=transient,
    )
