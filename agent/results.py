"""Result messages as the inference loop writes them: every inference, so every microsecond.

``ResultWriter`` encodes a ``protocol.Result`` byte for byte as ``protocol.encode`` would,
without building the pydantic model (tests/unit/test_results.py holds the two to the same bytes
on generated values).
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from agent.protocol import PROTOCOL_VERSION, ModelRef, Tier

_dumps, _now, _UTC_Z = orjson.dumps, datetime.now, orjson.OPT_UTC_Z  # looked up once


class ResultWriter:
    """Encodes the Results of one model and tier, byte for byte as ``encode(Result(...))``,
    without building a Result.

    The agent made every field itself (a counter, its own clock, the runtime's float
    outputs), so validating them again on every inference was pure cost: ~12 us of a 40 us
    model run on a 2-core EPYC (benchmarks/README.md, "Inference overhead"). orjson writes
    floats (shortest round-trip form) and UTC timestamps (``Z``) as pydantic does, in a third
    of pydantic's time; tests/unit/test_results.py checks the bytes against ``Result`` on
    generated values.
    """

    def __init__(self, model: ModelRef | None, tier: Tier) -> None:
        self._model = None if model is None else {"name": model.name, "version": model.version}
        self._tier = tier.value

    def encode(
        self,
        id: str,
        seq: int,
        latency_ms: float,
        outputs: dict[str, list[float]],
        input_ts: datetime | None,
    ) -> bytes:
        """``id``: 1-64 characters; ``seq`` and ``latency_ms``: >= 0 (unchecked)."""
        return _dumps(
            {
                "v": PROTOCOL_VERSION,
                "id": id,
                "ts": _now(UTC),
                "kind": "result",
                "seq": seq,
                "model": self._model,
                "tier": self._tier,
                "latency_ms": latency_ms,
                "outputs": outputs,
                "input_ts": input_ts,
            },
            option=_UTC_Z,
        )
