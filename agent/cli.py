"""``greenfleet-agent``: the device-side command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from agent.config import AgentConfig, MqttInput, load_config
from agent.errors import ConfigError
from agent.version import __version__

EXIT_CONFIG = 2
EXIT_AUTH = 3
EXIT_INSTALL = 1


def check_brokers(config: AgentConfig) -> None:
    """Refuse plain TCP to a non-loopback broker and missing TLS files (ConfigError), before
    the agent starts and counts a run: a bad setting is not a crash of the agent."""
    from agent.link import check_transport

    brokers = [("broker", config.broker)]
    if isinstance(config.input, MqttInput) and config.input.broker is not None:
        brokers.append(("input.broker", config.input.broker))
    for setting, broker in brokers:
        check_transport(broker.host, broker.tls, broker.allow_plaintext, setting)


def _run(args: argparse.Namespace) -> int:
    from agent.service import run_agent

    try:
        config = load_config(Path(args.config))
        check_brokers(config)
    except ConfigError as exc:
        print(f"greenfleet-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        code = run_agent(config, stop)
    except ConfigError as exc:  # a TLS file that went away since the check above
        print(f"greenfleet-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if code == EXIT_AUTH:
        print("greenfleet-agent: the broker refused our credentials; see the log", file=sys.stderr)
    return code


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own, sized to the terminal without shutil: argparse imports shutil for the
    width whenever a parser is built, and shutil brings the archive codecs (~0.5 MiB of an
    agent that runs for months and never prints its help)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=max(_columns() - 2, 40))


def _columns() -> int:
    """COLUMNS if set, else the terminal's width, else 80 (what shutil.get_terminal_size does)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="greenfleet-agent", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"greenfleet-agent {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent daemon", formatter_class=_HelpFormatter)
    run.add_argument("--config", required=True, help="agent YAML config file")
    run.set_defaults(func=_run)

    install = sub.add_parser(
        "install",
        formatter_class=_HelpFormatter,
        help="install the agent as a systemd service from an enrollment bundle",
        description="Write the agent config, its TLS files and a systemd unit from the "
        "enrollment bundle made by `greenfleet devices add`, then print what to run next. "
        "Starts nothing.",
    )
    install.add_argument("bundle", help="the enrollment bundle (YAML) for this device")
    install.add_argument(
        "--dry-run", action="store_true", help="print every file it would write; write nothing"
    )
    install.add_argument(
        "--root", default="/", help="write under this folder instead of / (to stage an image)"
    )
    install.add_argument(
        "--user",
        action="store_true",
        help="install a user service under ~/.config (no root needed)",
    )
    install.add_argument(
        "--service-user",
        default=None,
        help="the system user the service runs as (default greenfleet)",
    )
    install.add_argument(
        "--state-dir",
        default=None,
        help="models and state (default /var/lib/greenfleet; --user: ~/.local/state/greenfleet)",
    )
    install.add_argument(
        "--force", action="store_true", help="replace the files of an earlier install"
    )
    install.set_defaults(func=_install)

    uninstall = sub.add_parser(
        "uninstall",
        help="remove the agent's unit, config and TLS files (state with --purge)",
        formatter_class=_HelpFormatter,
    )
    uninstall.add_argument("--root", default="/", help="the folder install wrote under")
    uninstall.add_argument("--user", action="store_true", help="remove a --user install")
    uninstall.add_argument(
        "--purge", action="store_true", help="also remove the state directory (models, outbox)"
    )
    uninstall.set_defaults(func=_uninstall)
    return parser


def _install(args: argparse.Namespace) -> int:
    from agent.install import InstallError, install, system_layout, user_layout

    try:
        root = Path(args.root)
        layout = (
            user_layout(root, args.state_dir) if args.user else system_layout(root, args.state_dir)
        )
        return install(
            Path(args.bundle),
            layout,
            dry_run=args.dry_run,
            force=args.force,
            service_user=args.service_user,
        )
    except InstallError as exc:
        print(f"greenfleet-agent install: {exc}", file=sys.stderr)
        return EXIT_INSTALL


def _uninstall(args: argparse.Namespace) -> int:
    from agent.install import InstallError, system_layout, uninstall, user_layout

    try:
        root = Path(args.root)
        layout = user_layout(root) if args.user else system_layout(root)
        return uninstall(layout, purge=args.purge)
    except InstallError as exc:
        print(f"greenfleet-agent uninstall: {exc}", file=sys.stderr)
        return EXIT_INSTALL


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
