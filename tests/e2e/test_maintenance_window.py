"""Maintenance windows end to end: real Mosquitto, a real controller and a real agent.

Outside its site's window the device fetches the new model but keeps serving the old one; once
controller.yaml opens the window, the controller activates it and the agent serves it from the
copy on disk, without a second transfer.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import protocol as p
from tests.conftest import SAMPLES, Probe, Processes, agent_config, unique, wait_until

pytestmark = pytest.mark.e2e

OLD, NEW = "vibration-ae:1.0.0", "vibration-ae:1.1.0"


def show(procs: Processes, device: str) -> dict[str, Any]:
    result = procs.cli("devices", "show", device, "--json")
    if "no device" in result.stderr:
        return {}  # its birth has not arrived yet
    assert result.returncode == 0, result.stderr
    detail: dict[str, Any] = json.loads(result.stdout)
    return detail


def windows(procs: Processes, site: str, cron: str) -> None:
    """Rewrite controller.yaml: one window for ``site``, a minute long, in UTC."""
    config = {
        "sites": {site: {"maintenance": [{"cron": cron, "duration": "1m", "timezone": "UTC"}]}}
    }
    (Path(procs.env["GREENFLEET_HOME"]) / "controller.yaml").write_text(yaml.safe_dump(config))


def test_a_model_preloads_outside_the_window_and_activates_from_disk_when_it_opens(
    mosquitto: Any, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> None:
    device, site = unique("mw"), unique("site")
    for path, version in (("vibration-ae.onnx", "1.0.0"), ("vibration-ae.tflite", "1.1.0")):
        add = processes.cli(
            "models", "add", str(SAMPLES / path), "--name", "vibration-ae", "--version", version
        )
        assert add.returncode == 0, add.stderr
    new_sha = hashlib.sha256((SAMPLES / "vibration-ae.tflite").read_bytes()).hexdigest()
    processes.controller(mosquitto.port)
    processes.agent(
        agent_config(
            tmp_path / f"{device}.yaml", device, mosquitto.port, extra={"labels": {"site": site}}
        )
    )
    logs = lambda: processes.log("controller")[-3000:] + processes.log(device)[-3000:]  # noqa: E731
    probe = probe_factory(f"gf/v1/{device}/#", f"{p.BLOB_ROOT}/#")
    wait_until(lambda: show(processes, device).get("online"), 30, "agent online", logs)

    # no windows yet: the first model activates at once
    assert processes.cli("deploy", OLD, "--device", device).returncode == 0
    wait_until(lambda: show(processes, device)["active_model"] == OLD, 30, f"{OLD} active", logs)

    # the site's window opens in about 12 hours: the new model is fetched, not activated
    closed = (datetime.now(UTC) + timedelta(hours=12)).hour
    windows(processes, site, f"0 {closed} * * *")
    since = probe.mark()
    assert processes.cli("deploy", NEW, "--device", device).returncode == 0
    detail = wait_until(
        lambda: (d := show(processes, device))["preloaded_model"] == NEW and d,
        30,
        f"{NEW} preloaded",
        logs,
    )
    assert detail["active_model"] == OLD
    event = decoded(probe, device, p.Channel.EVENTS, since, p.EventKind.PRELOADED)
    assert event.detail["model"] == NEW
    births = [
        b for b in decoded_all(probe, device, p.Channel.STATE, since) if isinstance(b, p.Birth)
    ]
    assert births[-1].preloaded is not None and births[-1].preloaded.sha256 == new_sha
    assert births[-1].active is not None and str(births[-1].active.model) == OLD
    replies = [r for r in decoded_all(probe, device, p.Channel.REPLY, since) if r.ok]
    assert [r.detail["status"] for r in replies] == ["preloaded"]
    chunks = chunks_of(probe, device, new_sha)
    assert chunks, "the model was transferred while the window was closed"

    # still the old model, and the controller does not send it again
    mark = probe.mark()
    probe.wait_for(result_of(device, OLD), 10, f"results from {OLD} while waiting", since=mark)
    time.sleep(2.0)  # four reconcile passes
    assert len(decoded_all(probe, device, p.Channel.CMD, since)) == 1, "one deploy: the preload"
    assert show(processes, device)["active_model"] == OLD
    waiting = [e for e in show(processes, device)["recent_events"] if e["event"] == "window_wait"]
    assert waiting and "waiting for the maintenance window at " in waiting[0]["message"]
    assert f"{closed:02d}:00 UTC" in waiting[0]["message"]
    assert preload_again(probe, device, new_sha).detail["status"] == "already preloaded"

    # the window opens: activated from the local copy, no chunk sent again
    since = probe.mark()
    windows(processes, site, "* * * * *")
    wait_until(
        lambda: (
            (d := show(processes, device))["active_model"] == NEW and d["preloaded_model"] is None
        ),
        30,
        f"{NEW} active once the window opens",
        logs,
    )
    probe.wait_for(result_of(device, NEW), 10, f"results from {NEW}", since=since)
    reply = wait_until(
        lambda: [r for r in decoded_all(probe, device, p.Channel.REPLY, since) if r.ok],
        10,
        "the activation reply",
        logs,
    )[0]
    assert reply.detail["status"] == "activated from the local copy"
    assert chunks_of(probe, device, new_sha) == chunks, "no second transfer"
    assert not [
        r for r in decoded_all(probe, device, p.Channel.BLOB_REQ, since) if r.sha256 == new_sha
    ]

    def deployments() -> list[tuple[str, str]]:
        db = sqlite3.connect(Path(processes.env["GREENFLEET_HOME"]) / "greenfleet.db")
        try:
            return db.execute(
                "SELECT slot, status FROM deployments WHERE device = ? AND model = ? "
                "ORDER BY sent_at",
                [device, NEW],
            ).fetchall()
        finally:
            db.close()

    expected = [("preload", "ok"), ("active", "ok")]
    wait_until(lambda: deployments() == expected, 10, f"deployments {expected}", logs)
    assert preload_again(probe, device, new_sha).detail["status"] == "already active"


def preload_again(probe: Probe, device: str, sha256: str) -> p.Reply:
    """Send the agent a preload of the new model directly, as a duplicate would arrive."""
    size = (SAMPLES / "vibration-ae.tflite").stat().st_size
    command = p.Deploy(
        model=p.ModelRef.parse(NEW),
        artifact=p.Artifact(sha256=sha256, size=size, format=p.ModelFormat.TFLITE),
        slot=p.Slot.PRELOAD,
    )
    since = probe.mark()
    probe.publish(p.topic(device, p.Channel.CMD), p.encode(command))

    def answer(topic: str, payload: bytes) -> bool:
        reply = p.decode(payload) if topic.endswith(f"{device}/reply") else None
        return isinstance(reply, p.Reply) and reply.ref == command.id

    _, payload = probe.wait_for(answer, 10, "the answer to a repeated preload", since=since)
    reply = p.decode(payload)
    assert isinstance(reply, p.Reply) and reply.ok, reply
    return reply


def decoded_all(probe: Probe, device: str, channel: p.Channel, since: int) -> list[Any]:
    suffix = f"{device}/{channel.value}"
    return [p.decode(m) for t, m in list(probe.history[since:]) if t.endswith(suffix)]


def decoded(
    probe: Probe, device: str, channel: p.Channel, since: int, kind: p.EventKind
) -> p.Event:
    found = [e for e in decoded_all(probe, device, channel, since) if e.event is kind]
    assert found, f"no {kind.value} event"
    event: p.Event = found[0]
    return event


def chunks_of(probe: Probe, device: str, sha256: str) -> int:
    """Chunks of ``sha256`` published (on the shared topic; this test has one device)."""
    prefix = f"{p.BLOB_ROOT}/{sha256}/"
    return sum(1 for t, _ in list(probe.history) if t.startswith(prefix))


def result_of(device: str, model: str) -> Callable[[str, bytes], bool]:
    def check(topic: str, payload: bytes) -> bool:
        if not topic.endswith(f"{device}/results"):
            return False
        message = p.decode(payload)
        return isinstance(message, p.Result) and str(message.model) == model

    return check
