"""Inference overhead: the agent's per-inference path against a bare ``session.run``.

Both run the sample model vibration-ae on the same simulator windows in one process, in
alternating blocks so that noise from the shared machine falls on both alike. The agent path is
``Agent._infer_once`` on an agent built without ``start()``: reshape, the timed model run,
the telemetry window update, and building and encoding the Result message. Only the MQTT
publish itself is replaced, by a link that drops the payload (network, not inference).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort

from agent import protocol as p
from agent.config import AgentConfig
from agent.link import MqttLink
from agent.runtime import load_model
from agent.service import Agent, Serving
from agent.sources.base import Reading
from agent.sources.vibration import VibrationSimulator
from agent.telemetry import TelemetryWindow
from benchmarks.rig import Outcome, outcome, percentile

NAME = "inference_overhead"
TITLE = "Agent inference path vs bare session.run"
SAMPLE = Path(__file__).resolve().parents[1] / "model_store" / "samples" / "vibration-ae.onnx"
TARGET_ADDED_US = 10.0  # issue 14: the agent costs less than the smallest model it runs
WINDOWS = 256
WARM_UP = 200


class DroppingLink:
    """Stands in for MqttLink at the publish seam: the payload is built, then dropped."""

    def __init__(self) -> None:
        self.published = 0

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.published += 1


def _bare_session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(SAMPLE), sess_options=options, providers=["CPUExecutionProvider"]
    )


def _agent(state_dir: Path) -> tuple[Agent, Serving, DroppingLink]:
    agent = Agent(AgentConfig(device_id="bench-infer-1", state_dir=state_dir))
    link = DroppingLink()
    agent.link = cast(MqttLink, link)
    active = p.ActiveModel(
        model=p.ModelRef(name="vibration-ae", version="1.0.0"),
        sha256="0" * 64,
        format=p.ModelFormat.ONNX,
    )
    serving = Serving(load_model(SAMPLE, p.ModelFormat.ONNX), active)
    agent._serving = serving
    return agent, serving, link


def _time_block(call: Callable[[int], object], first: int, count: int, out: list[float]) -> None:
    clock = time.perf_counter_ns
    for i in range(first, first + count):
        t0 = clock()
        call(i)
        out.append((clock() - t0) / 1000.0)


def profile_agent_path(agent: Agent, serving: Serving, readings: list[Reading], calls: int) -> str:
    """cProfile of the agent path: the top functions by own time."""
    window = TelemetryWindow(p.utcnow(), 0.0)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(calls):
        agent._infer_once(serving, readings[i % len(readings)], window)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    return text.getvalue()


def run(quick: bool, *, profile: bool = False) -> Outcome:
    iterations = 600 if quick else 5000
    block = 100
    sim = VibrationSimulator(seed=7)
    readings = [Reading(sim.read(), p.utcnow()) for _ in range(WINDOWS)]
    feeds = [r.values.reshape(1, -1) for r in readings]
    session = _bare_session()
    with tempfile.TemporaryDirectory(prefix="gf-bench-infer-") as tmp:
        agent, serving, link = _agent(Path(tmp) / "state")
        window = TelemetryWindow(p.utcnow(), 0.0)

        def bare(i: int) -> object:
            return session.run(None, {"window": feeds[i % WINDOWS]})

        def agent_path(i: int) -> object:
            agent._infer_once(serving, readings[i % WINDOWS], window)
            return None

        for i in range(WARM_UP):  # warm-up: allocator, caches, lazy imports
            bare(i)
            agent_path(i)
        bare_us: list[float] = []
        agent_us: list[float] = []
        for n, first in enumerate(range(0, iterations, block)):
            order = [(bare, bare_us), (agent_path, agent_us)]
            for call, out in order if n % 2 == 0 else reversed(order):
                _time_block(call, first, block, out)
        expected = iterations + WARM_UP
        if link.published != expected:
            raise RuntimeError(f"agent published {link.published} results, expected {expected}")
        bare_p50, bare_p95 = percentile(bare_us, 50), percentile(bare_us, 95)
        agent_p50, agent_p95 = percentile(agent_us, 50), percentile(agent_us, 95)
        added_p50 = agent_p50 - bare_p50
        passed = added_p50 <= TARGET_ADDED_US
        numbers: dict[str, object] = {
            "iterations": iterations,
            "block": block,
            "bare_p50_us": round(bare_p50, 2),
            "bare_p95_us": round(bare_p95, 2),
            "agent_p50_us": round(agent_p50, 2),
            "agent_p95_us": round(agent_p95, 2),
            "added_p50_us": round(added_p50, 2),
            "added_p95_us": round(agent_p95 - bare_p95, 2),
            "result_bytes": len(p.encode(_sample_result(serving, readings[0]))),
        }
        if profile or not passed:
            numbers["profile"] = profile_agent_path(agent, serving, readings, 2000)
    return outcome(
        NAME,
        TITLE,
        measured=f"p50 {agent_p50:.1f} us, p95 {agent_p95:.1f} us",
        baseline=f"p50 {bare_p50:.1f} us, p95 {bare_p95:.1f} us",
        ratio=agent_p50 / bare_p50,
        target=f"added p50 <= {TARGET_ADDED_US:.0f} us (got {added_p50:.1f})",
        passed=passed,
        numbers=numbers,
    )


def _sample_result(serving: Serving, reading: Reading) -> p.Result:
    """One Result as the agent builds it, to report the payload size."""
    outputs = serving.model.run({"window": reading.values.reshape(1, -1)})
    return p.Result(
        seq=0,
        model=serving.active.model,
        latency_ms=0.1,
        outputs={k: np.asarray(v, dtype=np.float64).ravel().tolist() for k, v in outputs.items()},
        input_ts=reading.ts,
    )
