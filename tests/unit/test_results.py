"""The inference loop's Result encoder writes exactly what ``protocol.encode`` writes."""

from __future__ import annotations

import math
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import cast
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import protocol as p
from agent import results
from agent.config import AgentConfig
from agent.link import MqttLink
from agent.results import ResultWriter
from agent.runtime.base import TensorSpec
from agent.service import Agent, Serving
from agent.sources.base import Reading
from agent.telemetry import TelemetryWindow

finite = st.floats(allow_nan=False, allow_infinity=False)
moments = (
    st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)
    )
    | st.datetimes(timezones=st.sampled_from([timezone(timedelta(hours=2)), UTC]))
    | st.none()
)
models = st.none() | st.builds(
    p.ModelRef,
    name=st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,20}", fullmatch=True),
    version=st.from_regex(r"[0-9A-Za-z][0-9A-Za-z.+-]{0,10}", fullmatch=True),
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
S = 1_000_000_000  # ns in a second
# wall clocks the Result's ts accepts (2000..2100), some just before a whole second
FIRST, LAST = int(p.EARLIEST.timestamp()) + 1, int(p.LATEST.timestamp()) - 5
walls = st.integers(FIRST * S, LAST * S) | st.builds(
    lambda second, before: second * S - before, st.integers(FIRST, LAST), st.integers(0, 3_000_000)
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    model=models,
    tier=st.sampled_from(list(p.Tier)),
    seq=st.integers(min_value=0, max_value=2**53),
    latency=st.floats(min_value=0, allow_infinity=False),
    outputs=st.dictionaries(st.text(min_size=1, max_size=8), st.lists(finite, max_size=6)),
    input_ts=moments,
)
def test_the_writer_gives_the_bytes_of_the_result_model(
    model: p.ModelRef | None,
    tier: p.Tier,
    seq: int,
    latency: float,
    outputs: dict[str, list[float]],
    input_ts: datetime | None,
) -> None:
    payload = ResultWriter(model, tier).encode(
        f"s-{seq}", seq, latency, outputs, input_ts, time.perf_counter_ns()
    )
    decoded = p.decode(payload)
    assert isinstance(decoded, p.Result)
    again = p.Result(
        id=f"s-{seq}",
        ts=decoded.ts,
        seq=seq,
        model=model,
        tier=tier,
        latency_ms=latency,
        outputs=outputs,
        input_ts=input_ts,
    )
    assert p.encode(again) == payload, "same fields, same bytes as the wire model"
    assert decoded == again
    assert abs(decoded.ts - datetime.now(UTC)) < timedelta(minutes=1)


@settings(max_examples=300, deadline=None, database=None)
@given(
    wall0=walls,
    perf0=st.integers(0, 2**62),
    steps=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 999, 1000, 1001, 999_999, 1_000_000])
            | st.integers(0, 3_000_000),  # how far both clocks move (ns)
            st.integers(0, 5_000),  # how long ago the caller read its perf counter (ns)
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_the_ts_is_the_wall_clock_at_the_callers_perf_counter_reading(
    wall0: int, perf0: int, steps: list[tuple[int, int]]
) -> None:
    """The writer reads the wall clock once a millisecond and counts the microseconds on the
    caller's perf counter: every ts is still the wall clock at that reading, to the
    microsecond, written as the wire contract writes that datetime (whole seconds without a
    fraction, across second and millisecond boundaries)."""
    clock = {"wall": wall0, "perf": perf0}
    writer = ResultWriter(p.ModelRef(name="m", version="1"), p.Tier.ACTIVE)
    with (
        mock.patch.object(results, "_wall_ns", lambda: clock["wall"]),
        mock.patch.object(results, "_perf_ns", lambda: clock["perf"]),
    ):
        for seq, (moved, lag) in enumerate(steps):
            clock["wall"] += moved
            clock["perf"] += moved
            perf_ns = clock["perf"] - lag
            payload = writer.encode("s", seq, 0.5, {"score": [0.25]}, None, perf_ns)
            wall = wall0 + (perf_ns - perf0)
            expected = p.Result(
                id="s",
                ts=EPOCH + timedelta(microseconds=wall // 1000),
                seq=seq,
                model=p.ModelRef(name="m", version="1"),
                latency_ms=0.5,
                outputs={"score": [0.25]},
            )
            assert payload == p.encode(expected)


def test_a_step_of_the_wall_clock_shows_within_a_millisecond() -> None:
    clock = {"wall": 1_800_000_000 * S + 400_000_123, "perf": 10 * S}
    writer = ResultWriter(None, p.Tier.ACTIVE)
    with (
        mock.patch.object(results, "_wall_ns", lambda: clock["wall"]),
        mock.patch.object(results, "_perf_ns", lambda: clock["perf"]),
    ):
        assert writer.stamp(clock["perf"]) == "2027-01-15T08:00:00.400000Z"
        clock["wall"] += 3600 * S  # stepped an hour ahead (NTP, an operator)
        clock["wall"] += 500_000
        clock["perf"] += 500_000
        assert writer.stamp(clock["perf"]) == "2027-01-15T08:00:00.400500Z"  # same millisecond
        clock["wall"] += 600_000
        clock["perf"] += 600_000
        assert writer.stamp(clock["perf"]) == "2027-01-15T09:00:00.401100Z"


class _FixedModel:
    """A LoadedModel whose run returns the given outputs, whatever it is fed."""

    format = p.ModelFormat.ONNX
    path = Path("fixed.onnx")
    inputs = (TensorSpec("window", (1, 4), "float32"),)

    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self._outputs = outputs
        self.outputs = tuple(TensorSpec(n, v.shape, v.dtype.name) for n, v in outputs.items())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._outputs

    def close(self) -> None:
        pass


class _KeptLink:
    """Keeps what the agent publishes; never connected, so events stay in the outbox."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.connected = threading.Event()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.payloads.append(payload)


@pytest.mark.parametrize(
    "outputs",
    [
        {"score": np.array([[0.41]], dtype=np.float32)},  # one value: the agent's short path
        {"score": np.array(0.1, dtype=np.float64)},
        {"score": np.array([1.5], dtype=np.float16)},
        {"score": np.array([[2**53 + 1]], dtype=np.int64)},
        {"score": np.array([True])},
        {"score": np.array([[0.1, 0.2], [1e300, -0.0]], dtype=np.float64)},  # the general path
        {"a": np.array([0.5], dtype=np.float32), "b": np.array([3], dtype=np.int32)},
        {"score": np.array([[np.nan]], dtype=np.float32)},  # withheld
        {"score": np.array([np.inf], dtype=np.float64)},
        {"a": np.array([0.5], dtype=np.float32), "b": np.array([1e308, 1e308])},  # sum overflows
        {"a": np.array([0.5], dtype=np.float32), "b": np.array([1.0, -np.inf])},
    ],
)
def test_the_agent_publishes_each_output_as_floats_or_withholds_the_result(
    tmp_path: Path, outputs: dict[str, np.ndarray]
) -> None:
    """Whatever the path (one output of one value, or the general one), a Result carries every
    output flattened to floats, exactly what ``astype(float).ravel().tolist()`` gives, and a
    NaN or infinity anywhere withholds it."""
    agent = Agent(AgentConfig(device_id="results-1", state_dir=tmp_path / "state"))
    link = _KeptLink()
    agent.link = cast(MqttLink, link)
    active = p.ActiveModel(
        model=p.ModelRef(name="m", version="1"), sha256="0" * 64, format=p.ModelFormat.ONNX
    )
    serving = Serving(_FixedModel(outputs), active)
    window = TelemetryWindow(p.utcnow(), 0.0)
    reading = Reading(np.zeros(4, dtype=np.float32), p.utcnow())
    outcome = agent._infer_once(serving, reading, window)
    expected = {n: np.asarray(v).astype(float).ravel().tolist() for n, v in outputs.items()}
    if all(math.isfinite(x) for xs in expected.values() for x in xs):
        assert isinstance(outcome, float) and len(link.payloads) == 1
        result = p.decode(link.payloads[0])
        assert isinstance(result, p.Result) and result.outputs == expected
        assert all(type(x) is float for xs in result.outputs.values() for x in xs)
        assert p.encode(result) == link.payloads[0]
    else:
        assert outcome == "model m:1 returned NaN or infinity; result withheld"
        assert link.payloads == [] and window.errors == 1
