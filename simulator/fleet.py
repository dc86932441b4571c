"""Many simulated agents in one process, all on one asyncio event loop.

Each simulated device has its own MQTT connection (a paho client whose socket is driven by the
event loop: no thread per device), its own client id, a retained Birth and a last-will Death on
its state topic. It sends a TelemetryBatch every ``interval_s`` numbered (session, seq) from 0
with no gaps, answers Ping, refuses InjectFault, and handles Deploy like the real agent: it
pulls the artifact in windows of chunks with BlobRequest, subscribed to the shared topic of
each chunk it asks for until it arrives (``gf/blobs/v1/{sha256}/{index}``, as the agent: see
``agent.transfer.ChunkTopics``), re-asks for chunks that do not arrive, checks size and
sha256, "loads" the model for a simulated time, replies ok and re-publishes its birth with
the new active model.

Telemetry is stamped so that a record's ``start + window_s`` is the moment it was published:
``received_at - (start + window_s)`` in the controller's telemetry table is the end-to-end delay.

Nothing is written to disk: a transfer is hashed as it arrives (out-of-order chunks wait in
memory, at most two windows of them; chunks fanned out further ahead are dropped and asked for
again later). This is a load-test tool, not an agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol as p
from agent.transfer import ChunkTopics, request_batch

log = logging.getLogger(__name__)

AGENT_VERSION = "sim-0.1.0"
CHUNK_TIMEOUT_S = 5.0  # re-ask for chunks that have not arrived after this long (as the agent)
MAX_RECORDS_PER_BATCH = 1000  # TelemetryBatch's limit
MAX_PENDING_RECORDS = 100_000  # per device, while disconnected or held
RECONNECT_S = (0.5, 10.0)  # first and largest reconnect delay


@dataclass(frozen=True)
class SimProfile:
    """What a simulated device of one hardware class reports and how fast it "runs"."""

    name: str
    hardware: p.HardwareFacts
    runtimes: tuple[p.ModelFormat, ...]
    idle_w: float
    active_w_per_core: float
    latency_ms: float  # simulated per-inference latency
    load_s: float  # simulated model load time at activation


def load_sim_profiles(names: Sequence[str]) -> list[SimProfile]:
    """SimProfiles for device classes named in device_configs/ (ValueError for unknown ones)."""
    from device_configs.schema import load_profiles

    known = load_profiles()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown device class {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    out = []
    for name in names:
        prof = known[name]
        speed = prof.speed.fp32 or 1.0
        out.append(
            SimProfile(
                name=name,
                hardware=p.HardwareFacts(
                    arch=prof.cpu.arch.value if prof.cpu.arch is not None else "x86_64",
                    cpu_model=prof.cpu.model,
                    cpu_flags=list(prof.cpu.features),
                    cores=prof.cpu.cores,
                    memory_mb=prof.memory_mb,
                    os="Linux (simulated)",
                    python="simulated",
                ),
                runtimes=tuple(prof.runtimes),
                idle_w=prof.power.idle_w,
                active_w_per_core=prof.power.active_w_per_core,
                latency_ms=0.5 * speed,
                load_s=0.05 * speed,
            )
        )
    return out


# ------------------------------------------------------------------ paho on the asyncio loop


class _LoopDriver:
    """Drives a paho client's socket from the event loop (paho's loop_asyncio pattern)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, client: mqtt.Client) -> None:
        self.loop = loop
        self.client = client
        client.on_socket_open = self._open
        client.on_socket_close = self._close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write

    def _open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_reader(sock, client.loop_read)

    def _close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)

    def _register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.add_writer(sock, client.loop_write)

    def _unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.loop.remove_writer(sock)


# ----------------------------------------------------------------------------- one transfer


@dataclass
class _Transfer:
    command: p.Deploy
    hasher: Any = field(default_factory=hashlib.sha256)
    next_hash: int = 0  # the next chunk to feed the hasher, in order
    waiting: dict[int, bytes] = field(default_factory=dict)  # arrived out of order
    in_flight: dict[int, float] = field(default_factory=dict)
    received: set[int] = field(default_factory=set)
    size: int = 0
    last_arrival: float = float("-inf")

    @property
    def artifact(self) -> p.Artifact:
        return self.command.artifact

    @property
    def complete(self) -> bool:
        return len(self.received) == self.artifact.chunk_count

    def requests(self, now: float) -> list[tuple[int, int]]:
        """Ranges to ask for now, at most ``window`` chunks in flight, at least half of it at a
        time (agent.transfer.request_batch); re-asks only once no chunk came for
        CHUNK_TIMEOUT_S (as agent.transfer.Download.requests)."""
        stalled = now - self.last_arrival > CHUNK_TIMEOUT_S
        for index, asked in list(self.in_flight.items()):
            if stalled and now - asked > CHUNK_TIMEOUT_S:
                del self.in_flight[index]
        budget = self.command.window - len(self.in_flight)
        if self.in_flight and budget < request_batch(self.command.window):
            return []
        wanted: list[int] = []
        index = self.next_hash
        while budget > 0 and index < self.artifact.chunk_count:
            if index not in self.received and index not in self.in_flight:
                wanted.append(index)
                budget -= 1
            index += 1
        ranges: list[tuple[int, int]] = []
        for index in wanted:
            self.in_flight[index] = now
            if ranges and ranges[-1][0] + ranges[-1][1] == index and ranges[-1][1] < p.MAX_WINDOW:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
            else:
                ranges.append((index, 1))
        return ranges

    def accept(self, index: int, data: bytes) -> str | None:
        """Take chunk ``index``; an error text if it does not fit the artifact."""
        count, chunk = self.artifact.chunk_count, self.artifact.chunk_size
        if not 0 <= index < count:
            return f"chunk {index} is out of range ({count} chunks)"
        expected = chunk if index < count - 1 else self.artifact.size - chunk * (count - 1)
        if len(data) != expected:
            return f"chunk {index} has {len(data)} bytes, expected {expected}"
        self.in_flight.pop(index, None)
        self.last_arrival = time.monotonic()
        if index in self.received:
            return None
        if index >= self.next_hash + 2 * self.command.window:
            # Fanned out for other devices, far ahead of what this one hashed: drop it rather
            # than hold it in memory (asked for again later; the real agent writes it to disk).
            return None
        self.received.add(index)
        self.size += len(data)
        self.waiting[index] = data
        while self.next_hash in self.waiting:
            self.hasher.update(self.waiting.pop(self.next_hash))
            self.next_hash += 1
        return None


# ----------------------------------------------------------------------------- one device


class SimDevice:
    """One simulated agent: a connection, a session, telemetry and commands."""

    def __init__(
        self,
        fleet: Fleet,
        device_id: str,
        profile: SimProfile,
        labels: dict[str, str],
        phase_s: float,
    ) -> None:
        self.fleet = fleet
        self.id = p.check_device_id(device_id)
        self.profile = profile
        self.labels = labels
        self.phase_s = phase_s
        self.session = p.new_id()[:16]
        self.seq = 0  # the next telemetry seq
        self.pending: list[p.TelemetryRecord] = []
        self.active: p.ActiveModel | None = None
        self.fallback: p.ActiveModel | None = None
        self.preloaded: p.ActiveModel | None = None
        self.last_good: p.ActiveModel | None = None
        self.transfer: _Transfer | None = None
        self.chunks = ChunkTopics(  # shared chunk topics, as the agent
            lambda topics: self.client.subscribe([(topic, 1) for topic in topics]),
            lambda topics: self.client.unsubscribe(topics),
        )
        self.connected = False
        self.held = False  # the retained ControllerState says the controller is offline
        self.stopping = False
        self.backoff = RECONNECT_S[0]
        self.deploys_ok = 0
        self._topics: dict[p.Channel, str] = {
            c: p.topic(self.id, c) for c in p.Channel if c is not p.Channel.BLOB
        }
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if fleet.username:
            self.client.username_pw_set(fleet.username, fleet.password)
        self.client.max_inflight_messages_set(100)
        self.client.will_set(
            self._topics[p.Channel.STATE],
            p.encode(p.Death(session=self.session)),
            qos=1,
            retain=True,
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        _LoopDriver(fleet.loop, self.client)

    # -- connection ---------------------------------------------------------------------

    def connect(self) -> None:
        try:
            self.client.connect(self.fleet.host, self.fleet.port, keepalive=self.fleet.keepalive)
        except OSError as exc:
            log.warning("%s: cannot connect (%s); retrying", self.id, exc)
            self._retry()

    def _retry(self) -> None:
        if self.stopping:
            return
        delay = self.backoff * random.uniform(0.5, 1.0)
        self.backoff = min(self.backoff * 2, RECONNECT_S[1])
        self.fleet.loop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if self.stopping or self.connected:
            return
        try:
            self.client.reconnect()
        except OSError as exc:
            log.debug("%s: reconnect failed: %s", self.id, exc)
            self._retry()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            log.warning("%s: connection refused: %s", self.id, rc)
            return
        self.connected = True
        self.backoff = RECONNECT_S[0]
        client.subscribe(
            [
                (self._topics[p.Channel.CMD], 1),
                (p.blob_subscription(self.id), 1),
                (p.CONTROLLER_TOPIC, 1),
            ]
        )
        self.chunks.forget()  # subscribed again by _pump, before its requests
        self.publish_birth()
        if self.transfer is not None:
            self.transfer.in_flight.clear()  # outstanding requests died with the connection
            self._pump()
        self.fleet.on_device_connected(self)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        was = self.connected
        self.connected = False
        if was:
            self.fleet.on_device_disconnected(self)
        if not self.stopping:
            log.info("%s: disconnected (%s); reconnecting", self.id, rc)
            self._retry()

    def publish(self, channel: p.Channel, message: p.Envelope, retain: bool = False) -> bool:
        info = self.client.publish(self._topics[channel], p.encode(message), qos=1, retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def birth(self) -> p.Birth:
        return p.Birth(
            session=self.session,
            agent_version=AGENT_VERSION,
            device_class=self.profile.name,
            labels=self.labels,
            runtimes=list(self.profile.runtimes),
            hardware=self.profile.hardware,
            active=self.active,
            last_good=self.last_good,
            fallback=self.fallback,
            preloaded=self.preloaded,
            tier=p.Tier.ACTIVE if self.active is not None else p.Tier.NONE,
        )

    def publish_birth(self) -> None:
        if self.connected:
            self.publish(p.Channel.STATE, self.birth(), retain=True)

    def stop(self) -> None:
        """Publish the Death (as a cleanly stopping agent does) and disconnect."""
        self.stopping = True
        if self.connected:
            death = p.Death(session=self.session, reason="simulator stopped")
            self.publish(p.Channel.STATE, death, retain=True)
            self.client.disconnect()

    # -- telemetry ----------------------------------------------------------------------

    def tick(self, interval_s: float) -> None:
        """One telemetry window ends now: record it and send what is pending."""
        now = p.utcnow()
        model = self.active.model if self.active is not None else None
        inferences = int(self.fleet.rate_hz * interval_s) if model is not None else 0
        lat = self.profile.latency_ms
        cpu_s = inferences * lat / 1000
        power = self.profile.idle_w + self.profile.active_w_per_core * cpu_s / interval_s
        jitter = random.uniform(0.9, 1.1)
        self.pending.append(
            p.TelemetryRecord(
                seq=self.seq,
                # stamped so that start + window_s is the publish time: the e2e delay's origin
                start=now - timedelta(seconds=interval_s),
                window_s=interval_s,
                model=model,
                tier=p.Tier.ACTIVE if model is not None else p.Tier.NONE,
                inferences=inferences,
                errors=0,
                latency_p50_ms=lat * jitter if inferences else None,
                latency_p95_ms=lat * 1.3 * jitter if inferences else None,
                latency_p99_ms=lat * 1.6 * jitter if inferences else None,
                cpu_s=cpu_s,
                power_w=power,
                energy_per_inference_j=power * interval_s / inferences if inferences else None,
            )
        )
        self.seq += 1
        if len(self.pending) > MAX_PENDING_RECORDS:
            dropped = len(self.pending) - MAX_PENDING_RECORDS
            del self.pending[:dropped]
            log.error("%s: dropped %d unsent telemetry records", self.id, dropped)
        self.flush()

    def flush(self) -> None:
        while self.pending and self.connected and not self.held:
            records = self.pending[:MAX_RECORDS_PER_BATCH]
            batch = p.TelemetryBatch(session=self.session, records=records)
            if not self.publish(p.Channel.TELEMETRY, batch):
                return
            del self.pending[: len(records)]
            self.fleet.records_sent += len(records)

    # -- commands -----------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            if msg.topic == p.CONTROLLER_TOPIC:
                self._on_controller_state(payload)
                return
            parsed = p.parse_topic(msg.topic)
            if parsed.channel is p.Channel.BLOB:
                assert parsed.sha256 is not None and parsed.index is not None
                self._on_chunk(parsed.sha256, parsed.index, payload)
            elif parsed.channel is p.Channel.CMD:
                self._on_command(payload)
        except Exception:  # a simulated device must not take the loop down
            log.exception("%s: handling %s failed", self.id, msg.topic)

    def _on_controller_state(self, payload: bytes) -> None:
        if not payload:
            self.held = False
        else:
            try:
                state = p.decode(payload)
            except p.ProtocolError:
                return
            if isinstance(state, p.ControllerState):
                self.held = not state.online
        self.flush()

    def reply(self, ref: str, ok: bool, error: str | None = None, **detail: Any) -> None:
        self.publish(p.Channel.REPLY, p.Reply(ref=ref, ok=ok, error=error, detail=detail))

    def event(self, kind: p.EventKind, message: str, **detail: Any) -> None:
        self.publish(
            p.Channel.EVENTS,
            p.Event(event=kind, session=self.session, message=message, detail=detail),
        )

    def _on_command(self, payload: bytes) -> None:
        try:
            command = p.decode_command(payload)
        except p.ProtocolError as exc:
            self.reply(p.command_id(payload), False, str(exc))
            return
        if isinstance(command, p.Ping):
            self.reply(command.id, True, session=self.session)
        elif isinstance(command, p.InjectFault):
            self.reply(command.id, False, "a simulated device has no simulated sensor")
        else:
            self._on_deploy(command)

    def _on_deploy(self, command: p.Deploy) -> None:
        art = command.artifact
        if art.format not in self.profile.runtimes:
            self.reply(command.id, False, f"{self.profile.name} cannot run {art.format} models")
            return
        current = self.transfer
        if current is not None and current.artifact.sha256 == art.sha256:
            current.command = command  # a resent deploy: answer this one when done
            self._pump()
            return
        if (
            command.slot is p.Slot.ACTIVE
            and self.active is not None
            and self.active.sha256 == art.sha256
        ):
            self.reply(command.id, True, status="already active", model=str(command.model))
            return
        self.transfer = _Transfer(command)
        self.event(
            p.EventKind.DEPLOY_STARTED, f"fetching {command.model}", model=str(command.model)
        )
        self._pump()

    def _pump(self) -> None:
        transfer = self.transfer
        if not self.connected:
            return
        self._follow_chunks(transfer)
        if transfer is None:
            return
        art = transfer.artifact
        for first, count in transfer.requests(time.monotonic()):
            self.chunks.asking(art.sha256, first, count)
            request = p.BlobRequest(
                sha256=art.sha256, first=first, count=count, chunk_size=art.chunk_size
            )
            self.publish(p.Channel.BLOB_REQ, request)

    def _follow_chunks(self, transfer: _Transfer | None) -> None:
        """Drop the chunk subscriptions of an artifact no longer fetched (as the agent)."""
        self.chunks.keep_only(None if transfer is None else transfer.artifact.sha256)

    def check_timeouts(self) -> None:
        if self.transfer is not None:
            self._pump()

    def _on_chunk(self, sha256: str, index: int, data: bytes) -> None:
        self.chunks.arrived(sha256, index)
        self.fleet.chunk_bytes_delivered += len(data)  # whatever the broker sent, wanted or not
        transfer = self.transfer
        if transfer is None or transfer.artifact.sha256 != sha256:
            return  # late chunk of a finished or superseded transfer
        error = transfer.accept(index, data)
        if error is not None:
            self.event(p.EventKind.DEPLOY_FAILED, f"rejected chunk: {error}")
            return
        self.fleet.chunk_bytes += len(data)
        if not transfer.complete:
            self._pump()
            return
        self.transfer = None
        self._pump()  # unsubscribes from the shared chunk topic
        command = transfer.command
        digest = transfer.hasher.hexdigest()
        if transfer.size != transfer.artifact.size or digest != transfer.artifact.sha256:
            error = f"sha256 mismatch: got {digest}, expected {transfer.artifact.sha256}"
            self.event(p.EventKind.DEPLOY_FAILED, error, model=str(command.model))
            self.reply(command.id, False, error)
            return
        self.fleet.loop.call_later(self.profile.load_s, self._activate, command)

    def _activate(self, command: p.Deploy) -> None:
        """After the simulated load time: put the model in its slot, answer, re-announce."""
        model = p.ActiveModel(
            model=command.model, sha256=command.artifact.sha256, format=command.artifact.format
        )
        if command.slot is p.Slot.ACTIVE:
            if self.active is not None and self.active.sha256 != model.sha256:
                self.last_good = self.active
            self.active = model
            if self.preloaded is not None and self.preloaded.sha256 == model.sha256:
                self.preloaded = None
            self.event(p.EventKind.ACTIVATED, f"{command.model} active", model=str(command.model))
            status = "activated"
        elif command.slot is p.Slot.FALLBACK:
            self.fallback = model
            self.event(p.EventKind.FALLBACK_STAGED, f"{command.model} staged as fallback")
            status = "staged as fallback"
        else:
            self.preloaded = model
            self.event(p.EventKind.PRELOADED, f"{command.model} preloaded")
            status = "preloaded"
        self.deploys_ok += 1
        self.reply(command.id, True, status=status, model=str(command.model))
        self.publish_birth()


# ----------------------------------------------------------------------------- the fleet


class Fleet:
    """A fleet of simulated devices on one event loop; :meth:`run` it, or use FleetThread."""

    def __init__(
        self,
        host: str,
        port: int,
        count: int,
        profiles: Sequence[SimProfile],
        *,
        interval_s: float = 1.0,
        prefix: str = "sim",
        labels: dict[str, str] | None = None,
        rate_hz: float = 10.0,
        keepalive: int = 60,
        connect_rate: float = 500.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if count < 1 or not profiles:
            raise ValueError("a fleet needs at least one device and one profile")
        self.host, self.port = host, port
        self.count = count
        self.profiles = list(profiles)
        self.interval_s = interval_s
        self.prefix = prefix
        self.labels = labels or {}
        self.rate_hz = rate_hz
        self.keepalive = keepalive
        self.connect_rate = connect_rate
        self.username, self.password = username, password
        self.devices: list[SimDevice] = []
        self.online = 0
        self.records_sent = 0
        self.chunk_bytes = 0  # chunks taken by a transfer
        self.chunk_bytes_delivered = 0  # every chunk message received
        self.loop: asyncio.AbstractEventLoop  # set by run()
        self._stop: asyncio.Event | None = None

    def on_device_connected(self, device: SimDevice) -> None:
        self.online += 1

    def on_device_disconnected(self, device: SimDevice) -> None:
        self.online -= 1

    def stats(self) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "online": self.online,
            "records_sent": self.records_sent,
            "records_pending": sum(len(d.pending) for d in self.devices),
            "deploys_ok": sum(d.deploys_ok for d in self.devices),
            "chunk_bytes": self.chunk_bytes,
            "chunk_bytes_delivered": self.chunk_bytes_delivered,
        }

    def published(self) -> dict[tuple[str, str], int]:
        """Records created per (device, session): seq 0 .. n-1 were made (sent or pending)."""
        return {(d.id, d.session): d.seq for d in self.devices}

    async def run(
        self, duration_s: float | None = None, ready: Callable[[], None] | None = None
    ) -> None:
        """Connect every device, send telemetry until ``duration_s`` or :meth:`stop`."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        width = len(str(self.count - 1))
        for i in range(self.count):
            profile = self.profiles[i % len(self.profiles)]
            device = SimDevice(
                self,
                f"{self.prefix}-{i:0{width}d}",
                profile,
                dict(self.labels),
                phase_s=self.interval_s * i / self.count,
            )
            self.devices.append(device)
        tasks = [asyncio.create_task(self._misc())]
        started = time.monotonic()
        for i, device in enumerate(self.devices):
            device.connect()
            tasks.append(asyncio.create_task(self._telemetry(device)))
            # ramp: at most connect_rate connections a second, yielding to the loop meanwhile
            await asyncio.sleep(max(0.0, started + (i + 1) / self.connect_rate - time.monotonic()))
        if ready is not None:
            ready()
        try:
            if duration_s is None:
                await self._stop.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), duration_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for device in self.devices:
                device.stop()
            await self._drain()

    async def _drain(self, timeout_s: float = 10.0) -> None:
        """Let the final Deaths and disconnects go out."""
        deadline = time.monotonic() + timeout_s
        while any(d.connected for d in self.devices) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        """Stop :meth:`run` (call on the loop, or through FleetThread.stop)."""
        if self._stop is not None:
            self._stop.set()

    async def _telemetry(self, device: SimDevice) -> None:
        interval = self.interval_s
        first = time.monotonic() + device.phase_s + interval
        k = 0
        while True:
            await asyncio.sleep(max(0.0, first + k * interval - time.monotonic()))
            device.tick(interval)
            k += 1

    async def _misc(self) -> None:
        """Keep-alives and chunk re-requests for every client, once a second."""
        while True:
            await asyncio.sleep(1.0)
            for device in self.devices:
                if device.client.is_connected():
                    device.client.loop_misc()
                device.check_timeouts()


class FleetThread:
    """A Fleet on its own event loop in a background thread (for tests and benchmarks)."""

    def __init__(self, fleet_factory: Callable[[], Fleet], duration_s: float | None = None) -> None:
        self._factory = fleet_factory
        self._duration = duration_s
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="gf-simulator", daemon=True)
        self.fleet: Fleet | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            self.fleet = self._factory()
            loop.run_until_complete(self.fleet.run(self._duration, ready=self._ready.set))
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc
            log.exception("simulated fleet failed")
        finally:
            self._ready.set()
            loop.close()

    def start(self, timeout_s: float = 60.0) -> Fleet:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("the simulated fleet did not connect in time")
        if self.error is not None or self.fleet is None:
            raise RuntimeError(f"the simulated fleet failed: {self.error!r}")
        return self.fleet

    def call(self, func: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Run ``func`` on the fleet's loop and return its result."""
        assert self.loop is not None

        async def _call() -> Any:
            return func()

        return asyncio.run_coroutine_threadsafe(_call(), self.loop).result(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.fleet is not None and self.loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.fleet.stop)
        self._thread.join(timeout_s)
