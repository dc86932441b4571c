"""The network between an agent and its broker fails: inference goes on, telemetry catches up.

A real agent process reaches the real Mosquitto through :class:`tests.faults.proxy.TcpProxy`;
the test's subscriber connects to Mosquitto directly, so it sees exactly what reached the
broker. Two kinds of cut:

- a **drop** (connections reset, new ones refused): the agent notices at once;
- a **stall** (sockets open, nothing moves): only the agent's MQTT keepalive can notice, so the
  agent runs with the smallest keepalive the config allows (5 s).

Either way a user must see: the agent kept inferring through the cut (the telemetry windows
inside it report inferences), it buffered those windows on disk, and after the cut every
telemetry record of its session reached the broker exactly once, in order. Exactly once is
stricter than MQTT's QoS 1 promises; the proxy cuts only at a quiet moment, so a duplicate
here is the agent sending a record twice, not a PUBACK lost in the cut.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from agent import protocol as p
from agent.activation import Activation
from controller.broker import Mosquitto
from tests.conftest import SAMPLES, Probe, Processes, agent_config, unique
from tests.faults.proxy import TcpProxy

pytestmark = pytest.mark.e2e

KEEPALIVE_S = 5  # the smallest the agent config accepts
INTERVAL_S = 0.5  # telemetry window
DROP_S = 6.0
MODEL = p.ModelRef(name="vibration-ae", version="1.0.0")


def install_model(state_dir: Path) -> None:
    """Give the agent an active model before it starts, as a previous deploy would have left it:
    a cut is only interesting while the agent has inferences to report."""
    data = (SAMPLES / "vibration-ae.onnx").read_bytes()
    active = p.ActiveModel(
        model=MODEL, sha256=hashlib.sha256(data).hexdigest(), format=p.ModelFormat.ONNX
    )
    activation = Activation(state_dir)
    activation.prepare()
    shutil.copyfile(SAMPLES / "vibration-ae.onnx", activation.artifact_path(active))
    activation.activate(active)


def start_agent(processes: Processes, tmp_path: Path, device: str, port: int) -> None:
    config = agent_config(
        tmp_path / f"{device}.yaml",
        device,
        port,
        rate_hz=20,
        interval_s=INTERVAL_S,
        extra={
            "broker": {
                "host": "127.0.0.1",
                "port": port,
                "keepalive_s": KEEPALIVE_S,
                "reconnect_max_s": 2,
            },
            # results are QoS 0 and not the subject; without them the link is quiet between
            # telemetry windows, which lets the proxy cut at a quiet moment
            "inference": {"rate_hz": 20, "publish_results": False},
        },
    )
    install_model(tmp_path / f"{device}-state")
    processes.agent(config)


def records(probe: Probe, session: str, since: int = 0) -> list[p.TelemetryRecord]:
    """Telemetry records of ``session`` in the order they reached the subscriber."""
    found = []
    for topic, payload in list(probe.history)[since:]:
        if topic.endswith("/telemetry"):
            batch = p.decode(payload)
            if isinstance(batch, p.TelemetryBatch) and batch.session == session:
                found.extend(batch.records)
    return found


def wait(predicate: Callable[[], object], timeout: float, what: str, log: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log}")
        time.sleep(0.1)


def birth_session(probe: Probe) -> str:
    _, payload = probe.wait_for(
        lambda t, m: t.endswith("/state") and b'"birth"' in m, 30, "the agent's birth"
    )
    birth = p.decode(payload)
    assert isinstance(birth, p.Birth)
    assert birth.active is not None and birth.active.model == MODEL, "the installed model is active"
    return birth.session


def check_catch_up(
    probe: Probe, session: str, cut_start: datetime, cut_end: datetime, log: Callable[[], str]
) -> None:
    """After the cut: every record exactly once and in order, and the cut's windows inferred."""

    def caught_up() -> bool:
        got = records(probe, session)
        seqs = sorted({r.seq for r in got})
        return (
            bool(got)
            and seqs == list(range(len(seqs)))
            and any(r.start > cut_end for r in got)  # a window begun after the cut arrived...
            and len(got) >= len(seqs)  # ...and nothing before it is missing
        )

    wait(caught_up, 20, "telemetry to catch up after the cut", log())
    time.sleep(1.0)  # anything sent twice would arrive now
    got = records(probe, session)
    seqs = [r.seq for r in got]
    assert seqs == list(range(len(seqs))), (
        f"telemetry seqs must arrive once each, in order; got {seqs}"
    )
    inside = [
        r
        for r in got
        if r.start >= cut_start and r.start.timestamp() + r.window_s <= cut_end.timestamp()
    ]
    cut_s = (cut_end - cut_start).total_seconds()
    covered = sum(r.window_s for r in inside)  # consecutive windows: their span, less the edges
    assert covered >= cut_s - 4 * INTERVAL_S, (
        f"telemetry windows inside the {cut_s:.1f} s cut cover only {covered:.1f} s"
    )
    idle = [r.seq for r in inside if r.inferences == 0]
    assert not idle, f"windows {idle} during the cut report no inferences: inference stopped"
    assert all(r.model == MODEL for r in inside)


def test_a_dropped_network_loses_no_telemetry_and_inference_goes_on(
    mosquitto: Mosquitto, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> None:
    device = unique("drop")
    probe = probe_factory(f"gf/v1/{device}/#")
    with TcpProxy(mosquitto.port) as proxy:
        start_agent(processes, tmp_path, device, proxy.port)
        log = lambda: processes.log(device)[-3000:]  # noqa: E731
        session = birth_session(probe)
        wait(lambda: len(records(probe, session)) >= 3, 20, "telemetry before the cut", log())
        assert all(r.inferences > 0 for r in records(probe, session)[1:])

        cut_start = p.utcnow()
        proxy.drop()
        during = probe.mark()
        wait(lambda: "lost connection" in processes.log(device), 5, "the agent to notice", log())
        time.sleep(DROP_S)
        leaked = records(probe, session, since=during)
        cut_end = p.utcnow()
        proxy.heal()
        assert not leaked, "the cut was real: nothing reached the broker during it"

        check_catch_up(probe, session, cut_start, cut_end, log)
        assert proxy.accepted >= 2, "the agent reconnected through the proxy"


def test_a_stalled_network_is_found_by_the_keepalive_and_telemetry_catches_up(
    mosquitto: Mosquitto, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> None:
    device = unique("stall")
    probe = probe_factory(f"gf/v1/{device}/#")
    with TcpProxy(mosquitto.port) as proxy:
        start_agent(processes, tmp_path, device, proxy.port)
        log = lambda: processes.log(device)[-3000:]  # noqa: E731
        session = birth_session(probe)
        wait(lambda: len(records(probe, session)) >= 3, 20, "telemetry before the cut", log())

        cut_start = p.utcnow()
        stalled_at = time.monotonic()
        proxy.stall()
        during = probe.mark()
        # Nothing resets the sockets: only the agent's keepalive (PINGREQ unanswered for one more
        # keepalive period) can tell that the link is dead, within two keepalive periods.
        wait(
            lambda: "lost connection" in processes.log(device),
            2 * KEEPALIVE_S + 3,
            "the agent's keepalive to detect the stalled link",
            log(),
        )
        detected_s = time.monotonic() - stalled_at
        time.sleep(1.0)  # a reconnect attempt into the stall, which must time out too
        leaked = records(probe, session, since=during)
        cut_end = p.utcnow()
        proxy.heal()
        assert not leaked, "the stall was real: nothing reached the broker during it"
        assert KEEPALIVE_S - 1 <= detected_s <= 2 * KEEPALIVE_S + 3, detected_s

        check_catch_up(probe, session, cut_start, cut_end, log)
