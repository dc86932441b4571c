"""Ingest workers: telemetry stored by several processes that share one MQTT subscription.

One controller process decodes and stores every message its connection receives, and decoding
(JSON + pydantic) is what one Python process runs out of first. ``greenfleet controller run
--ingest-workers N`` starts N worker processes that join one MQTT 5 shared subscription,
``$share/gf-ingest/gf/v1/+/telemetry``: the broker hands each telemetry message to one member
(round robin on Mosquitto; EMQX, HiveMQ and VerneMQ do the same across a cluster), and the
controller itself stops subscribing to telemetry. Births, replies, events and chunk requests
stay with the controller process, which acts on them.

Nothing is lost when a worker dies. A worker acknowledges a message to the broker only once the
SQLite transaction that stored it has committed (``Ingest`` with ``ack``), under a persistent
MQTT 5 session with a fixed client id (``gf-ingest-{index}``). The pool restarts a dead worker
under the same id, and the broker sends again whatever it had not acknowledged. Telemetry rows
are keyed (device, session, seq), so a message stored twice is still one row.

Retirement. A broker keeps an offline persistent member in its share group and (Mosquitto 2.0)
goes on assigning it messages, which wait for it to come back. So when the worker count goes
down (the last count is kept in ``ingest-workers.json`` in the home), the pool first runs each
surplus index in retire mode: connect, store what waits, unsubscribe, end the session.

Every worker writes to the same SQLite file (WAL mode): the workers decode in parallel and take
turns to write. This scales a decode-bound ingest on the controller's own host; putting workers
on other machines would need a database server (see the README, "Scale").
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import protocol as p
from agent.link import MqttLink
from controller.broker_config import ingest_worker_user
from controller.home import Home
from controller.identity import CONTROLLER_USER
from controller.ingest import BATCH, Ingest, stored_messages

if TYPE_CHECKING:
    from controller.device_commands import Connection

log = logging.getLogger(__name__)

GROUP = "gf-ingest"
RECEIVE_MAXIMUM = 4 * BATCH  # unacknowledged messages the broker may send one worker
RESTART_S = (1.0, 30.0)  # first and longest wait before restarting a worker that died
HEALTHY_S = 60.0  # a worker up this long has its restart backoff reset
RETIRE_IDLE_S = 2.0  # retire mode: no message for this long means the session is drained
RETIRE_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 30.0  # start: how long to wait for the workers' subscriptions


def shared_topic() -> str:
    """The telemetry subscription every worker joins."""
    return f"$share/{GROUP}/{p.subscription(p.Channel.TELEMETRY)}"


def client_id(index: int) -> str:
    return f"gf-ingest-{index}"


def count_file(home: Home) -> Path:
    return home.root / "ingest-workers.json"


class IngestWorker:
    """The body of one worker process: a manual-ack MQTT 5 link feeding an ``Ingest``."""

    def __init__(self, home: Home, index: int, conn: Connection, retire: bool = False) -> None:
        self.index = index
        self.retire = retire
        self.last_message = time.monotonic()
        self.ingest = Ingest(home.database, on_stored=self._stored)
        self.link = MqttLink(
            client_id=client_id(index),
            host=conn.host,
            port=conn.port,
            # under the broker config's use_username_as_clientid the login is the client id, so
            # each worker logs in under a name of its own with the controller's password
            username=ingest_worker_user(index)
            if conn.username == CONTROLLER_USER
            else conn.username,
            password=conn.password,
            tls=conn.tls,
            allow_plaintext=conn.allow_plaintext,
            on_message_acked=self._on_message,
            # retire mode: the session's own subscription delivers what waits; subscribing
            # again would make a never-used index a member for the while it drains
            subscriptions=[] if retire else [(shared_topic(), 1)],
            mqtt5=True,
            receive_maximum=RECEIVE_MAXIMUM,
            max_inflight=16,
        )

    def _stored(self, acks: dict[str, tuple[list[str], list[str]]]) -> None:
        """Tell agents what this worker stored (protocol.Stored), as the controller does."""
        for topic, payload in stored_messages(acks):
            self.link.publish(topic, payload, qos=0)

    def _on_message(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        self.last_message = time.monotonic()
        self.ingest.offer(topic, payload, ack)

    def run(self, stop: threading.Event, ready_fd: int | None = None) -> int:
        """Serve until ``stop`` (or, in retire mode, until the session is drained); 3 when the
        broker refuses the credentials, as ``controller run``. ``ready_fd``: a pipe to write
        one line to once the broker has acknowledged the subscription (WorkerPool.start)."""
        self.ingest.start()
        self.link.start()
        parent = os.getppid()
        log.info(
            "ingest worker %d %s on %s (client id %s)",
            self.index,
            "retiring" if self.retire else "started",
            shared_topic(),
            client_id(self.index),
        )
        deadline = time.monotonic() + RETIRE_TIMEOUT_S
        code = 0
        while not stop.wait(0.2):
            if ready_fd is not None and self.link.subscribed.is_set():
                os.write(ready_fd, b"subscribed\n")
                os.close(ready_fd)
                ready_fd = None
            if self.link.fatal is not None:
                code = 3
                break
            if os.getppid() != parent:
                # the pool is gone (killed): a new one starts workers under the same client
                # ids, and two of us would knock each other off the broker for ever
                log.warning("ingest worker %d: controller gone; stopping", self.index)
                break
            if self.retire:
                connected = self.link.connected.is_set()
                idle = time.monotonic() - self.last_message >= RETIRE_IDLE_S
                if time.monotonic() > deadline and not connected:
                    log.error("ingest worker %d: cannot reach the broker to retire", self.index)
                    code = 1
                    break
                if connected and (idle or time.monotonic() > deadline):
                    self.link.unsubscribe(shared_topic())
                    time.sleep(0.5)  # UNSUBACK; nothing is routed to us after it
                    break
        self.ingest.stop()  # commits and acknowledges what it holds
        self.link.stop(end_session=self.retire)
        log.info("ingest worker %d stopped", self.index)
        return code


class WorkerPool:
    """Starts, restarts and stops the worker processes of one controller.

    ``command`` is the worker's command line without ``--index`` (see ``controller.cli``); the
    broker password reaches workers through the environment, never the command line.
    """

    def __init__(self, home: Home, count: int, command: Sequence[str]) -> None:
        if count < 0:
            raise ValueError("the number of ingest workers cannot be negative")
        self.home = home
        self.count = count
        self._command = list(command)
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._started: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._next_start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="gf-workers", daemon=True)
        self.restarts = 0

    def start(self) -> None:
        """Retire the sessions of workers a previous run had beyond ``count``, then start
        ``count`` workers."""
        previous = self._previous_count()
        failed = self._retire(range(self.count + 1, previous + 1))
        # a session that could not be retired is tried again at the next start
        recorded = max([self.count, *failed])
        count_file(self.home).write_text(json.dumps({"workers": recorded}) + "\n")
        ready = {}
        for index in range(1, self.count + 1):
            ready[index], write = os.pipe()
            try:
                self._spawn(index, ready_fd=write)
            finally:
                os.close(write)
        self._wait_subscribed(ready)
        if self.count:
            self._thread.start()

    def _wait_subscribed(self, pipes: dict[int, int]) -> None:
        """Wait until every new worker's subscription is acknowledged, so that the controller,
        which says "online" to agents once it is subscribed itself, never does so while
        telemetry would reach no subscriber. A later restart needs no wait: the broker keeps
        the session's subscription."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        for index, fd in pipes.items():
            try:
                left = max(deadline - time.monotonic(), 0.0)
                readable, _, _ = select.select([fd], [], [], left)
                if not readable or not os.read(fd, 64):
                    log.warning(
                        "ingest worker %d is not subscribed after %.0f s (broker unreachable, "
                        "or the worker failed: see its log above); going on",
                        index,
                        READY_TIMEOUT_S,
                    )
            finally:
                os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log.warning("ingest worker pid %d did not stop; killing it", proc.pid)
                proc.kill()

    def pids(self) -> dict[int, int]:
        """Index -> pid of every worker running now."""
        return {i: proc.pid for i, proc in self._procs.items() if proc.poll() is None}

    def _previous_count(self) -> int:
        path = count_file(self.home)
        try:
            return int(json.loads(path.read_text())["workers"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s); not retiring old worker sessions", path, exc)
            return 0

    def _retire(self, indexes: Sequence[int]) -> list[int]:
        """Run the surplus indexes in retire mode, all at once, and wait for them; return
        those that failed."""
        procs = {}
        failed: list[int] = []
        for index in indexes:
            log.info(
                "retiring the session of ingest worker %d (the pool is now %d)", index, self.count
            )
            procs[index] = subprocess.Popen([*self._command, "--index", str(index), "--retire"])
        for index, proc in procs.items():
            try:
                code = proc.wait(timeout=RETIRE_TIMEOUT_S + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = -1
            if code != 0:
                failed.append(index)
                log.warning(
                    "retiring ingest worker %d failed (exit %s): messages the broker assigned "
                    "to its session %s wait until it is retired at the next start",
                    index,
                    code,
                    client_id(index),
                )
        return failed

    def _spawn(self, index: int, ready_fd: int | None = None) -> None:
        """Start worker ``index``; ``ready_fd``: the write end of its readiness pipe."""
        command = [*self._command, "--index", str(index)]
        if ready_fd is None:
            self._procs[index] = subprocess.Popen(command)
        else:
            command += ["--ready-fd", str(ready_fd)]
            self._procs[index] = subprocess.Popen(command, pass_fds=(ready_fd,))
        self._started[index] = time.monotonic()

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for index, proc in list(self._procs.items()):
                code = proc.poll()
                if code is None:
                    if now - self._started[index] > HEALTHY_S:
                        self._backoff.pop(index, None)
                    continue
                if code == 3:  # as controller run: not retried with credentials the broker rejects
                    log.error("ingest worker %d: the broker refused its credentials", index)
                    del self._procs[index]
                    continue
                if index not in self._next_start:
                    wait = self._backoff.get(index, RESTART_S[0])
                    self._backoff[index] = min(wait * 2, RESTART_S[1])
                    self._next_start[index] = now + wait
                    log.warning(
                        "ingest worker %d (pid %d) exited with %s; restarting it in %.0f s "
                        "(the broker holds what it had not stored)",
                        index,
                        proc.pid,
                        code,
                        wait,
                    )
                elif now >= self._next_start[index]:
                    del self._next_start[index]
                    self.restarts += 1
                    self._spawn(index)


def worker_main(
    home: Home, index: int, conn: Connection, retire: bool, ready_fd: int | None = None
) -> int:
    """``greenfleet controller ingest-worker``: run one worker until SIGTERM."""
    worker = IngestWorker(home, index, conn, retire)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return worker.run(stop, ready_fd)


def worker_command(home: Home, connection_args: Sequence[str]) -> list[str]:
    """The command line of a worker of this controller, without ``--index``."""
    return [
        sys.executable,
        "-m",
        "controller.cli",
        "--home",
        str(home.root),
        "--log-level",
        logging.getLevelName(logging.getLogger().level),
        "controller",
        "ingest-worker",
        *connection_args,
    ]
