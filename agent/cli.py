"""``greenfleet-agent``: the device-side command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from agent.config import load_config
from agent.errors import ConfigError
from agent.version import __version__

EXIT_CONFIG = 2
EXIT_AUTH = 3


def _run(args: argparse.Namespace) -> int:
    from agent.service import run_agent

    try:
        config = load_config(Path(args.config))
    except ConfigError as exc:
        print(f"greenfleet-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    code = run_agent(config, stop)
    if code == EXIT_AUTH:
        print("greenfleet-agent: the broker refused our credentials; see the log", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="greenfleet-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"greenfleet-agent {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("--config", required=True, help="agent YAML config file")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
