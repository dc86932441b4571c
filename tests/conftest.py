"""Shared fixtures: a real Mosquitto on a free port, homes, agent configs, MQTT test clients."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import paho.mqtt.publish as paho_publish
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol as p
from controller.broker import Mosquitto, mosquitto_path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "model_store" / "samples"


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One real Mosquitto for the session; tests keep apart by unique device ids."""
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does this)")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    logs: Callable[[], str] | str = "",
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); AssertionError naming
    ``what`` and showing ``logs`` (text, or a function giving it) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    text = logs() if callable(logs) else logs
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{text}")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Probe:
    """A paho client that records everything on the topics it subscribes to.

    Where it stands in for the controller it also answers like one: every telemetry batch and
    event it receives is acknowledged on the device's ack topic (protocol.Stored), or agents
    would keep their outbox window full and send it again (``acks=False`` to watch that).
    """

    def __init__(self, port: int, *topics: str, acks: bool = True) -> None:
        self.history: list[tuple[str, bytes]] = []
        self._acks = acks
        self._arrived = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=unique("probe")
        )
        self._topics = topics
        self._subscribed = 0
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while self._subscribed < len(topics) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _on_connect(self, client: Any, *args: Any) -> None:
        for t in self._topics:
            client.subscribe(t, 1)

    def _on_subscribe(self, *args: Any) -> None:
        self._subscribed += 1

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._arrived:
            self.history.append((msg.topic, msg.payload))
            self._arrived.notify_all()
        if self._acks and msg.topic.endswith(("/telemetry", "/events")):
            with contextlib.suppress(p.ProtocolError, ValueError):
                device = p.parse_topic(msg.topic).device
                stored = p.Stored(ids=[p.decode(msg.payload).id])
                client.publish(p.topic(device, p.Channel.ACK), p.encode(stored), qos=0)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def wait_for(
        self,
        predicate: Callable[[str, bytes], bool],
        timeout: float = 20.0,
        what: str = "message",
        since: int = 0,
    ) -> tuple[str, bytes]:
        """The first message (from index ``since`` of the history) that matches ``predicate``."""
        deadline = time.monotonic() + timeout
        checked = since
        with self._arrived:
            while True:
                for topic, payload in self.history[checked:]:
                    if predicate(topic, payload):
                        return topic, payload
                checked = len(self.history)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
                self._arrived.wait(remaining)

    def mark(self) -> int:
        """An index to pass as ``since`` to look only at messages from now on."""
        with self._arrived:
            return len(self.history)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def probe_factory(mosquitto: Mosquitto) -> Iterator[Callable[..., Probe]]:
    probes: list[Probe] = []

    def make(*topics: str) -> Probe:
        probe = Probe(mosquitto.port, *topics)
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        probe.close()


def agent_config(
    path: Path,
    device: str,
    port: int,
    *,
    rate_hz: float = 20,
    interval_s: float = 1,
    extra: dict[str, Any] | None = None,
) -> Path:
    config: dict[str, Any] = {
        "device_id": device,
        "device_class": "x86-ipc",
        "labels": {"site": "test", "line": device},
        "state_dir": str(path.parent / f"{device}-state"),
        "broker": {"host": "127.0.0.1", "port": port, "reconnect_max_s": 2},
        "input": {"type": "vibration", "seed": 7},
        "inference": {"rate_hz": rate_hz},
        "telemetry": {"interval_s": interval_s},
        # Tests assert on the estimate; a CI host with readable RAPL would measure instead.
        "power": {"meters": ["estimate"]},
    }
    config.update(extra or {})
    path.write_text(yaml.safe_dump(config))
    return path


class Processes:
    """Real greenfleet processes started by a test, stopped (and their logs kept) after it."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.controller_ports: set[int] = set()

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
            )
        self.procs.append((proc, log))
        return proc

    def agent(self, config: Path, name: str | None = None) -> subprocess.Popen[bytes]:
        return self.start(name or config.stem, "-m", "agent.cli", "run", "--config", str(config))

    def controller(self, port: int, *extra: str) -> subprocess.Popen[bytes]:
        self.controller_ports.add(port)
        return self.start(
            "controller",
            "-m",
            "controller.cli",
            "controller",
            "run",
            "--broker",
            f"127.0.0.1:{port}",
            "--reconcile-interval",
            "0.5",
            *extra,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controller.cli", *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.workdir,
            timeout=60,
        )

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for port in self.controller_ports:
            clear_controller_presence(port)


def clear_controller_presence(port: int) -> None:
    """Remove the retained controller state a stopped controller left on a shared broker: it
    says "offline", and agents of later tests (which have no controller) would hold their
    telemetry waiting for it, as they should in a real fleet."""
    from agent.protocol import CONTROLLER_TOPIC

    with contextlib.suppress(OSError):
        paho_publish.single(
            CONTROLLER_TOPIC, b"", qos=1, retain=True, hostname="127.0.0.1", port=port
        )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    env = dict(os.environ)
    env["GREENFLEET_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = str(REPO)
    env.pop("GREENFLEET_BROKER", None)
    procs = Processes(tmp_path, env)
    yield procs
    procs.stop_all()


@contextlib.contextmanager
def configured_broker(processes: Processes, tmp_path: Path) -> Iterator[int]:
    """A locked-down Mosquitto from `greenfleet broker config` (TLS, per-device logins, ACL)
    for the test's controller home; yields its TLS port, stops every process and the broker
    after."""
    from controller import broker_config as bc
    from controller import device_commands
    from controller.broker import ConfiguredMosquitto, free_port, mosquitto_path
    from controller.home import Home

    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does this)")
    home = Home(Path(processes.env["GREENFLEET_HOME"])).prepare()
    settings = bc.BrokerSettings(
        out_dir=tmp_path / "broker", hosts=["broker.test"], port=free_port(), cert_port=free_port()
    )
    files, _ = device_commands.configure_broker(home, settings)
    broker = ConfiguredMosquitto(files.conf, settings.port, tmp_path / "mosquitto.log").start()
    try:
        yield settings.port
    finally:
        processes.stop_all()
        broker.stop()
