"""Serving model chunks to agents that ask for them (the controller side of agent.transfer).

Requests are answered on a thread of their own so that a large transfer never delays ingest.
Only artifacts in the catalog are served, and only the chunks that exist; anything else is
logged with the device and what it asked for.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from agent import protocol as p

log = logging.getLogger(__name__)


class BlobServer:
    """Reads chunks from the store and publishes them to the requesting device."""

    def __init__(
        self,
        resolve: Callable[[str], Path | None],
        publish: Callable[[str, bytes], None],
    ) -> None:
        self._resolve = resolve
        self._publish = publish
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
        while (item := self._queue.get()) is not None:
            try:
                self._serve(*item)
            except Exception:
                log.exception("serving %s to %s failed", item[1].sha256[:12], item[0])

    def _serve(self, device: str, request: p.BlobRequest) -> None:
        path = self._resolve(request.sha256)
        if path is None:
            log.warning("%s asked for unknown artifact %s", device, request.sha256[:12])
            return
        size = path.stat().st_size
        count = -(-size // request.chunk_size)
        last = min(request.first + request.count, count)
        if request.first >= count:
            log.warning(
                "%s asked for chunks %d.. of %s, which has %d",
                device,
                request.first,
                request.sha256[:12],
                count,
            )
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            for index in range(request.first, last):
                data = os.pread(fd, request.chunk_size, index * request.chunk_size)
                self._publish(p.blob_topic(device, request.sha256, index), data)
        finally:
            os.close(fd)
