"""Serving model chunks to agents that ask for them (the controller side of agent.transfer).

Broker fan-out
--------------
Every chunk is published on ONE shared topic per artifact, ``gf/blobs/v1/{sha256}/{index}``
(agent.protocol.shared_blob_topic), never once per device, and **retained**: the broker copies it
to every agent subscribed at that moment, and hands the retained copy to every agent that
subscribes later, at its SUBSCRIBE. An agent subscribes to the topic of each chunk just before it
asks for it with a ``BlobRequest`` on its own ``gf/v1/{device}/blob/req`` topic, and drops the
subscription when the chunk arrives (agent.transfer.ChunkTopics); flow control, re-asks and
resume after a restart stay per device. A re-ask subscribes again, which makes the broker send
the retained copy again (MQTT: a SUBSCRIBE that replaces a subscription re-sends retained
messages).

So the controller publishes a chunk once, not once per wave of late devices: a request for a
chunk it published less than ``REPUBLISH_AFTER_S`` ago is served by the retained copy. A request
after that publishes it again, which also restores a retained copy a broker lost (a restart
without persistence). Before retained chunks, every request after a publish was published again,
and every re-publish went to every device still waiting for its earlier copy: 5,000 simulated
devices each received the model ~7.6 times and Mosquitto grew past 10 GB (docs/scale.md).

Requests for one chunk that arrive together are merged (:class:`Coalescer`): everything queued
when the server thread wakes is admitted before anything is published. They do not wait for
more (``linger_s`` is 0): the retained copy already serves every later request, and a linger of
0.2 s made one device's transfer, which asks for the next chunk as each one lands, 14x slower
(window / linger: 16 chunks per 0.2 s). The retained copies of an artifact nobody asked for in
``CLEAR_AFTER_S`` are deleted (an empty retained publish), and all of them when the controller
stops, so the broker does not keep models for ever. The only ordering needed is that a device's
SUBSCRIBE reaches the broker before its BlobRequest, which holds because both go on the same
connection in that order.

The shared tree sits outside ``gf/v1/{device}`` so no device id can collide with it and the
controller's ``gf/v1/+/...`` subscriptions never receive its own chunks. The broker ACL lets
every device read ``gf/blobs/v1/+/+`` and only the controller write it: a device can read any
model the fleet is fetching. Models are signed (integrity, origin), not secret within a fleet.

The controller owns the chunking. Every artifact is cut into ``CHUNK_SIZE`` chunks (the size
every Deploy names, ``protocol.DEFAULT_CHUNK_SIZE``), so what the shared topic carries is always
the canonical chunk, and a chunk is a key of (sha256, index) alone. A request naming another
size is refused: when the server cut chunks to whatever size a request named, one device's
222-byte request made it publish 60 MB, and requests with other sizes overwrote the retained
chunks every other device was fetching (issue 15). A device may ask only for artifacts the
controller sent it (``allowed``). So whatever a device asks, it makes the controller publish
at most one copy of each artifact it was sent per ``REPUBLISH_AFTER_S`` (1.0x; the fleet's other
devices share that copy), and a refused request is counted, not served
(``benchmarks/blob_budget.py``).

Requests are decoded and answered on a thread of their own, never queued behind telemetry in
ingest: a transfer neither waits for a SQLite commit nor delays one (routed through ingest, each
one-chunk request cost a transaction, and a single push ran at 0.6 of raw paho). Only artifacts
in the catalog are served, and only the chunks that exist; anything else is logged with the
device and what it asked for. :attr:`BlobServer.stats` counts what was asked for, rejected and
published (benchmarks/fleet_rollout.py reports it).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import protocol as p

log = logging.getLogger(__name__)

LINGER_S = 0.0  # how long the first request for a chunk waits for others to join it (none)
REPUBLISH_AFTER_S = 30.0  # a request for a chunk published longer ago publishes it again
CLEAR_AFTER_S = 300.0  # retained chunks of an artifact nobody asked for in this long go
QUEUE_LIMIT = 10_000  # requests waiting for the server thread; more are dropped, not queued
CHUNK_SIZE = p.DEFAULT_CHUNK_SIZE  # the one chunking of every artifact (Deploy.artifact)

ChunkKey = tuple[str, int, int]  # (sha256, chunk_size, index)


@dataclass
class BlobStats:
    requests: int = 0  # BlobRequests read
    chunks_requested: int = 0  # chunks they named (the per-device copies of the old design)
    chunks_published: int = 0
    bytes_published: int = 0
    chunks_retained: int = 0  # asked for, and served by the broker's retained copy
    rejected: int = 0  # requests that were not a well-formed BlobRequest on a device's topic
    refused: int = 0  # well-formed, but another chunk size or an artifact not sent to it
    dropped: int = 0  # requests that found the queue full (the device asks again after a stall)


def _now_and_then(count: int, what: str, source: str, why: str) -> None:
    """Log the 1st, 1001st, ... chunk request ``what`` (rejected, refused): a flood must not
    flood the log too."""
    if count % 1000 == 1:
        log.warning("%s chunk request from %s: %s (%d %s so far)", what, source, why, count, what)


class Coalescer:
    """Pending chunk publishes, merged by (sha256, chunk size, index); pure logic, no I/O.

    :meth:`add` a requested chunk at time ``now``; :meth:`due` hands out, oldest first, the
    chunks whose first request is at least ``linger_s`` old, and forgets them, so that a later
    request for the same chunk is a new publish.
    """

    def __init__(self, linger_s: float = LINGER_S) -> None:
        self.linger_s = linger_s
        self._pending: dict[ChunkKey, float] = {}  # insertion order = first-request order

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: ChunkKey, now: float) -> bool:
        """Queue ``key``; False if it was already waiting (this request joins that publish)."""
        if key in self._pending:
            return False
        self._pending[key] = now
        return True

    def due(self, now: float) -> list[ChunkKey]:
        """The chunks to publish now, in the order they were first asked for."""
        ready: list[ChunkKey] = []
        for key, first in self._pending.items():
            if now - first < self.linger_s:
                break  # later entries were asked for later still
            ready.append(key)
        for key in ready:
            del self._pending[key]
        return ready

    def next_due(self) -> float | None:
        """When the oldest pending chunk becomes due (clock time), or None if none waits."""
        for first in self._pending.values():
            return first + self.linger_s
        return None


class BlobServer:
    """Reads chunks from the store and publishes each once, retained, on the shared topic of
    its artifact. ``publish(topic, payload)`` must publish retained (an empty payload deletes)."""

    def __init__(
        self,
        resolve: Callable[[str], Path | None],
        publish: Callable[[str, bytes], None],
        linger_s: float = LINGER_S,
        clock: Callable[[], float] = time.monotonic,
        allowed: Callable[[str, str], bool] | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        """``allowed(device, sha256)``: whether the controller sent that artifact to that device
        (None: every catalogued artifact, for tools and tests without a deployments table);
        ``chunk_size``: the chunking of every artifact (tests use tiny ones)."""
        self._resolve = resolve
        self.chunk_size = chunk_size
        self._allowed = allowed
        self._publish = publish
        self._clock = clock
        self._coalescer = Coalescer(linger_s)
        self._retained: dict[ChunkKey, float] = {}  # published retained, and when
        self._asked: dict[str, float] = {}  # artifact -> last request
        self.stats = BlobStats()
        self._queue: queue.Queue[tuple[str, bytes | p.BlobRequest] | None] = queue.Queue(
            maxsize=QUEUE_LIMIT
        )
        self._thread = threading.Thread(target=self._run, name="gf-blobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):  # full: the thread drains it, or never ran
            self._queue.put(None, timeout=10)
        self._thread.join(timeout=10)

    def request(self, device: str, request: p.BlobRequest) -> None:
        """Serve a decoded request of ``device``."""
        self._queue.put((device, request))

    def offer(self, topic: str, payload: bytes) -> None:
        """Network thread: a raw message from a ``gf/v1/{device}/blob/req`` topic; it is
        decoded on the server's thread. A full queue drops it (counted) rather than block the
        network thread that carries every other device's messages, or grow without bound
        under a flood; an agent asks again once its transfer stalls."""
        try:
            self._queue.put_nowait((topic, payload))
        except queue.Full:
            self.stats.dropped += 1
            if self.stats.dropped % 1000 == 1:
                log.warning(
                    "chunk requests arrive faster than they are served: %d dropped",
                    self.stats.dropped,
                )

    def _run(self) -> None:
        while True:
            due = self._coalescer.next_due()
            timeout = None if due is None else max(due - self._clock(), 0.0)
            if self._retained:  # wake now and then to delete what nobody wants any more
                timeout = min(timeout if timeout is not None else 10.0, 10.0)
            item: tuple[str, bytes | p.BlobRequest] | bool | None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = False  # a pending chunk is due
            while item is not False:  # take everything already queued before publishing
                if not isinstance(item, tuple):
                    self.clear(everything=True)  # None: stop()
                    return
                self._admit_safely(*item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = False
            self.flush(self._clock())
            self.clear()

    def _admit_safely(self, source: str, request: bytes | p.BlobRequest) -> None:
        if isinstance(request, bytes):
            try:
                source, request = self._decode(source, request)
            except p.ProtocolError as exc:
                self.stats.rejected += 1
                _now_and_then(self.stats.rejected, "rejected", source, str(exc))
                return
        try:
            self._admit(source, request)
        except Exception:
            log.exception("serving %s to %s failed", request.sha256[:12], source)

    @staticmethod
    def _decode(topic: str, payload: bytes) -> tuple[str, p.BlobRequest]:
        """(device, request) of a raw message; ProtocolError for anything else."""
        parsed = p.parse_topic(topic)
        message = p.decode(payload)
        if parsed.channel is not p.Channel.BLOB_REQ or not isinstance(message, p.BlobRequest):
            raise p.ProtocolError(f"expected a blob_request on blob/req, got {message.kind}")
        return parsed.device, message

    def _refuse(self, device: str, why: str) -> None:
        self.stats.refused += 1
        _now_and_then(self.stats.refused, "refused", device, why)

    def _admit(self, device: str, request: p.BlobRequest) -> None:
        """Check a request and add its chunks to the pending publishes."""
        self.stats.requests += 1
        if request.chunk_size != self.chunk_size:
            self._refuse(device, f"chunk size {request.chunk_size}, not {self.chunk_size}")
            return
        if self._allowed is not None and not self._allowed(device, request.sha256):
            self._refuse(device, f"artifact {request.sha256[:12]} was not sent to it")
            return
        path = self._resolve(request.sha256)
        if path is None:
            log.warning("%s asked for unknown artifact %s", device, request.sha256[:12])
            return
        size = path.stat().st_size
        count = -(-size // request.chunk_size)
        if request.first >= count:
            log.warning(
                "%s asked for chunks %d.. of %s, which has %d",
                device,
                request.first,
                request.sha256[:12],
                count,
            )
            return
        last = min(request.first + request.count, count)
        now = self._clock()
        self._asked[request.sha256] = now
        for index in range(request.first, last):
            self.stats.chunks_requested += 1
            key = (request.sha256, request.chunk_size, index)
            published = self._retained.get(key)
            if published is not None and now - published < REPUBLISH_AFTER_S:
                self.stats.chunks_retained += 1  # the device's SUBSCRIBE fetched that copy
                continue
            self._coalescer.add(key, now)

    def flush(self, now: float) -> None:
        """Publish every chunk that is due."""
        for sha256, chunk_size, index in self._coalescer.due(now):
            path = self._resolve(sha256)
            if path is None:
                continue  # removed from the store since it was asked for
            try:
                with path.open("rb") as fh:
                    fh.seek(index * chunk_size)
                    data = fh.read(chunk_size)
                self._publish(p.shared_blob_topic(sha256, index), data)
            except Exception:
                log.exception("publishing chunk %d of %s failed", index, sha256[:12])
                continue
            self._retained[(sha256, chunk_size, index)] = now
            self.stats.chunks_published += 1
            self.stats.bytes_published += len(data)

    def clear(self, everything: bool = False) -> None:
        """Delete the retained chunks of artifacts nobody asked for in CLEAR_AFTER_S (or all)."""
        now = self._clock()
        idle = {
            sha for sha, asked in self._asked.items() if everything or now - asked >= CLEAR_AFTER_S
        }
        for key in [k for k in self._retained if k[0] in idle]:
            del self._retained[key]
            try:
                self._publish(p.shared_blob_topic(key[0], key[2]), b"")
            except Exception:
                log.exception("deleting the retained chunk %d of %s failed", key[2], key[0][:12])
        for sha in idle:
            del self._asked[sha]
