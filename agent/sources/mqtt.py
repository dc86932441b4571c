"""Windows of samples arriving on a topic of the local broker.

Accepts a ``SensorReading`` JSON message or a bare JSON array of numbers. The buffer is
bounded: when inference cannot keep up, the oldest readings are dropped and counted, so the
model always works on recent data.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import msgspec.json
import numpy as np

from agent.config import MqttInput
from agent.protocol import FaultKind, ProtocolError, SensorReading, decode, utcnow
from agent.sources.base import Reading

log = logging.getLogger(__name__)


def _json(payload: bytes) -> Any:
    """msgspec's JSON, and for what it refuses Python's: a byte-order mark, UTF-16 or -32, NaN
    or Infinity (refused below as what they are, not as broken JSON). The json module is loaded
    only when a sensor sends such a payload."""
    try:
        return msgspec.json.decode(payload)
    except msgspec.DecodeError:
        import json

        return json.loads(payload)


def parse_reading(payload: bytes) -> Reading:
    """Decode one payload; ProtocolError says what is wrong with it."""
    try:
        raw = _json(payload)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"sensor reading is not valid JSON: {str(exc)[:200]}") from exc
    if isinstance(raw, list):
        try:
            values = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ProtocolError("sensor reading array must hold only numbers") from exc
        if values.ndim != 1 or values.size == 0:
            raise ProtocolError("sensor reading array must be a non-empty flat list of numbers")
        return Reading(_finite(values), utcnow())
    message = decode(payload)
    if not isinstance(message, SensorReading):
        raise ProtocolError(f"expected a reading on the input topic, got {message.kind!r}")
    return Reading(_finite(np.asarray(message.values, dtype=np.float32)), message.ts)


def _finite(values: np.ndarray) -> np.ndarray:
    """Reject NaN, infinities and values beyond float32 (a broken sensor, not a reading)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.all(np.isfinite(values)):
            raise ProtocolError("sensor reading holds NaN, infinite or out-of-range values")
    return values


class MqttSource:
    """A bounded queue of readings fed by the MQTT network thread."""

    name = "mqtt"

    def __init__(self, config: MqttInput) -> None:
        self.topic = config.topic
        self._queue: deque[Reading] = deque(maxlen=config.queue)
        self._ready = threading.Condition()
        self.dropped = 0
        self.rejected = 0

    def offer(self, payload: bytes) -> None:
        """Called from the network thread: parse and enqueue, never raise."""
        try:
            reading = parse_reading(payload)
        except ProtocolError as exc:
            self.rejected += 1
            log.warning("ignored reading on %s: %s", self.topic, exc)
            return
        with self._ready:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(reading)
            self._ready.notify()

    def read(self, timeout: float) -> Reading | None:
        with self._ready:
            if not self._queue:
                self._ready.wait(timeout)
            return self._queue.popleft() if self._queue else None

    def set_fault(self, fault: FaultKind, severity: float) -> None:
        raise NotImplementedError("fault injection needs the simulated vibration input")
