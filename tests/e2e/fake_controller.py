"""The controller's side of the wire contract, played by a test so it can misbehave on purpose."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

from agent import protocol as p
from tests.conftest import SAMPLES, Probe

MODEL = (SAMPLES / "vibration-ae.onnx").read_bytes()
CHUNK = 64 * 1024


class FakeController:
    """Publishes commands to one device and answers its chunk requests from ``blobs``."""

    def __init__(self, probe: Probe, device: str) -> None:
        self.probe = probe
        self.device = device
        self.blobs: dict[str, bytes] = {}
        self.tamper: Callable[[int, bytes], list[tuple[int, bytes]]] = lambda i, d: [(i, d)]
        self.chunk_delay_s = 0.0
        self.chunks_served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        seen = 0
        while not self._stop.is_set():
            history = self.probe.history[seen:]
            seen += len(history)
            for topic, payload in history:
                parsed = p.parse_topic(topic)
                if parsed.device != self.device or parsed.channel is not p.Channel.BLOB_REQ:
                    continue
                request = p.decode(payload)
                assert isinstance(request, p.BlobRequest)
                data = self.blobs[request.sha256]
                for index in range(request.first, request.first + request.count):
                    chunk = data[index * request.chunk_size : (index + 1) * request.chunk_size]
                    for i, d in self.tamper(index, chunk):
                        self.probe.client.publish(
                            p.blob_topic(self.device, request.sha256, i), d, qos=1
                        )
                    self.chunks_served += 1
                    time.sleep(self.chunk_delay_s)
            time.sleep(0.02)

    def command(self, command: Any) -> str:
        self.probe.publish(p.topic(self.device, p.Channel.CMD), p.encode(command))
        return str(command.id)

    def raw(self, payload: bytes) -> None:
        self.probe.publish(p.topic(self.device, p.Channel.CMD), payload)

    def deploy(self, data: bytes, version: str, *, announced_sha: str | None = None) -> str:
        sha = announced_sha or hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return self.command(
            p.Deploy(
                model=p.ModelRef(name="vibration-ae", version=version),
                artifact=p.Artifact(
                    sha256=sha, size=len(data), format=p.ModelFormat.ONNX, chunk_size=CHUNK
                ),
            )
        )

    def reply_to(self, ref: str, timeout: float = 20) -> p.Reply:
        def match(topic: str, payload: bytes) -> bool:
            if not topic.endswith("/reply") or p.parse_topic(topic).device != self.device:
                return False
            reply = p.decode(payload)
            return isinstance(reply, p.Reply) and reply.ref == ref

        _, payload = self.probe.wait_for(match, timeout, f"reply to {ref}")
        reply = p.decode(payload)
        assert isinstance(reply, p.Reply)
        return reply

    def event(self, kind: p.EventKind, since: int, needle: str = "") -> p.Event:
        def match(topic: str, payload: bytes) -> bool:
            if not topic.endswith("/events") or p.parse_topic(topic).device != self.device:
                return False
            event = p.decode(payload)
            return isinstance(event, p.Event) and event.event is kind and needle in event.message

        _, payload = self.probe.wait_for(
            match, 20, f"{kind.value} event with {needle!r}", since=since
        )
        event = p.decode(payload)
        assert isinstance(event, p.Event)
        return event

    def serving(self, model: str, since: int | None = None) -> None:
        """Assert the agent is still producing results with ``model``."""
        start = self.probe.mark() if since is None else since

        def match(topic: str, payload: bytes) -> bool:
            if not topic.endswith("/results") or p.parse_topic(topic).device != self.device:
                return False
            result = p.decode(payload)
            return isinstance(result, p.Result) and str(result.model) == model

        self.probe.wait_for(match, 10, f"results from {model}", since=start)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
