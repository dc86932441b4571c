"""Broker transport settings: TLS files checked at start, plain TCP only to loopback or when
allowed (and then warned about), errors that name the setting to change."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import TlsConfig, load_config
from agent.errors import ConfigError
from agent.link import (
    HandshakeCut,
    MqttLink,
    check_transport,
    describe_tls_failure,
    is_loopback,
    tls_context,
)
from tests.tls_ca import TestCA


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.10.20.30", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("broker.localhost", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.5", False),
        ("192.168.1.10", False),
        ("::2", False),
        ("mqtt.plant-a.local", False),
        ("localhost.example.com", False),
        ("0.0.0.0", False),
        ("localhost.localdomain", True),
        ("", False),
    ],
)
def test_loopback_is_decided_from_the_setting_not_from_dns(host: str, loopback: bool) -> None:
    """One rule for the agent's plain-TCP check, the broker's plain listener and the API's
    token-free local access (they were three, and disagreed on ::ffff:127.0.0.1)."""
    from controller import api, broker_config

    assert is_loopback(host) is loopback
    assert broker_config.is_loopback(host) is loopback
    assert api.is_loopback(host) is loopback


def test_plain_tcp_is_allowed_to_loopback_and_refused_elsewhere_naming_the_settings() -> None:
    assert check_transport("127.0.0.1", None, False) is None
    assert check_transport("localhost", None, False) is None
    with pytest.raises(ConfigError) as err:
        check_transport("mqtt.plant-a.local", None, False)
    message = str(err.value)
    assert "broker.host mqtt.plant-a.local is not a loopback address" in message
    assert "broker.tls.ca_file" in message and "broker.allow_plaintext: true" in message
    with pytest.raises(ConfigError, match=r"input\.broker\.allow_plaintext"):
        check_transport("10.1.1.1", None, False, "input.broker")
    assert check_transport("mqtt.plant-a.local", None, True) is None


def _quiet_link(host: str, **kwargs: object) -> MqttLink:
    return MqttLink(client_id="t", host=host, port=1883, on_message=lambda t, m: None, **kwargs)  # type: ignore[arg-type]


def test_allowed_plain_tcp_is_warned_about_at_every_start(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="agent.link")
    for host, warned in (("10.0.0.5", True), ("127.0.0.1", False)):
        caplog.clear()
        link = _quiet_link(host, allow_plaintext=True)
        monkeypatch.setattr(link._client, "connect_async", lambda *a, **k: None)
        monkeypatch.setattr(link._client, "loop_start", lambda: None)
        link.start()
        link.start()  # a second start (a restarted agent) warns again
        warnings = [r for r in caplog.records if "plain TCP to a non-loopback broker" in r.message]
        assert len(warnings) == (2 if warned else 0), host
        if warned:
            assert warnings[0].levelno == logging.WARNING
            assert "credentials and models travel unencrypted" in warnings[0].message


def test_the_link_refuses_plain_tcp_to_a_remote_broker() -> None:
    with pytest.raises(ConfigError, match=r"broker\.allow_plaintext"):
        _quiet_link("10.0.0.5")


def test_missing_or_unreadable_tls_files_are_named(tmp_path: Path, ca: TestCA) -> None:
    missing = tmp_path / "nope" / "ca.pem"
    with pytest.raises(ConfigError) as err:
        check_transport("mqtt.example", TlsConfig(ca_file=missing), False)
    assert f"broker.tls.ca_file: cannot read {missing}" in str(err.value)
    assert "No such file" in str(err.value)

    ca_file = ca.write(tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match=r"broker\.tls\.cert_file: cannot read .*client\.pem"):
        tls_context(TlsConfig(ca_file=ca_file, cert_file=tmp_path / "client.pem"))
    cert, _ = ca.issue("dev", client=True).write(tmp_path, "dev")
    key = tmp_path / "missing.key"
    with pytest.raises(ConfigError, match=r"input\.broker\.tls\.key_file: cannot read"):
        tls_context(TlsConfig(ca_file=ca_file, cert_file=cert, key_file=key), "input.broker")


def test_tls_files_that_are_not_what_they_should_be(tmp_path: Path, ca: TestCA) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"broker\.tls\.ca_file: .*junk\.pem holds no usable PEM"):
        tls_context(TlsConfig(ca_file=junk))
    ca_file = ca.write(tmp_path / "ca.pem")
    cert, _ = ca.issue("dev", client=True).write(tmp_path, "dev")
    _, other_key = ca.issue("other", client=True).write(tmp_path, "other")
    with pytest.raises(ConfigError, match="matching unencrypted private key"):
        tls_context(TlsConfig(ca_file=ca_file, cert_file=cert, key_file=other_key))


def test_a_good_tls_setting_makes_a_strict_context(tmp_path: Path, ca: TestCA) -> None:
    ca_file = ca.write(tmp_path / "ca.pem")
    cert, key = ca.issue("dev", client=True).write(tmp_path, "dev")
    context = check_transport(
        "10.0.0.5", TlsConfig(ca_file=ca_file, cert_file=cert, key_file=key), False
    )
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert len(context.get_ca_certs()) == 1  # only the pinned CA, not the system store


def test_tls_paths_resolve_from_the_config_folder_and_a_key_needs_a_cert(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        "device_id: a\nbroker:\n  host: mqtt.example\n  port: 8883\n"
        "  tls: {ca_file: tls/ca.pem, cert_file: /abs/client.pem, key_file: tls/client.key}\n"
    )
    loaded = load_config(config, environ={})
    assert loaded.broker.tls is not None
    assert loaded.broker.tls.ca_file == tmp_path / "tls" / "ca.pem"
    assert loaded.broker.tls.cert_file == Path("/abs/client.pem")
    assert loaded.broker.tls.key_file == tmp_path / "tls" / "client.key"
    config.write_text("device_id: a\nbroker:\n  tls: {ca_file: ca.pem, key_file: k.pem}\n")
    with pytest.raises(ConfigError, match=r"broker\.tls: key_file is set without"):
        load_config(config, environ={})


def test_run_refuses_before_starting_and_names_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.yaml"
    config.write_text(f"device_id: a\nstate_dir: {state}\nbroker: {{host: 10.9.8.7}}\n")
    assert main(["run", "--config", str(config)]) == 2
    assert "broker.allow_plaintext" in capsys.readouterr().err
    assert not state.exists()  # refused before the agent counted a run or made its state
    config.write_text(
        f"device_id: a\nstate_dir: {state}\n"
        f"broker: {{host: 10.9.8.7, tls: {{ca_file: {tmp_path / 'gone.pem'}}}}}\n"
    )
    assert main(["run", "--config", str(config)]) == 2
    assert f"broker.tls.ca_file: cannot read {tmp_path / 'gone.pem'}" in capsys.readouterr().err
    config.write_text(
        f"device_id: a\nstate_dir: {state}\n"
        "input: {type: mqtt, topic: plc/x, broker: {host: plc.lan}}\n"
    )
    assert main(["run", "--config", str(config)]) == 2
    assert "input.broker.host plc.lan" in capsys.readouterr().err


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.verify_code, error.verify_message = code, message
    return error


@pytest.mark.parametrize(
    "error, needle",
    [
        (_verify_error(62, "Hostname mismatch"), "set broker.tls.server_name"),
        (_verify_error(20, "unable to get local issuer certificate"), "not signed by the pinned"),
        (_verify_error(10, "certificate has expired"), "check this device's clock"),
        (HandshakeCut("[Errno 104] Connection reset by peer"), "is broker.port its TLS listener"),
        (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]"), "client certificate"),
    ],
)
def test_handshake_failures_are_explained(error: ssl.SSLError, needle: str) -> None:
    tls = TlsConfig(ca_file=Path("/etc/greenfleet/tls/ca.pem"))
    assert needle in describe_tls_failure(error, tls, "mqtt.example", "broker")
