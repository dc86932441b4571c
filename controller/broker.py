"""Brokers for demos and tests: a local Mosquitto, or the embedded pure-Python broker.

Mosquitto is the broker for production and tests. The embedded broker (amqtt) exists so
``make demo`` runs on a machine without Mosquitto; it is for demos only: on amqtt 0.12.1, QoS 1
messages queued for an offline persistent session were never delivered after reconnect.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.errors import InvalidRequest

log = logging.getLogger(__name__)

EMBEDDED_WARNING = (
    "embedded broker (amqtt) started on 127.0.0.1:%d: for demos only, it loses queued QoS 1 "
    "messages across reconnects; use Mosquitto in production"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int,
    timeout: float = 10.0,
    host: str = "127.0.0.1",
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Wait until something accepts connections on ``port``, or ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


class ConfiguredMosquitto:
    """Mosquitto run with a configuration file made elsewhere (``greenfleet broker config``):
    started, waited for on ``port`` (its first listener), stopped. Output goes to ``log``."""

    def __init__(self, conf: Path, port: int, log: Path, host: str = "127.0.0.1") -> None:
        self.conf, self.port, self.log, self.host = conf, port, log, host
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> ConfiguredMosquitto:
        binary = mosquitto_path()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                [binary, "-c", str(self.conf)], stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port(
                self.port,
                host=self.host,
                alive=lambda: self.process is not None and self.process.poll() is None,
            )
        except TimeoutError as exc:
            self.stop()
            text = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mosquitto did not start with {self.conf}: {exc}\n{text}") from exc
        return self

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


class Mosquitto(ConfiguredMosquitto):
    """A Mosquitto process on a loopback port with a config suited to greenfleet's tests,
    written to ``workdir/mosquitto.conf``.

    ``max_queued_messages 0`` (no limit) and a large in-flight window: Mosquitto's default of
    1000 queued messages silently drops QoS 1 traffic for a subscriber that falls behind.
    """

    def __init__(
        self, workdir: Path, port: int | None = None, password_file: Path | None = None
    ) -> None:
        super().__init__(workdir / "mosquitto.conf", port or free_port(), workdir / "mosquitto.log")
        self.workdir = workdir
        self.password_file = password_file

    def start(self) -> Mosquitto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        auth = (
            f"allow_anonymous false\npassword_file {self.password_file}\n"
            if self.password_file
            else "allow_anonymous true\n"
        )
        self.conf.write_text(
            # Started as root, Mosquitto drops to user "mosquitto" and could not read our files.
            f"user {getpass.getuser()}\n"
            f"listener {self.port} 127.0.0.1\n"
            f"{auth}"
            "persistence false\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "message_size_limit 0\n"
        )
        super().start()
        return self


class EmbeddedBroker:
    """amqtt running on its own event loop in a background thread."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gf-broker", daemon=True
        )
        self._broker: Any = None

    def start(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:  # the `demo` extra: only demos use it
            self._loop.close()
            raise InvalidRequest(
                "the embedded broker needs amqtt: pip install 'greenfleet[demo]', or install "
                "Mosquitto (apt-get install -y mosquitto) and run without --embedded"
            ) from exc

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._thread.start()

        async def _start() -> None:
            self._broker = Broker(config)
            await self._broker.start()

        asyncio.run_coroutine_threadsafe(_start(), self._loop).result(timeout=15)
        log.warning(EMBEDDED_WARNING, self.port)
        return self

    def stop(self) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(5)
            except Exception:  # shutting down a demo broker; nothing left to protect
                log.debug("embedded broker shutdown raised", exc_info=True)

        async def _cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(_cancel_rest(), self._loop).result(5)
        except Exception:
            log.debug("embedded broker task cleanup raised", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
