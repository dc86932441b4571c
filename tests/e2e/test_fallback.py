"""The run-time fallback chain with a real agent process, real models and a real Mosquitto.

The models are built here so the failure is controlled by the input: ``fragile(c)`` returns
``sqrt(c - mean(x^2))``, finite on the zero-input smoke test and on quiet windows, NaN on loud
ones. Readings come over the agent's MQTT input, so the test decides when a tier fails and
when the cause clears.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent import protocol as p
from controller.broker import Mosquitto
from tests.conftest import Probe, Processes, agent_config, unique
from tests.e2e.fake_controller import CHUNK, FakeController

pytestmark = pytest.mark.e2e

N = 512  # the window the models take
QUIET, LOUD, VERY_LOUD = 0.1, 1.0, 3.0  # amplitudes: mean(x^2) 0.01, 1, 9


def model(c: float | None, tag: str) -> bytes:
    """``sqrt(c - mean(x^2))`` (``c`` None: just ``mean(x^2)``, which never fails)."""
    nodes = [
        helper.make_node("Mul", ["window", "window"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[1], keepdims=1),
    ]
    inits = []
    if c is None:
        nodes.append(helper.make_node("Identity", ["ms"], ["score"]))
    else:
        inits.append(helper.make_tensor("c", TensorProto.FLOAT, [], [c]))
        nodes += [
            helper.make_node("Sub", ["c", "ms"], ["d"]),
            helper.make_node("Sqrt", ["d"], ["score"]),
        ]
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
    return built.SerializeToString()


def rules_manifest(data: bytes, version: str) -> p.SignedManifest:
    """An unsigned manifest (the agent is not enrolled) carrying a thresholds rule baseline."""
    manifest = p.Manifest(
        model=p.ModelRef(name="vibration-ae", version=version),
        artifact=p.Artifact(
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            format=p.ModelFormat.ONNX,
            chunk_size=CHUNK,
        ),
        task=p.Task.ANOMALY,
        precision="fp32",
        technique="reference",
        inputs=[p.TensorSignature(name="window", dtype="float32", shape=[1, N])],
        outputs=[p.TensorSignature(name="score", dtype="float32", shape=[1, 1])],
        rules={
            "kind": "thresholds",
            "version": 1,
            "input": "window",
            "output": "score",
            "output_shape": [1, 1],
            "features": [{"name": "rms", "max": 0.5}],
            "combine": "max_ratio",
        },
        created=p.utcnow(),
    )
    return p.SignedManifest(payload=p.encode(manifest).decode(), signature="", key_id="")


def deploy(
    ctl: FakeController,
    data: bytes,
    version: str,
    *,
    slot: p.Slot = p.Slot.ACTIVE,
    manifest: p.SignedManifest | None = None,
) -> p.Reply:
    sha = hashlib.sha256(data).hexdigest()
    ctl.blobs[sha] = data
    command = p.Deploy(
        model=p.ModelRef(name="vibration-ae", version=version),
        artifact=p.Artifact(
            sha256=sha, size=len(data), format=p.ModelFormat.ONNX, chunk_size=CHUNK
        ),
        slot=slot,
        manifest=manifest,
    )
    reply = ctl.reply_to(ctl.command(command), timeout=30)
    assert reply.ok, reply.error
    return reply


class Sensor:
    """Publishes windows of noise at ``amplitude`` to the agent's input topic, 25 times a second."""

    def __init__(self, probe: Probe, topic: str) -> None:
        self.probe, self.topic = probe, topic
        self.amplitude = QUIET
        self.changed_at = time.monotonic()
        self._stop = threading.Event()
        self._rng = np.random.default_rng(5)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def set(self, amplitude: float) -> None:
        self.amplitude, self.changed_at = amplitude, time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(0.04):
            window = self._rng.choice([-1.0, 1.0], N) * self.amplitude
            self.probe.client.publish(self.topic, json.dumps(window.tolist()).encode(), qos=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def decoded(probe: Probe, device: str, channel: p.Channel, since: int = 0) -> list[Any]:
    suffix = f"{device}/{channel.value}"
    return [p.decode(m) for t, m in list(probe.history[since:]) if t.endswith(suffix)]


def tier_events(probe: Probe, device: str, since: int = 0) -> list[p.Event]:
    return [
        e
        for e in decoded(probe, device, p.Channel.EVENTS, since)
        if e.event is p.EventKind.TIER_CHANGED
    ]


def wait_result(
    probe: Probe, device: str, tier: p.Tier, since: int, timeout: float = 20
) -> p.Result:
    def match(topic: str, payload: bytes) -> bool:
        if not topic.endswith(f"{device}/results"):
            return False
        result = p.decode(payload)
        return isinstance(result, p.Result) and result.tier is tier

    _, payload = probe.wait_for(match, timeout, f"a result from tier {tier.value}", since=since)
    result = p.decode(payload)
    assert isinstance(result, p.Result)
    return result


@contextmanager
def fallback_agent(
    mosquitto: Mosquitto,
    processes: Processes,
    probe_factory: Callable[..., Probe],
    tmp_path: Path,
    fallback: dict[str, Any],
) -> Iterator[tuple[str, Path, Probe, FakeController, Sensor]]:
    device = unique("tier")
    topic = f"plant/{device}/vibration"
    config = agent_config(
        tmp_path / f"{device}.yaml",
        device,
        mosquitto.port,
        rate_hz=25,
        interval_s=0.5,
        extra={"input": {"type": "mqtt", "topic": topic}, "fallback": fallback},
    )
    probe = probe_factory(f"gf/v1/{device}/#")
    processes.agent(config)
    probe.wait_for(lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "birth")
    ctl = FakeController(probe, device)
    sensor = Sensor(probe, topic)
    try:
        yield device, config, probe, ctl, sensor
    finally:
        sensor.close()
        ctl.close()


def test_a_failing_model_falls_to_last_good_and_probes_back_when_the_cause_clears(
    mosquitto: Mosquitto,
    processes: Processes,
    probe_factory: Callable[..., Probe],
    tmp_path: Path,
) -> None:
    policy = {"errors_to_fall": 3, "probe_after_s": 1.0, "probe_confirm_s": 1.5}
    with fallback_agent(mosquitto, processes, probe_factory, tmp_path, policy) as agent:
        device, _, probe, ctl, sensor = agent
        deploy(ctl, model(None, "steady"), "1.0.0")
        deploy(ctl, model(0.5, "fragile"), "2.0.0")
        since = probe.mark()
        assert str(wait_result(probe, device, p.Tier.ACTIVE, since).model) == "vibration-ae:2.0.0"

        since = probe.mark()
        sensor.set(LOUD)  # 2.0.0 returns NaN from now on; 1.0.0 does not
        result = wait_result(probe, device, p.Tier.LAST_GOOD, since)
        to_last_good = time.monotonic() - sensor.changed_at
        assert str(result.model) == "vibration-ae:1.0.0" and result.outputs["score"][0] > 0.5
        fall = tier_events(probe, device, since)[0]
        assert fall.detail["from"] == "active" and fall.detail["to"] == "last_good"
        assert "3 failed inferences in a row" in fall.detail["cause"]
        assert "NaN" in fall.detail["cause"]
        print(f"from the first failing reading to serving last-good: {to_last_good:.2f} s")

        time.sleep(4.0)  # probes of the active tier keep failing while the input stays loud
        events = tier_events(probe, device, since)
        probes = [e for e in events if e.detail["probe"]]
        assert probes and all(e.detail["to"] == "active" for e in probes)
        assert events[-1].detail["to"] == "last_good" or events[-1].detail["probe"]
        falls_after_probe = [e for e in events[1:] if not e.detail["probe"]]
        assert falls_after_probe, "a failed probe falls back down"
        assert len(probes) >= 2, "probed again after the first failed probe"
        gaps = [b.ts - a.ts for a, b in itertools.pairwise(probes)]
        assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), (
            f"each failed probe waits longer before the next: {gaps}"
        )

        since = probe.mark()
        sensor.set(QUIET)  # the cause clears: the next probe stays up
        result = wait_result(probe, device, p.Tier.ACTIVE, since, timeout=30)
        assert str(result.model) == "vibration-ae:2.0.0"
        time.sleep(2.0)  # past probe_confirm_s
        later = decoded(probe, device, p.Channel.RESULTS, probe.mark() - 20)
        assert later and all(r.tier is p.Tier.ACTIVE for r in later[-10:])

        telemetry = [r for b in decoded(probe, device, p.Channel.TELEMETRY) for r in b.records]
        tiers = {r.tier for r in telemetry}
        assert {p.Tier.ACTIVE, p.Tier.LAST_GOOD} <= tiers, tiers
        births = [b for b in decoded(probe, device, p.Channel.STATE) if isinstance(b, p.Birth)]
        assert births[-1].tier is p.Tier.ACTIVE
        assert any(b.tier is p.Tier.LAST_GOOD for b in births), "the retained state names the tier"


def test_fallback_variant_then_rules_then_a_crash_loop_starts_lower(
    mosquitto: Mosquitto,
    processes: Processes,
    probe_factory: Callable[..., Probe],
    tmp_path: Path,
) -> None:
    policy = {"errors_to_fall": 3, "probe_after_s": 60, "restart_budget": 1}
    with fallback_agent(mosquitto, processes, probe_factory, tmp_path, policy) as agent:
        device, config, probe, ctl, sensor = agent
        fragile = model(0.5, "fragile active")
        deploy(ctl, fragile, "1.0.0", manifest=rules_manifest(fragile, "1.0.0"))
        since = probe.mark()
        reply = deploy(ctl, model(4.0, "smaller"), "1.0.0+small", slot=p.Slot.FALLBACK)
        assert reply.detail["status"] == "staged as fallback"
        staged = ctl.event(p.EventKind.FALLBACK_STAGED, since)
        assert staged.detail["model"] == "vibration-ae:1.0.0+small"
        births = [b for b in decoded(probe, device, p.Channel.STATE) if isinstance(b, p.Birth)]
        assert births[-1].fallback is not None
        assert str(births[-1].fallback.model) == "vibration-ae:1.0.0+small"
        assert str(births[-1].active.model) == "vibration-ae:1.0.0"  # type: ignore[union-attr]

        since = probe.mark()
        sensor.set(LOUD)  # the active model fails, there is no last-good: the fallback answers
        result = wait_result(probe, device, p.Tier.FALLBACK, since)
        assert str(result.model) == "vibration-ae:1.0.0+small"
        assert tier_events(probe, device, since)[0].detail["to"] == "fallback"

        since = probe.mark()
        sensor.set(VERY_LOUD)  # the fallback fails too: the rules from the manifest answer
        result = wait_result(probe, device, p.Tier.RULES, since)
        assert result.outputs["score"][0] == pytest.approx(VERY_LOUD / 0.5, rel=1e-3)
        sensor.set(QUIET)

        # a crash loop: killed twice in a row with a budget of one unclean restart
        state = p.topic(device, p.Channel.STATE)

        def new_birth(topic: str, payload: bytes) -> bool:
            return topic == state and isinstance(p.decode(payload), p.Birth)

        for attempt, expected in enumerate([p.Tier.ACTIVE, p.Tier.FALLBACK], start=1):
            running = processes.procs[-1][0]
            running.send_signal(signal.SIGKILL)
            running.wait(5)
            since = probe.mark()
            processes.agent(config, name=f"{device}-{attempt}")
            _, payload = probe.wait_for(new_birth, 20, f"birth after kill #{attempt}", since=since)
            birth = p.decode(payload)
            assert isinstance(birth, p.Birth) and birth.tier is expected, (attempt, birth)
            wait_result(probe, device, expected, since)
        event = ctl.event(p.EventKind.TIER_CHANGED, since, "crash loop")
        assert "2 unclean restarts in a row" in event.detail["cause"]


def test_staging_refuses_a_model_over_the_latency_budget_and_the_old_one_serves_on(
    mosquitto: Mosquitto,
    processes: Processes,
    probe_factory: Callable[..., Probe],
    tmp_path: Path,
) -> None:
    policy = {"latency_budget_ms": 1.0}
    with fallback_agent(mosquitto, processes, probe_factory, tmp_path, policy) as agent:
        _, _, probe, ctl, _ = agent
        deploy(ctl, model(None, "fast"), "1.0.0")
        # 1000 chained 512x512 MatMuls sharing one weight: 262 M multiply-adds (milliseconds
        # on any CPU, against a 10 us model and a 1 ms budget) in a 1 MiB file
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((N, N)) * 0.04).astype(np.float32)
        weight = helper.make_tensor("w", TensorProto.FLOAT, [N, N], w.tobytes(), True)
        steps = 1000
        nodes = [
            helper.make_node("MatMul", ["window" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"])
            for i in range(steps)
        ]
        nodes.append(helper.make_node("ReduceMean", [f"h{steps}"], ["score"], axes=[1]))
        graph = helper.make_graph(
            nodes,
            "slow",
            [helper.make_tensor_value_info("window", TensorProto.FLOAT, [1, N])],
            [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 1])],
            [weight],
        )
        slow = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        slow.ir_version = 8
        data = slow.SerializeToString()
        ctl.blobs[hashlib.sha256(data).hexdigest()] = data
        since = probe.mark()
        command = p.Deploy(
            model=p.ModelRef(name="vibration-ae", version="2.0.0"),
            artifact=p.Artifact(
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                format=p.ModelFormat.ONNX,
                chunk_size=CHUNK,
            ),
        )
        reply = ctl.reply_to(ctl.command(command), timeout=60)
        assert not reply.ok
        assert "over this device's latency budget of 1 ms" in (reply.error or "")
        event = ctl.event(p.EventKind.MODEL_LOAD_FAILED, since)
        assert "latency budget" in event.message
        ctl.serving("vibration-ae:1.0.0")


def test_power_budget_breaches_move_down_a_tier(
    mosquitto: Mosquitto,
    processes: Processes,
    probe_factory: Callable[..., Probe],
    tmp_path: Path,
) -> None:
    # The estimate meter reports at least the configured idle power (3 W): a 1 W budget is
    # breached by every window, so after three windows the agent moves down to last-good.
    policy = {"power_budget_w": 1.0, "power_windows_to_fall": 3, "probe_after_s": 60}
    with fallback_agent(mosquitto, processes, probe_factory, tmp_path, policy) as agent:
        device, _, probe, ctl, _ = agent
        deploy(ctl, model(None, "first"), "1.0.0")
        since = probe.mark()
        deploy(ctl, model(None, "second"), "2.0.0")
        event = ctl.event(p.EventKind.TIER_CHANGED, since, "power budget")
        assert event.detail["from"] == "active" and event.detail["to"] == "last_good"
        assert "3 telemetry windows in a row over the 1 W power budget" in event.detail["cause"]
        result = wait_result(probe, device, p.Tier.LAST_GOOD, since)
        assert str(result.model) == "vibration-ae:1.0.0"
