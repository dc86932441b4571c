"""Readings on the MQTT input topic (``agent.sources.mqtt.parse_reading``): what a sensor
gateway may send, including what msgspec's strict JSON refuses and Python's json read."""

from __future__ import annotations

import codecs

import numpy as np
import pytest

from agent.protocol import ProtocolError
from agent.sources.mqtt import parse_reading


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"[0.5, 1.5, -2]", id="plain"),
        pytest.param(codecs.BOM_UTF8 + b"[0.5, 1.5, -2]", id="utf-8-with-bom"),
        pytest.param("[0.5, 1.5, -2]".encode("utf-16"), id="utf-16"),
    ],
)
def test_a_bare_array_is_read_in_any_encoding_json_allows(payload: bytes) -> None:
    reading = parse_reading(payload)
    np.testing.assert_array_equal(reading.values, np.array([0.5, 1.5, -2], np.float32))


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        pytest.param(b"[0.1, NaN]", "holds NaN, infinite or out-of-range", id="nan"),
        pytest.param(b"[1e400]", "holds NaN, infinite or out-of-range", id="overflow"),
        pytest.param(b"[Infinity]", "holds NaN, infinite or out-of-range", id="infinity"),
        pytest.param(b"{not json", "not valid JSON", id="broken"),
        pytest.param(b"\xff\xfe\x00", "not valid JSON", id="bytes"),
    ],
)
def test_a_broken_sensor_is_told_apart_from_broken_json(payload: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        parse_reading(payload)
