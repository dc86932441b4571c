"""The MQTT connection, with the hygiene every greenfleet process needs.

- subscriptions are made in ``on_connect``, so a reconnect resubscribes;
- an optional retained birth is published on every connect, with a last will set before it;
- reconnects back off exponentially up to a cap (paho's own reconnect loop);
- a QoS 1 message stays with paho until its PUBACK and is sent again after a reconnect; the
  handle ``publish`` returns says so, so the outbox does not send it a second time;
- TCP_NODELAY on the socket, so small request/response exchanges are not held back;
- refused credentials are fatal and stop the loop instead of hammering the broker;
- TLS with the broker's CA pinned (and a client certificate for certificate auth); plain TCP
  only to a loopback broker or where ``allow_plaintext`` says so, with a warning at every start.
  A failed handshake (wrong CA, name mismatch, expired certificate) is logged saying what to
  check and retried with the same backoff as an unreachable broker;
- the message callback only hands ``(topic, payload)`` to a handler that must enqueue; any
  exception it raises is logged with the topic and never reaches paho's network thread;
- optionally (``on_message_acked``, the controller's ingest workers) a QoS 1 message is
  acknowledged only when the handler says it is stored, so one that dies with the process is
  sent again by the broker on the next connect of the same session; with ``mqtt5`` the session
  outlives the connection by ``session_expiry_s`` and the broker sends at most
  ``receive_maximum`` unacknowledged messages at once (MQTT 5 shared subscriptions need v5).

The controller uses this class too: it is the one place that knows paho's API.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import ipaddress
import logging
import socket
import ssl
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from agent.config import TlsConfig
from agent.errors import BrokerAuthError, ConfigError


class _LoadedOnFirstUse(types.ModuleType):
    """A module that is imported but not used: its code runs on the first read of an
    attribute it does not have yet, in this same module object (so a later patch, reload or
    ``install_opener`` acts on the one module everyone holds). paho imports
    ``urllib.request`` (with http.client and the email package, ~1.6 MiB of an agent's RSS)
    only to look up proxies when PySocks is installed, which the agent's install does not do,
    so an agent never reads it; with PySocks, paho's first connect reads it and it loads then.
    ``importlib.util.LazyLoader`` does not do here: Python 3.11's import statement reads the
    lazy module's ``__spec__``, and that loads it."""

    _lock = threading.RLock()  # two threads' first reads run the module once

    def __getattr__(self, name: str) -> Any:
        with self._lock:
            state = self.__dict__
            if type(self) is _LoadedOnFirstUse and not state.get("_gf_loading"):
                state["_gf_loading"] = True  # a read while it runs: a partial module's answer
                try:
                    self.__spec__.loader.exec_module(self)  # type: ignore[union-attr]
                finally:
                    del state["_gf_loading"]
                self.__class__ = types.ModuleType  # type: ignore[assignment]
            if name in state:
                return state[name]
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


def _defer_import(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)  # __file__, __spec__, ... but no code run
    module.__class__ = _LoadedOnFirstUse
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


_defer_import("urllib.request")  # with PySocks installed, paho's first connect loads it

import paho.mqtt.client as mqtt  # noqa: E402  (after the stand-in above)
from paho.mqtt.client import topic_matches_sub  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402

__all__ = ["MqttLink", "Will", "topic_matches_sub"]

log = logging.getLogger(__name__)

# MQTT 5 reason codes (paho maps 3.1.1 return codes 4 and 5 onto them) that retrying cannot fix.
FATAL_CONNECT_CODES = {134, 135, 138, 140}

PLAINTEXT_WARNING = (
    "plain TCP to a non-loopback broker %s:%s: credentials and models travel unencrypted "
    "(%s.allow_plaintext is set; set %s.tls to encrypt)"
)
TLS_RELOG_S = 300.0  # the same TLS failure is logged again at most this often while retrying

# OpenSSL X509_V_ERR_* codes the handshake failure message explains.
_HOSTNAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NOT_YET_VALID, _EXPIRED = 9, 10


LOOPBACK_NAMES = frozenset(
    {"localhost", "localhost.", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` (and ``*.localhost``) and loopback addresses (127.0.0.0/8, ::1,
    an IPv4-mapped 127.x). The one rule for every "is this this machine?" question: the agent's
    plain-TCP check, the broker config's plain listener and the API's token-free local access.

    Names are not resolved: what counts is what the config says, not what DNS answers today.
    """
    name = host.strip().lower().strip("[]")
    if name in LOOPBACK_NAMES:
        return True
    if name.endswith((".localhost", ".localhost.")):
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class HandshakeCut(ssl.SSLError):
    """The broker closed the connection, or never answered, during the TLS handshake."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "connection cut during the TLS handshake"


class _ClosingSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails: paho drops the socket without closing it, and
    each retry against a broker we do not trust would leave one behind for the collector."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except ssl.SSLError:
            self.close()
            raise
        except OSError as exc:  # reset or timed out: the peer is there but does not speak TLS
            self.close()
            raise HandshakeCut(str(exc)) from exc
        except BaseException:
            self.close()
            raise

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        """Keep a TLS alert for the log: with TLS 1.3 a broker that rejects the client
        certificate says so after the handshake, on the first read, which paho only logs."""
        try:
            return super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            if isinstance(self.context, _PinnedContext):
                self.context.read_error = exc
            raise


class _PinnedContext(ssl.SSLContext):
    """An SSL context that checks the broker certificate against ``server_name`` when set
    (the broker is reached by an address its certificate does not name), else the host."""

    server_name: str | None = None
    read_error: ssl.SSLError | None = None  # the last TLS error a read raised
    sslsocket_class = _ClosingSocket

    def wrap_socket(
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name or server_hostname,
            session=session,
        )


def _no_password(*_: Any) -> bytes:
    """Password callback for an encrypted key: never prompt on a terminal (a service has none)."""
    return b""


def tls_context(tls: TlsConfig, setting: str = "broker") -> ssl.SSLContext:
    """A client context that trusts only ``tls.ca_file``, needs TLS 1.2+ and checks the name;
    ConfigError naming the setting and the file when a file is missing or not what it should be.
    """
    files = [("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file)]
    for key, path in files:
        if path is None:
            continue
        try:
            with Path(path).open("rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise ConfigError(
                f"{setting}.tls.{key}: cannot read {path}: {exc.strerror or exc}"
                + (
                    " (the agent runs as the service user: the file must be readable by it)"
                    if isinstance(exc, PermissionError)
                    else ""
                )
            ) from exc
    if tls.key_file is not None and tls.cert_file is None:
        raise ConfigError(f"{setting}.tls.key_file is set without {setting}.tls.cert_file")
    context = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.server_name = tls.server_name
    try:
        context.load_verify_locations(cafile=str(tls.ca_file))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"{setting}.tls.ca_file: {tls.ca_file} holds no usable PEM CA certificate ({exc})"
        ) from exc
    if tls.cert_file is not None:
        try:
            context.load_cert_chain(
                str(tls.cert_file),
                str(tls.key_file) if tls.key_file is not None else None,
                password=_no_password,
            )
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"{setting}.tls.cert_file/key_file: {tls.cert_file} and "
                f"{tls.key_file or '(key in the same file)'} are not a PEM certificate and its "
                f"matching unencrypted private key ({exc})"
            ) from exc
    return context


def check_transport(
    host: str, tls: TlsConfig | None, allow_plaintext: bool, setting: str = "broker"
) -> ssl.SSLContext | None:
    """The TLS context to connect to ``host`` with, or None for plain TCP where that is allowed
    (a loopback broker, or ``allow_plaintext``); ConfigError naming the setting otherwise."""
    if tls is not None:
        return tls_context(tls, setting)
    if not (allow_plaintext or is_loopback(host)):
        raise ConfigError(
            f"{setting}.host {host} is not a loopback address and {setting}.tls is not set: "
            "the agent will not send its credentials and models over plain TCP. Set "
            f"{setting}.tls.ca_file (the CA from the enrollment bundle) and the broker's TLS "
            f"port, or, on a network you trust, {setting}.allow_plaintext: true"
        )
    return None


def describe_tls_failure(exc: BaseException, tls: TlsConfig, host: str, setting: str) -> str:
    """What a failed handshake means and what to check, for the log."""
    name = tls.server_name or host
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, why = exc.verify_code, exc.verify_message
        if code in _HOSTNAME_MISMATCH:
            return (
                f"the broker's certificate is not valid for the name {name!r} ({why}); connect "
                f"by a name the certificate holds ({setting}.host) or set {setting}.tls."
                "server_name to the name it was issued for"
            )
        if code in (_EXPIRED, _NOT_YET_VALID):
            return (
                f"the broker's certificate is outside its validity period ({why}); renew it, "
                "or check this device's clock"
            )
        return (
            f"the broker's certificate is not signed by the pinned CA {tls.ca_file} ({why}); "
            f"check that {setting}.tls.ca_file is the CA from this fleet's enrollment bundle and "
            f"that {setting}.host/port is this fleet's broker"
        )
    reason = (getattr(exc, "reason", None) or str(exc)).upper()
    if isinstance(exc, HandshakeCut) or "WRONG_VERSION_NUMBER" in reason or "TOO_LONG" in reason:
        return (
            f"the broker did not answer in TLS ({exc}); is {setting}.port its TLS listener "
            "(usually 8883) rather than a plain-TCP one?"
        )
    if any(word in reason for word in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA")):
        return (
            f"the broker rejected this device's client certificate ({exc}); check "
            f"{setting}.tls.cert_file/key_file: issued by the fleet CA, not expired or revoked"
        )
    if "PROTOCOL_VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
        return f"the broker does not speak TLS 1.2 or later ({exc}), which the agent requires"
    return f"{exc}; check {setting}.tls and that {setting}.port is the broker's TLS listener"


class Will(msgspec.Struct, frozen=True):
    """A message the broker publishes for us if we vanish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Delivery:
    """What :meth:`MqttLink.publish` returns: paho's ``MQTTMessageInfo`` and what paho will do.

    ``resent_on_reconnect``: paho keeps an unacknowledged QoS 1/2 message and sends it again by
    itself after a reconnect, so a caller with its own resend logic (the agent's outbox sender)
    must not send it a second time.
    """

    __slots__ = ("info", "resent_on_reconnect")

    def __init__(self, info: mqtt.MQTTMessageInfo, qos: int) -> None:
        self.info = info
        self.resent_on_reconnect = qos > 0

    @property
    def mid(self) -> int:
        return self.info.mid

    @property
    def rc(self) -> MQTTErrorCode:
        return self.info.rc

    def is_published(self) -> bool:
        """True once the broker has acknowledged it; RuntimeError/ValueError if it never will."""
        return self.info.is_published()

    def wait_for_publish(self, timeout: float | None = None) -> None:
        self.info.wait_for_publish(timeout)


def _no_delay(sock: Any) -> None:
    """Disable Nagle's algorithm: chunk requests are small, and waiting for the delayed ACK
    (40 ms on Linux) cut model transfer to a tenth of the broker's throughput."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttLink:
    """A paho client wired for greenfleet; construct, then :meth:`start`.

    ``tls``: connect over TLS, trusting only its CA (and presenting its client certificate, if
    any). Without it the connection is plain TCP, which the constructor refuses (ConfigError)
    for a non-loopback host unless ``allow_plaintext``. ``setting`` is the config key the
    error and log messages name (``broker``, ``input.broker``, ...). ConfigError also when a
    TLS file is missing or unreadable.
    """

    def __init__(
        self,
        *,
        client_id: str,
        host: str,
        port: int,
        on_message: Callable[[str, bytes], None] | None = None,
        on_message_acked: Callable[[str, bytes, Callable[[], None]], None] | None = None,
        subscriptions: Sequence[tuple[str, int]] = (),
        username: str | None = None,
        password: str | None = None,
        keepalive_s: int = 30,
        will: Will | None = None,
        birth: Callable[[], tuple[str, bytes]] | None = None,
        on_connected: Callable[[], None] | None = None,
        clean_session: bool = False,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        max_inflight: int = 64,
        tls: TlsConfig | None = None,
        allow_plaintext: bool = False,
        setting: str = "broker",
        mqtt5: bool = False,
        session_expiry_s: int = 7 * 24 * 3600,
        receive_maximum: int | None = None,
    ) -> None:
        if (on_message is None) == (on_message_acked is None):
            raise TypeError("MqttLink needs exactly one of on_message and on_message_acked")
        self.host, self.port = host, port
        self._tls = tls
        self._setting = setting
        context = check_transport(host, tls, allow_plaintext, setting)
        self._context = context if isinstance(context, _PinnedContext) else None
        self._tls_failure: tuple[str, float] | None = None  # last logged, and when
        self._awaiting_connack = False
        self._handler = on_message
        self._acked_handler = on_message_acked
        self._mqtt5 = mqtt5
        self._connect_properties: Properties | None = None
        if mqtt5:
            # clean_start False + an expiry: the broker keeps the session (subscriptions,
            # unacknowledged and queued messages) while this process restarts
            self._connect_properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            self._connect_properties.SessionExpiryInterval = (
                session_expiry_s if not clean_session else 0
            )
            if receive_maximum is not None:
                self._connect_properties.ReceiveMaximum = receive_maximum
        self._subscriptions = list(subscriptions)
        self._dropped: list[str] = []  # unsubscribed while offline: sent at the next connect
        self._birth = birth
        self._on_connected = on_connected
        self._keepalive = keepalive_s
        self.connected = threading.Event()
        # set once the broker has acknowledged (SUBACK) every subscription made at connect
        self.subscribed = threading.Event()
        self._awaiting_subacks: set[int] = set()
        self.fatal: BrokerAuthError | None = None
        self._ever_connected = False
        self._warned_unreachable = False
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
            clean_session=None if mqtt5 else clean_session,
            manual_ack=on_message_acked is not None,
        )
        self._clean_start = clean_session
        if context is not None:
            self._client.tls_set_context(context)
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.reconnect_delay_set(
            min_delay=max(1, int(reconnect_min_s)), max_delay=int(reconnect_max_s)
        )
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._client.on_socket_open = self._on_socket_open

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; an unreachable broker is retried, never fatal."""
        if self._tls is None and not is_loopback(self.host):
            log.warning(PLAINTEXT_WARNING, self.host, self.port, self._setting, self._setting)
        if self._mqtt5:
            self._client.connect_async(
                self.host,
                self.port,
                keepalive=self._keepalive,
                clean_start=self._clean_start,
                properties=self._connect_properties,
            )
        else:
            self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()

    def stop(self, last: tuple[str, bytes] | None = None, end_session: bool = False) -> None:
        """Publish ``last`` (e.g. a clean Death), disconnect and stop the network thread.

        ``end_session`` (MQTT 5): tell the broker to drop the session now instead of keeping
        it for ``session_expiry_s``; its subscriptions go with it."""
        if last is not None and self.connected.is_set():
            info = self._client.publish(last[0], last[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        properties = None
        if end_session and self._mqtt5:
            properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
        self._client.disconnect(properties=properties)
        self._client.loop_stop()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and after every reconnect."""
        self.subscribe_all([topic], qos)

    def subscribe_all(self, topics: list[str], qos: int = 1) -> None:
        """Add subscriptions now (one SUBSCRIBE) and after every reconnect.

        Sent whenever paho has a connection (a duplicate SUBSCRIBE is harmless), so that a
        subscription added while ``_on_connect`` runs is not lost until the next reconnect.
        """
        known = set(self._subscriptions)
        self._subscriptions = [
            *self._subscriptions,
            *((t, qos) for t in topics if (t, qos) not in known),
        ]
        # MQTT_ERR_NO_CONN offline: _on_connect sends them
        self._client.subscribe([(topic, qos) for topic in topics])

    def unsubscribe(self, topic: str) -> None:
        """Drop a subscription now and for later reconnects."""
        self.unsubscribe_all([topic])

    def unsubscribe_all(self, topics: list[str]) -> None:
        """Drop subscriptions now (one UNSUBSCRIBE) and for later reconnects.

        Offline, the UNSUBSCRIBE is sent at the next connect: the session is persistent, so the
        broker would otherwise keep the subscription.
        """
        gone = set(topics)
        self._subscriptions = [s for s in self._subscriptions if s[0] not in gone]
        rc, _mid = self._client.unsubscribe(topics)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._dropped = [*self._dropped, *topics]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        """Queue a message; the returned handle says when the broker has acknowledged it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN:
            # Published in the moment between losing the socket and noticing it: paho keeps the
            # message and sends it after the reconnect, but its info would report a failure for
            # ever, and the outbox would send it again. It is queued, not failed.
            info.rc = mqtt.MQTT_ERR_SUCCESS
        return Delivery(info, qos)

    # -- paho callbacks (network thread) -----------------------------------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        _no_delay(sock)
        self._awaiting_connack = True

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self._awaiting_connack = False
        if rc.is_failure:
            if rc.value in FATAL_CONNECT_CODES:
                self.fatal = BrokerAuthError(
                    f"broker {self.host}:{self.port} refused the connection: {rc}. "
                    "Check the username/password (or certificate) in the config; "
                    "not retrying with credentials the broker rejects."
                )
                log.error("%s", self.fatal)
                threading.Thread(target=self._give_up, daemon=True).start()
            else:
                log.warning("broker %s:%s refused the connection: %s", self.host, self.port, rc)
            return
        self._warned_unreachable = False
        self._tls_failure = None
        dropped, self._dropped = self._dropped, []
        for topic in dropped:
            if topic not in {t for t, _ in self._subscriptions}:
                client.unsubscribe(topic)
        self.subscribed.clear()
        self._awaiting_subacks = set()
        for topic, qos in self._subscriptions:
            self._awaiting_subacks.add(client.subscribe(topic, qos)[1] or 0)
        if not self._awaiting_subacks:
            self.subscribed.set()
        if self._birth is not None:
            birth_topic, payload = self._birth()
            client.publish(birth_topic, payload, qos=1, retain=True)
        log.info(
            "%s to broker %s:%s",
            "reconnected" if self._ever_connected else "connected",
            self.host,
            self.port,
        )
        self._ever_connected = True
        self.connected.set()
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:
                log.exception("on_connected hook failed")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, *_: Any) -> None:
        if mid in self._awaiting_subacks:
            self._awaiting_subacks.discard(mid)
            if not self._awaiting_subacks:
                self.subscribed.set()

    def _give_up(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self.connected.clear()
        awaiting, self._awaiting_connack = self._awaiting_connack, False
        if awaiting and rc.is_failure:
            # Closed before the broker answered CONNECT: with TLS 1.3, how a rejected client
            # certificate shows (a TLS alert on the first read); without TLS, what a TLS-only
            # port does; or just a network that dropped us at that moment.
            context = self._context
            alert = context.read_error if context is not None else None
            if context is not None and alert is not None and self._tls is not None:
                context.read_error = None
                self._log_tls_failure(
                    "the broker ended the TLS session: "
                    + describe_tls_failure(alert, self._tls, self.host, self._setting)
                )
            else:
                self._log_tls_failure(
                    "the broker closed the connection before accepting it; "
                    + (
                        f"if it requires client certificates, check {self._setting}.tls."
                        "cert_file/key_file (issued by the fleet CA, not expired or revoked)"
                        if self._tls is not None
                        else f"if {self._setting}.port is a TLS listener, set {self._setting}.tls"
                    ),
                    level=logging.WARNING,
                )
            return
        if rc.is_failure:
            log.warning(
                "lost connection to broker %s:%s (%s); reconnecting", self.host, self.port, rc
            )

    def _log_tls_failure(self, what: str, level: int = logging.ERROR) -> None:
        """Log a failed connection attempt that retrying alone will likely not fix: once per
        distinct reason, again after TLS_RELOG_S while it lasts; the retries go on with
        backoff."""
        now = time.monotonic()
        last = self._tls_failure
        if last is not None and last[0] == what and now - last[1] < TLS_RELOG_S:
            return
        self._tls_failure = (what, now)
        log.log(
            level,
            "%s to broker %s:%s failed: %s; retrying with backoff",
            "TLS connection" if self._tls is not None else "connection",
            self.host,
            self.port,
            what,
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` around the connect: the error is current.
        exc = sys.exc_info()[1]
        if self._tls is not None and isinstance(exc, ssl.SSLError):
            self._log_tls_failure(
                "handshake failed: "
                + describe_tls_failure(exc, self._tls, self.host, self._setting)
            )
            return
        if not self._warned_unreachable:
            log.warning(
                "broker %s:%s is unreachable; retrying with backoff (check broker.host and "
                "broker.port, and that the broker is running)",
                self.host,
                self.port,
            )
            self._warned_unreachable = True

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            if self._acked_handler is not None:
                mid, qos = msg.mid, msg.qos

                def ack() -> None:
                    client.ack(mid, qos)

                self._acked_handler(msg.topic, bytes(msg.payload), ack)
            elif self._handler is not None:
                self._handler(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception("dropped message on %s: handler failed", msg.topic)
            if self._acked_handler is not None:
                client.ack(msg.mid, msg.qos)  # a message that fails every time must not stick
