"""Serving model chunks to agents that ask for them (the controller side of agent.transfer).

Broker fan-out
--------------
Every chunk is published on ONE shared topic per artifact, ``gf/blobs/v1/{sha256}/{index}``
(agent.protocol.shared_blob_topic), never once per device: the broker copies it to every agent
that is subscribed. An agent subscribes to ``gf/blobs/v1/{sha256}/+`` while it fetches that
artifact (and unsubscribes when it is done), and still asks for windows of chunks with a
``BlobRequest`` on its own ``gf/v1/{device}/blob/req`` topic; flow control, re-asks after a
timeout and resume after a restart stay per device (agent.transfer). Chunks it did not ask for,
or already has, are harmless: ``Download.accept`` writes a chunk once and ignores duplicates.

The controller coalesces: a request for chunk ``i`` of an artifact that is still waiting to be
published joins the pending entry instead of adding a copy (:class:`Coalescer`). Entries wait
at most ``linger_s`` (0.2 s) after the first request so that devices asking at about the same
time share one publish; under load the queue behind the publisher merges far more. A request
that arrives after a chunk went out is served again: its device may have subscribed after that
publish, and the broker keeps no copy. The only ordering needed is that a device's SUBSCRIBE
reaches the broker before its BlobRequest, which holds because both go on the same connection
in that order.

The shared tree sits outside ``gf/v1/{device}`` so no device id can collide with it and the
controller's ``gf/v1/+/...`` subscriptions never receive its own chunks. The broker ACL lets
every device read ``gf/blobs/v1/+/+`` and only the controller write it: a device can read any
model the fleet is fetching. Models are signed (integrity, origin), not secret within a fleet.

Requests are answered on a thread of their own so that a large transfer never delays ingest.
Only artifacts in the catalog are served, and only the chunks that exist; anything else is
logged with the device and what it asked for. :attr:`BlobServer.stats` counts what was asked
for and what was published (benchmarks/fleet_rollout.py reports it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent import protocol as p

log = logging.getLogger(__name__)

LINGER_S = 0.2  # how long the first request for a chunk waits for others to join it

ChunkKey = tuple[str, int, int]  # (sha256, chunk_size, index)


@dataclass
class BlobStats:
    requests: int = 0  # BlobRequests read
    chunks_requested: int = 0  # chunks they named (the per-device copies of the old design)
    chunks_published: int = 0
    bytes_published: int = 0


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
    """Reads chunks from the store and publishes each once on the shared topic of its artifact."""

    def __init__(
        self,
        resolve: Callable[[str], Path | None],
        publish: Callable[[str, bytes], None],
        linger_s: float = LINGER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._resolve = resolve
        self._publish = publish
        self._clock = clock
        self._coalescer = Coalescer(linger_s)
        self.stats = BlobStats()
        self._queue: queue.Queue[tuple[str, p.BlobRequest] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="gf-blobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def request(self, device: str, request: p.BlobRequest) -> None:
        self._queue.put((device, request))

    def _run(self) -> None:
        while True:
            due = self._coalescer.next_due()
            timeout = None if due is None else max(due - self._clock(), 0.0)
            item: tuple[str, p.BlobRequest] | bool | None
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = False  # a pending chunk is due
            while item is not False:  # take everything already queued before publishing
                if not isinstance(item, tuple):
                    return  # None: stop()
                self._admit_safely(*item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = False
            self.flush(self._clock())

    def _admit_safely(self, device: str, request: p.BlobRequest) -> None:
        try:
            self._admit(device, request)
        except Exception:
            log.exception("serving %s to %s failed", request.sha256[:12], device)

    def _admit(self, device: str, request: p.BlobRequest) -> None:
        """Check a request and add its chunks to the pending publishes."""
        self.stats.requests += 1
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
        for index in range(request.first, last):
            self.stats.chunks_requested += 1
            self._coalescer.add((request.sha256, request.chunk_size, index), now)

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
            self.stats.chunks_published += 1
            self.stats.bytes_published += len(data)
