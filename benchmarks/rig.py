"""The bench rig: a real Mosquitto, real agent processes, a topic watcher, and the result shape.

Every benchmark returns an :class:`Outcome` built with :func:`outcome`: the raw numbers, a
baseline measured in the same run, their ratio, the target and whether it is met. The machine
these run on is shared and noisy, so only ratios against a same-run baseline are meaningful.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import yaml

from agent import protocol as p
from agent.link import MqttLink
from controller.broker import Mosquitto

REPO = Path(__file__).resolve().parents[1]

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
def agent_process(
    config: Path, log_path: Path, python: str = sys.executable
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m agent.cli run --config config`` as a child process, terminated on exit;
    ``python`` may be another environment's interpreter (the repository is put on its path)."""
    log_file = log_path.open("ab")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [python, "-m", "agent.cli", "--log-level", "INFO", "run", "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path},
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


class BenchController:
    """The controller's half of one device's wire contract, for benchmarks that drive a real
    agent without the controller: publishes commands, serves the agent's chunk requests from
    ``blobs`` (a thread of its own, QoS 1, as the controller's blob server does), and records
    replies, events, telemetry and results with their monotonic arrival times.

    The network thread only appends raw payloads (results arrive hundreds of times a second);
    the caller decodes them. Replies and births are decoded on arrival, they are rare.
    """

    def __init__(self, port: int, device: str, client_id: str) -> None:
        self.device = device
        self.blobs: dict[str, bytes] = {}
        self.results: list[tuple[float, bytes]] = []
        self.events: list[tuple[float, bytes]] = []
        self.telemetry: list[tuple[float, bytes]] = []
        self.births: list[tuple[float, p.Birth]] = []
        self.chunks_served = 0
        self._replies: dict[str, tuple[float, p.Reply]] = {}
        self._arrived = threading.Condition()
        self._requests: queue.Queue[p.BlobRequest | None] = queue.Queue()
        self._channels = {
            p.topic(device, channel): channel
            for channel in (
                p.Channel.STATE,
                p.Channel.REPLY,
                p.Channel.EVENTS,
                p.Channel.TELEMETRY,
                p.Channel.RESULTS,
                p.Channel.BLOB_REQ,
            )
        }
        self._link = MqttLink(
            client_id=client_id,
            host="127.0.0.1",
            port=port,
            on_message=self._on_message,
            subscriptions=[(t, 1) for t in self._channels],
            clean_session=True,
            max_inflight=256,
        )
        self._server = threading.Thread(target=self._serve, name="bench-blobs", daemon=True)

    def __enter__(self) -> BenchController:
        self._server.start()
        self._link.start()
        if not self._link.connected.wait(10):
            raise RuntimeError("bench controller could not connect to the broker")
        return self

    def __exit__(self, *exc: object) -> None:
        self._requests.put(None)
        self._server.join(timeout=5)
        self._link.stop()

    def _on_message(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        channel = self._channels.get(topic)
        if channel is p.Channel.RESULTS:
            self.results.append((now, payload))
        elif channel is p.Channel.TELEMETRY:
            self.telemetry.append((now, payload))
        elif channel is p.Channel.EVENTS:
            self.events.append((now, payload))
        elif channel is p.Channel.BLOB_REQ:
            request = p.decode(payload)
            if isinstance(request, p.BlobRequest):
                self._requests.put(request)
        elif channel in (p.Channel.REPLY, p.Channel.STATE):
            message = p.decode(payload)
            with self._arrived:
                if isinstance(message, p.Reply):
                    self._replies[message.ref] = (now, message)
                elif isinstance(message, p.Birth):
                    self.births.append((now, message))
                self._arrived.notify_all()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            data = self.blobs.get(request.sha256)
            if data is None:
                continue
            size = request.chunk_size
            for index in range(request.first, request.first + request.count):
                chunk = data[index * size : (index + 1) * size]
                if chunk:
                    self._link.publish(
                        p.blob_topic(self.device, request.sha256, index), chunk, qos=1
                    )
                    self.chunks_served += 1

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self._link.publish(topic, payload, qos=qos)

    def deploy(
        self,
        data: bytes,
        model: str,
        *,
        fmt: p.ModelFormat = p.ModelFormat.ONNX,
        slot: p.Slot = p.Slot.ACTIVE,
        chunk_size: int = p.DEFAULT_CHUNK_SIZE,
    ) -> tuple[str, float]:
        """Offer ``data`` as ``model`` (NAME:VERSION) and send the Deploy; return its id and
        the monotonic time it was handed to paho."""
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        command = p.Deploy(
            model=p.ModelRef.parse(model),
            artifact=p.Artifact(sha256=sha, size=len(data), format=fmt, chunk_size=chunk_size),
            slot=slot,
        )
        payload = p.encode(command)
        sent = time.monotonic()
        self._link.publish(p.topic(self.device, p.Channel.CMD), payload, qos=1)
        return command.id, sent

    def reply(self, ref: str, timeout: float = 30.0) -> tuple[float, p.Reply]:
        """The reply to command ``ref`` and its arrival time; TimeoutError if none comes."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while ref not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no reply to command {ref} in {timeout:.0f} s")
                self._arrived.wait(remaining)
            return self._replies[ref]

    def wait_birth(
        self, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 30.0
    ) -> p.Birth:
        """The agent's first birth (retained or new); raise if the agent dies or stays silent."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while not self.births:
                check_alive(process, log_path)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"agent {self.device} sent no birth in {timeout:.0f} s")
                self._arrived.wait(0.1)
            return self.births[0][1]


class BirthWatcher:
    """Every agent's births (``gf/v1/+/state``) with their wall-clock arrival times
    (``time.time()``), for benchmarks that line them up with the controller's database stamps
    (UTC wall clock). Deaths and undecodable payloads are ignored."""

    def __init__(self, port: int, client_id: str) -> None:
        self.births: list[tuple[float, str, p.Birth]] = []
        self._arrived = threading.Condition()
        self._link = MqttLink(
            client_id=client_id,
            host="127.0.0.1",
            port=port,
            on_message=self._on_message,
            subscriptions=[(p.subscription(p.Channel.STATE), 1)],
            clean_session=True,
        )

    def _on_message(self, topic: str, payload: bytes) -> None:
        now = time.time()
        try:
            device = p.parse_topic(topic).device
            message = p.decode(payload)
        except p.ProtocolError:
            return
        if isinstance(message, p.Birth):
            with self._arrived:
                self.births.append((now, device, message))
                self._arrived.notify_all()

    def __enter__(self) -> BirthWatcher:
        self._link.start()
        if not self._link.connected.wait(10):
            raise RuntimeError("birth watcher could not connect to the broker")
        return self

    def __exit__(self, *exc: object) -> None:
        self._link.stop()

    def wait(
        self,
        device: str,
        model: str,
        *,
        after: float,
        timeout: float = 30.0,
        tier: p.Tier | None = None,
    ) -> tuple[float, p.Birth]:
        """The first birth of ``device`` that arrived at or after ``after`` (wall clock) with
        ``model`` (NAME:VERSION[+VARIANT]) active (and ``tier``, when given); TimeoutError if
        none comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._arrived:
            while True:
                for at, who, birth in self.births[seen:]:
                    if (
                        at >= after
                        and who == device
                        and birth.active is not None
                        and str(birth.active.model) == model
                        and (tier is None or birth.tier is tier)
                    ):
                        return at, birth
                seen = len(self.births)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no birth of {device} with {model} in {timeout:.0f} s")
                self._arrived.wait(remaining)
