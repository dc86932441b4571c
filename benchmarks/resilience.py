"""Resilience: results lost in hot swaps under load, and how fast a failing model falls back.

One real agent (``python -m agent.cli run``) with an MQTT input topic and results on, a real
Mosquitto, and the controller's side played here (``rig.BenchController``: Deploy commands,
chunks served from memory). A sensor thread publishes numbered windows (``SensorReading``,
each with its own ``ts``, which the agent echoes as ``Result.input_ts``) at ``RATE_HZ``.

1. *Hot swaps.* Two copies of the sample model vibration-ae (same graph, different bytes) are
   downloaded once each, then activated alternately 100 times (30 in quick mode) while the
   stream runs; after the downloads every activation comes from the agent's local last-good
   copy. Counted: windows published against results received (matched by ``input_ts``),
   inference errors (telemetry ``errors``), the time from Deploy to Reply of each swap, and the
   longest gap between results. Baseline, same run: the same number of windows on the same
   stream with no swaps.
2. *Falling to last-good.* v1 (vibration-ae) then v2, ``sqrt(0.5 - mean(x^2))``: it passes
   staging (finite on zeros) and answers quiet windows, and returns NaN on loud ones. The stream
   turns loud; timed from the publication of the first loud window to the arrival of the first
   Result with tier ``last_good``; the stream turns quiet again and the agent probes back up
   (``probe_after_s``/``probe_confirm_s`` short). Baseline, same run, one sample per repetition:
   ``errors_to_fall`` input periods plus creating a bare onnxruntime InferenceSession on v1 and
   running it once, what a fall must cost at least. Also: a v3 that fails staging (NaN on the
   zero-input smoke test) is deployed while v2 serves, and the longest gap between consecutive
   results during that deploy is compared with the input period.
"""

from __future__ import annotations

import bisect
import itertools
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper

from agent import protocol as p
from agent.link import MqttLink
from benchmarks.rig import (
    AGENT_START_TIMEOUT_S,
    BenchController,
    Outcome,
    agent_process,
    check_alive,
    median,
    mosquitto,
    outcome,
    percentile,
    write_agent_config,
)

NAME = "resilience"
TITLE = "Hot swaps under load; failed activation -> last-good"
DEVICE = "bench-resilience-1"
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "model_store" / "samples" / "vibration-ae.onnx"
N = 512  # the window vibration-ae takes
RATE_HZ = 200.0  # input windows per second
AGENT_RATE_HZ = 400.0  # the agent's tick: above the input rate, so a backlog drains
QUEUE = 64  # the agent's MQTT input queue (the default)
QUIET, LOUD = 0.1, 1.0  # amplitudes: mean(x^2) 0.01 and 1; v2 is NaN above 0.5
TELEMETRY_S = 0.5
FALLBACK = {
    "errors_to_fall": 3,
    "probe_after_s": 0.3,
    "probe_confirm_s": 0.3,
    "probe_max_s": 2.0,
}
SETTLE_S = 0.3  # stream alone before and after the swaps, so the first and last are under load
TIMEOUT_S = 30.0
TARGET = "0 results dropped in the swaps"


# -- models -----------------------------------------------------------------------------------


def twin(data: bytes, tag: str) -> bytes:
    """The same model with a different doc string: same graph and cost, another sha256."""
    model = onnx.load_from_string(data)
    model.doc_string = f"bench copy {tag}"
    return bytes(model.SerializeToString())


def fragile(c: float, tag: str, dead_weight: int = 0) -> bytes:
    """``sqrt(c - mean(x^2))``: NaN once the window's power passes ``c`` (c < 0: always NaN,
    so the zero-input smoke test of staging fails). ``dead_weight`` columns of a 512 x k
    float32 MatMul whose result is multiplied by zero make the file bigger and the load slower
    without changing the answer."""
    nodes = [
        helper.make_node("Mul", ["window", "window"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["c", "ms"], ["d"]),
        helper.make_node("Sqrt", ["d"], ["root"]),
    ]
    inits = [helper.make_tensor("c", TensorProto.FLOAT, [], [c])]
    if dead_weight:
        rng = np.random.default_rng(7)
        w = rng.standard_normal((N, dead_weight)).astype(np.float32)
        inits += [
            helper.make_tensor("w", TensorProto.FLOAT, [N, dead_weight], w.tobytes(), True),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ]
        nodes += [
            helper.make_node("MatMul", ["window", "w"], ["h"]),
            helper.make_node("ReduceMean", ["h"], ["hm"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["hm", "zero"], ["nothing"]),
            helper.make_node("Add", ["root", "nothing"], ["score"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["root"], ["score"]))
    graph = helper.make_graph(
        nodes,
        tag,
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
        inits,
    )
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    built.ir_version = 8
    onnx.checker.check_model(built)
    return bytes(built.SerializeToString())


def bare_session_s(path: Path) -> float:
    """Seconds to open an InferenceSession on ``path`` as the agent does and run it once."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    zeros = np.zeros((1, N), np.float32)
    t0 = time.perf_counter()
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    session.run(None, {"window": zeros})
    return time.perf_counter() - t0


# -- the input stream -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    index: int
    at: float  # monotonic, when handed to paho
    ts: datetime  # the reading's ts, echoed as the result's input_ts
    loud: bool
    phase: str | None


class Stream:
    """Publishes windows of +-amplitude noise to the agent's input topic at ``rate_hz`` (QoS 0,
    like a sensor gateway), each a SensorReading with a distinct ``ts``. On a fixed schedule;
    if the thread falls more than 5 periods behind (a starved CPU) it drops the schedule rather
    than burst the backlog into the agent's queue."""

    def __init__(self, port: int, topic: str, rate_hz: float) -> None:
        self.topic = topic
        self.period = 1.0 / rate_hz
        self.sent: list[Sent] = []
        self.by_ts: dict[datetime, int] = {}
        self.phase: str | None = None
        self.loud = False
        self.resyncs = 0
        rng = np.random.default_rng(11)
        signs = rng.choice([-1.0, 1.0], (32, N))
        self._pool = {False: (signs * QUIET).tolist(), True: (signs * LOUD).tolist()}
        self._stop = threading.Event()
        self._link = MqttLink(
            client_id="bench-resilience-sensor",
            host="127.0.0.1",
            port=port,
            on_message=lambda topic, payload: None,
            clean_session=True,
        )
        self._thread = threading.Thread(target=self._run, name="bench-sensor", daemon=True)

    def __enter__(self) -> Stream:
        self._link.start()
        if not self._link.connected.wait(10):
            raise RuntimeError("sensor could not connect to the broker")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._link.stop()

    def count(self, phase: str) -> int:
        return sum(1 for s in self.sent if s.phase == phase)

    def _run(self) -> None:
        next_at = time.monotonic()
        last_ts = p.utcnow()
        for index in itertools.count():
            if self._stop.is_set():
                return
            loud, phase = self.loud, self.phase
            ts = max(p.utcnow(), last_ts + timedelta(microseconds=1))
            last_ts = ts
            values = self._pool[loud][index % 32]
            payload = p.encode(p.SensorReading(ts=ts, values=values))
            self.by_ts[ts] = index  # before it can be answered
            at = time.monotonic()
            self.sent.append(Sent(index, at, ts, loud, phase))
            self._link.publish(self.topic, payload, qos=0)
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -5 * self.period:
                next_at = time.monotonic()
                self.resyncs += 1


@dataclass(frozen=True, slots=True)
class Got:
    at: float  # monotonic arrival at the bench
    index: int  # the window it answers (-1: not one of ours)
    tier: p.Tier
    model: str


class Results:
    """The agent's results as they arrive, decoded on demand and matched to windows."""

    def __init__(self, ctl: BenchController, stream: Stream) -> None:
        self.ctl, self.stream = ctl, stream
        self.got: list[Got] = []

    def update(self) -> list[Got]:
        """Decode what arrived since the last call; return the new ones."""
        start = len(self.got)
        for at, payload in self.ctl.results[start:]:
            result = p.decode(payload)
            assert isinstance(result, p.Result)
            index = self.stream.by_ts.get(result.input_ts, -1) if result.input_ts else -1
            self.got.append(Got(at, index, result.tier, str(result.model)))
        return self.got[start:]

    def wait(
        self, match: Callable[[Got], bool], timeout: float, what: str, check: Callable[[], None]
    ) -> Got:
        """The first new result (from now on) that ``match``es; poll every 2 ms."""
        deadline = time.monotonic() + timeout
        self.update()
        while True:
            for got in self.update():
                if match(got):
                    return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} in {timeout:.0f} s")
            check()
            time.sleep(0.002)

    def longest_gap(self, start: float, end: float) -> float:
        """Longest time between consecutive result arrivals over [start, end], counting the last
        result before ``start`` and the first after ``end``."""
        times = sorted(g.at for g in self.got)
        lo = max(bisect.bisect_left(times, start) - 1, 0)
        hi = min(bisect.bisect_right(times, end) + 1, len(times))
        span = times[lo:hi]
        return max((b - a for a, b in itertools.pairwise(span)), default=float("nan"))


def dropped(stream: Stream, answered: set[int], phase: str) -> tuple[int, int]:
    """Windows published in ``phase`` and how many of them got no result."""
    windows = [s.index for s in stream.sent if s.phase == phase]
    return len(windows), sum(1 for i in windows if i not in answered)


def log_problems(text: str) -> dict[str, int]:
    """Warnings, errors and tracebacks in the agent's log, counted by level, logger and the
    message's first clause (the agent logs events as ``kind: message``)."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("Traceback"):
            counts["Traceback"] += 1
            continue
        parts = line.split(" ", 4)  # date, time, level, logger:, message
        if len(parts) == 5 and parts[2] in ("WARNING", "ERROR", "CRITICAL"):
            counts[f"{parts[2]} {parts[3]} {parts[4].split(':', 1)[0][:60]}"] += 1
    return dict(counts)


# -- the run ----------------------------------------------------------------------------------


def _agent_config(workdir: Path, port: int, topic: str) -> Path:
    path = write_agent_config(
        workdir / "agent",
        DEVICE,
        port,
        input_config={"type": "mqtt", "topic": topic, "queue": QUEUE},
        rate_hz=AGENT_RATE_HZ,
        telemetry_interval_s=TELEMETRY_S,
    )
    config = yaml.safe_load(path.read_text())
    config["inference"]["publish_results"] = True
    config["fallback"] = FALLBACK
    path.write_text(yaml.safe_dump(config))
    return path


def _deploy(ctl: BenchController, data: bytes, model: str, *, ok: bool = True) -> dict[str, Any]:
    ref, sent = ctl.deploy(data, model)
    arrived, reply = ctl.reply(ref, TIMEOUT_S)
    if reply.ok != ok:
        raise RuntimeError(f"deploy of {model}: expected ok={ok}, got {reply}")
    return {"s": arrived - sent, "status": reply.detail.get("status"), "error": reply.error}


def run(quick: bool) -> Outcome:
    swaps = 30 if quick else 100
    falls = 4 if quick else 10
    stagings = 1 if quick else 3
    sample = SAMPLE.read_bytes()
    model_a, model_b = twin(sample, "a"), twin(sample, "b")
    v2 = fragile(0.5, "fragile")
    v3 = fragile(-1.0, "fails-staging", dead_weight=2048)  # 4 MiB, 16 chunks
    with tempfile.TemporaryDirectory(prefix="gf-bench-res-") as tmp:
        workdir = Path(tmp)
        v1_path = workdir / "v1.onnx"
        topic = f"plant/{DEVICE}/vibration"
        with mosquitto(workdir) as broker:
            config = _agent_config(workdir, broker.port, topic)
            log_path = workdir / "agent.log"
            with (
                BenchController(broker.port, DEVICE, "bench-resilience-ctl") as ctl,
                agent_process(config, log_path) as process,
            ):
                ctl.wait_birth(process, log_path, AGENT_START_TIMEOUT_S)
                with Stream(broker.port, topic, RATE_HZ) as stream:
                    results = Results(ctl, stream)

                    def check() -> None:
                        check_alive(process, log_path)

                    # -- 1. hot swaps --------------------------------------------------------
                    downloads = [
                        _deploy(ctl, model_a, "vibration-ae:1.0.0"),
                        _deploy(ctl, model_b, "vibration-ae:1.0.1"),
                    ]
                    results.wait(
                        lambda g: g.model == "vibration-ae:1.0.1", TIMEOUT_S, "result", check
                    )
                    stream.phase = "swaps"
                    time.sleep(SETTLE_S)
                    swap_log: list[dict[str, Any]] = []
                    swaps_start = time.monotonic()
                    for k in range(swaps):
                        data, model = (
                            (model_a, "vibration-ae:1.0.0")
                            if k % 2 == 0
                            else (model_b, "vibration-ae:1.0.1")
                        )
                        swap_log.append(_deploy(ctl, data, model))
                        check()
                    swaps_end = time.monotonic()
                    time.sleep(SETTLE_S)
                    swap_windows = stream.count("swaps")
                    stream.phase = "steady"
                    steady_start = time.monotonic()
                    while stream.count("steady") < swap_windows:
                        time.sleep(0.01)
                    stream.phase = None
                    steady_end = time.monotonic()
                    v1 = model_b if swaps % 2 == 0 else model_a
                    v1_path.write_bytes(v1)
                    time.sleep(2 * TELEMETRY_S + 0.3)  # every window of part 1 reported
                    part1_end = p.utcnow()

                    # -- 2. falling to last-good ---------------------------------------------
                    activate_v2 = _deploy(ctl, v2, "vibration-ae:2.0.0")
                    results.wait(
                        lambda g: g.model == "vibration-ae:2.0.0", TIMEOUT_S, "v2 result", check
                    )
                    fall_log: list[dict[str, Any]] = []
                    floor_s: list[float] = []
                    for _ in range(falls):
                        time.sleep(FALLBACK["probe_confirm_s"] + 0.2)  # a probe has lasted
                        floor_s.append(bare_session_s(v1_path))
                        stream.phase = f"fall-{len(fall_log)}"
                        first = len(stream.sent)
                        stream.loud = True
                        got = results.wait(
                            lambda g: g.tier is p.Tier.LAST_GOOD, TIMEOUT_S, "last_good", check
                        )
                        stream.loud = False
                        loud = next(s for s in stream.sent[first:] if s.loud)
                        fall_log.append(
                            {
                                "s": got.at - loud.at,
                                "first_loud": loud.index,
                                "answered": got.index,
                                "model": got.model,
                            }
                        )
                        results.wait(
                            lambda g: g.tier is p.Tier.ACTIVE, TIMEOUT_S, "probe back up", check
                        )
                        stream.phase = None

                    # -- 2b. failed staging while v2 serves ----------------------------------
                    time.sleep(FALLBACK["probe_confirm_s"] + 0.2)
                    staging_log: list[dict[str, Any]] = []
                    stream.phase = "staging"
                    for attempt in range(stagings):
                        results.update()
                        ref, sent = ctl.deploy(v3, f"vibration-ae:3.0.{attempt}")
                        arrived, reply = ctl.reply(ref, TIMEOUT_S)
                        if reply.ok:
                            raise RuntimeError("v3 passed staging; it must not")
                        time.sleep(0.1)  # the first result after the reply
                        results.update()
                        served = {g.model for g in results.got if sent <= g.at <= arrived} or {
                            "none"
                        }
                        staging_log.append(
                            {
                                "s": arrived - sent,
                                "longest_gap_s": results.longest_gap(sent, arrived),
                                "served_by": sorted(served),
                                "error": reply.error,
                            }
                        )
                        time.sleep(0.2)
                    stream.phase = None
                    time.sleep(0.5)  # the last results and telemetry
                    results.update()
                    resyncs = stream.resyncs
                check()
            log_text = log_path.read_text(errors="replace")
    log_tail = log_text[-3000:]
    problems = log_problems(log_text)

    # -- analysis ------------------------------------------------------------------------------
    answered = {g.index for g in results.got if g.index >= 0}
    swap_sent, swap_lost = dropped(stream, answered, "swaps")
    steady_sent, steady_lost = dropped(stream, answered, "steady")
    staging_sent, staging_lost = dropped(stream, answered, "staging")
    batches = [p.decode(payload) for _, payload in ctl.telemetry]
    records = [r for b in batches if isinstance(b, p.TelemetryBatch) for r in b.records]
    part1 = [r for r in records if r.start + timedelta(seconds=r.window_s) <= part1_end]
    errors = sum(r.errors for r in part1)
    later = [r for r in records if r.start + timedelta(seconds=r.window_s) > part1_end]
    sent_at = {s.index: s.at for s in stream.sent}
    latency = {g.index: g.at - sent_at[g.index] for g in results.got if g.index >= 0}
    steady_latency = [
        latency[s.index] for s in stream.sent if s.phase == "steady" and s.index in latency
    ]
    swap_s = [x["s"] for x in swap_log]
    statuses = Counter(str(x["status"]) for x in swap_log)
    local = statuses.get("activated from the local copy", 0)
    in_swaps = Counter(
        g.model for g in results.got if swaps_start <= g.at <= swaps_end and g.index >= 0
    )
    swap_gap = results.longest_gap(swaps_start, swaps_end)
    steady_gap = results.longest_gap(steady_start, steady_end)

    period = 1.0 / RATE_HZ
    fall_s = [x["s"] for x in fall_log]
    withheld = []
    for x in fall_log:
        span = range(x["first_loud"], x["answered"])
        withheld.append(sum(1 for i in span if i not in answered))
    offsets = [x["answered"] - x["first_loud"] for x in fall_log]
    moves = Counter(
        ("probe" if e.detail.get("probe") else "fall", e.detail.get("to"))
        for e in (p.decode(payload) for _, payload in ctl.events)
        if isinstance(e, p.Event) and e.event is p.EventKind.TIER_CHANGED
    )
    answer_latency = [latency[x["answered"]] for x in fall_log]
    errors_to_fall = int(FALLBACK["errors_to_fall"])
    floor = [errors_to_fall * period + s for s in floor_s]
    strict = [(errors_to_fall - 1) * period + s for s in floor_s]
    fall_p50, floor_p50 = median(fall_s), median(floor)
    ratio = fall_p50 / floor_p50
    gaps = [x["longest_gap_s"] for x in staging_log]

    passed = swap_lost == 0 and errors == 0 and len(swap_log) == swaps
    ms = 1e3
    numbers = {
        "rate_hz": RATE_HZ,
        "agent_rate_hz": AGENT_RATE_HZ,
        "input_queue": QUEUE,
        "window": N,
        "fallback": FALLBACK,
        "sensor_resyncs": resyncs,
        "downloads_s": [round(x["s"], 4) for x in downloads],
        "swaps": len(swap_log),
        "swap_statuses": dict(statuses),
        "swaps_from_local_copy": local,
        "swap_p50_ms": round(percentile(swap_s, 50) * ms, 2),
        "swap_p95_ms": round(percentile(swap_s, 95) * ms, 2),
        "swap_max_ms": round(max(swap_s) * ms, 2),
        "swap_phase_s": round(swaps_end - swaps_start + 2 * SETTLE_S, 2),
        "results_by_model_during_swaps": dict(in_swaps),
        "windows_with_swaps": swap_sent,
        "dropped_with_swaps": swap_lost,
        "windows_without_swaps": steady_sent,
        "dropped_without_swaps": steady_lost,
        "inference_errors_part1": errors,
        "inferences_part1_telemetry": sum(r.inferences for r in part1),
        "result_latency_steady_p50_ms": round(percentile(steady_latency, 50) * ms, 2),
        "result_latency_steady_p95_ms": round(percentile(steady_latency, 95) * ms, 2),
        "longest_result_gap_swaps_ms": round(swap_gap * ms, 2),
        "longest_result_gap_steady_ms": round(steady_gap * ms, 2),
        "activate_v2": activate_v2,
        "falls": len(fall_log),
        "fall_ms": [round(s * ms, 2) for s in fall_s],
        "fall_p50_ms": round(fall_p50 * ms, 2),
        "fall_p95_ms": round(percentile(fall_s, 95) * ms, 2),
        "fall_served_by": sorted({x["model"] for x in fall_log}),
        "windows_without_result_per_fall": withheld,
        "answering_window_offset_per_fall": offsets,
        "answering_window_latency_ms": [round(x * ms, 2) for x in answer_latency],
        "inference_errors_part2": sum(r.errors for r in later),
        "tier_changes": {f"{kind} to {to}": n for (kind, to), n in sorted(moves.items())},
        "agent_log_warnings": problems,
        "expected_errors_part2": len(fall_log) * int(FALLBACK["errors_to_fall"]),
        "bare_session_ms": [round(s * ms, 2) for s in floor_s],
        "floor_ms": [round(s * ms, 2) for s in floor],
        "floor_p50_ms": round(floor_p50 * ms, 2),
        "floor_p95_ms": round(percentile(floor, 95) * ms, 2),
        "fall_over_floor_p50": round(ratio, 3),
        "strict_floor_p50_ms": round(median(strict) * ms, 2),
        "input_period_ms": round(period * ms, 2),
        "failed_stagings": len(staging_log),
        "failed_staging_s": [round(x["s"], 4) for x in staging_log],
        "failed_staging_longest_gap_ms": [round(g * ms, 2) for g in gaps],
        "windows_during_failed_stagings": staging_sent,
        "dropped_during_failed_stagings": staging_lost,
        "failed_staging_served_by": sorted({m for x in staging_log for m in x["served_by"]}),
        "failed_staging_error": staging_log[0]["error"] if staging_log else None,
    }
    if not passed:
        numbers["agent_log_tail"] = log_tail
    return outcome(
        NAME,
        TITLE,
        measured=(
            f"{swap_lost}/{swap_sent} results dropped in {len(swap_log)} swaps "
            f"(swap p50 {numbers['swap_p50_ms']:.1f} ms, p95 {numbers['swap_p95_ms']:.1f} ms), "
            f"{errors} errors; last-good in p50 {fall_p50 * ms:.1f} ms, "
            f"p95 {numbers['fall_p95_ms']:.1f} ms; failed staging: longest gap "
            f"{max(gaps) * ms:.1f} ms, {staging_lost}/{staging_sent} dropped"
        ),
        baseline=(
            f"{steady_lost}/{steady_sent} dropped without swaps; fall floor p50 "
            f"{floor_p50 * ms:.1f} ms; input period {period * ms:.1f} ms"
        ),
        ratio=ratio,
        target=f"{TARGET} (ratio: last-good p50 / floor, not judged)",
        passed=passed,
        numbers=numbers,
    )
