"""The agent over TLS against a real Mosquitto with a test CA: pinned CA, client certificates,
server name checks, and handshake failures that are explained and retried, never a crash."""

from __future__ import annotations

import getpass
import hashlib
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import protocol as p
from agent.config import TlsConfig
from agent.install import install, user_layout
from agent.link import MqttLink
from controller.broker import free_port, mosquitto_path, wait_for_port
from model_store.signing import Signer
from tests.conftest import Probe, Processes, unique, wait_until
from tests.e2e.fake_controller import MODEL, FakeController
from tests.e2e.test_verified import signed_deploy
from tests.tls_ca import TestCA, bundle_document, write_bundle

pytestmark = pytest.mark.e2e


@dataclass
class TlsBroker:
    """A Mosquitto with a plain loopback listener (for test probes), a TLS listener, and a TLS
    listener that requires a client certificate; all with certificates from ``ca``."""

    ca: TestCA
    ca_file: Path
    plain_port: int
    tls_port: int
    cert_port: int
    log: Path


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    binary = mosquitto_path()
    if binary is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto")
    work = tmp_path_factory.mktemp("tls-broker")
    ca = TestCA()
    ca_file = ca.write(work / "ca.pem")
    server_cert, server_key = ca.issue(
        "greenfleet test broker", dns=("localhost", "broker.test"), ips=("127.0.0.1",)
    ).write(work, "server")
    ports = free_port(), free_port(), free_port()
    tls = f"cafile {ca_file}\ncertfile {server_cert}\nkeyfile {server_key}\n"
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"user {getpass.getuser()}\n"
        "per_listener_settings false\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 0\n"
        f"listener {ports[0]} 127.0.0.1\n"
        f"listener {ports[1]} 127.0.0.1\n{tls}"
        f"listener {ports[2]} 127.0.0.1\n{tls}"
        "require_certificate true\nuse_identity_as_username true\n"
    )
    log = work / "mosquitto.log"
    with log.open("ab") as out:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        for port in ports:
            wait_for_port(port, alive=lambda: proc.poll() is None)
    except TimeoutError:
        proc.kill()
        pytest.fail(f"mosquitto did not start:\n{log.read_text(errors='replace')}")
    yield TlsBroker(ca, ca_file, *ports, log)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def probe(tls_broker: TlsBroker) -> Iterator[Probe]:
    probe = Probe(tls_broker.plain_port, "gf/v1/#")
    yield probe
    probe.close()


def _birth_of(device: str) -> Callable[[str, bytes], bool]:
    state = p.topic(device, p.Channel.STATE)
    return lambda topic, payload: topic == state and b'"birth"' in payload


def test_an_installed_agent_connects_with_its_client_certificate_and_takes_a_deployment(
    tls_broker: TlsBroker, probe: Probe, processes: Processes, tmp_path: Path
) -> None:
    """The whole device path: bundle -> install (user mode) -> agent over TLS with a client
    certificate -> birth, and a signed deployment arrives over the encrypted link."""
    device = unique("tls")
    signer = Signer.load_or_create(tmp_path / "keys")
    client = tls_broker.ca.issue(device, client=True)
    bundle = write_bundle(
        tmp_path / "bundle.yaml",
        bundle_document(
            device,
            host="localhost",
            port=tls_broker.cert_port,
            ca=tls_broker.ca,
            client=client,
            password=None,
            controller_keys=[signer.public_raw.hex()],
        ),
    )
    layout = user_layout(home=tmp_path / "home", environ={})
    assert install(bundle, layout, python=sys.executable) == 0
    config = layout.on_disk(layout.config_path)

    processes.agent(config, name="agent")
    probe.wait_for(_birth_of(device), 30, "the agent's birth over TLS")
    ctl = FakeController(probe, device)
    try:
        ctl.blobs[hashlib.sha256(MODEL).hexdigest()] = MODEL
        assert ctl.reply_to(ctl.command(signed_deploy(signer, MODEL, "1.0.0")), 30).ok
        ctl.serving("vibration-ae:1.0.0")
    finally:
        ctl.close()
    log = processes.log("agent")
    assert f"connected to broker localhost:{tls_broker.cert_port}" in log
    assert "plain TCP" not in log


def test_an_agent_with_the_wrong_ca_explains_the_handshake_failure_and_keeps_retrying(
    tls_broker: TlsBroker, probe: Probe, processes: Processes, tmp_path: Path
) -> None:
    device = unique("wrongca")
    wrong_ca = TestCA("some other CA").write(tmp_path / "other-ca.pem")
    config = tmp_path / f"{device}.yaml"
    config.write_text(
        f"device_id: {device}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "broker:\n"
        "  host: 127.0.0.1\n"
        f"  port: {tls_broker.tls_port}\n"
        "  reconnect_max_s: 1\n"
        f"  tls: {{ca_file: {wrong_ca}}}\n"
        "power: {meters: [estimate]}\n"
    )
    agent = processes.agent(config, name="agent")
    needle = (
        f"TLS connection to broker 127.0.0.1:{tls_broker.tls_port} failed: handshake failed: "
        "the broker's certificate is not signed by the pinned CA"
    )
    wait_until(
        lambda: needle in processes.log("agent"),
        30,
        "the handshake failure",
        logs=lambda: processes.log("agent"),
    )
    log = processes.log("agent")
    assert "tls.ca_file" in log and str(wrong_ca) in log and "retrying with backoff" in log
    assert "Traceback" not in log
    # still running and still trying (paho reconnects with backoff), logged once, not per try
    time.sleep(3)
    assert agent.poll() is None, processes.log("agent")
    assert processes.log("agent").count(needle) == 1
    assert not [m for t, m in probe.history if t == p.topic(device, p.Channel.STATE)]


@dataclass
class LinkRun:
    link: MqttLink
    births: list[str]


def _link(port: int, tls: TlsConfig | None, host: str = "127.0.0.1") -> MqttLink:
    return MqttLink(
        client_id=unique("tls-link"),
        host=host,
        port=port,
        on_message=lambda topic, payload: None,
        tls=tls,
        reconnect_max_s=1,
    )


def _connects(link: MqttLink) -> bool:
    link.start()
    try:
        return link.connected.wait(10)
    finally:
        link.stop()


def test_a_client_certificate_is_presented_and_the_server_name_can_be_set(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    cert, key = tls_broker.ca.issue("dev-cert", client=True).write(tmp_path, "client")
    with_cert = TlsConfig(ca_file=tls_broker.ca_file, cert_file=cert, key_file=key)
    assert _connects(_link(tls_broker.cert_port, with_cert))
    # reached by an address, checked against the name the certificate was issued for
    named = TlsConfig(ca_file=tls_broker.ca_file, server_name="broker.test")
    assert _connects(_link(tls_broker.tls_port, named))


@pytest.mark.parametrize(
    "case, needle, level",
    [
        (
            "name",
            "handshake failed: the broker's certificate is not valid for the name 'wrong.example'",
            logging.ERROR,
        ),
        (
            "no-client-cert",
            "the broker ended the TLS session: the broker rejected this device's client "
            "certificate",
            logging.ERROR,
        ),
        ("plain-to-tls", "if broker.port is a TLS listener, set broker.tls", logging.WARNING),
        ("tls-to-plain", "the broker did not answer in TLS", logging.ERROR),
    ],
)
def test_connection_failures_say_what_to_check_and_are_retried(
    tls_broker: TlsBroker, caplog: pytest.LogCaptureFixture, case: str, needle: str, level: int
) -> None:
    ca = tls_broker.ca_file
    link = {
        "name": lambda: _link(
            tls_broker.tls_port, TlsConfig(ca_file=ca, server_name="wrong.example")
        ),
        "no-client-cert": lambda: _link(tls_broker.cert_port, TlsConfig(ca_file=ca)),
        "plain-to-tls": lambda: _link(tls_broker.tls_port, None),
        "tls-to-plain": lambda: _link(tls_broker.plain_port, TlsConfig(ca_file=ca)),
    }[case]()
    caplog.set_level(logging.INFO, logger="agent.link")
    link.start()
    try:
        wait_until(
            lambda: any(needle in r.getMessage() for r in caplog.records),
            15,
            f"a log line saying {needle!r}",
            logs=lambda: "\n".join(r.getMessage() for r in caplog.records),
        )
        assert link.fatal is None and not link.connected.is_set()
    finally:
        link.stop()
    failures = [r for r in caplog.records if needle in r.getMessage()]
    assert failures[0].levelno == level
    assert "retrying with backoff" in failures[0].getMessage()
