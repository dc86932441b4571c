"""Result messages as the inference loop writes them: every inference, so every microsecond.

``ResultWriter`` encodes a ``protocol.Result`` byte for byte as ``protocol.encode`` would,
without building the Result (tests/unit/test_results.py holds the two to the same bytes
on generated values).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import msgspec

from agent.protocol import PROTOCOL_VERSION, ModelRef, Tier

_dumps = msgspec.json.Encoder().encode  # looked up once; protocol.encode's encoder
_wall_ns, _perf_ns = time.time_ns, time.perf_counter_ns  # the clocks (tests replace them)
_US_Z = tuple(f"{n:03d}Z" for n in range(1000))  # a timestamp's last three digits, and its Z


class ResultWriter:
    """Encodes the Results of one model and tier, byte for byte as ``encode(Result(...))``,
    without building a Result.

    The agent made every field itself (a counter, its own clock, the runtime's float
    outputs), so validating them again on every inference was pure cost: ~12 us of a 40 us
    model run on a 2-core EPYC when it was a pydantic model (benchmarks/README.md, "Inference
    overhead"). A plain dict through msgspec's encoder writes the bytes ``protocol.encode``
    writes for the Result; tests/unit/test_results.py checks them against ``Result`` on
    generated values.

    The ``ts`` is written from the ``perf_counter_ns`` reading the caller already took, not
    from ``datetime.now(UTC)`` (~3 us right after a model run, with the encoder's aware-datetime
    path): the wall clock is read once per millisecond, when the text up to the millisecond
    is made, and within that millisecond the microseconds are the perf counter's. So ``ts``
    is the wall clock to the microsecond, and a step of the wall clock shows within 1 ms.
    """

    def __init__(self, model: ModelRef | None, tier: Tier) -> None:
        self._model = None if model is None else {"name": model.name, "version": model.version}
        self._tier = tier.value
        # One dict, its fields in the wire order, refilled on every encode: building a
        # 10-field dict per message cost ~1 us right after a model run. Not thread-safe: a
        # writer belongs to one Serving, which one inference thread uses.
        self._message: dict[str, object] = {
            "v": PROTOCOL_VERSION,
            "id": "",
            "ts": "",
            "kind": "result",
            "seq": 0,
            "model": self._model,
            "tier": self._tier,
            "latency_ms": 0.0,
            "outputs": None,
            "input_ts": None,
        }
        self._ms_start = self._ms_end = 0  # the millisecond _ms_text names, in perf_counter ns
        self._ms_text = ""  # "YYYY-MM-DDTHH:MM:SS.mmm"
        self._second = -1  # the second _whole names, in s since the epoch
        self._whole = ""  # "YYYY-MM-DDTHH:MM:SS"

    def stamp(self, perf_ns: int) -> str:
        """The wall-clock time at ``perf_ns`` (a recent ``time.perf_counter_ns()``), written
        as the wire contract writes that datetime (to the microsecond, ``Z``)."""
        if self._ms_start <= perf_ns < self._ms_end:
            return self._ms_text + _US_Z[(perf_ns - self._ms_start) // 1000]
        return self._new_millisecond(perf_ns)

    def _new_millisecond(self, perf_ns: int) -> str:
        wall_ns = _wall_ns() - (_perf_ns() - perf_ns)  # the wall clock at perf_ns
        second, micro = divmod(wall_ns // 1000, 1_000_000)
        if second != self._second:
            # the encoder writes a whole second without a fraction ("...:SSZ"): keep it less the Z
            self._whole = _dumps(datetime.fromtimestamp(second, UTC))[1:-2].decode()
            self._second = second
        if not micro:
            return f"{self._whole}Z"  # a whole second has no fraction
        millis = micro // 1000
        self._ms_text = f"{self._whole}.{millis:03d}"
        self._ms_start = perf_ns - wall_ns % 1_000_000
        # the first millisecond of a second holds the whole second: it is never cached
        self._ms_end = self._ms_start + 1_000_000 if millis else 0
        return self._ms_text + _US_Z[micro % 1000]

    def encode(
        self,
        id: str,
        seq: int,
        latency_ms: float,
        outputs: dict[str, list[float]],
        input_ts: datetime | None,
        perf_ns: int,
    ) -> bytes:
        """``id``: 1-64 characters; ``seq`` and ``latency_ms``: >= 0 (unchecked); ``perf_ns``:
        the ``time.perf_counter_ns()`` the message was made at (its ``ts``)."""
        message = self._message
        message["id"] = id
        message["ts"] = self.stamp(perf_ns)
        message["seq"] = seq
        message["latency_ms"] = latency_ms
        message["outputs"] = outputs
        message["input_ts"] = input_ts
        return _dumps(message)
