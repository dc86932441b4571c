"""A TCP proxy that a fault test puts between an agent and the broker, to cut the network.

Real networks fail in two ways that an MQTT client sees differently, and the proxy plays both:

- **drop** (:meth:`TcpProxy.drop`): every live connection is reset and new ones are accepted
  and reset at once, like a rebooting router or a firewall that forgets its state. The client
  notices immediately and reconnects with backoff.
- **stall** (:meth:`TcpProxy.stall`): sockets stay open but no byte moves in either direction,
  like a pulled cable or a saturated uplink. Nothing tells the client; only its MQTT keepalive
  can find out. New connections made during the stall are accepted and stalled too. When the
  stall ends the stalled connections are reset rather than resumed: a partition that outlasts
  the keepalive has already been given up by both ends, and forwarding their stale bytes late
  would only muddle what the test observes.

A cut starts at a quiet moment (no byte forwarded for ``QUIET_S``, waited for at most
``QUIET_WAIT_S``), so that no QoS 1 PUBLISH is caught between the broker and its PUBACK. Such a
message is legitimately delivered twice under MQTT 3.1.1 and the controller de-duplicates it;
cutting at a quiet moment lets a test demand exactly-once delivery and so catch an agent that
sends a message twice on its own.

It can also be slow (``rate_bps``, per direction and connection), like a gateway's uplink: a
test that must kill the broker in the middle of a model transfer uses it to make the transfer
last seconds instead of milliseconds.

Threads only, no dependencies: one accept thread and one forwarding thread per connection.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from types import TracebackType

QUIET_S = 0.05
QUIET_WAIT_S = 2.0
POLL_S = 0.05
BUFFER = 64 * 1024
SLOW_BUFFER = 4 * 1024  # read size when throttled, so the rate is smooth


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): unsent bytes are discarded, the peer sees a reset."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Pipe:
    """One client connection and its upstream connection, forwarded by one thread."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.stalled = False
        self.closed = False
        self.lock = threading.Lock()  # held while bytes move; a cut waits for it
        self.thread = threading.Thread(target=self._run, name="proxy-pipe", daemon=True)

    def _run(self) -> None:
        peers = {self.client: self.upstream, self.upstream: self.client}
        try:
            while not self.closed:
                if self.stalled:
                    time.sleep(POLL_S)
                    continue
                try:
                    readable, _, _ = select.select(list(peers), [], [], POLL_S)
                except (OSError, ValueError):
                    return
                rate = self.proxy.rate_bps
                for sock in readable:
                    with self.lock:
                        if self.closed or self.stalled:
                            break
                        try:
                            data = sock.recv(SLOW_BUFFER if rate else BUFFER)
                            if not data:  # one side closed: close the other, as TCP would
                                return
                            peers[sock].sendall(data)
                        except OSError:
                            return
                        self.proxy._moved(len(data))
                    if rate:
                        time.sleep(len(data) / rate)
        finally:
            self.close()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            _reset(self.client)
            _reset(self.upstream)
        self.proxy._forget(self)


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` until told to cut.

    Use as a context manager (or :meth:`start` / :meth:`close`); :attr:`port` is where clients
    connect. :attr:`accepted` counts connections, so a test can see that a client reconnected.
    """

    def __init__(
        self, upstream_port: int, upstream_host: str = "127.0.0.1", rate_bps: float | None = None
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.rate_bps = rate_bps  # bytes per second per direction; None: as fast as it goes
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self.mode = "forward"  # or "drop", "stall"
        self.accepted = 0
        self.bytes_forwarded = 0
        self._pipes: set[_Pipe] = set()
        self._lock = threading.Lock()
        self._last_moved = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self._listener.close()
        for pipe in self._live():
            pipe.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults -------------------------------------------------------------------------------

    def drop(self) -> None:
        """Reset every connection and refuse new ones (accepted, then reset) until :meth:`heal`."""
        self._wait_quiet()
        with self._lock:
            self.mode = "drop"
        for pipe in self._live():
            pipe.close()

    def stall(self) -> None:
        """Stop forwarding on every connection, live and new, until :meth:`heal`."""
        self._wait_quiet()
        with self._lock:
            self.mode = "stall"
            pipes = list(self._pipes)
        for pipe in pipes:
            with pipe.lock:
                pipe.stalled = True

    def heal(self) -> None:
        """Forward again; connections stalled during a cut are reset (see the module docstring)."""
        with self._lock:
            self.mode = "forward"
            stalled = [pipe for pipe in self._pipes if pipe.stalled]
        for pipe in stalled:
            pipe.close()

    @contextlib.contextmanager
    def dropped(self) -> Iterator[None]:
        self.drop()
        try:
            yield
        finally:
            self.heal()

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        self.stall()
        try:
            yield
        finally:
            self.heal()

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._live())

    # -- internals ----------------------------------------------------------------------------

    def _live(self) -> list[_Pipe]:
        with self._lock:
            return list(self._pipes)

    def _moved(self, count: int) -> None:
        self.bytes_forwarded += count
        self._last_moved = time.monotonic()

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)

    def _wait_quiet(self) -> None:
        deadline = time.monotonic() + QUIET_WAIT_S
        while time.monotonic() < deadline and time.monotonic() - self._last_moved < QUIET_S:
            time.sleep(QUIET_S / 5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                readable, _, _ = select.select([self._listener], [], [], POLL_S)
            except (OSError, ValueError):
                return
            if not readable:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self.accepted += 1
                mode = self.mode
            if mode == "drop":
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(self, client, upstream)
            with self._lock:
                # a stall that began while we connected upstream covers this connection too
                pipe.stalled = self.mode == "stall"
                self._pipes.add(pipe)
            pipe.thread.start()
