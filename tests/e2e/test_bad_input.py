"""Bad input against a running agent: each gets a clear error and the agent keeps serving.

The test plays the controller's side of the wire contract itself (commands and chunk
answers), so that it can send what a correct controller never would.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest

from agent import protocol as p
from controller.broker import Mosquitto, free_port
from tests.conftest import REPO, SAMPLES, Probe, Processes, agent_config, unique, wait_until
from tests.e2e.fake_controller import MODEL, FakeController

pytestmark = pytest.mark.e2e


@pytest.fixture
def running_agent(
    mosquitto: Mosquitto, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> Iterator[FakeController]:
    """An agent that has activated vibration-ae:1.0.0 from the fake controller."""
    device = unique("bad")
    probe = probe_factory(f"gf/v1/{device}/#")
    processes.agent(agent_config(tmp_path / f"{device}.yaml", device, mosquitto.port))
    probe.wait_for(lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "birth")
    ctl = FakeController(probe, device)
    reply = ctl.reply_to(ctl.deploy(MODEL, "1.0.0"))
    assert reply.ok, reply.error
    ctl.serving("vibration-ae:1.0.0")
    yield ctl
    ctl.close()


def test_malformed_and_unknown_commands_get_error_replies(running_agent: FakeController) -> None:
    ctl = running_agent
    ctl.raw(b"{this is not json")
    ctl.raw(b'{"v": 1, "kind": "reboot", "id": "cmd-reboot"}')
    ctl.raw(b'{"v": 1, "kind": "deploy", "id": "cmd-half"}')
    assert "not valid JSON" in (ctl.reply_to("").error or "")
    reboot = ctl.reply_to("cmd-reboot")
    assert not reboot.ok and "unknown kind 'reboot'" in (reboot.error or "")
    assert "known commands: deploy, ping" in (reboot.error or "")
    half = ctl.reply_to("cmd-half")
    assert not half.ok and "malformed deploy: model: required field missing" in (half.error or "")
    ping = ctl.command(p.Ping())
    assert ctl.reply_to(ping).ok
    ctl.serving("vibration-ae:1.0.0")


def test_wrong_sized_and_out_of_range_chunks_are_rejected_and_the_transfer_recovers(
    running_agent: FakeController,
) -> None:
    ctl = running_agent
    since = ctl.probe.mark()
    sent_bad: set[int] = set()

    def tamper(index: int, chunk: bytes) -> list[tuple[int, bytes]]:
        if index == 2 and index not in sent_bad:
            sent_bad.add(index)
            return [(index, chunk[:100]), (999, chunk)]  # short chunk, then one out of range
        return [(index, chunk)]

    ctl.tamper = tamper
    # a different artifact, so that a real transfer happens: the same graph with a doc string
    graph = onnx.load_from_string(MODEL)
    graph.doc_string = "variant for the chunk test"
    data = graph.SerializeToString()
    ref = ctl.deploy(data, "1.0.1")
    reply = ctl.reply_to(ref, timeout=30)
    assert reply.ok, reply.error
    ctl.serving("vibration-ae:1.0.1")
    # a rejected chunk is not a failed deploy (issue 15): counted in the progress events
    events = [
        e
        for t, m in ctl.probe.history[since:]
        if t.endswith("/events") and isinstance(e := p.decode(m), p.Event)
    ]
    assert not [e for e in events if e.event is p.EventKind.DEPLOY_FAILED], events
    progress = [e for e in events if e.event is p.EventKind.DEPLOY_PROGRESS]
    assert max(e.detail["rejected_chunks"] for e in progress) >= 1, progress


def test_sha256_mismatch_is_refused_and_the_old_model_keeps_serving(
    running_agent: FakeController,
) -> None:
    ctl = running_agent
    since = ctl.probe.mark()
    ref = ctl.deploy(MODEL[::-1], "2.0.0", announced_sha=hashlib.sha256(b"other").hexdigest())
    reply = ctl.reply_to(ref)
    assert not reply.ok
    assert "does not match" in (reply.error or "") and "still running vibration-ae:1.0.0" in (
        reply.error or ""
    )
    ctl.event(p.EventKind.DEPLOY_FAILED, since, "does not match")
    ctl.serving("vibration-ae:1.0.0")


def test_a_model_that_fails_to_load_is_refused_and_the_old_model_keeps_serving(
    running_agent: FakeController,
) -> None:
    ctl = running_agent
    since = ctl.probe.mark()
    truncated = MODEL[: len(MODEL) // 3]  # correct sha256 of these bytes, but not a valid model
    ref = ctl.deploy(truncated, "3.0.0")
    reply = ctl.reply_to(ref)
    assert not reply.ok and "still running vibration-ae:1.0.0" in (reply.error or "")
    ctl.event(p.EventKind.MODEL_LOAD_FAILED, since)
    ctl.serving("vibration-ae:1.0.0")


def test_fault_injection_raises_the_anomaly_score(running_agent: FakeController) -> None:
    ctl = running_agent
    ref = ctl.command(p.InjectFault(fault=p.FaultKind.OUTER_RACE, severity=1.0))
    assert ctl.reply_to(ref).ok
    since = ctl.probe.mark()

    def high(topic: str, payload: bytes) -> bool:
        result = p.decode(payload) if topic.endswith("/results") else None
        return isinstance(result, p.Result) and result.outputs["score"][0] > 2.0

    ctl.probe.wait_for(high, 10, "a high anomaly score", since=since)


def test_config_with_a_typo_exits_with_a_message_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("device_id: gw-1\nbrokr:\n  host: localhost\n")
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "brokr: unknown field" in result.stderr


def test_unreachable_broker_the_agent_keeps_inferring_and_reports_after_connecting(
    processes: Processes, tmp_path: Path, probe_factory: Callable[..., Probe]
) -> None:
    """No broker at start: the agent runs its model offline, then connects and reports."""
    device = unique("offline")
    port = free_port()
    config = agent_config(tmp_path / f"{device}.yaml", device, port)
    state = tmp_path / f"{device}-state"
    sha = hashlib.sha256(MODEL).hexdigest()
    (state / "models").mkdir(parents=True)
    shutil.copy(SAMPLES / "vibration-ae.onnx", state / "models" / f"{sha}.onnx")
    active = p.ActiveModel(
        model=p.ModelRef(name="vibration-ae", version="1.0.0"),
        sha256=sha,
        format=p.ModelFormat.ONNX,
    )
    (state / "active.json").write_text(
        f'{{"active": {p.encode(active).decode()}, "last_good": null}}'
    )
    proc = processes.agent(config)
    # the agent says it cannot reach the broker and keeps running: wait for the words, not a
    # fixed time (a slow start under load took more than the 4 s this once slept)
    wait_until(
        lambda: "unreachable" in processes.log(device) or proc.poll() is not None,
        60,
        "the agent to report the broker unreachable",
        lambda: processes.log(device),
    )
    assert proc.poll() is None, processes.log(device)
    broker = Mosquitto(tmp_path / "late-broker", port).start()
    try:
        probe = Probe(port, f"gf/v1/{device}/#")
        try:
            _, payload = probe.wait_for(
                lambda t, m: t.endswith("/telemetry"), 20, "telemetry after connecting"
            )
            batch = p.decode(payload)
            assert isinstance(batch, p.TelemetryBatch)
            first = batch.records[0]
            assert first.seq == 0 and first.inferences > 0, (
                "inference ran while the broker was away"
            )
            assert str(first.model) == "vibration-ae:1.0.0"
        finally:
            probe.close()
    finally:
        processes.stop_all()
        broker.stop()


def test_refused_credentials_are_fatal_with_a_clear_message(
    processes: Processes, tmp_path: Path
) -> None:
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    workdir = tmp_path / "auth-broker"
    workdir.mkdir()
    subprocess.run([passwd, "-b", "-c", str(workdir / "passwd"), "agent", "right"], check=True)
    broker = Mosquitto(workdir, password_file=workdir / "passwd").start()
    port = broker.port
    try:
        device = unique("auth")
        config = agent_config(
            tmp_path / f"{device}.yaml",
            device,
            port,
            extra={
                "broker": {
                    "host": "127.0.0.1",
                    "port": port,
                    "username": "agent",
                    "password": "wrong",
                }
            },
        )
        proc = processes.agent(config)
        assert proc.wait(timeout=20) == 3
        log = processes.log(device)
        assert "refused the connection" in log and "not retrying" in log
    finally:
        broker.stop()
