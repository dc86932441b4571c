"""A transfer survives a killed agent and a restarted broker, resuming where it was."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import onnx
import pytest

from agent import protocol as p
from controller.broker import Mosquitto
from tests.conftest import Probe, Processes, agent_config, unique
from tests.e2e.fake_controller import CHUNK, MODEL, FakeController

pytestmark = pytest.mark.e2e


def variant(tag: str) -> bytes:
    """The sample model with a different doc string: same graph, different sha256."""
    graph = onnx.load_from_string(MODEL)
    graph.doc_string = tag
    return graph.SerializeToString()


def requested_chunks(probe: Probe, device: str, since: int = 0) -> int:
    total = 0
    for topic, payload in probe.history[since:]:
        if topic == p.topic(device, p.Channel.BLOB_REQ):
            request = p.decode(payload)
            assert isinstance(request, p.BlobRequest)
            total += request.count
    return total


def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_agent_killed_mid_transfer_resumes_from_the_chunks_on_disk(
    mosquitto: Mosquitto, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> None:
    device = unique("kill")
    probe = probe_factory(f"gf/v1/{device}/#")
    config = agent_config(tmp_path / f"{device}.yaml", device, mosquitto.port)
    agent = processes.agent(config)
    probe.wait_for(lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "birth")
    ctl = FakeController(probe, device)
    ctl.chunk_delay_s = 0.15
    data = variant("kill test")
    total = -(-len(data) // CHUNK)
    ctl.deploy(data, "1.0.0")
    sidecars = tmp_path / f"{device}-state" / "downloads"
    wait(lambda: any(sidecars.glob("*.chunks")), 20, "progress saved to disk")
    assert ctl.chunks_served < total
    agent.send_signal(signal.SIGKILL)
    agent.wait(5)
    ctl.chunk_delay_s = 0.0
    since = probe.mark()
    processes.agent(config, name=f"{device}-again")
    _, birth = probe.wait_for(
        lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "second birth", since=since
    )
    session = p.decode(birth).session  # type: ignore[union-attr]
    ref = ctl.deploy(data, "1.0.0")  # the controller re-sends while desired != active
    assert ctl.reply_to(ref, timeout=30).ok

    def started_in_new_session(topic: str, payload: bytes) -> bool:
        # the first session's events are replayed from its outbox too: look at the new one
        event = p.decode(payload) if topic.endswith("/events") else None
        return (
            isinstance(event, p.Event)
            and event.event is p.EventKind.DEPLOY_STARTED
            and event.session == session
        )

    _, payload = probe.wait_for(started_in_new_session, 20, "deploy_started", since=since)
    started = p.decode(payload)
    assert isinstance(started, p.Event)
    assert started.detail["resumed_chunks"] > 0, started.message
    assert requested_chunks(probe, device, since) < total
    ctl.serving("vibration-ae:1.0.0")
    ctl.close()


def test_broker_restart_mid_transfer_resumes_the_transfer(
    processes: Processes, tmp_path: Path
) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    probe = Probe(broker.port, "gf/v1/#")
    probe.client.reconnect_delay_set(1, 2)
    try:
        device = unique("restart")
        processes.agent(agent_config(tmp_path / f"{device}.yaml", device, broker.port))
        probe.wait_for(lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "birth")
        ctl = FakeController(probe, device)
        ctl.chunk_delay_s = 0.15
        data = variant("broker restart test")
        total = -(-len(data) // CHUNK)
        ref = ctl.deploy(data, "1.0.0")
        wait(lambda: ctl.chunks_served >= total // 2, 20, "half of the chunks")
        broker.stop()
        time.sleep(1.0)
        broker = Mosquitto(tmp_path / "broker", broker.port).start()
        ctl.chunk_delay_s = 0.0
        reply = ctl.reply_to(ref, timeout=40)
        assert reply.ok, reply.error
        # no restart from zero: chunks asked for again are at most the ones lost in flight
        window = next(f.default for f in msgspec.structs.fields(p.Deploy) if f.name == "window")
        assert requested_chunks(probe, device) <= total + 2 * window
        ctl.serving("vibration-ae:1.0.0")
        ctl.close()
    finally:
        probe.close()
        processes.stop_all()
        broker.stop()


def test_a_restarted_agent_finishes_the_deploy_without_being_asked_again(
    mosquitto: Mosquitto, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> None:
    """The deploy in progress is persisted: after SIGKILL the agent resumes it on its own."""
    device = unique("resume")
    probe = probe_factory(f"gf/v1/{device}/#")
    config = agent_config(tmp_path / f"{device}.yaml", device, mosquitto.port)
    agent = processes.agent(config)
    probe.wait_for(lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "birth")
    ctl = FakeController(probe, device)
    ctl.chunk_delay_s = 0.15
    data = variant("resume test")
    ref = ctl.deploy(data, "1.0.0")
    state = tmp_path / f"{device}-state"
    wait(lambda: any((state / "downloads").glob("*.chunks")), 20, "progress saved to disk")
    assert '"fetching"' in (state / "deploy.json").read_text()
    agent.send_signal(signal.SIGKILL)
    agent.wait(5)
    ctl.chunk_delay_s = 0.0
    since = probe.mark()
    processes.agent(config, name=f"{device}-again")  # nobody re-sends the deploy
    reply = ctl.reply_to(ref, timeout=30)
    assert reply.ok, reply.error
    ctl.serving("vibration-ae:1.0.0", since=since)
    assert not (state / "deploy.json").exists()
    ctl.close()
