"""``greenfleet rollout ...`` and ``devices pin|unpin``: staged rollouts from the command line.

Commands read and write SQLite only (controller.rollout_store), so they work with the daemon
stopped; a running daemon picks their changes up at its next tick. Every change goes through
the pure decisions of controller.rollout and is recorded as an event with its reason.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from agent.protocol import ModelRef, ProtocolError, utcnow
from controller import registry, rollout, rollout_store
from controller.config import load_controller_config
from controller.db import open_db
from controller.errors import InvalidRequest, NotFound
from controller.output import console, emit
from controller.rollout import (
    NO_WAVE,
    MemberStatus,
    RolloutSpec,
    RolloutState,
    Status,
    Step,
)
from controller.rollouts_job import device_facts
from controller.windows import parse_duration
from model_store.catalog import Catalog

FINISHED = (Status.COMPLETED, Status.ABORTED)
OUT_OF_WAVES = (MemberStatus.SKIPPED, MemberStatus.CANCELLED)  # not shown as wave progress
STATUS_STYLE = {
    "running": "green",
    "paused": "yellow",
    "aborting": "red",
    "aborted": "red",
    "completed": "green",
    "pending": "white",
    "updating": "cyan",
    "updated": "green",
    "failed": "red",
    "missed": "yellow",
    "skipped": "dim",
    "rolling_back": "red",
    "rolled_back": "yellow",
    "cancelled": "dim",
}


def styled(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{escape(status)}[/]"


# ------------------------------------------------------------------------------- read models


def wave_name(wave: int) -> str:
    if wave == NO_WAVE:
        return "-"
    return "canary" if wave == 0 else f"wave {wave}"


def summary(state: RolloutState) -> dict[str, Any]:
    """One rollout as ``rollout list`` shows it."""
    targeted = [m for m in state.members if m.status not in OUT_OF_WAVES]
    return {
        "id": state.id,
        "model": state.spec.model,
        "status": state.status.value,
        "wave": state.wave,
        "waves": state.waves,
        "updated": sum(m.status is MemberStatus.UPDATED for m in state.members),
        "total": len(targeted),
        **{
            s.value: sum(m.status is s for m in state.members)
            for s in (
                MemberStatus.FAILED,
                MemberStatus.MISSED,
                MemberStatus.ROLLING_BACK,
                MemberStatus.ROLLED_BACK,
                MemberStatus.SKIPPED,
            )
        },
        "reason": state.reason,
        "created": state.created.isoformat(),
        "wave_started": state.wave_started.isoformat() if state.wave_started else None,
        "soak_started": state.soak_started.isoformat() if state.soak_started else None,
        "soak_s": state.spec.soak_s,
    }


def detail(db: Any, state: RolloutState, events: int = 20) -> dict[str, Any]:
    """Everything ``rollout show`` and ``watch`` print about one rollout."""
    return {
        **summary(state),
        "spec": state.spec.model_dump(mode="json"),
        "members": [
            {
                "device": m.device,
                "wave": m.wave,
                "status": m.status.value,
                "previous_model": m.previous_model,
                "since": m.since.isoformat() if m.since else None,
                "reason": m.reason,
            }
            for m in state.members
        ],
        "gates": rollout_store.gates(db, state.id),
        "events": rollout_store.events(db, state.id, events),
    }


def short_time(stamp: str | None) -> str:
    return "-" if stamp is None else f"{datetime.fromisoformat(stamp):%Y-%m-%d %H:%M:%S}"


def wave_label(view: dict[str, Any]) -> str:
    """``canary/3`` or ``2/3``: the current wave of the waves after the canary."""
    current = "canary" if view["wave"] == 0 else str(view["wave"])
    return f"{current}/{max(view['waves'] - 1, 0)}"


def _percent(value: float) -> str:
    return f"{value:.1%}"


def gate_value(name: str, value: float | None) -> str:
    """Rates as percentages, regressions as +N% against the control group, counts as is."""
    if value is None:
        return "-"
    if "regression" in name:
        return f"{value:+.0%}"
    if "increase" in name:
        return f"{value * 100:+.1f} pts"
    if "rate" in name:
        return _percent(value)
    return f"{value:g}"


def gates_table(gates: dict[str, Any]) -> Table:
    title = "gates" + (f" ({wave_name(gates['wave'])}, {gates['at']})" if gates["at"] else "")
    table = Table("gate", "value", "limit", "verdict", "detail", title=title, title_justify="left")
    for g in gates["results"]:
        if g["breached"]:
            verdict = "[red]breached[/]"
        elif g["judged"]:
            verdict = "[green]ok[/]"
        else:
            verdict = "[yellow]waiting[/]"
        table.add_row(
            g["name"],
            gate_value(g["name"], g["value"]),
            gate_value(g["name"], g["limit"]),
            verdict,
            escape(g["detail"]),
        )
    return table


def position(view: dict[str, Any]) -> str:
    """``canary, 2 waves to follow`` or ``wave 1 of 2``."""
    after = max(view["waves"] - 1, 0)
    if view["wave"] == 0:
        return f"canary, {after} wave{'s' if after != 1 else ''} to follow"
    return f"wave {view['wave']} of {after}"


def headline(view: dict[str, Any]) -> str:
    text = (
        f"rollout {view['id']} of {escape(view['model'])}: {styled(view['status'])} in "
        f"{position(view)}; {view['updated']}/{view['total']} devices updated"
    )
    for key in ("failed", "missed", "rolling_back", "rolled_back", "skipped"):
        if view.get(key):
            text += f", {view[key]} {key.replace('_', ' ')}"
    if view["reason"]:
        text += f"\n{escape(view['reason'])}"
    return text


def soak_line(view: dict[str, Any]) -> str | None:
    if view["status"] != "running" or view["soak_started"] is None:
        return None
    elapsed = (utcnow() - datetime.fromisoformat(view["soak_started"])).total_seconds()
    soak = view["soak_s"]
    return f"{wave_name(view['wave'])} soaking: {min(elapsed, soak):.0f} s of {soak:.0f} s"


def wave_bars(view: dict[str, Any]) -> Progress:
    """One bar per wave: devices on the new model of the wave's devices."""
    bars = Progress(
        TextColumn("{task.description:>8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[label]}"),
        console=console,
        auto_refresh=False,
    )
    waves: dict[int, list[dict[str, Any]]] = {}
    for m in view["members"]:
        if m["status"] not in {s.value for s in OUT_OF_WAVES}:
            waves.setdefault(m["wave"], []).append(m)
    for wave in sorted(waves):
        members = waves[wave]
        counts: dict[str, int] = {}
        for m in members:
            counts[m["status"]] = counts.get(m["status"], 0) + 1
        label = ", ".join(f"{n} {styled(s)}" for s, n in sorted(counts.items()))
        marker = "▶ " if wave == view["wave"] and view["status"] not in FINISHED else ""
        bars.add_task(
            marker + wave_name(wave),
            total=len(members),
            completed=counts.get("updated", 0),
            label=label,
        )
    return bars


def frame(view: dict[str, Any]) -> RenderableType:
    """One screen of ``rollout watch``."""
    parts: list[RenderableType] = [Text.from_markup(headline(view)), wave_bars(view)]
    soaking = soak_line(view)
    if soaking:
        parts.append(Text(soaking))
    skipped = [m for m in view["members"] if m["status"] == "skipped"]
    if skipped:
        parts.append(
            Text(
                "skipped: "
                + "; ".join(f"{m['device']} ({m['reason'] or 'skipped'})" for m in skipped)
            )
        )
    if view["gates"]["results"]:
        parts.append(gates_table(view["gates"]))
    return Group(*parts)


# ---------------------------------------------------------------------------------- commands


def _seconds(text: str) -> float:
    if text.strip() in ("0", "0s"):
        return 0.0
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise InvalidRequest(f"bad duration {text!r}: {exc}") from exc


def _check_model(db: Any, args: argparse.Namespace, model: str) -> str:
    """The rollout's model as the catalog names it; refuse one the catalog lacks."""
    try:
        ref = ModelRef.parse(model)
    except ProtocolError as exc:
        raise InvalidRequest(str(exc)) from exc
    catalog = Catalog(db, args.home.store)
    variant = catalog.variant_or_none(ref)
    if variant is None:
        if "+" in ref.version or catalog.version_or_none(str(ref)) is None:
            raise NotFound(f"no model {ref} in the catalog; see `greenfleet models list`")
    elif not variant.eligible and not args.force:
        raise InvalidRequest(
            f"{ref} is not eligible: {variant.reason}; see `greenfleet models show "
            f"{variant.base}`, or pass --force to roll it out anyway"
        )
    return str(ref)


def build_spec(db: Any, args: argparse.Namespace) -> RolloutSpec:
    """The rollout file (if any), with the flags given on the command line over it."""
    raw: dict[str, Any] = {}
    if args.file:
        raw = RolloutSpec.from_yaml(Path(args.file)).model_dump()
    if args.model:
        raw["model"] = args.model
    if args.selector:
        raw["selector"] = registry.parse_selector(args.selector)
    for flag, key in (("canary", "canary"), ("wave_size", "wave_size"), ("growth", "growth")):
        if getattr(args, flag) is not None:
            raw[key] = getattr(args, flag)  # the spec judges them, naming the flag's key
    for flag, key in (("soak", "soak_s"), ("offline_deadline", "offline_deadline_s")):
        if getattr(args, flag) is not None:
            raw[key] = _seconds(getattr(args, flag))
    if args.on_breach is not None:
        raw["gates"] = {**raw.get("gates", {}), "on_breach": args.on_breach}
    if not raw.get("model"):
        raise InvalidRequest("name the model: rollout create NAME:VERSION (or model: in --file)")
    if not raw.get("selector"):
        raise InvalidRequest(
            "a rollout targets devices by label: pass --selector key=value[,key=value...] "
            "(or selector: in --file)"
        )
    spec = RolloutSpec.parse(raw, "rollout")
    return spec.model_copy(update={"model": _check_model(db, args, spec.model)})


def cmd_create(args: argparse.Namespace) -> int:
    db = open_db(args.home.prepare().database)
    spec = build_spec(db, args)
    config = load_controller_config(args.home.config)
    now = utcnow()
    with rollout_store.write_transaction(db):
        rollout_id = rollout_store.next_id(db)
        facts = device_facts(db, rollout_id, spec, now, now, config)
        step = rollout.start(rollout_id, spec, list(facts.values()), now)  # RolloutError: exit 1
        rollout_store.commit_step(db, step, now, previous=None)
    view = detail(db, step.state)

    def render() -> None:
        console.print(headline(view))
        if not facts:
            console.print(
                f"no device matches {escape(str(spec.selector))} yet: devices that register "
                "later and match join the rollout"
            )
        console.print(wave_bars(view))
        console.print(
            f"the controller daemon moves it on; watch with `greenfleet rollout watch {rollout_id}`"
        )

    emit(args, view, render)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    rows = [summary(s) for s in rollout_store.load_all(db)]

    def render() -> None:
        table = Table(
            "id",
            "model",
            "status",
            "wave",
            "devices",
            "reason",
            title=f"{len(rows)} rollouts",
            title_justify="left",
        )
        for r in rows:
            table.add_row(
                r["id"],
                escape(r["model"]),
                styled(r["status"]),
                wave_label(r),
                f"{r['updated']}/{r['total']}"
                + (f" ({r['skipped']} skipped)" if r["skipped"] else ""),
                escape(r["reason"]),
            )
        console.print(table)

    emit(args, rows, render)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    view = detail(db, rollout_store.load(db, args.id))

    def render() -> None:
        console.print(headline(view))
        spec = view["spec"]
        console.print(
            f"selector {','.join(f'{k}={v}' for k, v in spec['selector'].items())}; canary "
            f"{spec['canary']}, waves of {spec['wave_size']} x{spec['growth']:g}, soak "
            f"{spec['soak_s']:g} s, on breach {spec['gates']['on_breach']}"
        )
        members = Table(
            "device",
            "wave",
            "status",
            "previous model",
            "since",
            "reason",
            title="members",
            title_justify="left",
        )
        for m in sorted(view["members"], key=lambda m: (m["wave"] == NO_WAVE, m["wave"])):
            members.add_row(
                m["device"],
                wave_name(m["wave"]),
                styled(m["status"]),
                escape(m["previous_model"] or "-"),
                short_time(m["since"]),
                escape(m["reason"]),
            )
        console.print(members)
        console.print(gates_table(view["gates"]))
        events = Table("time", "device", "event", "message", title="events", title_justify="left")
        for e in view["events"]:
            events.add_row(e["ts"], e["device"] or "-", e["event"], escape(e["message"]))
        console.print(events)

    emit(args, view, render)
    return 0


def _operate(
    args: argparse.Namespace,
    decide: Callable[[RolloutState, str, Any], Step],
    verb: str,
) -> int:
    """pause, resume, abort: one pure decision, committed with its events and rollbacks."""
    db = open_db(args.home.database)
    now = utcnow()
    reason = args.reason or f"{verb} by the operator"
    with rollout_store.write_transaction(db):
        state = rollout_store.load(db, args.id)
        step = decide(state, reason, now)  # RolloutError (an InvalidRequest): exit 1
        rollout_store.commit_step(db, step, now, previous=state)
    view = summary(step.state)
    rollbacks = [c for c in step.changes if c.rollback]

    def render() -> None:
        console.print(headline(view))
        if rollbacks:
            console.print(
                f"rolling back {len(rollbacks)} device(s) to their previous model: "
                + ", ".join(f"{c.device} -> {c.model}" for c in rollbacks)
            )

    emit(args, {**view, "rollbacks": [c.device for c in rollbacks]}, render)
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _operate(args, rollout.pause, "paused")


def cmd_resume(args: argparse.Namespace) -> int:
    return _operate(args, rollout.resume, "resumed")


def cmd_abort(args: argparse.Namespace) -> int:
    return _operate(args, rollout.abort, "aborted")


def cmd_watch(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)

    def view() -> dict[str, Any]:
        return detail(db, rollout_store.load(db, args.id), events=5)

    current = view()
    if args.json:
        emit(args, current, lambda: None)
        return 0
    if args.once:
        console.print(frame(current))
        return 0
    try:
        with Live(frame(current), console=console, refresh_per_second=4) as live:
            while current["status"] not in FINISHED:
                time.sleep(args.interval)
                current = view()
                live.update(frame(current))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_pin(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    registry.set_pinned(db, args.id, True, args.reason or "", utcnow())
    emit(
        args,
        {"device": args.id, "pinned": True, "reason": args.reason or ""},
        lambda: console.print(
            f"{args.id} pinned"
            + (f" ({escape(args.reason)})" if args.reason else "")
            + ": rollouts skip it and show it as skipped; `devices unpin` releases it"
        ),
    )
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    before = registry.set_pinned(db, args.id, False, "", utcnow())
    emit(
        args,
        {"device": args.id, "pinned": False, "was_pinned": bool(before.get("pinned"))},
        lambda: console.print(
            f"{args.id} unpinned: rollouts that match it include it from their next wave"
            if before.get("pinned")
            else f"{args.id} was not pinned"
        ),
    )
    return 0


# ---------------------------------------------------------------------------------- parser


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    rollouts = sub.add_parser("rollout", help="staged rollouts with health gates").add_subparsers(
        dest="sub", required=True
    )
    create = add(
        rollouts,
        "create",
        cmd_create,
        "roll a model out to the devices matching a selector: canary, waves, gates",
        True,
    )
    create.add_argument(
        "model",
        nargs="?",
        help="NAME:VERSION (the plan picks each device's variant) or NAME:VERSION+VARIANT",
    )
    create.add_argument("--selector", help="device labels, e.g. site=plant-a,line=3")
    create.add_argument("--canary", help="devices in the canary: a count or N%% (default 1)")
    create.add_argument("--wave-size", help="devices per wave: a count or N%% (default 25%%)")
    create.add_argument("--growth", type=float, help="each wave is this times the last (1)")
    create.add_argument("--soak", help="soak time per wave, e.g. 30s, 5m (default 5m)")
    create.add_argument(
        "--offline-deadline", help="how long a wave waits for an offline device (default 1h)"
    )
    create.add_argument(
        "--on-breach", choices=["pause", "abort"], help="what a breached gate does (abort)"
    )
    create.add_argument("--file", help="a rollout YAML file (RolloutSpec); flags override it")
    create.add_argument("--force", action="store_true", help="roll out an ineligible variant")
    add(rollouts, "list", cmd_list, "list rollouts", True)
    show = add(rollouts, "show", cmd_show, "members, gates and events of a rollout", True)
    show.add_argument("id")
    for name, func, help in (
        ("pause", cmd_pause, "pause a rollout: no new wave starts"),
        ("resume", cmd_resume, "resume a paused rollout"),
        ("abort", cmd_abort, "abort a rollout: its updated devices roll back"),
    ):
        op = add(rollouts, name, func, help, True)
        op.add_argument("id")
        op.add_argument("--reason", help="why (recorded in the rollout's events)")
    watch = add(rollouts, "watch", cmd_watch, "live progress of a rollout, until it ends", True)
    watch.add_argument("id")
    watch.add_argument("--once", action="store_true", help="print one frame and exit")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")


def register_devices(devices: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    pin = add(devices, "pin", cmd_pin, "keep a device out of rollouts", True)
    pin.add_argument("id")
    pin.add_argument("--reason", help="why (shown where the rollout skips it)")
    unpin = add(devices, "unpin", cmd_unpin, "let rollouts include a device again", True)
    unpin.add_argument("id")
