"""Result messages as the inference loop writes them: every inference, so every microsecond.

``ResultWriter`` encodes a ``protocol.Result`` byte for byte as ``protocol.encode`` would,
without building the Result (tests/unit/test_results.py holds the two to the same bytes on
generated values).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from agent.protocol import PROTOCOL_VERSION, ModelRef, Tier

_dumps, _now = msgspec.json.Encoder().encode, datetime.now  # looked up once


class ResultWriter:
    """Encodes the Results of one model and tier, byte for byte as ``encode(Result(...))``,
    without building a Result.

    The agent made every field itself (a counter, its own clock, the runtime's float
    outputs), so building and checking a Result on every inference was pure cost: ~12 us of a
    40 us model run on a 2-core EPYC when it was a pydantic model (benchmarks/README.md,
    "Inference overhead"). A plain dict through the same msgspec encoder writes the same
    bytes; tests/unit/test_results.py checks them against ``Result`` on generated values.
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
            }
        )
