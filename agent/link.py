"""The MQTT connection, with the hygiene every greenfleet process needs.

- subscriptions are made in ``on_connect``, so a reconnect resubscribes;
- an optional retained birth is published on every connect, with a last will set before it;
- reconnects back off exponentially up to a cap (paho's own reconnect loop);
- a QoS 1 message stays with paho until its PUBACK and is sent again after a reconnect; the
  handle ``publish`` returns says so, so the outbox does not send it a second time;
- TCP_NODELAY on the socket, so small request/response exchanges are not held back;
- refused credentials are fatal and stop the loop instead of hammering the broker;
- the message callback only hands ``(topic, payload)`` to a handler that must enqueue; any
  exception it raises is logged with the topic and never reaches paho's network thread.

The controller uses this class too: it is the one place that knows paho's API.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import BrokerAuthError

log = logging.getLogger(__name__)

# MQTT 5 reason codes (paho maps 3.1.1 return codes 4 and 5 onto them) that retrying cannot fix.
FATAL_CONNECT_CODES = {134, 135, 138, 140}


@dataclass(frozen=True, slots=True)
class Will:
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


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Disable Nagle's algorithm: chunk requests are small, and waiting for the delayed ACK
    (40 ms on Linux) cut model transfer to a tenth of the broker's throughput."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttLink:
    """A paho client wired for greenfleet; construct, then :meth:`start`."""

    def __init__(
        self,
        *,
        client_id: str,
        host: str,
        port: int,
        on_message: Callable[[str, bytes], None],
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
    ) -> None:
        self.host, self.port = host, port
        self._handler = on_message
        self._subscriptions = list(subscriptions)
        self._birth = birth
        self._on_connected = on_connected
        self._keepalive = keepalive_s
        self.connected = threading.Event()
        self.fatal: BrokerAuthError | None = None
        self._ever_connected = False
        self._warned_unreachable = False
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
        )
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
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message
        self._client.on_socket_open = _no_delay

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; an unreachable broker is retried, never fatal."""
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()

    def stop(self, last: tuple[str, bytes] | None = None) -> None:
        """Publish ``last`` (e.g. a clean Death), disconnect and stop the network thread."""
        if last is not None and self.connected.is_set():
            info = self._client.publish(last[0], last[1], qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Add a subscription now and after every reconnect."""
        self._subscriptions.append((topic, qos))
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

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

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
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
        for topic, qos in self._subscriptions:
            client.subscribe(topic, qos)
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

    def _give_up(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self.connected.clear()
        if rc.is_failure:
            log.warning(
                "lost connection to broker %s:%s (%s); reconnecting", self.host, self.port, rc
            )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
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
            self._handler(msg.topic, bytes(msg.payload))
        except Exception:
            log.exception("dropped message on %s: handler failed", msg.topic)
