"""The agent daemon: receives commands, pulls and activates models, runs inference, reports.

Threads and who owns what:

- paho's network thread only decodes topics and enqueues (``_on_message``);
- the worker thread (``_work``) owns commands and transfers: it downloads, verifies, loads
  and swaps models, so a slow download never delays an inference;
- the inference thread (``_infer``) reads the input source at the configured rate, runs the
  current model and cuts telemetry windows. A model swap is one reference assignment, so no
  inference is dropped or fails while a new model is being activated. It also feeds the
  fallback ladder (agent.fallback) and moves down or probes up the chain as it says; a tier's
  model is loaded on this thread, under ``_tier_lock``, which the worker takes to activate.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from agent import protocol as p
from agent.activation import Activation, Pointer
from agent.config import AgentConfig, MqttInput
from agent.errors import IntegrityError, TransferError
from agent.fallback import Ladder, Move, RunRecord, effective_budgets, with_budgets
from agent.hardware import read_hardware
from agent.link import MqttLink, Will, topic_matches_sub
from agent.outbox import Outbox, OutboxSender
from agent.power.chain import MeterChain
from agent.results import ResultWriter
from agent.rules import RulesModel
from agent.runtime import EXTRAS, available_formats, load_model
from agent.runtime.base import InferenceError, LoadedModel, ModelLoadError
from agent.sources import source_class
from agent.sources.base import Source
from agent.telemetry import TelemetryWindow
from agent.transfer import ChunkTopics, Download
from agent.verify import (
    ManifestRejected,
    check_artifact,
    check_expiry,
    check_golden,
    check_latency,
    load_public_key,
    read_unsigned,
    verify_manifest,
    verify_rollback,
)
from agent.version import __version__

log = logging.getLogger(__name__)

CHUNK_TIMEOUT_S = 5.0  # re-ask for chunks that have not arrived after this long
PROGRESS_STEPS = 4  # deploy_progress events per transfer
EVENT_REPEAT_S = 60.0  # the same recurring error is reported at most once per this period
STAGING_TIMED_RUNS = 5  # runs on zeros whose median staging compares with the profile
WAKE = ("", b"")  # put in the worker's inbox: something went into the outbox
BLOB_PREFIX = p.BLOB_ROOT + "/"  # the shared chunk tree (controller.blobs)
OUTBOX_WINDOW = 32  # telemetry/event messages in flight; below the link's max_inflight (64)


class Serving:
    """What the inference thread uses, swapped as a whole: a tier of the fallback chain and
    the model file it runs (for the rules tier, the model whose manifest holds the rules)."""

    __slots__ = (
        "active",
        "feed_shape",
        "feeds",
        "input_name",
        "model",
        "only_output",
        "results",
        "tier",
    )

    def __init__(
        self, model: LoadedModel | RulesModel, active: p.ActiveModel, tier: p.Tier = p.Tier.ACTIVE
    ) -> None:
        self.model = model
        self.active = active
        self.tier = tier
        # worked out once, not on every inference:
        spec = model.inputs[0]
        self.input_name: str = spec.name
        # the input's shape, -1 where it is free
        self.feed_shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in spec.shape)
        self.feeds: dict[str, Any] = {}  # the inference thread's feed, refilled each run
        # the output's name, if the model has one
        self.only_output = model.outputs[0].name if len(model.outputs) == 1 else None
        self.results = ResultWriter(active.model, tier)

    def __repr__(self) -> str:
        return f"Serving({self.active.model}, tier={self.tier.value})"


class Transfer(msgspec.Struct):
    """A deploy in progress."""

    command: p.Deploy
    download: Download
    manifest: p.Manifest | None  # verified when the deploy arrived (enrolled agents); or None
    next_progress: int = 1


class Agent:
    """One device's agent. Build it with a config; ``run`` blocks until ``stop``."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device = config.device_id
        self.session = p.new_id()[:16]
        self.activation = Activation(config.state_dir)
        self.meter = MeterChain(config.power)
        self.controller_keys = [load_public_key(k) for k in config.controller_keys]
        self.outbox = Outbox(config.state_dir / "outbox.db")
        self.sender: OutboxSender | None = None
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=10_000)
        self._stop = threading.Event()
        self._serving: Serving | None = None
        self.ladder = Ladder(config.fallback)
        self.budgets = effective_budgets(config.fallback, None)  # until a deploy brings some
        self.runs = RunRecord(config.state_dir / "runs.json", config.fallback)
        self._tier_lock = threading.RLock()
        self._controller_path = config.state_dir / "controller"
        self._controller_since: datetime | None = None  # the controller connection last seen
        self._transfer: Transfer | None = None
        self._chunks = ChunkTopics(self._subscribe, self._unsubscribe)  # shared chunk topics
        # Chunk requests go out from the worker and from paho's network thread (as each chunk
        # arrives, _on_message); this lock keeps the transfer, its flow control and the chunk
        # subscriptions consistent between the two.
        self._flow_lock = threading.Lock()
        self._followed: str | None = None  # the artifact whose chunk topics are kept
        self._input_handlers: list[tuple[str, Any]] = []
        self._last_event: dict[str, float] = {}
        self.source: Source | None = None
        self.link: MqttLink | None = None
        self.input_link: MqttLink | None = None
        self.inference_seq = 0
        self.rejected_chunks = 0  # chunks that failed their checks, over the agent's life
        self._results_topic = p.topic(self.device, p.Channel.RESULTS)
        self._ack_topic = p.topic(self.device, p.Channel.ACK)
        self._blob_prefix = f"{p.ROOT}/{self.device}/blob/"  # chunks sent to this device alone
        self._publish_results = config.inference.publish_results

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Restore the active model, connect, and start the worker and inference threads."""
        self.activation.prepare()
        self._controller_since = self._load_controller_since()
        self.outbox.open()
        self.meter.start()
        self._restore()
        self.hardware = read_hardware()
        self.runtimes = available_formats()
        self.link = MqttLink(
            client_id=f"gf-agent-{self.device}",
            host=self.config.broker.host,
            port=self.config.broker.port,
            username=self.config.broker.username,
            password=self.config.broker.password,
            keepalive_s=self.config.broker.keepalive_s,
            reconnect_min_s=self.config.broker.reconnect_min_s,
            reconnect_max_s=self.config.broker.reconnect_max_s,
            tls=self.config.broker.tls,
            allow_plaintext=self.config.broker.allow_plaintext,
            on_message=self._on_message,
            subscriptions=[
                (p.topic(self.device, p.Channel.CMD), 1),
                (p.topic(self.device, p.Channel.ACK), 0),
                (p.blob_subscription(self.device), 1),
                (p.topic(self.device, p.Channel.STATE), 1),
                (p.CONTROLLER_TOPIC, 1),
            ],
            will=Will(
                p.topic(self.device, p.Channel.STATE),
                p.encode(p.Death(session=self.session)),
            ),
            birth=self._birth,
            on_connected=self._on_connected,
        )
        pending = self.activation.load_pending()
        if pending is not None:  # carry on where the previous run stopped, without the controller
            command, state = pending
            log.info(
                "resuming the deploy of %s (was %s when the agent stopped)", command.model, state
            )
            self._inbox.put_nowait((p.topic(self.device, p.Channel.CMD), p.encode(command)))
        self.source = source_class(self.config.input.type)(self.config.input)
        self._connect_input()
        link = self.link
        self.sender = OutboxSender(
            self.outbox,
            lambda topic, payload: link.publish(topic, payload, qos=1),
            link.connected.is_set,
        )
        if self._controller_since is not None:  # a controller was seen: wait until it is back
            self.sender.hold()
        self.link.start()
        self._threads = [
            threading.Thread(target=self._guard, args=(self._work,), name="gf-worker", daemon=True),
            threading.Thread(target=self._guard, args=(self._infer,), name="gf-infer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "agent %s started (session %s, runtimes %s, model %s)",
            self.device,
            self.session,
            ",".join(r.value for r in self.runtimes) or "none",
            self._serving.active.model if self._serving else "none",
        )

    def _connect_input(self) -> None:
        """Subscribe an MQTT input source: on the fleet link, or on its own local broker."""
        config = self.config.input
        if not isinstance(config, MqttInput):
            return
        offer = self.source.offer  # type: ignore[union-attr]
        if config.broker is None:
            assert self.link is not None
            self._input_handlers.append((config.topic, offer))
            self.link.subscribe(config.topic, 0)
            return
        self.input_link = MqttLink(
            client_id=f"gf-agent-{self.device}-input",
            host=config.broker.host,
            port=config.broker.port,
            username=config.broker.username,
            password=config.broker.password,
            keepalive_s=config.broker.keepalive_s,
            reconnect_min_s=config.broker.reconnect_min_s,
            reconnect_max_s=config.broker.reconnect_max_s,
            tls=config.broker.tls,
            allow_plaintext=config.broker.allow_plaintext,
            setting="input.broker",
            on_message=lambda topic, payload: offer(payload),
            subscriptions=[(config.topic, 0)],
            clean_session=True,
        )
        self.input_link.start()

    def stop(self) -> None:
        """Stop threads, keep transfer progress, and tell the controller we left on purpose."""
        self._stop.set()
        if self.input_link is not None:
            self.input_link.stop()
        for thread in getattr(self, "_threads", []):
            thread.join(timeout=5)
        self.runs.end()  # a clean stop is not a crash: the next start is not in a crash loop
        if self._transfer is not None:
            self._transfer.download.close()
        if self.link is not None:
            death = p.Death(session=self.session, reason="agent stopped")
            if self.sender is not None:
                # Deliver what is buffered while the broker is there (bounded, 3 s: a stop must
                # not hang); what is left stays in the outbox for the next start.
                deadline = time.monotonic() + 3.0
                self.sender.pump(OUTBOX_WINDOW)
                while (
                    (self.sender.in_flight or self.outbox.stats()["pending"])
                    and self.link.connected.is_set()
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.02)
                    self.sender.pump(OUTBOX_WINDOW)
            self.link.stop(last=(p.topic(self.device, p.Channel.STATE), p.encode(death)))
        # The agent's own account, for the operator to compare with what the controller stored:
        # one telemetry record per batch, numbered 0..N-1 in this session.
        records = self.outbox.puts(p.topic(self.device, p.Channel.TELEMETRY))
        log.info(
            "agent stopped: session %s produced %d telemetry records (seq %s) and %d events; "
            "%d dropped from the outbox, %d still in it for the next start",
            self.session,
            records,
            f"0..{records - 1}" if records else "none",
            self.outbox.puts(p.topic(self.device, p.Channel.EVENTS)),
            self.outbox.dropped_since_open,
            self.outbox.stats()["pending"],
        )
        self.outbox.close()

    def _guard(self, target: Any) -> None:
        """Keep a thread alive through unexpected errors (logged): the agent never goes silent."""
        while not self._stop.is_set():
            try:
                target()
                return
            except Exception:
                log.exception("%s crashed; restarting it", threading.current_thread().name)
                time.sleep(1.0)

    def _restore(self) -> None:
        """Serve what was active before the restart, or the next tier that loads.

        A crash loop (more unclean restarts in a row than the budget) or a death while probing
        starts the chain lower; see agent.fallback.RunRecord.
        """
        floor, cause = self.runs.begin()
        with self._tier_lock:
            self._apply_budgets(self.activation.read().budgets)
            self.ladder.hold_s = self.runs.hold_s
            self._refresh_tiers()
            move = self.ladder.start(time.monotonic(), floor, cause)
            self._enter_tier(move, previous=None)

    def _apply_budgets(self, sent: p.Budgets | None) -> None:
        """Fall on the budgets the controller sent with the active model, unless agent.yaml
        sets its own (agent.fallback.effective_budgets)."""
        self.budgets = effective_budgets(self.config.fallback, sent)
        self.ladder.policy = with_budgets(self.config.fallback, self.budgets)

    # -- the fallback chain ---------------------------------------------------------------------

    def _tier_models(self) -> dict[p.Tier, p.ActiveModel]:
        """The model file behind each file tier, skipping copies of a better tier."""
        pointer = self.activation.read()
        models: dict[p.Tier, p.ActiveModel] = {}
        seen: set[str] = set()
        for tier, ref in (
            (p.Tier.ACTIVE, pointer.active),
            (p.Tier.LAST_GOOD, pointer.last_good),
            (p.Tier.FALLBACK, pointer.fallback),
        ):
            if ref is not None and ref.sha256 not in seen:
                models[tier] = ref
                seen.add(ref.sha256)
        return models

    def _rules_source(self) -> tuple[p.ActiveModel, p.Manifest] | None:
        """The best-tier model whose kept manifest carries a rule baseline."""
        for ref in self._tier_models().values():
            manifest = self.activation.manifest(ref)
            if manifest is not None and manifest.rules is not None:
                return ref, manifest
        return None

    def _refresh_tiers(self) -> None:
        """Tell the ladder which tiers exist now (after a restart, activation or staging)."""
        available = set(self._tier_models())
        if self._rules_source() is not None:
            available.add(p.Tier.RULES)
        self.ladder.available = available

    def _load_tier(self, tier: p.Tier) -> Serving:
        """Load and smoke-test what serves at ``tier``; ModelLoadError/InferenceError if not."""
        if tier is p.Tier.RULES:
            source = self._rules_source()
            if source is None:
                raise ModelLoadError("no manifest with a rule baseline is kept on this device")
            ref, manifest = source
            path = self.activation.models_dir / f"{ref.sha256}.manifest.json"
            model: LoadedModel | RulesModel = RulesModel(manifest, path)
        else:
            ref = self._tier_models()[tier]
            current = self._serving
            if (
                current is not None
                and current.active.sha256 == ref.sha256
                and current.tier is not p.Tier.RULES
            ):
                return Serving(current.model, ref, tier)  # already loaded
            model = load_model(
                self.activation.artifact_path(ref),
                ref.format,
                threads=self.config.inference.threads,
            )
        self._smoke_test(model)
        return Serving(model, ref, tier)

    def _enter_tier(self, move: Move | None, previous: Serving | None) -> None:
        """Serve the ladder's tier, falling further while a tier cannot load; report the move.

        Called with ``_tier_lock`` held, by the inference thread (and once at start).
        """
        causes = [move.cause] if move is not None else []
        while self.ladder.tier is not p.Tier.NONE:
            tier = self.ladder.tier
            try:
                serving = self._load_tier(tier)
            except (ModelLoadError, InferenceError, KeyError) as exc:
                reason = f"{tier.value} cannot serve: {exc}"
                log.error(reason)
                if self.ladder.unusable(tier, reason, time.monotonic()) is None:
                    self.ladder.tier = p.Tier.NONE
                causes.append(reason)
                continue
            self._serving = serving
            break
        else:
            self._serving = None
        now_tier = self.ladder.tier
        was = previous.tier if previous is not None else p.Tier.ACTIVE
        if not causes and (previous is None or now_tier is was):
            return  # nothing moved (or a start with no model at all: nothing to report)
        model = self._serving.active.model if self._serving else None
        self._event(
            p.EventKind.TIER_CHANGED,
            f"serving {now_tier.value}"
            + (f" ({model})" if model else "")
            + f" instead of {was.value}: {'; then '.join(causes) or 'no model can serve'}",
            **{"from": was.value, "to": now_tier.value, "cause": "; then ".join(causes)},
            model=str(model) if model else None,
            probe=bool(move and move.probe),
        )
        self._publish_birth()

    def _apply(self, move: Move | None) -> None:
        """Apply a ladder decision from the inference thread; note probes for crash recovery."""
        if move is None:
            return
        previous = self._serving
        self.runs.probe(move.to if move.probe else None, self.ladder.hold_s)
        self._enter_tier(move, previous)
        if not move.probe:
            self._last_fall = time.monotonic()

    # -- MQTT ---------------------------------------------------------------------------------

    def _active_model(self) -> p.ActiveModel | None:
        """The deployed active model (what the controller deployed), whatever tier serves."""
        return self.activation.read().active or (self._serving.active if self._serving else None)

    def _publish_birth(self) -> None:
        """Re-publish the retained birth (what runs changed); on reconnect the link does it."""
        if self.link is not None and self.link.connected.is_set():
            self.link.publish(*self._birth(), qos=1, retain=True)

    def _birth(self) -> tuple[str, bytes]:
        pointer = self.activation.read()
        birth = p.Birth(
            session=self.session,
            agent_version=__version__,
            device_class=self.config.device_class,
            labels=self.config.labels,
            runtimes=self.runtimes,
            hardware=self.hardware,
            active=pointer.active or (self._serving.active if self._serving else None),
            last_good=pointer.last_good,
            fallback=pointer.fallback,
            tier=self.ladder.tier,
            preloaded=pointer.preloaded,
            outbox_dropped=self.outbox.dropped,
            budgets=self.budgets,
        )
        return p.topic(self.device, p.Channel.STATE), p.encode(birth)

    def _on_connected(self) -> None:
        if self._transfer is not None:
            self._transfer.download.reset_in_flight()
        if self.sender is not None:
            self.sender.reset()  # paho resends what the broker had not confirmed
            if self._controller_since is not None:
                self.sender.hold()  # until the retained ControllerState says it is subscribed

    def _stored(self, payload: bytes) -> None:
        """The controller stored outbox messages (paho's thread; see protocol.Stored)."""
        try:
            stored = p.decode(payload)
        except p.ProtocolError as exc:
            log.warning("ignored acknowledgement: %s", exc)
            return
        if isinstance(stored, p.Stored) and self.sender is not None:
            self.sender.stored(stored.ids, stored.rejected)
            with contextlib.suppress(queue.Full):  # the worker deletes them and sends more
                self._inbox.put_nowait(WAKE)

    def _controller_state(self, payload: bytes) -> None:
        """Follow the controller's presence (paho's thread; see protocol.ControllerState)."""
        if not payload:  # the retained state was cleared (a decommissioned controller)
            return
        try:
            state = p.decode(payload)
        except p.ProtocolError as exc:
            log.warning("ignored controller state: %s", exc)
            return
        if not isinstance(state, p.ControllerState) or self.sender is None:
            return
        if not state.online:
            log.info("controller offline: holding telemetry and events on disk")
            self.sender.hold()
            return
        # a connection of the controller this agent has not seen: what the broker took before
        # it subscribed reached nobody, so everything unacknowledged goes again
        new = state.since != self._controller_since
        if new:
            self._controller_since = state.since
            self._save_controller_since(state.since)
        if self.sender.held or new:
            log.info(
                "controller online%s",
                ": sending again what it has not acknowledged" if new else "",
            )
        self.sender.release(resend=new)

    def _load_controller_since(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self._controller_path.read_text().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable %s (%s)", self._controller_path, exc)
            return None

    def _save_controller_since(self, since: datetime) -> None:
        try:
            tmp = self._controller_path.with_suffix(".tmp")
            tmp.write_text(since.isoformat())
            os.replace(tmp, self._controller_path)
        except OSError as exc:  # a full disk must not stop anything
            log.error(
                "cannot record the controller's presence in %s: %s", self._controller_path, exc
            )

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == p.CONTROLLER_TOPIC:
            self._controller_state(payload)
            return
        if topic == self._ack_topic:
            self._stored(payload)
            return
        for sub, handler in self._input_handlers:
            if topic_matches_sub(sub, topic):
                handler(payload)
                return
        try:
            self._inbox.put_nowait((topic, payload))
        except queue.Full:
            log.error("inbox full; dropped message on %s", topic)
            return
        if topic.startswith(BLOB_PREFIX) or topic.startswith(self._blob_prefix):
            self._chunk_arrived(topic, len(payload))

    def _chunk_arrived(self, topic: str, length: int) -> None:
        """Network thread: a chunk was queued for the worker. It leaves the window now, and the
        next chunks are asked for now, not once the worker has written this one.

        Asked for by the worker alone, every request waited for the worker to get through the
        chunks queued before it (4 ms at the median, 12-14 ms at p90 in the 20 MiB push, where
        a window of 16 chunks takes ~22 ms to arrive), so the window ran dry between requests
        and the push reached 0.7-0.9 of raw paho (benchmarks/README.md, "Model push").
        """
        transfer = self._transfer
        if transfer is None:
            return
        try:
            parsed = p.parse_topic(topic)
        except p.ProtocolError:
            return  # the worker logs it
        if (
            parsed.channel is not p.Channel.BLOB
            or parsed.sha256 != transfer.download.artifact.sha256
            or parsed.index is None
        ):
            return
        if not transfer.download.arrived(parsed.index, length):
            return
        # Never wait here for the worker: while it holds the lock it is asking (and sees this
        # arrival), or it will ask once it has this chunk from the inbox.
        if self._flow_lock.acquire(blocking=False):
            try:
                self._chunks.arrived(parsed.sha256, parsed.index)
                self._ask(transfer)
            finally:
                self._flow_lock.release()

    def _publish(self, channel: p.Channel, message: Any, qos: int = 1) -> None:
        """Telemetry and events go through the on-disk outbox (they must survive outages and
        restarts); replies, results and chunk requests only matter now and go straight out."""
        if channel in (p.Channel.TELEMETRY, p.Channel.EVENTS):
            topic, payload = p.topic(self.device, channel), p.encode(message)
            self.outbox.put(
                topic, payload, message.id, fallback=lambda: self._send_now(topic, payload)
            )
            with contextlib.suppress(queue.Full):  # wake the worker: it sends the outbox
                self._inbox.put_nowait(WAKE)
            return
        assert self.link is not None
        self.link.publish(p.topic(self.device, channel), p.encode(message), qos=qos)

    def _send_now(self, topic: str, payload: bytes) -> bool:
        """The outbox could not store a record (a full disk): send it straight away if the link
        is up, so nothing is lost while the network is fine (QoS 1, no resend of our own)."""
        link = self.link
        if link is None or not link.connected.is_set():
            return False
        try:
            link.publish(topic, payload, qos=1)
        except ValueError:
            return False
        return True

    def _reply(self, ref: str, ok: bool, error: str | None = None, **detail: Any) -> None:
        self._publish(p.Channel.REPLY, p.Reply(ref=ref, ok=ok, error=error, detail=detail))

    def _event(
        self, kind: p.EventKind, message: str, *, throttle: str | None = None, **detail: Any
    ) -> None:
        """Publish an event and log it; ``throttle`` names a recurring error to rate-limit."""
        if throttle is not None:
            now = time.monotonic()
            if now - self._last_event.get(throttle, -EVENT_REPEAT_S) < EVENT_REPEAT_S:
                return
            self._last_event[throttle] = now
        level = (
            logging.INFO
            if kind
            in (p.EventKind.ACTIVATED, p.EventKind.DEPLOY_STARTED, p.EventKind.DEPLOY_PROGRESS)
            else logging.WARNING
        )
        log.log(level, "%s: %s", kind.value, message)
        self._publish(
            p.Channel.EVENTS,
            p.Event(event=kind, session=self.session, message=message, detail=detail),
        )

    # -- worker: commands and transfers -----------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.sender is not None and self.sender.in_flight
                topic, payload = self._inbox.get(timeout=0.05 if busy else 0.5)
            except queue.Empty:
                self._pump()
                continue
            if not topic:  # WAKE
                self._pump()
                continue
            try:
                parsed = p.parse_topic(topic)
            except p.ProtocolError as exc:
                log.warning("ignored message: %s", exc)
                continue
            if parsed.channel is p.Channel.CMD:
                self._handle_command(payload)
            elif parsed.channel is p.Channel.STATE:
                self._check_state(payload)
            elif parsed.channel is p.Channel.BLOB:
                assert parsed.sha256 is not None and parsed.index is not None
                self._handle_chunk(parsed.sha256, parsed.index, payload)
            self._pump()

    def _check_state(self, payload: bytes) -> None:
        """Re-assert our birth if a stale last will (an older connection's) replaced it."""
        try:
            message = p.decode(payload)
        except p.ProtocolError:
            return
        if isinstance(message, p.Death):
            self._publish_birth()

    def _handle_command(self, payload: bytes) -> None:
        try:
            command = p.decode_command(payload)
        except p.ProtocolError as exc:
            ref = p.command_id(payload)
            self._reply(ref, False, f"{exc}; known commands: {', '.join(p.COMMAND_KINDS)}")
            self._event(p.EventKind.COMMAND_REJECTED, str(exc), ref=ref)
            return
        if isinstance(command, p.Ping):
            self._reply(command.id, True, session=self.session)
        elif isinstance(command, p.InjectFault):
            try:
                assert self.source is not None
                self.source.set_fault(command.fault, command.severity)
            except NotImplementedError as exc:
                self._reply(command.id, False, str(exc))
            else:
                self._reply(command.id, True, fault=command.fault.value, severity=command.severity)
        elif isinstance(command, p.Deploy):
            self._start_deploy(command)

    def _verified(self, command: p.Deploy) -> p.Manifest | None:
        """The deploy's manifest after every check an enrolled agent makes; an agent that is not
        enrolled reads it unverified (None when there is none).

        Raises ManifestRejected with the reason; nothing is downloaded before this passes.
        """
        if not self.controller_keys:
            return None if command.manifest is None else read_unsigned(command.manifest)
        active = self.activation.read().active
        now = p.utcnow()
        if command.rollback:
            verify_rollback(
                command.rollback_grant,
                self.controller_keys,
                device=self.device,
                sha256=command.artifact.sha256,
                now=now,
            )
        manifest = verify_manifest(
            command.manifest,
            self.controller_keys,
            now=now,
            device_class=self.config.device_class,
            active=active.model if active else None,
            allow_older=command.rollback,
        )
        check_artifact(manifest, command.artifact, model=command.model)
        return manifest

    def _start_deploy(self, command: p.Deploy) -> None:
        try:
            manifest = self._verified(command)
        except ManifestRejected as exc:
            self._reply(command.id, False, str(exc), reason=exc.reason)
            detail = {**exc.detail, "model": str(command.model)}
            self._event(p.EventKind.DEPLOY_FAILED, str(exc), **detail)
            return
        artifact = command.artifact
        if artifact.format not in self.runtimes:
            reason = (
                f"cannot run {artifact.format.value} models: no runtime installed "
                f"(install greenfleet[{EXTRAS[artifact.format]}])"
            )
            self._reply(command.id, False, reason)
            self._event(p.EventKind.DEPLOY_FAILED, reason, model=str(command.model))
            return
        pointer = self.activation.read()
        if command.slot is p.Slot.PRELOAD and self._preload_answered(command, pointer):
            return
        if command.slot is p.Slot.FALLBACK:
            if pointer.fallback is not None and pointer.fallback.sha256 == artifact.sha256:
                self.activation.clear_pending()
                self._reply(command.id, True, status="already staged as fallback")
                return
            if pointer.active is not None and pointer.active.sha256 == artifact.sha256:
                self._reply(
                    command.id,
                    False,
                    f"{command.model} is the active model; a fallback must be another variant",
                )
                return
        elif pointer.active is not None and pointer.active.sha256 == artifact.sha256:
            serving = self._serving
            if (
                pointer.active.model != command.model
                and serving is not None
                and serving.tier is p.Tier.ACTIVE
                and not isinstance(serving.model, RulesModel)
            ):  # the same file under another name: rename it, nothing to load
                self._activate_loaded(command, serving.model, manifest)
            self.activation.clear_pending()
            self._reply(command.id, True, status="already active", model=str(command.model))
            return
        last_good = pointer.last_good
        if last_good is not None and last_good.sha256 == artifact.sha256:
            path = self.activation.artifact_path(last_good)
            if path.is_file():  # the previous model is still on disk: no transfer needed
                self._activate_from_disk(command, path, manifest)
                return
        finished = self.activation.models_dir / f"{artifact.sha256}.{artifact.format.value}"
        if finished.is_file():  # downloaded and verified before a restart, never activated
            self.activation.save_pending(command, "staging")
            self._activate_from_disk(command, finished, manifest)
            return
        current = self._transfer
        if current is not None and current.download.artifact.sha256 == artifact.sha256:
            current.command, current.manifest = command, manifest  # re-sent: answer this id
            current.download.reset_in_flight()
            return
        if current is not None:
            current.download.close()
            self._reply(current.command.id, False, f"superseded by deploy of {command.model}")
        download = Download(self.activation.downloads_dir, artifact)
        try:
            have = download.open()
        except (OSError, OverflowError) as exc:
            self._fail_deploy(command, f"cannot write the download to {download.part}: {exc}")
            return
        transfer = Transfer(command, download, manifest)
        self._set_transfer(transfer)
        self.activation.save_pending(command, "fetching")
        self._event(
            p.EventKind.DEPLOY_STARTED,
            f"fetching {command.model} ({artifact.size} bytes, {artifact.chunk_count} chunks"
            + (f", resuming with {have} on disk)" if have else ")"),
            model=str(command.model),
            resumed_chunks=have,
        )
        if download.complete:  # killed after the last chunk, before the file was verified
            self._set_transfer(None)
            self._finish_deploy(transfer)

    def _activate_from_disk(
        self, command: p.Deploy, path: Path, manifest: p.Manifest | None
    ) -> None:
        """Activate a model file already on disk: the last-good copy (a rollback), or a download
        that finished before a restart. It is staged like any new model."""
        model = self._load_staged(
            command, path, manifest, "the copy on disk does not pass staging: "
        )
        if model is None:
            return
        self._install(command, model, manifest, "from the local copy")

    def _install(
        self, command: p.Deploy, model: LoadedModel, manifest: p.Manifest | None, how: str = ""
    ) -> None:
        """Put a staged model in its slot (active, or kept ready as the fallback) and answer."""
        if command.slot is not p.Slot.ACTIVE:
            self._keep(command, model, manifest)
            status = "staged as fallback" if command.slot is p.Slot.FALLBACK else "preloaded"
        else:
            self._activate_loaded(command, model, manifest)
            status = "activated"
        self._reply(command.id, True, status=f"{status} {how}".strip(), model=str(command.model))

    def _pump(self) -> None:
        """Worker-thread housekeeping after every message or timeout: the outbox, then chunks
        (events first: once a window of chunks is streaming in, paho's one network thread is
        busy reading and a queued event would wait behind the whole transfer)."""
        if self.sender is not None:
            self.sender.pump(OUTBOX_WINDOW)
        self._pump_transfer()

    def _pump_transfer(self) -> None:
        transfer = self._transfer
        if self.link is not None:
            self._follow_chunks(transfer)
        if transfer is not None:
            self._request_chunks(transfer)

    def _request_chunks(self, transfer: Transfer) -> None:
        with self._flow_lock:
            self._ask(transfer)

    def _ask(self, transfer: Transfer) -> None:
        """Ask for what the window has room for (worker, or network thread as chunks arrive);
        the caller holds the flow lock."""
        link = self.link
        if link is None or not link.connected.is_set() or self._transfer is not transfer:
            return  # offline (asked again on reconnect), or finished or superseded meanwhile
        artifact = transfer.download.artifact
        for first, count in transfer.download.requests(transfer.command.window, CHUNK_TIMEOUT_S):
            self._chunks.asking(artifact.sha256, first, count)
            request = p.BlobRequest(
                sha256=artifact.sha256, first=first, count=count, chunk_size=artifact.chunk_size
            )
            self._publish(p.Channel.BLOB_REQ, request)

    def _set_transfer(self, transfer: Transfer | None) -> None:
        with self._flow_lock:
            self._transfer = transfer

    def _follow_chunks(self, transfer: Transfer | None) -> None:
        """Drop the chunk subscriptions of an artifact no longer being fetched (ChunkTopics);
        once per change of transfer, not after every message."""
        sha256 = None if transfer is None else transfer.download.artifact.sha256
        if sha256 == self._followed:
            return
        with self._flow_lock:
            self._chunks.keep_only(sha256)
        self._followed = sha256

    def _subscribe(self, topics: list[str]) -> None:
        if self.link is not None:
            self.link.subscribe_all(topics, 1)

    def _unsubscribe(self, topics: list[str]) -> None:
        if self.link is not None:
            self.link.unsubscribe_all(topics)

    def _handle_chunk(self, sha256: str, index: int, data: bytes) -> None:
        with self._flow_lock:
            self._chunks.arrived(sha256, index)
        transfer = self._transfer
        if transfer is None or transfer.download.artifact.sha256 != sha256:
            return  # a late chunk of a finished or superseded transfer
        try:
            transfer.download.accept(index, data)
        except TransferError as exc:
            # not a failed deploy: the transfer goes on and asks again (a late or foreign
            # chunk, or one a hostile client published); counted in the progress events
            self.rejected_chunks += 1
            log.debug("rejected chunk %d of %s: %s", index, sha256[:12], exc)
            return
        except OSError as exc:
            # A full (NoSpaceError says how full and what to do) or failing disk: give the space
            # back, keep serving the active model, and tell the controller.
            self._set_transfer(None)
            transfer.download.discard()
            self._fail_deploy(transfer.command, f"cannot store the download: {exc}")
            return
        done = transfer.download.received * PROGRESS_STEPS // transfer.download.artifact.chunk_count
        if done >= transfer.next_progress and not transfer.download.complete:
            transfer.next_progress = done + 1
            self._event(
                p.EventKind.DEPLOY_PROGRESS,
                f"{transfer.command.model}: {transfer.download.received}/"
                f"{transfer.download.artifact.chunk_count} chunks",
                model=str(transfer.command.model),
                received=transfer.download.received,
                total=transfer.download.artifact.chunk_count,
                rejected_chunks=self.rejected_chunks,
            )
        if transfer.download.complete:
            self._set_transfer(None)
            self._finish_deploy(transfer)

    def _finish_deploy(self, transfer: Transfer) -> None:
        command = transfer.command
        artifact = command.artifact
        active = p.ActiveModel(model=command.model, sha256=artifact.sha256, format=artifact.format)
        path = self.activation.artifact_path(active)
        self.activation.save_pending(command, "verifying")
        try:
            transfer.download.finish(path)
        except IntegrityError as exc:
            self._fail_deploy(command, str(exc))
            return
        except OSError as exc:
            transfer.download.discard()  # close() could fail again the same way (a full disk)
            self._fail_deploy(command, f"cannot store the model: {exc}")
            return
        self.activation.save_pending(command, "staging")
        model = self._load_staged(command, path, transfer.manifest)
        if model is None:
            path.unlink(missing_ok=True)  # a file that failed staging is never kept
            return
        self._install(command, model, transfer.manifest)

    def _load_staged(
        self, command: p.Deploy, path: Path, manifest: p.Manifest | None, prefix: str = ""
    ) -> LoadedModel | None:
        """Load and stage ``path``; on failure report why and return None (nothing changes)."""
        try:
            model = load_model(path, command.artifact.format, threads=self.config.inference.threads)
            # an active deploy brings its budgets; a fallback serves under the active model's
            sent = command.budgets if command.slot is p.Slot.ACTIVE else None
            budgets = (
                self.budgets if sent is None else effective_budgets(self.config.fallback, sent)
            )
            self._stage(model, manifest, budgets)
        except (ModelLoadError, InferenceError, ManifestRejected) as exc:
            self._event(p.EventKind.MODEL_LOAD_FAILED, str(exc), model=str(command.model))
            self._fail_deploy(command, f"{prefix}{exc}")
            return None
        return model

    def _stage(
        self, model: LoadedModel, manifest: p.Manifest | None, budgets: p.Budgets | None = None
    ) -> None:
        """Run the manifest's golden cases when there is a manifest, else the zero-input test.

        The signature was checked when the deploy arrived; only expiry can change since.
        """
        if manifest is not None:
            check_expiry(manifest, p.utcnow())
        if manifest is None or not manifest.golden:
            self._smoke_test(model)
        else:
            shapes = {
                s.name: tuple(d if isinstance(d, int) and d > 0 else 1 for d in s.shape)
                for s in model.inputs
            }
            check_golden(manifest, model.run, shapes)
        feed = self._zero_feed(model)
        times = []
        for _ in range(STAGING_TIMED_RUNS):
            t0 = time.perf_counter()
            model.run(feed)
            times.append((time.perf_counter() - t0) * 1e3)
        check_latency(
            manifest,
            model.format,
            float(np.median(times)),
            factor=self.config.fallback.staging_latency_factor,
            budget_ms=(budgets or self.budgets).latency_ms,
            budget_from=(budgets or self.budgets).latency_from,
        )

    @staticmethod
    def _zero_feed(model: LoadedModel | RulesModel) -> dict[str, np.ndarray]:
        spec = model.inputs[0]
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
        return {spec.name: np.zeros(shape, dtype=spec.dtype)}

    def _smoke_test(self, model: LoadedModel) -> None:
        """Run the model once on zeros: it must load, accept its input and return finite numbers."""
        outputs = model.run(self._zero_feed(model))
        for name, value in outputs.items():
            if not np.all(np.isfinite(value)):
                raise InferenceError(f"smoke test: output {name!r} is not finite on a zero input")

    def _keep(self, command: p.Deploy, model: LoadedModel, manifest: p.Manifest | None) -> None:
        """Keep a staged model on disk without activating it: as the fallback tier (loaded only
        when the chain falls to it), or preloaded until an active deploy of the same file (a
        maintenance window opened) activates it from there without another transfer."""
        ref = p.ActiveModel(
            model=command.model, sha256=command.artifact.sha256, format=command.artifact.format
        )
        model.close()
        if manifest is not None:
            self.activation.save_manifest(ref.sha256, manifest)
        # disk writes outside the lock inference takes
        if command.slot is p.Slot.FALLBACK:
            self.activation.set_fallback(ref)
            kind, what = p.EventKind.FALLBACK_STAGED, "staged as the fallback tier"
        else:
            self.activation.set_preloaded(ref)
            kind, what = p.EventKind.PRELOADED, "preloaded: kept on disk until it is activated"
        self.activation.clear_pending()
        if command.slot is p.Slot.FALLBACK:
            with self._tier_lock:
                self.ladder.broken.discard(p.Tier.FALLBACK)
                self._refresh_tiers()
        self._event(
            kind, f"{command.model} {what}", model=str(command.model), size=command.artifact.size
        )
        self._publish_birth()

    def _preload_answered(self, command: p.Deploy, pointer: Pointer) -> bool:
        """Answer a preload of what is already active or preloaded (True), or leave it (False)."""
        sha256 = command.artifact.sha256
        if pointer.active is not None and pointer.active.sha256 == sha256:
            status = "already active"
        elif pointer.preloaded is not None and pointer.preloaded.sha256 == sha256:
            status = "already preloaded"
            if pointer.preloaded.model != command.model:  # the same file under another name
                self.activation.set_preloaded(p.replace(pointer.preloaded, model=command.model))
                self._publish_birth()
        else:
            return False
        self.activation.clear_pending()
        self._reply(command.id, True, status=status, model=str(command.model))
        return True

    def _activate_loaded(
        self, command: p.Deploy, model: LoadedModel, manifest: p.Manifest | None
    ) -> None:
        active = p.ActiveModel(
            model=command.model, sha256=command.artifact.sha256, format=command.artifact.format
        )
        if manifest is not None:
            self.activation.save_manifest(active.sha256, manifest)
        # fsyncs: outside the lock the inference thread takes
        self.activation.activate(active, command.budgets)
        self.activation.clear_pending()
        with self._tier_lock:
            previous = self._serving
            self._serving = Serving(model, active)
            self._apply_budgets(command.budgets)
            self.ladder.reset(time.monotonic())
            self._refresh_tiers()
        if previous is not None and previous.tier is not p.Tier.ACTIVE:
            self._event(
                p.EventKind.TIER_CHANGED,
                f"serving active ({command.model}) instead of {previous.tier.value}: "
                "a new model was activated",
                **{"from": previous.tier.value, "to": "active", "cause": "new model activated"},
                model=str(command.model),
                probe=False,
            )
        self._event(
            p.EventKind.ACTIVATED,
            f"{command.model} active" + (f" (was {previous.active.model})" if previous else ""),
            model=str(command.model),
            previous=str(previous.active.model) if previous else None,
        )
        self._publish_birth()

    def _fail_deploy(self, command: p.Deploy, reason: str) -> None:
        """Reject the deploy: the active model stays, the reason goes to the controller."""
        self.activation.clear_pending()
        active = self._active_model()
        current = active.model if active else None
        message = (
            f"deploy of {command.model} failed: {reason}; still running {current or 'no model'}"
        )
        self._reply(command.id, False, message)
        self._event(p.EventKind.DEPLOY_FAILED, message, model=str(command.model))

    # -- inference ------------------------------------------------------------------------------

    def _infer(self) -> None:
        period = 1.0 / self.config.inference.rate_hz
        interval = self.config.telemetry.interval_s
        window = TelemetryWindow(p.utcnow(), self._cpu_s())
        next_report = time.monotonic() + interval
        next_tick = time.monotonic()
        started = self._last_fall = time.monotonic()
        healthy = False
        assert self.source is not None
        while not self._stop.is_set():
            reading = self.source.read(timeout=min(period, 0.5))
            serving = self._serving
            move: Move | None = None
            now = time.monotonic()
            with self._tier_lock:
                if reading is not None and serving is not None:
                    outcome = self._infer_once(serving, reading, window)
                    if self._serving is serving:  # not swapped by an activation meanwhile
                        move = (
                            self.ladder.succeeded(outcome, now)
                            if isinstance(outcome, float)
                            else self.ladder.failed(outcome, now)
                        )
                was_probing = self.ladder.probing
                move = move or self.ladder.tick(now)
                if was_probing and not self.ladder.probing and move is None:
                    self.runs.probe(None, self.ladder.hold_s)  # the probe lasted: it stays up
            if now >= next_report or move is not None:
                # cut the window at every move, so each record has the one tier that served it
                next_report = now + interval
                power = self._report(window, serving)
                with self._tier_lock:
                    if move is None and self._serving is serving:
                        move = self.ladder.power(power, now)
            if move is not None:
                with self._tier_lock:
                    self._apply(move)
            if move is not None and not move.probe:
                healthy = False
            if not healthy and now - max(started, self._last_fall) >= (
                self.config.fallback.healthy_after_s
            ):
                healthy = True
                self.runs.healthy()
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_tick = time.monotonic()  # behind: skip ticks rather than build a backlog

    def _infer_once(self, serving: Serving, reading: Any, window: TelemetryWindow) -> float | str:
        """Run one inference and publish its result: its latency in ms, or why it failed.

        Paid on every inference, so nothing here is worked out twice: the feed shape and the
        Result's constant fields belong to ``serving``, the thread's CPU time (a system call,
        ~1.5 us) is read for few inferences (``TelemetryWindow.sample_cpu``), and the
        Result is encoded without being validated (benchmarks/README.md, "Inference overhead").
        """
        try:
            feed = reading.values.reshape(serving.feed_shape)
        except ValueError:
            window.error()
            reason = (
                f"input has {reading.values.size} values; model {serving.active.model} expects "
                f"shape {serving.model.inputs[0].shape}. Check the input source's window size."
            )
            self._event(p.EventKind.INPUT_ERROR, reason, throttle="input-shape")
            return reason
        sample_cpu = window.sample_cpu
        c0 = time.thread_time_ns() if sample_cpu else 0
        feeds = serving.feeds
        feeds[serving.input_name] = feed
        t0 = time.perf_counter_ns()
        try:
            outputs = serving.model.run(feeds)
        except InferenceError as exc:
            window.error()
            self._event(p.EventKind.INFERENCE_ERROR, str(exc), throttle="inference")
            return str(exc)
        t1 = time.perf_counter_ns()
        latency_ms = (t1 - t0) / 1e6
        cpu_s = (time.thread_time_ns() - c0) / 1e9 if sample_cpu else None
        values: dict[str, list[float]] | None = None
        if self._publish_results:  # the lists are needed anyway: check them, not the arrays
            only = serving.only_output
            if only is not None and (v := outputs[only]).size == 1:  # a score: no loop, no list
                x = float(v.item())
                if not math.isfinite(x):
                    return self._non_finite(serving, window)
                values = {only: [x]}
            else:
                values = {}
                for name, v in outputs.items():
                    floats = v if v.dtype.kind == "f" else v.astype(float)
                    xs = values[name] = floats.ravel().tolist()
                    if not math.isfinite(sum(xs)) and not all(map(math.isfinite, xs)):
                        return self._non_finite(serving, window)  # a finite sum proves every term
        elif not all(np.isfinite(v).all() for v in outputs.values()):
            return self._non_finite(serving, window)
        window.observe(latency_ms, cpu_s)
        seq = self.inference_seq
        self.inference_seq = seq + 1
        if values is not None:
            link = self.link
            assert link is not None
            id_ = f"{self.session}-{seq}"
            link.publish(
                self._results_topic,
                serving.results.encode(id_, seq, latency_ms, values, reading.ts, t1),
                qos=0,
            )
        return latency_ms

    def _non_finite(self, serving: Serving, window: TelemetryWindow) -> str:
        window.error()
        reason = f"model {serving.active.model} returned NaN or infinity; result withheld"
        self._event(p.EventKind.INFERENCE_ERROR, reason, throttle="non-finite")
        return reason

    def _cpu_s(self) -> float:
        return time.process_time()  # user + system time of all the agent's threads

    def _report(self, window: TelemetryWindow, serving: Serving | None) -> float | None:
        """Cut the telemetry window (its tier is the one that served it); return its power."""
        now, cpu = p.utcnow(), self._cpu_s()
        window_s = max((now - window.start).total_seconds(), 1e-6)
        reading = self.meter.read(
            window_s, max(cpu - window.start_cpu_s, 0.0), window.inference_cpu_s, window.inferences
        )
        record = window.cut(
            now,
            cpu,
            serving.active.model if serving else None,
            serving.tier if serving else p.Tier.NONE,
            reading.power_w,
            reading.energy_per_inference_j,
            reading.method,
            self.outbox.dropped,
        )
        self._publish(p.Channel.TELEMETRY, p.TelemetryBatch(session=self.session, records=[record]))
        if reading.note:
            self._event(
                p.EventKind.POWER_METER,
                reading.note,
                throttle="power-meter",
                method=reading.method.value,
            )
        return reading.power_w


def run_agent(config: AgentConfig, stop: threading.Event) -> int:
    """Run until ``stop`` is set (0) or the broker refuses our credentials (3)."""
    agent = Agent(config)
    agent.start()
    while not stop.wait(0.5):
        if agent.link is not None and agent.link.fatal is not None:
            agent.stop()
            return 3
    agent.stop()
    return 0
