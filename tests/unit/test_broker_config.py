"""controller.broker_config and the enrollment commands: the generated Mosquitto files, rule by
rule, the bundle ``devices add`` writes, and how ``controller run`` logs in."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
import yaml

from agent import protocol as p
from agent.config import parse_config
from agent.enrollment import Bundle
from controller import broker_config as bc
from controller import device_commands, identity
from controller.cli import main
from controller.db import open_db
from controller.errors import InvalidRequest
from controller.home import Home
from device_configs.schema import load_profiles

SHA = "ab" * 32


# ------------------------------------------------------------------- the ACL, as Mosquitto reads it


def acl_rules(text: str, user: str) -> list[tuple[str, str]]:
    """``(access, topic)`` rules that apply to ``user``: its ``user`` section and every
    ``pattern`` with %u replaced (Mosquitto's acl_file semantics)."""
    rules: list[tuple[str, str]] = []
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split(" ", 2)
        if words[0] == "user":
            current = words[1]
        elif words[0] == "pattern":
            rules.append((words[1], words[2].replace("%u", user)))
        elif words[0] == "topic" and current == user:
            rules.append((words[1], words[2]))
        elif words[0] == "topic":
            assert current is not None, f"a rule for anonymous clients: {line}"
    return rules


def allowed(text: str, user: str, access: str, topic: str) -> bool:
    """Mosquitto's check: a matching ``deny`` refuses; else any matching grant allows."""
    rules = acl_rules(text, user)
    if any(a == "deny" and mqtt.topic_matches_sub(t, topic) for a, t in rules):
        return False
    return any(a in (access, "readwrite") and mqtt.topic_matches_sub(t, topic) for a, t in rules)


def own(device: str) -> dict[str, str]:
    return {
        "state": p.topic(device, p.Channel.STATE),
        "cmd": p.topic(device, p.Channel.CMD),
        "reply": p.topic(device, p.Channel.REPLY),
        "events": p.topic(device, p.Channel.EVENTS),
        "telemetry": p.topic(device, p.Channel.TELEMETRY),
        "results": p.topic(device, p.Channel.RESULTS),
        "blob_req": p.topic(device, p.Channel.BLOB_REQ),
        "chunk": p.blob_topic(device, SHA, 3),
    }


DEVICE_WRITES = {"state", "reply", "events", "telemetry", "results", "blob_req"}
DEVICE_READS = {"state", "cmd", "chunk"}


def test_a_device_writes_and_reads_its_own_topics_only() -> None:
    text = bc.acl_text()
    mine, theirs = own("press-1"), own("press-2")
    for name, topic in mine.items():
        assert allowed(text, "press-1", "write", topic) == (name in DEVICE_WRITES), name
        assert allowed(text, "press-1", "read", topic) == (name in DEVICE_READS), name
    for name, topic in theirs.items():
        assert not allowed(text, "press-1", "write", topic), name
        assert not allowed(text, "press-1", "read", topic), name
    assert allowed(text, "press-1", "read", p.CONTROLLER_TOPIC)
    assert not allowed(text, "press-1", "write", p.CONTROLLER_TOPIC)
    for topic in ("gf/v1/press-1", "other/topic", "$SYS/broker/clients/total", "gf/v1"):
        assert not allowed(text, "press-1", "write", topic)
        assert not allowed(text, "press-1", "read", topic)


def test_no_device_may_write_a_cmd_topic() -> None:
    text = bc.acl_text()
    for device in ("press-1", "cam.2", "x"):
        for target in ("press-1", "cam.2", "x", "gf-controller"):
            assert not allowed(text, device, "write", p.topic(target, p.Channel.CMD))
    # nor through a pattern: every write rule of a device names its own, non-cmd, channel
    for access, topic in acl_rules(text, "%u"):
        if "write" in access:
            assert topic.startswith("gf/v1/%u/") and not topic.endswith("/cmd"), topic


def test_the_controller_has_what_it_subscribes_to_and_publishes() -> None:
    text = bc.acl_text()
    user = identity.CONTROLLER_USER
    topics = own("press-1")
    for name in ("state", "reply", "events", "telemetry", "blob_req"):
        assert allowed(text, user, "read", topics[name]), name
        assert allowed(text, user, "read", p.subscription(p.Channel(name.replace("_", "/"))))
    for name in ("cmd", "chunk"):
        assert allowed(text, user, "write", topics[name]), name
    assert allowed(text, user, "write", p.topic("press-1", p.Channel.ACK))
    # state is written only to delete a revoked device's retained birth
    assert allowed(text, user, "write", topics["state"])
    for name in ("telemetry", "reply", "events", "blob_req"):
        assert not allowed(text, user, "write", topics[name]), name  # cannot forge reports
    assert allowed(text, user, "read", p.CONTROLLER_TOPIC)
    assert allowed(text, user, "write", p.CONTROLLER_TOPIC)


def test_a_revoked_device_is_denied_everything() -> None:
    text = bc.acl_text(["cam-9"])
    for topic in own("cam-9").values():
        assert not allowed(text, "cam-9", "write", topic)
        assert not allowed(text, "cam-9", "read", topic)
    assert not allowed(text, "cam-9", "read", p.CONTROLLER_TOPIC)
    assert allowed(text, "cam-8", "write", own("cam-8")["telemetry"])


# ----------------------------------------------------------------------------- mosquitto.conf


def directives(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line and not line.startswith("#")]


def sections(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(general settings, one dict per listener) of a mosquitto.conf."""
    general: dict[str, str] = {}
    listeners: list[dict[str, str]] = []
    for words in directives(text):
        if words[0] == "listener":
            listeners.append({"port": words[1], "bind": words[2] if len(words) > 2 else "*"})
        elif listeners:
            listeners[-1][words[0]] = " ".join(words[1:])
        else:
            general[words[0]] = " ".join(words[1:])
    return general, listeners


def test_conf_has_tls_listeners_no_anonymous_and_persistence(tmp_path: Path) -> None:
    settings = bc.BrokerSettings(out_dir=tmp_path, port=8883, cert_port=8884, plain_port=1883)
    files = bc.BrokerFiles.at(tmp_path)
    general, listeners = sections(bc.conf_text(settings, files))
    assert general["allow_anonymous"] == "false"
    assert general["per_listener_settings"] == "false"
    assert general["password_file"] == str(files.passwd)
    assert general["acl_file"] == str(files.acl)
    assert general["persistence"] == "true"
    assert general["persistence_location"] == f"{tmp_path / 'data'}/"
    assert int(general["max_queued_messages"]) >= 100_000
    assert general["set_tcp_nodelay"] == "true"
    password, cert, plain = listeners
    assert password["port"] == "8883" and password["bind"] == "*"
    assert password["certfile"] == str(files.server_cert)
    assert password["keyfile"] == str(files.server_key)
    assert password["require_certificate"] == "false"
    assert cert["port"] == "8884"
    assert cert["require_certificate"] == "true"
    assert cert["use_identity_as_username"] == "true"
    assert cert["crlfile"] == str(files.crl) and cert["cafile"] == str(files.ca)
    assert plain == {
        "port": "1883",
        "bind": "127.0.0.1",
        "protocol": "mqtt",
        "use_username_as_clientid": "true",
    }
    # every listener: the client id is the login, so no client can take another's session
    assert all(entry["use_username_as_clientid"] == "true" for entry in listeners)


def test_plain_tcp_off_loopback_needs_allow_plaintext(tmp_path: Path) -> None:
    settings = bc.BrokerSettings(out_dir=tmp_path, plain_port=1883, plain_bind="0.0.0.0")
    with pytest.raises(InvalidRequest, match="allow-plaintext"):
        bc.check_settings(settings)
    allowed_plain = settings.model_copy(update={"allow_plaintext": True})
    (warning,) = bc.check_settings(allowed_plain)
    assert "unencrypted" in warning
    with pytest.raises(InvalidRequest, match="differ"):
        bc.check_settings(bc.BrokerSettings(out_dir=tmp_path, port=8883, cert_port=8883))
    no_cert = bc.BrokerSettings(out_dir=tmp_path, cert_port=None)
    _, listeners = sections(bc.conf_text(no_cert, bc.BrokerFiles.at(tmp_path)))
    assert [entry["port"] for entry in listeners] == ["8883"]


# --------------------------------------------------------------------------- files, from the DB


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    monkeypatch.setenv("GREENFLEET_HOME", str(tmp_path / "home"))
    return Home.from_env().prepare()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_regenerated_from_the_database(home: Home) -> None:
    db = open_db(home.database)
    settings = bc.BrokerSettings(out_dir=home.broker_dir, hosts=["broker.local"])
    files = bc.write_broker_files(db, home, settings)
    for path in (files.server_key, files.passwd, home.pki / "ca.key", home.controller_credentials):
        assert mode(path) == 0o600, path
    workers = [f"gf-ingest-{i}" for i in range(bc.MAX_INGEST_WORKERS)]
    assert [line.split(":")[0] for line in files.passwd.read_text().splitlines()] == [
        "gf-controller",
        *workers,
    ]
    hashes = {line.split(":", 1)[1] for line in files.passwd.read_text().splitlines()}
    assert len(hashes) == 1, "each ingest worker logs in with the controller's password"
    first = {path.name: path.read_text() for path in files.dir.iterdir() if path.is_file()}
    added = device_commands.add_device(home, "press-1", device_class="rpi5", db=db)
    assert added.reload is not None and not added.reload.signalled  # no broker running
    users = [line.split(":")[0] for line in files.passwd.read_text().splitlines()]
    assert users == ["gf-controller", "press-1", *workers]
    device_commands.revoke_device(home, "press-1", db=db)
    assert [line.split(":")[0] for line in files.passwd.read_text().splitlines()] == [
        "gf-controller",
        *workers,
    ]
    assert "user press-1\ntopic deny #" in files.acl.read_text()
    # idempotent: writing again changes nothing but the ACL's revoked section
    bc.write_broker_files(db, home)
    now = {path.name: path.read_text() for path in files.dir.iterdir() if path.is_file()}
    assert {k for k in first if first[k] != now[k]} == {bc.ACL}
    assert bc.load_settings(db) == settings.model_copy(update={"out_dir": home.broker_dir})


def test_server_certificate_follows_the_host_names(home: Home) -> None:
    db = open_db(home.database)
    bc.write_broker_files(db, home, bc.BrokerSettings(out_dir=home.broker_dir, hosts=["a.local"]))
    first = (home.broker_dir / bc.SERVER_CERT).read_text()
    bc.write_broker_files(db, home)
    assert (home.broker_dir / bc.SERVER_CERT).read_text() == first  # unchanged names: kept
    bc.write_broker_files(db, home, bc.BrokerSettings(out_dir=home.broker_dir, hosts=["b.local"]))
    assert (home.broker_dir / bc.SERVER_CERT).read_text() != first


def test_reload_signals_only_our_mosquitto(home: Home) -> None:
    files = bc.BrokerFiles.at(home.broker_dir)
    assert not bc.reload_broker(files).signalled  # no pid file
    home.broker_dir.mkdir(parents=True, exist_ok=True)
    files.pid.write_text(f"{os.getpid()}\n")  # pytest: not a mosquitto
    result = bc.reload_broker(files)
    assert not result.signalled and "not a Mosquitto" in result.message
    assert result.command == f"kill -HUP $(cat {files.pid})"


# --------------------------------------------------------------------------------- the bundle


def test_devices_add_writes_a_private_bundle_the_agent_accepts(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["broker", "config", "--host", "broker.plant-a.local", "--json"]) == 0
    capsys.readouterr()
    code = main(
        [
            "devices",
            "add",
            "press-1",
            "--profile",
            "rpi5",
            "--site",
            "plant-a",
            "--labels",
            "line=3,cell=b",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["broker"] == "broker.plant-a.local:8883" and out["auth"] == "password"
    path = Path(out["bundle"])
    assert path == home.enrollments / "press-1.yaml" and mode(path) == 0o600
    assert mode(home.enrollments) == 0o700
    bundle = msgspec.convert(yaml.safe_load(path.read_text()), Bundle)
    assert bundle.labels == {"line": "3", "cell": "b", "site": "plant-a"}
    assert bundle.broker.username == "press-1" and bundle.broker.password
    assert bundle.broker.ca_pem == (home.pki / "ca.pem").read_text()
    assert bundle.broker.cert_pem is None and not bundle.broker.allow_plaintext
    assert bundle.controller_keys == [(home.keys / "signing.pub").read_text().strip()]
    profile = load_profiles()["rpi5"]
    assert bundle.power == {
        "idle_w": profile.power.idle_w,
        "active_w_per_core": profile.power.active_w_per_core,
    }
    # what `greenfleet-agent install` makes of it is a valid agent config
    parse_config(
        {
            "device_id": bundle.device_id,
            "device_class": bundle.device_class,
            "labels": bundle.labels,
            "power": bundle.power,
            "controller_keys": bundle.controller_keys,
        }
    )
    db = open_db(home.database)
    passwd = dict(identity.password_entries(db))
    assert identity.verify_password(bundle.broker.password or "", passwd["press-1"])


def test_cert_enrollment_and_revocation_take_json(
    home: Home, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "cam.yaml"
    code = main(
        [
            "devices",
            "add",
            "cam-1",
            "--profile",
            "jetson-orin-nano",
            "--auth",
            "cert",
            "--broker",
            "10.0.0.5:8884",
            "--out",
            str(out_file),
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["reload"] is None and out["broker"] == "10.0.0.5:8884"
    assert any("broker config" in w for w in out["warnings"])  # not written yet
    bundle = msgspec.convert(yaml.safe_load(out_file.read_text()), Bundle)
    assert bundle.broker.username is None and bundle.broker.password is None
    assert bundle.broker.cert_pem and bundle.broker.key_pem and mode(out_file) == 0o600
    assert main(["devices", "revoke", "cam-1", "--reason", "stolen", "--json"]) == 0
    revoked = json.loads(capsys.readouterr().out)
    assert revoked["device"] == "cam-1" and revoked["auth"] == "cert"
    assert len(revoked["revoked_serials"]) == 1
    assert main(["devices", "identities", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "revoked" and row["seen"] == "never seen"


def test_devices_add_refuses_unknown_classes_and_missing_broker(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["devices", "add", "x-1", "--profile", "toaster", "--broker", "h:1"]) == 1
    assert "unknown device class 'toaster'" in capsys.readouterr().err
    assert main(["devices", "add", "x-1", "--profile", "rpi5"]) == 1
    assert "broker config --host" in capsys.readouterr().err
    assert main(["devices", "add", "gf-controller", "--profile", "rpi5", "--broker", "h:1"]) == 1
    assert "reserved" in capsys.readouterr().err


def test_embedded_broker_help_says_demo_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["broker", "run", "--help"])
    assert "demos only" in capsys.readouterr().out


# --------------------------------------------------------------------------- controller login


def test_controller_uses_the_home_credentials_over_tls(home: Home) -> None:
    plain = device_commands.controller_connection(home, None)
    assert (plain.host, plain.port, plain.tls, plain.username) == ("127.0.0.1", 1883, None, None)
    db = open_db(home.database)
    bc.write_broker_files(db, home, bc.BrokerSettings(out_dir=home.broker_dir, port=18883))
    conn = device_commands.controller_connection(home, None)
    assert (conn.host, conn.port, conn.username) == ("127.0.0.1", 18883, "gf-controller")
    assert conn.tls is not None and conn.tls.ca_file == home.pki / "ca.pem"
    entries = dict(identity.password_entries(db))
    assert identity.verify_password(conn.password or "", entries["gf-controller"])
    other = device_commands.controller_connection(home, "broker.local:9999")
    assert (other.host, other.port, other.tls) == ("broker.local", 9999, conn.tls)
    forced = device_commands.controller_connection(home, None, plain=True)
    assert forced.tls is None and forced.port == 1883


def test_the_embedded_broker_without_amqtt_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """amqtt is the `demo` extra, not a controller dependency: its absence is one line."""
    import sys

    from controller.broker import EmbeddedBroker
    from controller.errors import InvalidRequest

    monkeypatch.setitem(sys.modules, "amqtt.broker", None)  # import fails as if not installed
    with pytest.raises(InvalidRequest, match=r"pip install 'greenfleet\[demo\]'"):
        EmbeddedBroker().start()
