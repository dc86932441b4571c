"""The inference loop's Result encoder writes exactly what the pydantic ``Result`` writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from agent import protocol as p
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
    payload = ResultWriter(model, tier).encode(f"s-{seq}", seq, latency, outputs, input_ts)
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
