"""The bench rig: a real Mosquitto, real agent processes, a topic watcher, and the result shape.

Every benchmark returns an :class:`Outcome` built with :func:`outcome`: the raw numbers, a
baseline measured in the same run, their ratio, the target and whether it is met. The machine
these run on is shared and noisy, so only ratios against a same-run baseline are meaningful.
"""

from __future__ import annotations

import os
import queue
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import yaml

from agent.link import MqttLink
from controller.broker import Mosquitto

AGENT_START_TIMEOUT_S = 30.0


class Outcome(TypedDict):
    """One benchmark's result, as run.py prints it and writes it to JSON."""

    name: str
    title: str
    measured: str
    baseline: str
    ratio: float
    target: str
    passed: bool
    numbers: dict[str, Any]


def outcome(
    name: str,
    title: str,
    *,
    measured: str,
    baseline: str,
    ratio: float,
    target: str,
    passed: bool,
    numbers: dict[str, Any],
) -> Outcome:
    return Outcome(
        name=name,
        title=title,
        measured=measured,
        baseline=baseline,
        ratio=round(ratio, 4),
        target=target,
        passed=passed,
        numbers=numbers,
    )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@contextmanager
def mosquitto(workdir: Path) -> Iterator[Mosquitto]:
    """A Mosquitto on a free loopback port, stopped on exit."""
    broker = Mosquitto(workdir / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


def write_agent_config(
    directory: Path,
    device: str,
    port: int,
    *,
    input_config: dict[str, Any],
    rate_hz: float = 10.0,
    telemetry_interval_s: float = 60.0,
) -> Path:
    """An agent YAML config in ``directory`` whose state dir is ``directory/state``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "device_id": device,
        "state_dir": str(directory / "state"),
        "broker": {"host": "127.0.0.1", "port": port},
        "input": input_config,
        "inference": {"rate_hz": rate_hz, "threads": 1},
        "telemetry": {"interval_s": telemetry_interval_s},
    }
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def agent_process(config: Path, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m agent.cli run --config config`` as a child process, terminated on exit."""
    log_file = log_path.open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "--log-level", "INFO", "run", "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_file.close()


def check_alive(process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Raise with the tail of the agent's log if it exited."""
    if process.poll() is not None:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"agent exited with code {process.returncode}:\n{tail}")


class Watcher:
    """Records every message on some topics with its monotonic arrival time."""

    def __init__(self, port: int, topics: Sequence[str], client_id: str) -> None:
        self.messages: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
        self._link = MqttLink(
            client_id=client_id,
            host="127.0.0.1",
            port=port,
            on_message=self._on_message,
            subscriptions=[(t, 1) for t in topics],
            clean_session=True,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.messages.put((time.monotonic(), topic, payload))

    def __enter__(self) -> Watcher:
        self._link.start()
        if not self._link.connected.wait(10):
            raise RuntimeError("watcher could not connect to the broker")
        return self

    def __exit__(self, *exc: object) -> None:
        self._link.stop()


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"no VmHWM in /proc/{pid}/status")
    return int(found.group(1))
