"""The inference loop's Result encoder writes exactly what the pydantic ``Result`` writes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import protocol as p
from agent import results
from agent.results import ResultWriter

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
def test_the_writer_gives_the_bytes_of_the_pydantic_result(
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
    microsecond, written as pydantic writes that datetime (whole seconds without a fraction,
    across second and millisecond boundaries)."""
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
