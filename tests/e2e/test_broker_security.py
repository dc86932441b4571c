"""The generated broker configuration, against a real Mosquitto started with it.

One broker for the module (``greenfleet broker config`` in-process, then Mosquitto with its
files), devices enrolled with ``devices add``, and paho clients where no agent is needed.
"Nothing arrived" is never a sleep: after the refused messages the same sender publishes an
allowed marker, and once the marker is in, anything published before it would have been too.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent import protocol as p
from controller import broker_config as bc
from controller import device_commands
from controller.broker import ConfiguredMosquitto, free_port, mosquitto_path
from controller.home import Home
from controller.identity import CertificateAuthority, load_controller_credentials

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SHA = "cd" * 32
NOT_AUTHORIZED = 135  # MQTT 5 0x87; paho maps MQTT 3.1.1 CONNACK 5 onto it
DEVICES = {"dev-a": "password", "dev-b": "password", "dev-c": "cert"}


@dataclass
class Site:
    home: Home
    files: bc.BrokerFiles
    settings: bc.BrokerSettings
    broker: ConfiguredMosquitto
    bundles: dict[str, device_commands.Added]

    def log(self) -> str:
        return self.broker.log.read_text(errors="replace")[-3000:]


def non_loopback_ipv4() -> str | None:
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return str(address.address)
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: apt-get install -y mosquitto (.ci/run does this)")
    root = tmp_path_factory.mktemp("secure-site")
    home = Home(root / "home").prepare()
    cert_port = free_port()
    settings = bc.BrokerSettings(
        out_dir=root / "broker",
        hosts=["broker.test"],
        port=free_port(),
        cert_port=cert_port,
        plain_port=free_port(),
    )
    files, _ = device_commands.configure_broker(home, settings)
    bundles = {
        device: device_commands.add_device(
            home,
            device,
            device_class="x86-ipc",
            site="test",
            auth=auth,  # type: ignore[arg-type]
            broker=("127.0.0.1", cert_port if auth == "cert" else settings.port),
        )
        for device, auth in DEVICES.items()
    }
    broker = ConfiguredMosquitto(files.conf, settings.port, root / "mosquitto.log").start()
    yield Site(home, files, settings, broker, bundles)
    broker.stop()


class Client:
    """A paho client over TLS with the fleet CA pinned, recording what it gets."""

    def __init__(
        self,
        site: Site,
        username: str | None = None,
        password: str | None = None,
        *,
        port: int | None = None,
        cert: tuple[Path, Path] | None = None,
        tls: bool = True,
        protocol: int = mqtt.MQTTv311,
        host: str = "127.0.0.1",
        client_id: str | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.connacks: list[ReasonCode] = []
        self.subacks: list[list[ReasonCode]] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.disconnected = threading.Event()
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"t-{username}-{uuid.uuid4().hex[:6]}",
            protocol=protocol,  # type: ignore[arg-type]
        )
        if tls:
            self.client.tls_set(
                ca_certs=str(site.files.ca),
                certfile=str(cert[0]) if cert else None,
                keyfile=str(cert[1]) if cert else None,
            )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        self.error: BaseException | None = None
        try:
            self.client.connect(host, port or site.settings.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
            return
        self.client.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self._cond:
            self.connacks.append(rc)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self.subacks.append(list(codes))
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        with self._cond:
            self.pubacks[mid] = rc
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (value := predicate()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {what}")
                self._cond.wait(min(remaining, 0.1))
            return value

    def connack(self, timeout: float = 5.0) -> ReasonCode | None:
        """The CONNACK, or None if the connection ended without one (TLS refused)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.error is None:
            if self.connacks:
                return self.connacks[0]
            if self.disconnected.is_set() and not self.client.is_connected():
                return None
            time.sleep(0.02)
        return self.connacks[0] if self.connacks else None

    def connected(self) -> Client:
        rc = self.connack()
        assert rc is not None and not rc.is_failure, f"not connected: {rc} {self.error}"
        return self

    def subscribe(self, *topics: str) -> list[ReasonCode]:
        before = len(self.subacks)
        for topic in topics:
            self.client.subscribe(topic, 1)
        self.wait(lambda: len(self.subacks) >= before + len(topics), "SUBACKs")
        return [code for codes in self.subacks[before:] for code in codes]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1)
        return self.wait(lambda: self.pubacks.get(info.mid), f"PUBACK of {topic}")  # type: ignore[no-any-return]

    def received(self, topic: str, payload: bytes, timeout: float = 5.0) -> None:
        self.wait(lambda: (topic, payload) in self.messages, f"{payload!r} on {topic}", timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        client = Client(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def password_of(site: Site, device: str) -> str:
    password = site.bundles[device].bundle.broker.password
    assert password
    return password


def cert_files(site: Site, device: str, directory: Path) -> tuple[Path, Path]:
    broker = site.bundles[device].bundle.broker
    assert broker.cert_pem and broker.key_pem
    cert, key = directory / f"{device}.pem", directory / f"{device}.key"
    cert.write_text(broker.cert_pem)
    key.write_text(broker.key_pem)
    key.chmod(0o600)
    return cert, key


def controller(site: Site, make: Callable[..., Client], protocol: int = mqtt.MQTTv311) -> Client:
    creds = load_controller_credentials(site.home.controller_credentials)
    assert creds is not None
    return make(site, creds.username, creds.password, protocol=protocol).connected()


def marker() -> bytes:
    return f"marker-{uuid.uuid4().hex[:8]}".encode()


# ---------------------------------------------------------------------------------------- tests


def test_a_device_publishes_its_reports_and_reads_its_commands(
    site: Site, clients: Callable[..., Client]
) -> None:
    ctl = controller(site, clients)
    ctl.subscribe(p.subscription(p.Channel.TELEMETRY), p.subscription(p.Channel.STATE))
    a = clients(site, "dev-a", password_of(site, "dev-a")).connected()
    a.subscribe(p.topic("dev-a", p.Channel.CMD), p.blob_subscription("dev-a"), p.CONTROLLER_TOPIC)
    a.publish(p.topic("dev-a", p.Channel.TELEMETRY), b"tel-a")
    ctl.received(p.topic("dev-a", p.Channel.TELEMETRY), b"tel-a")
    ctl.publish(p.topic("dev-a", p.Channel.CMD), b"cmd-a")
    a.received(p.topic("dev-a", p.Channel.CMD), b"cmd-a")
    ctl.publish(p.blob_topic("dev-a", SHA, 0), b"chunk-a")
    a.received(p.blob_topic("dev-a", SHA, 0), b"chunk-a")
    ctl.publish(p.CONTROLLER_TOPIC, b"ctl-online")
    a.received(p.CONTROLLER_TOPIC, b"ctl-online")


def test_every_device_reads_shared_chunks_and_only_the_controller_writes_them(
    site: Site, clients: Callable[..., Client]
) -> None:
    """Broker fan-out (controller/blobs.py): one publish on gf/blobs/v1 reaches every device."""
    ctl = controller(site, clients)
    a = clients(site, "dev-a", password_of(site, "dev-a"), protocol=mqtt.MQTTv5).connected()
    b = clients(site, "dev-b", password_of(site, "dev-b")).connected()
    a.subscribe(p.shared_blob_topic(SHA, 0), p.shared_blob_topic(SHA, 1))
    b.subscribe(*(p.shared_blob_topic(SHA, i) for i in range(3)))
    ctl.publish(p.shared_blob_topic(SHA, 0), b"chunk-0")
    a.received(p.shared_blob_topic(SHA, 0), b"chunk-0")
    b.received(p.shared_blob_topic(SHA, 0), b"chunk-0")
    rc = a.publish(p.shared_blob_topic(SHA, 1), b"forged")
    assert rc.value == NOT_AUTHORIZED, rc
    done = marker()
    ctl.publish(p.shared_blob_topic(SHA, 2), done)
    b.received(p.shared_blob_topic(SHA, 2), done)
    assert (p.shared_blob_topic(SHA, 1), b"forged") not in b.messages


def test_a_device_cannot_touch_another_devices_topics_and_keeps_working(
    site: Site, clients: Callable[..., Client]
) -> None:
    ctl = controller(site, clients)
    ctl.subscribe("gf/v1/#")  # sees whatever the ACL lets it read
    b = clients(site, "dev-b", password_of(site, "dev-b")).connected()
    b.subscribe(p.topic("dev-b", p.Channel.CMD), p.blob_subscription("dev-b"))
    a = clients(site, "dev-a", password_of(site, "dev-a"), protocol=mqtt.MQTTv5).connected()
    own_cmd = p.topic("dev-a", p.Channel.CMD)
    # reading: every filter that would cover B is granted at most on paper (MQTT 5: 0x87 is
    # also fine); none of B's messages may arrive
    codes = a.subscribe(own_cmd, "gf/v1/dev-b/#", "gf/v1/+/cmd", "gf/v1/+/telemetry", "#")
    assert all(c.value in (0, 1, NOT_AUTHORIZED) for c in codes), codes
    b.publish(p.topic("dev-b", p.Channel.TELEMETRY), b"tel-b")
    ctl.received(p.topic("dev-b", p.Channel.TELEMETRY), b"tel-b")
    ctl.publish(p.topic("dev-b", p.Channel.CMD), b"cmd-b")
    ctl.publish(p.blob_topic("dev-b", SHA, 1), b"chunk-b")
    b.received(p.topic("dev-b", p.Channel.CMD), b"cmd-b")
    b.received(p.blob_topic("dev-b", SHA, 1), b"chunk-b")
    done = marker()
    ctl.publish(own_cmd, done)
    a.received(own_cmd, done)
    # (one copy per matching subscription, as MQTT 5 has it)
    assert set(a.messages) == {(own_cmd, done)}, a.messages

    # writing: B's topics and every cmd topic (its own too) are refused: PUBACK 0x87 in
    # MQTT 5, and no subscriber gets the message
    forged = [
        p.topic("dev-b", p.Channel.TELEMETRY),
        p.topic("dev-b", p.Channel.STATE),
        p.topic("dev-b", p.Channel.CMD),
        p.topic("dev-a", p.Channel.CMD),
        p.topic("dev-c", p.Channel.CMD),
        p.blob_topic("dev-b", SHA, 2),
        p.blob_topic("dev-a", SHA, 2),
        p.CONTROLLER_TOPIC,
    ]
    for topic in forged:
        rc = a.publish(topic, b"forged")
        assert rc.value == NOT_AUTHORIZED, (topic, rc)
    done = marker()
    assert not a.publish(p.topic("dev-a", p.Channel.EVENTS), done).is_failure
    ctl.received(p.topic("dev-a", p.Channel.EVENTS), done)
    b_done = marker()
    ctl.publish(p.topic("dev-b", p.Channel.CMD), b_done)
    b.received(p.topic("dev-b", p.Channel.CMD), b_done)
    assert not [m for m in ctl.messages + b.messages if m[1] == b"forged"]
    # and A is still connected and still works
    assert a.client.is_connected()
    again = marker()
    a.publish(p.topic("dev-a", p.Channel.TELEMETRY), again)
    ctl.received(p.topic("dev-a", p.Channel.TELEMETRY), again)


def test_anonymous_and_wrong_password_are_not_authorized(
    site: Site, clients: Callable[..., Client]
) -> None:
    anonymous = clients(site).connack()
    assert anonymous is not None and anonymous.value == NOT_AUTHORIZED
    wrong = clients(site, "dev-a", "not-the-password").connack()
    assert wrong is not None and wrong.value == NOT_AUTHORIZED
    unknown = clients(site, "nobody", "x").connack()
    assert unknown is not None and unknown.value == NOT_AUTHORIZED
    # a device's password is not the controller's
    stolen = clients(site, "gf-controller", password_of(site, "dev-a")).connack()
    assert stolen is not None and stolen.value == NOT_AUTHORIZED


def test_a_cert_device_logs_in_with_its_certificate(
    site: Site, clients: Callable[..., Client], tmp_path: Path
) -> None:
    cert = cert_files(site, "dev-c", tmp_path)
    ctl = controller(site, clients)
    ctl.subscribe(p.subscription(p.Channel.TELEMETRY))
    c = clients(site, port=site.settings.cert_port, cert=cert).connected()
    c.subscribe(p.topic("dev-c", p.Channel.CMD))
    c.publish(p.topic("dev-c", p.Channel.TELEMETRY), b"tel-c")  # its CN is its username
    ctl.received(p.topic("dev-c", p.Channel.TELEMETRY), b"tel-c")
    ctl.publish(p.topic("dev-c", p.Channel.CMD), b"cmd-c")
    c.received(p.topic("dev-c", p.Channel.CMD), b"cmd-c")
    # no certificate on the certificate listener: no session, even with a good password
    bare = clients(site, "dev-a", password_of(site, "dev-a"), port=site.settings.cert_port)
    assert bare.connack() is None
    # a certificate from another CA (same CA name) is refused in the handshake
    rogue_ca = CertificateAuthority.load_or_create(tmp_path / "rogue")
    rogue = rogue_ca.issue_client("dev-a")
    (tmp_path / "rogue.pem").write_text(rogue.cert_pem)
    (tmp_path / "rogue.key").write_text(rogue.key_pem)
    forged = clients(
        site,
        port=site.settings.cert_port,
        cert=(tmp_path / "rogue.pem", tmp_path / "rogue.key"),
    )
    assert forged.connack() is None


def test_no_plain_tcp_except_on_loopback(site: Site, clients: Callable[..., Client]) -> None:
    # MQTT without TLS on the TLS listener gets no CONNACK
    assert clients(site, "dev-a", password_of(site, "dev-a"), tls=False).connack() is None
    # the plain listener answers on loopback only (and still wants a password)
    plain = site.settings.plain_port
    anonymous = clients(site, port=plain, tls=False).connack()
    assert anonymous is not None and anonymous.value == NOT_AUTHORIZED
    clients(site, "dev-a", password_of(site, "dev-a"), port=plain, tls=False).connected()
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("no non-loopback IPv4 address to test from")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, plain), timeout=2).close()
    # the TLS listener is reachable on that address, so the refusal is the config's doing
    socket.create_connection((address, site.settings.port), timeout=2).close()


def test_revoked_devices_cannot_connect(
    site: Site, clients: Callable[..., Client], tmp_path: Path
) -> None:
    """Revoke with the CLI (which signals our broker), then: the password device is dropped
    and refused, the cert device is refused at the handshake, and its open connection (which
    Mosquitto keeps across a reload) can neither read nor write."""
    for device, auth in (("dev-r", "password"), ("dev-s", "cert")):
        site.bundles[device] = device_commands.add_device(
            site.home,
            device,
            device_class="x86-ipc",
            auth=auth,  # type: ignore[arg-type]
            broker=("127.0.0.1", site.settings.port),
        )
        assert site.bundles[device].reload is not None
        assert site.bundles[device].reload.signalled  # type: ignore[union-attr]
    cert = cert_files(site, "dev-s", tmp_path)
    r = clients(site, "dev-r", password_of(site, "dev-r")).connected()
    s = clients(site, port=site.settings.cert_port, cert=cert).connected()
    s.subscribe(p.topic("dev-s", p.Channel.CMD))
    ctl = controller(site, clients)
    ctl.subscribe(p.subscription(p.Channel.TELEMETRY))

    env = {"GREENFLEET_HOME": str(site.home.root), "PYTHONPATH": str(REPO), "PATH": "/usr/bin"}
    for device in ("dev-r", "dev-s"):
        done = subprocess.run(
            [sys.executable, "-m", "controller.cli", "devices", "revoke", device, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["reload"]["signalled"], done.stdout

    r.wait(r.disconnected.is_set, "the revoked password device to be dropped")
    refused = clients(site, "dev-r", password_of(site, "dev-r")).connack()
    assert refused is not None and refused.value == NOT_AUTHORIZED
    assert clients(site, port=site.settings.cert_port, cert=cert).connack() is None, site.log()
    # the cert device's old connection is inert: nothing in, nothing out
    s.publish(p.topic("dev-s", p.Channel.TELEMETRY), b"from-revoked")
    ctl.publish(p.topic("dev-s", p.Channel.CMD), b"to-revoked")
    done_marker = marker()
    a = clients(site, "dev-a", password_of(site, "dev-a")).connected()
    a.publish(p.topic("dev-a", p.Channel.TELEMETRY), done_marker)
    ctl.received(p.topic("dev-a", p.Channel.TELEMETRY), done_marker)
    assert (p.topic("dev-s", p.Channel.TELEMETRY), b"from-revoked") not in ctl.messages
    assert s.messages == []
    # others are untouched
    assert a.client.is_connected()


def test_the_controller_daemon_logs_in_with_the_home_credentials(
    site: Site, clients: Callable[..., Client]
) -> None:
    """``controller run``'s connection: TLS, the CA pinned, user gf-controller; its presence
    (controller topic, retained) reaches a device."""
    from controller.daemon import Controller

    conn = device_commands.controller_connection(site.home, None)
    assert conn.tls is not None and conn.username == "gf-controller"
    assert conn.port == site.settings.port
    daemon = Controller(
        site.home,
        "127.0.0.1",
        conn.port,
        username=conn.username,
        password=conn.password,
        tls=conn.tls,
        client_id=f"gf-controller-{uuid.uuid4().hex[:6]}",
    )
    daemon.start()
    try:
        assert daemon.link.connected.wait(10), site.log()
        a = clients(site, "dev-a", password_of(site, "dev-a")).connected()
        a.subscribe(p.CONTROLLER_TOPIC)
        a.wait(
            lambda: any(
                t == p.CONTROLLER_TOPIC and b'"online":true' in m.replace(b" ", b"")
                for t, m in a.messages
            ),
            "the controller's presence",
        )
    finally:
        daemon.stop()


def test_a_device_that_takes_anothers_client_id_knocks_nobody_off(
    site: Site, clients: Callable[..., Client]
) -> None:
    """Issue 15 (3): dev-a, with its own valid login, connects again and again under the
    controller's client id and under dev-b's. The broker makes every client id the login
    (use_username_as_clientid), so the controller and dev-b keep their connections and go on
    exchanging messages."""
    creds = load_controller_credentials(site.home.controller_credentials)
    assert creds is not None
    ctl = clients(site, creds.username, creds.password, client_id="gf-controller").connected()
    ctl.subscribe(p.subscription(p.Channel.TELEMETRY))
    b = clients(site, "dev-b", password_of(site, "dev-b"), client_id="gf-agent-dev-b").connected()
    b.subscribe(p.topic("dev-b", p.Channel.CMD))
    for stolen in ("gf-controller", "gf-agent-dev-b", "dev-b", "gf-ingest-0") * 3:
        clients(site, "dev-a", password_of(site, "dev-a"), client_id=stolen).connected()
    # after the last attacker's CONNACK: the broker has already dropped whom it would drop
    command, report = marker(), marker()
    assert ctl.publish(p.topic("dev-b", p.Channel.CMD), command) == 0
    b.received(p.topic("dev-b", p.Channel.CMD), command)
    assert b.publish(p.topic("dev-b", p.Channel.TELEMETRY), report) == 0
    ctl.received(p.topic("dev-b", p.Channel.TELEMETRY), report)
    assert not ctl.disconnected.is_set(), "the controller was knocked off the broker"
    assert not b.disconnected.is_set(), "dev-b was knocked off the broker"
    assert len(ctl.connacks) == 1 and len(b.connacks) == 1, "nobody had to reconnect"


def test_ingest_workers_log_in_under_names_of_their_own_beside_the_controller(
    site: Site, clients: Callable[..., Client]
) -> None:
    """With the client id bound to the login, each ingest worker needs a login of its own: it
    has the controller's password, stores telemetry from the shared subscription and tells the
    device what it stored on the device's ack topic, while the controller stays connected."""
    creds = load_controller_credentials(site.home.controller_credentials)
    assert creds is not None
    ctl = clients(site, creds.username, creds.password, protocol=mqtt.MQTTv5).connected()
    worker = clients(site, "gf-ingest-0", creds.password, protocol=mqtt.MQTTv5).connected()
    assert worker.subscribe("$share/gf-ingest/" + p.subscription(p.Channel.TELEMETRY))[0] < 128
    a = clients(site, "dev-a", password_of(site, "dev-a")).connected()
    a.subscribe(p.topic("dev-a", p.Channel.ACK))
    report, ack = marker(), marker()
    assert a.publish(p.topic("dev-a", p.Channel.TELEMETRY), report) == 0
    worker.received(p.topic("dev-a", p.Channel.TELEMETRY), report)
    assert worker.publish(p.topic("dev-a", p.Channel.ACK), ack) == 0
    a.received(p.topic("dev-a", p.Channel.ACK), ack)
    assert worker.publish(p.topic("dev-a", p.Channel.CMD), marker()) == NOT_AUTHORIZED
    assert not ctl.disconnected.is_set() and not worker.disconnected.is_set()


def birth_of(device: str) -> bytes:
    return p.encode(
        p.Birth(
            session=uuid.uuid4().hex[:16],
            agent_version="0.1.0",
            device_class="x86-ipc",
            runtimes=[p.ModelFormat.ONNX],
            hardware=p.HardwareFacts(
                arch="x86_64",
                cpu_model="test",
                cpu_flags=[],
                cores=2,
                memory_mb=1024,
                os="t",
                python="3.11",
            ),
        )
    )


def test_a_revoked_device_is_offline_at_once_and_its_retained_birth_is_deleted(
    site: Site, clients: Callable[..., Client]
) -> None:
    """Issue 15 (5): the ACL's `deny #` also blocks a revoked device's last will, so its
    retained birth stayed on the broker and the controller showed it online for ever. dev-v
    (a raw paho client) publishes a retained birth; after `devices revoke` the controller shows
    it revoked and offline, out of what plans and rollouts see, with an event; the retained
    birth is gone from the broker, so a controller that starts again does not see it online."""
    from controller import metrics, registry, views
    from controller.daemon import Controller
    from controller.db import open_db

    device = "dev-v"
    site.bundles[device] = device_commands.add_device(
        site.home, device, device_class="x86-ipc", broker=("127.0.0.1", site.settings.port)
    )
    v = clients(site, device, password_of(site, device)).connected()
    state = p.topic(device, p.Channel.STATE)
    v.client.publish(state, birth_of(device), qos=1, retain=True).wait_for_publish(5)
    conn = device_commands.controller_connection(site.home, None)

    def daemon() -> Controller:
        ctl = Controller(
            site.home, "127.0.0.1", conn.port, username=conn.username, password=conn.password,
            tls=conn.tls, reconcile_interval_s=0.2,
        )  # fmt: skip
        ctl.start()
        assert ctl.link.connected.wait(10), site.log()
        return ctl

    def row() -> dict[str, Any]:
        return next(d for d in views.fleet(open_db(site.home.database)) if d["id"] == device)

    def wait(predicate: Callable[[], Any], what: str) -> None:
        deadline = time.monotonic() + 15
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    ctl = daemon()
    try:
        wait(lambda: any(d["id"] == device and d["online"] for d in views.fleet(
            open_db(site.home.database))), "dev-v online")  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "controller.cli", "devices", "revoke", device, "--json"],
            capture_output=True, text=True, timeout=30,
            env={"GREENFLEET_HOME": str(site.home.root), "PYTHONPATH": str(REPO),
                 "PATH": "/usr/bin"},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        shown = row()  # at once: the revoke itself marks it, no broker message needed
        assert shown["revoked"] and not shown["online"], shown
        db = open_db(site.home.database)
        assert device not in [r["id"] for r in registry.devices(db)], "out of plans and rollouts"
        assert any(
            e["event"] == "device_revoked" for e in views.device_detail(db, device)["recent_events"]
        )
        up = {
            sample.labels["device"]: sample.value
            for family in metrics.fleet_metrics(db)
            if family.name == "greenfleet_device_up"
            for sample in family.samples
        }
        assert up[device] == 0.0
        wait(lambda: not registry.states_to_clear(open_db(site.home.database)), "the clear")
    finally:
        ctl.stop()
    v.wait(v.disconnected.is_set, "the revoked device to be dropped")
    # the retained birth is gone: a subscriber gets the controller's presence and nothing else
    reader = controller(site, clients)
    reader.subscribe(state, p.CONTROLLER_TOPIC)
    reader.wait(lambda: any(t == p.CONTROLLER_TOPIC for t, _ in reader.messages), "presence")
    assert [t for t, _ in reader.messages if t == state] == [], "the retained birth is still there"
    reader.close()
    # and a controller that starts again does not bring it back online
    ctl = daemon()
    try:
        time.sleep(0.5)  # nothing to wait for: the test is that nothing arrives
        assert row()["revoked"] and not row()["online"]
    finally:
        ctl.stop()


def test_a_poisoned_record_is_refused_alone_counted_and_others_keep_their_data(
    site: Site, clients: Callable[..., Client]
) -> None:
    """Issue 15 (1): dev-a sends, on its own allowed telemetry topic, records a schema of old
    accepted (a window of 1e300 s, which overflowed the tier's timestamp, and one of year 9999)
    between dev-b's good records; before, ingest dropped the whole batch, dev-b's records with
    it. Now dev-b's records are all stored, dev-a's are refused alone and counted where an
    operator looks (devices show, /metrics, an event)."""
    from controller import metrics, views
    from controller.daemon import Controller
    from controller.db import open_db

    conn = device_commands.controller_connection(site.home, None)
    ctl = Controller(
        site.home, "127.0.0.1", conn.port, username=conn.username, password=conn.password,
        tls=conn.tls, reconcile_interval_s=0.2,
    )  # fmt: skip
    ctl.start()
    try:
        assert ctl.link.connected.wait(10), site.log()
        a = clients(site, "dev-a", password_of(site, "dev-a")).connected()
        b = clients(site, "dev-b", password_of(site, "dev-b")).connected()
        a.publish(p.topic("dev-a", p.Channel.STATE), birth_of("dev-a"))
        record = {"seq": 0, "start": "2026-12-07T10:00:00Z", "window_s": 1.0, "model": None,
                  "inferences": 1, "errors": 0, "cpu_s": 0.0}  # fmt: skip

        def telemetry(session: str, seq: int, **bad: Any) -> bytes:
            body = {"v": 1, "id": uuid.uuid4().hex, "ts": "2026-12-07T10:00:00Z",
                    "kind": "telemetry", "session": session,
                    "records": [{**record, "seq": seq, **bad}]}  # fmt: skip
            return json.dumps(body).encode()

        for seq in range(20):  # interleaved: they share ingest batches
            b.client.publish(p.topic("dev-b", p.Channel.TELEMETRY), telemetry("sb", seq), qos=1)
            poison = {"window_s": 1e300} if seq % 2 else {"start": "9999-12-31T00:00:00Z"}
            a.client.publish(
                p.topic("dev-a", p.Channel.TELEMETRY), telemetry("sa", seq, **poison), qos=1
            )

        def stored(device: str) -> list[int]:
            db = open_db(site.home.database)
            return [r[0] for r in db.execute(
                "SELECT seq FROM telemetry WHERE device = ? ORDER BY seq", [device])]  # fmt: skip

        def rejected() -> int:
            row = next(d for d in views.fleet(open_db(site.home.database)) if d["id"] == "dev-a")
            return int(row.get("rejected_messages", 0))

        deadline = time.monotonic() + 20
        while (stored("dev-b") != list(range(20)) or rejected() < 20) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert stored("dev-b") == list(range(20)), "dev-b lost records to dev-a's poison"
        assert stored("dev-a") == [] and rejected() == 20
        db = open_db(site.home.database)
        detail = views.device_detail(db, "dev-a")
        assert (
            "outside 2000..2100" in detail["last_rejection"]
            or "<= 86400" in detail["last_rejection"]  # the last poisoned record: a window too long
        )
        events = [e for e in detail["recent_events"] if e["event"] == "messages_rejected"]
        assert len(events) == 1, "one event per episode, not one per message"
        counted = {
            sample.labels["device"]: sample.value
            for family in metrics.fleet_metrics(db)
            if family.name == "greenfleet_device_rejected_messages"
            for sample in family.samples
        }
        assert counted["dev-a"] == 20 and counted.get("dev-b", 0) == 0
    finally:
        ctl.stop()


def test_a_read_only_consumer_reads_results_and_can_never_publish(
    site: Site, clients: Callable[..., Client]
) -> None:
    """Issue 15 (6): `greenfleet consumers add historian --read results,telemetry --site test`
    gives a historian a login that reads those channels of the site's devices (also with the
    README's mosquitto_sub line), publishes nothing, reads nothing else, and is gone when
    revoked."""
    import shutil

    env = {"GREENFLEET_HOME": str(site.home.root), "PYTHONPATH": str(REPO), "PATH": "/usr/bin"}

    def cli(*args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "controller.cli", "consumers", *args, "--json"],
            capture_output=True, text=True, env=env, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    added = cli("add", "historian", "--read", "results,telemetry", "--site", "test")
    assert added["username"] == "gf-consumer-historian" and added["reload"]["signalled"]
    user, password = added["username"], added["password"]
    historian = clients(site, user, password, protocol=mqtt.MQTTv5).connected()
    codes = historian.subscribe(
        p.subscription(p.Channel.RESULTS), p.subscription(p.Channel.TELEMETRY)
    )
    assert all(code.value < 128 for code in codes), codes
    a = clients(site, "dev-a", password_of(site, "dev-a")).connected()
    result, report = marker(), marker()
    a.publish(p.topic("dev-a", p.Channel.RESULTS), result)
    a.publish(p.topic("dev-a", p.Channel.TELEMETRY), report)
    historian.received(p.topic("dev-a", p.Channel.RESULTS), result)
    historian.received(p.topic("dev-a", p.Channel.TELEMETRY), report)
    # it can never publish, on any topic, nor read what it was not given
    for topic in (
        p.topic("dev-a", p.Channel.CMD),
        p.topic("dev-a", p.Channel.RESULTS),
        p.topic("dev-a", p.Channel.ACK),
        p.shared_blob_topic("a" * 64, 0),
        p.CONTROLLER_TOPIC,
    ):
        assert historian.publish(topic, marker()) == NOT_AUTHORIZED, topic
    # Mosquitto grants a SUBSCRIBE and applies the ACL at delivery: a command sent to dev-a
    # after it never reaches the historian (dev-a gets it, then a later result arrives)
    historian.subscribe(p.topic("dev-a", p.Channel.CMD))
    a.subscribe(p.topic("dev-a", p.Channel.CMD))
    command, after = marker(), marker()
    controller(site, clients).publish(p.topic("dev-a", p.Channel.CMD), command)
    a.received(p.topic("dev-a", p.Channel.CMD), command)
    a.publish(p.topic("dev-a", p.Channel.RESULTS), after)
    historian.received(p.topic("dev-a", p.Channel.RESULTS), after)
    assert not [m for t, m in historian.messages if t.endswith("/cmd")]
    # the README's mosquitto_sub line works against the generated config
    mosquitto_sub = shutil.which("mosquitto_sub")
    assert mosquitto_sub, "apt-get install -y mosquitto-clients (.ci/run does this)"
    sub = subprocess.Popen(
        [mosquitto_sub, "-h", "127.0.0.1", "-p", str(site.settings.port), "--cafile",
         str(site.files.ca), "--insecure", "-u", user, "-P", password,
         "-t", p.subscription(p.Channel.RESULTS), "-C", "1", "-v", "-W", "20"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = ""
        deadline = time.monotonic() + 20
        while sub.poll() is None and time.monotonic() < deadline:
            a.publish(p.topic("dev-a", p.Channel.RESULTS), b"via-mosquitto-sub")
            time.sleep(0.2)  # mosquitto_sub gives no readiness signal: publish until it reads
        line = sub.communicate(timeout=5)[0]
    finally:
        sub.kill()
    assert line.strip() == f"{p.topic('dev-a', p.Channel.RESULTS)} via-mosquitto-sub"
    listed = cli("list")
    assert [c["username"] for c in listed if c["status"] == "active"] == [user]
    cli("revoke", "historian")
    historian.wait(historian.disconnected.is_set, "the revoked consumer to be dropped")
    refused = clients(site, user, password).connack()
    assert refused is not None and refused.value == NOT_AUTHORIZED


FLOOD = 20_000


def test_a_device_flooding_chunk_requests_does_not_stop_anothers_transfer(
    site: Site, clients: Callable[..., Client], tmp_path: Path
) -> None:
    """dev-a, with its own login, floods its blob/req topic with garbage, with requests for
    chunks, and with requests naming chunk sizes of its choosing (issue 15 (2): each size used
    to be a new set of retained chunks that overwrote the ones other devices fetched); the
    controller's network thread never blocks on them and its memory does not grow with them
    (the blob server's queue is bounded, what does not fit is dropped and counted), the odd
    sizes are refused, and dev-b, asking as an agent does (again after a stall), gets the
    canonical chunk."""
    from benchmarks.model_push import build_model
    from controller.daemon import Controller
    from controller.db import open_db
    from model_store.catalog import Catalog

    version = Catalog(open_db(site.home.database), site.home.store).add(
        build_model(tmp_path / "m.onnx", seed=3, rows=64, cols=1100), "flood-test", "1.0.0"
    )
    conn = device_commands.controller_connection(site.home, None)
    daemon = Controller(
        site.home,
        "127.0.0.1",
        conn.port,
        username=conn.username,
        password=conn.password,
        tls=conn.tls,
        client_id=f"gf-controller-{uuid.uuid4().hex[:6]}",
    )
    daemon.start()
    try:
        assert daemon.link.connected.wait(10), site.log()
        for device in ("dev-a", "dev-b"):  # as if the controller had sent both this model
            daemon._sent.add((device, version.sha256))
        a = clients(site, "dev-a", password_of(site, "dev-a")).connected()
        b = clients(site, "dev-b", password_of(site, "dev-b")).connected()
        chunk = p.shared_blob_topic(version.sha256, 1)
        assert b.subscribe(chunk)[0].value < 128
        flood = p.topic("dev-a", p.Channel.BLOB_REQ)
        size = p.DEFAULT_CHUNK_SIZE

        def ask(first: int, chunk_size: int = size) -> bytes:
            return p.encode(
                p.BlobRequest(sha256=version.sha256, first=first, count=1, chunk_size=chunk_size)
            )

        odd = [ask(1, size - 1 - k % 1000) for k in range(FLOOD // 4)]
        sent = [
            a.client.publish(flood, [b"{garbage", ask(0), b"{garbage", odd[i // 4]][i % 4], qos=1)
            for i in range(FLOOD)
        ]
        request = ask(1)
        got_chunk = lambda: any(t == chunk for t, _ in b.messages)  # noqa: E731
        for _attempt in range(60):  # an agent asks again after a stall; here every second
            b.publish(p.topic("dev-b", p.Channel.BLOB_REQ), request)
            try:
                b.wait(got_chunk, "chunk 1 at dev-b", timeout=1.0)
                break
            except AssertionError:
                continue
        assert got_chunk(), f"dev-b never got its chunk; blob server {daemon.blobs.stats}"
        sent[-1].wait_for_publish(60)  # the broker has taken the whole flood
        stats = daemon.blobs.stats

        def accounted() -> int:  # served, rejected or dropped: none unaccounted
            return stats.requests + stats.rejected + stats.dropped

        deadline = time.monotonic() + 60
        while accounted() < FLOOD + 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a counter, not standing in for an acknowledgement
        assert accounted() >= FLOOD + 1, stats  # the flood and dev-b's request at least
        assert stats.rejected >= 1 and stats.rejected + stats.dropped >= FLOOD // 2, stats
        assert stats.refused >= 1, stats  # odd chunk sizes
        data = (site.home.store / version.sha256).read_bytes()
        assert {m for t, m in b.messages if t == chunk} == {data[size : 2 * size]}, (
            "dev-b got a chunk cut to dev-a's size"
        )
        assert stats.bytes_published <= len(data), stats  # one copy at most, whatever dev-a asks
        assert daemon.link.connected.is_set(), "the controller stayed on the broker"
    finally:
        daemon.stop()


def test_the_embedded_broker_says_it_is_for_demos_only(tmp_path: Path) -> None:
    port = free_port()
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin", "GREENFLEET_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "broker", "run", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)  # the demo broker's shutdown may take 5 + 5 s on a loaded machine
        if proc.stdout is not None:
            proc.stdout.close()
    text = "".join(lines)
    assert "FOR DEMOS ONLY" in text and "for demos only" in text, text
