"""``greenfleet simulate``: run a simulated fleet against a broker (load tests and demos)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulator.fleet import Fleet, load_sim_profiles

    host, _, port = args.broker.rpartition(":")
    if not host or not port.isdigit():
        print(f"greenfleet: bad broker address {args.broker!r}: use HOST:PORT", file=sys.stderr)
        return 1
    try:
        profiles = load_sim_profiles([n.strip() for n in args.profiles.split(",") if n.strip()])
    except ValueError as exc:
        print(f"greenfleet: {exc}", file=sys.stderr)
        return 1
    labels = dict(item.split("=", 1) for item in args.label)

    async def main() -> None:
        fleet = Fleet(
            host,
            int(port),
            args.devices,
            profiles,
            interval_s=args.interval,
            prefix=args.prefix,
            labels=labels,
            connect_rate=args.connect_rate,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop)

        async def report() -> None:
            while True:
                await asyncio.sleep(10)
                print(f"simulator: {fleet.stats()}", flush=True)

        reporter = asyncio.create_task(report())
        try:
            await fleet.run(
                args.duration,
                ready=lambda: print(
                    f"simulator: {args.devices} devices started ({args.prefix}-*), "
                    f"telemetry every {args.interval} s; Ctrl-C stops",
                    flush=True,
                ),
            )
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        print(f"simulator: done {fleet.stats()}", flush=True)

    asyncio.run(main())
    return 0


def register(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``simulate`` to the ``greenfleet`` command line."""
    sim = add(
        sub,
        "simulate",
        cmd_simulate,
        "run simulated devices speaking the real protocol (a load-test tool, not an agent)",
    )
    sim.add_argument("--devices", type=int, default=10, help="how many devices")
    sim.add_argument(
        "--profiles",
        default="rpi4,x86-ipc",
        help="device classes (device_configs/ names), assigned round-robin",
    )
    sim.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (plain TCP)")
    sim.add_argument("--interval", type=float, default=1.0, help="seconds between telemetry")
    sim.add_argument("--duration", type=float, help="stop after this many seconds")
    sim.add_argument("--prefix", default="sim", help="device ids are PREFIX-N")
    sim.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="label (repeatable)"
    )
    sim.add_argument(
        "--connect-rate", type=float, default=500.0, help="new connections per second at start"
    )
