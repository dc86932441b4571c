"""``greenfleet``: the operator's command line, and the composition root of the controller.

Commands write intent to the controller database and read state from it; the daemon
(``greenfleet controller run``) acts on that intent. Lists print tables, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from agent.errors import ConfigError as AgentConfigError
from agent.protocol import ModelRef, ProtocolError
from controller import (
    api_commands,
    consumer_commands,
    device_commands,
    model_commands,
    plan_commands,
    registry,
    rollout_commands,
    views,
)
from controller.db import open_db
from controller.errors import ControllerError, InvalidRequest
from controller.home import Home
from controller.output import console, emit, fleet_table, tier_text
from model_store.catalog import Catalog
from model_store.errors import ModelStoreError
from simulator import cli as simulator_cli

# ---------------------------------------------------------------------------------- commands


def _budget(value: float | None, unit: str, source: str) -> str:
    # the source comes from the device's birth: text, never markup
    return "none (not checked)" if value is None else f"{value:g} {unit} ({escape(source)})"


def _differs(applied: dict[str, Any] | None, planned: dict[str, Any]) -> bool:
    """The agent applies other budgets than the plan's, and not because agent.yaml says so."""
    if applied is None:
        return True
    if "agent.yaml" in (applied["latency_from"], applied["power_from"]):
        return False
    return (applied["latency_ms"], applied["power_w"]) != (
        planned["latency_ms"],
        planned["power_w"],
    )


def budgets_text(budgets: dict[str, Any]) -> str:
    """``devices show``'s budget line: what the agent applies, and what the controller would
    send with the next active deploy where that differs."""
    applied, planned = budgets.get("applied"), budgets.get("planned")
    if applied is None:
        text = "budgets: not reported by the agent yet"
    else:
        text = (
            f"budgets: latency {_budget(applied['latency_ms'], 'ms', applied['latency_from'])}, "
            f"power {_budget(applied['power_w'], 'W', applied['power_from'])}"
        )
    if planned is not None and _differs(applied, planned):
        text += (
            f"; [yellow]the controller plans with latency {planned['latency_ms']:g} ms "
            f"({planned['latency_from']}), power {planned['power_w']:g} W "
            f"({planned['power_from']})[/]: sent with the next active deploy"
        )
    return text


def cmd_devices_list(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    rows = views.fleet(db)
    emit(args, rows, lambda: console.print(fleet_table(rows, f"{len(rows)} devices")))
    return 0


def cmd_devices_show(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    detail = views.device_detail(db, args.id)

    def render() -> None:
        console.print(fleet_table([detail], f"device {args.id}"))
        hw = detail["hardware"]
        console.print(
            f"hardware: {hw.get('arch')} {hw.get('cpu_model')} x{hw.get('cores')}, "
            f"{hw.get('memory_mb')} MiB, {hw.get('os')}; flags {','.join(hw.get('cpu_flags', []))}"
        )
        console.print(f"agent {detail['agent_version']}, runtimes {','.join(detail['runtimes'])}")
        since = f" (since {detail['tier_at']})" if detail["tier_at"] else ""
        console.print(
            f"tier {tier_text(detail['tier'])}{since}; "
            f"last-good {detail['last_good_model'] or '-'}; "
            f"fallback {detail['fallback_model'] or '-'}"
        )
        console.print(budgets_text(detail["budgets"]))
        if detail.get("pinned"):
            console.print(
                f"[yellow]pinned[/]: rollouts skip it ({escape(detail.get('pin_reason') or '-')}); "
                f"`greenfleet devices unpin {args.id}` to release"
            )
        if detail.get("preloaded_model"):
            console.print(
                f"preloaded {detail['preloaded_model']}: on the device, activated when its "
                "maintenance window opens"
            )
        retry = detail.get("deploy_retry")
        if retry:
            console.print(
                f"[red]deploy of {escape(retry['model'])} failed[/] "
                f"({retry['failures']} in a row: {escape(retry['error'] or '-')}); next try "
                f"{retry['next_try']}, or now: `greenfleet deploy {escape(retry['model'])} "
                f"--device {args.id} --retry`"
            )
        if detail.get("outbox_dropped"):
            console.print(
                f"[red]{detail['outbox_dropped']} message(s) dropped by the agent[/] "
                "(its outbox could neither store nor send them)"
            )
        if detail.get("rejected_messages"):
            console.print(
                f"[red]{detail['rejected_messages']} message(s) rejected[/] "
                f"(last: {escape(detail.get('last_rejection') or '-')})"
            )
        for m in detail["hardware_check"]:
            colour = "red" if m["severity"] == "error" else "yellow"
            console.print(f"[{colour}]{m['severity']}[/]: {escape(m['message'])}")
        if not detail["hardware_check"]:
            console.print(f"hardware matches the {detail['device_class']} profile")
        table = Table("time", "event", "message", title="recent events", title_justify="left")
        for e in detail["recent_events"]:
            table.add_row(e["ts"], e["event"], escape(e["message"]))
        console.print(table)
        if detail["recent_tier_changes"]:
            changes = Table(
                "time", "from", "to", "cause", title="recent tier changes", title_justify="left"
            )
            for e in detail["recent_tier_changes"]:
                d = e["detail"]
                changes.add_row(
                    e["ts"],
                    tier_text(d.get("from")),
                    tier_text(d.get("to")),
                    escape(str(d.get("cause") or e["message"])),
                )
            console.print(changes)

    emit(args, detail, render)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    try:
        ref = ModelRef.parse(args.model)
    except ProtocolError as exc:
        raise InvalidRequest(str(exc)) from exc
    variant = Catalog(db, args.home.store).get(ref)
    if not variant.eligible and not args.force:
        raise InvalidRequest(
            f"{ref} is not eligible: {variant.reason}; see `greenfleet models show "
            f"{variant.base}`, or pass --force to deploy it anyway"
        )
    if args.selector:
        targets = registry.matching(db, registry.parse_selector(args.selector))
        if not targets:
            raise InvalidRequest(f"no device matches selector {args.selector!r}")
    else:
        targets = list(args.device)
    registry.set_desired(db, targets, str(ref))
    retried = registry.retry_now(db, targets) if args.retry else 0
    emit(
        args,
        {"model": str(ref), "devices": targets, "retried": retried},
        lambda: console.print(
            f"desired model of {len(targets)} device(s) set to {ref}: {', '.join(targets)}\n"
            + (f"{retried} failed deploy(s) tried again now\n" if args.retry else "")
            + "the controller daemon delivers it (watch with `greenfleet status`)"
        ),
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    device = registry.get_device(db, args.id)
    target: str | None
    if args.to:
        try:
            target = str(ModelRef.parse(args.to))
        except ProtocolError as exc:
            raise InvalidRequest(str(exc)) from exc
        Catalog(db, args.home.store).get(target)
    else:
        target = device.get("last_good_model")
        if not target:
            raise InvalidRequest(
                f"{args.id} reports no last-good model; name a version with --to NAME:VERSION"
            )
    registry.set_desired(db, [args.id], target, rollback=True)
    emit(
        args,
        {"device": args.id, "model": target, "rollback": True},
        lambda: console.print(
            f"{args.id} rolls back to {target} (from {device.get('active_model') or 'nothing'}); "
            "served from its local copy when it still has one"
        ),
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    db = open_db(args.home.database)
    rows = views.fleet(db)
    events = views.recent_events(db, 10)
    online = sum(r["online"] for r in rows)
    converged = sum(
        1 for r in rows if r["desired_model"] and r["desired_model"] == r["active_model"]
    )
    pending = sum(1 for r in rows if r["desired_model"] and r["desired_model"] != r["active_model"])
    summary = {"devices": len(rows), "online": online, "converged": converged, "pending": pending}

    def render() -> None:
        console.print(
            f"{len(rows)} devices, {online} online; {converged} on their desired model, "
            f"{pending} pending"
        )
        console.print(fleet_table(rows))
        table = Table(
            "time", "device", "event", "message", title="recent events", title_justify="left"
        )
        for e in events:
            table.add_row(e["ts"], e["device"], e["event"], e["message"])
        console.print(table)

    emit(args, {"summary": summary, "devices": rows, "events": events}, render)
    return 0


def parse_broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidRequest(f"bad broker address {text!r}: use HOST:PORT")
    return host, int(port)


def _connection(args: argparse.Namespace) -> device_commands.Connection:
    return device_commands.controller_connection(
        args.home,
        args.broker,
        username=args.username or os.environ.get("GREENFLEET_BROKER_USERNAME"),
        password=os.environ.get("GREENFLEET_BROKER_PASSWORD"),
        plain=args.plain,
        allow_plaintext=args.allow_plaintext,
    )


def _connection_args(args: argparse.Namespace) -> list[str]:
    """The broker flags of ``controller run``, for the ingest workers it starts."""
    out = ["--broker", args.broker] if args.broker else []
    out += ["--username", args.username] if args.username else []
    out += ["--plain"] if args.plain else []
    return out + (["--allow-plaintext"] if args.allow_plaintext else [])


def cmd_controller_run(args: argparse.Namespace) -> int:
    from controller.broker_config import MAX_INGEST_WORKERS
    from controller.daemon import Controller
    from controller.ingest_workers import WorkerPool, worker_command

    if not 0 <= args.ingest_workers <= MAX_INGEST_WORKERS:
        raise InvalidRequest(
            f"--ingest-workers must be 0 (the controller ingests) to {MAX_INGEST_WORKERS}"
        )
    conn = _connection(args)
    try:
        controller = Controller(
            args.home,
            conn.host,
            conn.port,
            username=conn.username,
            password=conn.password,
            tls=conn.tls,
            allow_plaintext=conn.allow_plaintext,
            reconcile_interval_s=args.reconcile_interval,
            api=api_commands.from_args(args),
            workers=WorkerPool(
                args.home,
                args.ingest_workers,
                worker_command(args.home, _connection_args(args)),
            ),
        )
    except AgentConfigError as exc:
        raise InvalidRequest(str(exc)) from exc
    logging.getLogger(__name__).info("broker %s", conn.describe())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    controller.start()
    while not stop.wait(0.5):
        if controller.link.fatal is not None:
            controller.stop()
            return 3
    controller.stop()
    return 0


def cmd_controller_ingest_worker(args: argparse.Namespace) -> int:
    from controller.ingest_workers import worker_main

    try:
        conn = _connection(args)
        return worker_main(args.home, args.index, conn, args.retire, args.ready_fd)
    except AgentConfigError as exc:
        raise InvalidRequest(str(exc)) from exc


def cmd_broker_run(args: argparse.Namespace) -> int:
    from controller.broker import EmbeddedBroker

    if args.secure:
        return device_commands.cmd_broker_run_secure(args)
    broker = EmbeddedBroker(args.port).start()
    print(
        f"embedded broker (amqtt) listening on 127.0.0.1:{broker.port}: FOR DEMOS ONLY (no TLS, "
        "no authentication, loses queued QoS 1 messages); for a site: `greenfleet broker "
        "config` then `greenfleet broker run --secure`. Ctrl-C stops it",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    broker.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from controller.demo import run_demo

    return run_demo(args.home, keep_running=args.keep_running, embedded=args.embedded_broker)


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greenfleet", description="Operate a greenfleet fleet.")
    parser.add_argument(
        "--home", help="controller home (default $GREENFLEET_HOME or ./.greenfleet)"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: Any,
        name: str,
        func: Callable[[argparse.Namespace], int],
        help: str,
        json_flag: bool = False,
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    devices = sub.add_parser("devices", help="list and inspect devices").add_subparsers(
        dest="sub", required=True
    )
    add(devices, "list", cmd_devices_list, "list devices with their latest telemetry", True)
    show = add(devices, "show", cmd_devices_show, "show one device", True)
    show.add_argument("id")
    rollout_commands.register_devices(devices, add)
    device_commands.register_devices(devices, add)

    consumers = sub.add_parser(
        "consumers", help="read-only broker logins for local consumers of results"
    ).add_subparsers(dest="sub", required=True)
    consumer_commands.register(consumers, add)

    models = sub.add_parser("models", help="the model catalog").add_subparsers(
        dest="sub", required=True
    )
    model_commands.register(models, add)

    deploy = add(sub, "deploy", cmd_deploy, "set the desired model of devices", True)
    deploy.add_argument(
        "model", help="NAME:VERSION (the plan picks each device's variant) or NAME:VERSION+VARIANT"
    )
    target = deploy.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", action="append", help="device id (repeatable)")
    target.add_argument("--selector", help="label selector, e.g. site=plant-a,line=3")
    deploy.add_argument("--force", action="store_true", help="deploy an ineligible variant")
    deploy.add_argument(
        "--retry",
        action="store_true",
        help="try a failed deploy again now instead of waiting for its next try",
    )

    rollback = add(sub, "rollback", cmd_rollback, "roll a device back to its last-good model", True)
    rollback.add_argument("id", help="device id")
    rollback.add_argument("--to", help="NAME:VERSION[+VARIANT] instead of the last-good model")
    add(sub, "status", cmd_status, "fleet summary, devices and recent events", True)
    plan_commands.register(sub, add)
    rollout_commands.register(sub, add)
    api_commands.register(sub, add)
    simulator_cli.register(sub, add)

    ctl = sub.add_parser("controller", help="the controller daemon").add_subparsers(
        dest="sub", required=True
    )
    run = add(ctl, "run", cmd_controller_run, "run the controller daemon")
    worker = add(
        ctl,
        "ingest-worker",
        cmd_controller_ingest_worker,
        "one telemetry ingest process (started by `controller run --ingest-workers N`)",
    )
    for cmd in (run, worker):
        cmd.add_argument(
            "--broker",
            default=os.environ.get("GREENFLEET_BROKER"),
            help="HOST:PORT (env GREENFLEET_BROKER; default: the TLS listener of `broker "
            "config` when the home has the controller's credentials, else 127.0.0.1:1883)",
        )
        cmd.add_argument(
            "--plain",
            action="store_true",
            help="ignore the home's broker credentials: plain TCP (loopback only unless "
            "--allow-plaintext)",
        )
        cmd.add_argument(
            "--allow-plaintext",
            action="store_true",
            help="allow plain TCP to a non-loopback broker",
        )
        cmd.add_argument(
            "--username", help="broker user (password from env GREENFLEET_BROKER_PASSWORD)"
        )
    run.add_argument(
        "--reconcile-interval", type=float, default=2.0, help="seconds between reconcile passes"
    )
    run.add_argument(
        "--ingest-workers",
        type=int,
        default=int(os.environ.get("GREENFLEET_INGEST_WORKERS", "0")),
        metavar="N",
        help="store telemetry in N worker processes sharing an MQTT 5 shared subscription "
        "(env GREENFLEET_INGEST_WORKERS; default 0: the controller process ingests it)",
    )
    api_commands.add_controller_options(run)
    worker.add_argument("--index", type=int, required=True, help="worker number, from 1")
    worker.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # WorkerPool's pipe
    worker.add_argument(
        "--retire",
        action="store_true",
        help="store what waits in this worker's broker session, then end the session",
    )

    broker = sub.add_parser("broker", help="MQTT broker helpers").add_subparsers(
        dest="sub", required=True
    )
    brun = add(
        broker,
        "run",
        cmd_broker_run,
        "run the embedded demo broker (default), or Mosquitto with the generated config",
    )
    kind = brun.add_mutually_exclusive_group()
    kind.add_argument(
        "--embedded", action="store_true", help="the embedded amqtt broker, demos only (default)"
    )
    kind.add_argument(
        "--secure",
        action="store_true",
        help="Mosquitto with `broker config`'s files (TLS, auth, ACL), rewritten first",
    )
    brun.add_argument("--port", type=int, default=1883, help="port of the embedded broker")
    device_commands.register_broker(broker, add)

    demo = add(
        sub,
        "demo",
        cmd_demo,
        "run a broker, the controller and three agents, and deploy the sample model",
    )
    demo.add_argument("--keep-running", action="store_true", help="stay up after the summary")
    demo.add_argument(
        "--embedded-broker",
        action="store_true",
        help="use the embedded broker even if Mosquitto is installed",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # APScheduler logs every run of every job at INFO (4 lines every 2 s per controller):
    # scheduler noise belongs at DEBUG, or it buries what an operator must read
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    args.home = Home.from_env(args.home)
    try:
        code: int = args.func(args)
    except (ControllerError, ModelStoreError) as exc:
        print(f"greenfleet: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
