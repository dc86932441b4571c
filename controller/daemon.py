"""The controller daemon: MQTT link, ingest, blob server and the reconcile loop, wired together."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler

from agent import protocol as p
from agent.config import TlsConfig
from agent.link import MqttLink, Will
from controller import registry
from controller.blobs import BlobServer
from controller.config import ControllerConfig, load_controller_config
from controller.db import open_db
from controller.errors import InvalidRequest
from controller.home import Home
from controller.ingest import Ingest, stored_messages
from controller.planning import device_budgets, fallbacks, is_planned, measured, plan
from controller.reconcile import (
    DeployDecision,
    DeviceView,
    limit_transfers,
    plan_deploys,
    plan_fallback_deploys,
)
from controller.rollouts_job import RolloutsJob
from controller.selection import Measured
from controller.windows import describe, inside, next_opening
from device_configs.schema import DeviceProfile, ProfileError, load_profiles
from model_store.catalog import Catalog
from model_store.signing import Signer

if TYPE_CHECKING:
    from controller.api_commands import ApiServer
    from controller.ingest_workers import WorkerPool

log = logging.getLogger(__name__)

TELEMETRY_REFRESH_S = 30.0  # how stale the plan's field figures may be
TRANSFER_STALE = timedelta(minutes=10)  # an unanswered Deploy older than this holds no slot
ROLLBACK_GRANT_TTL = timedelta(hours=1)  # a re-sent rollback gets a fresh grant
BLOB_REQ_SUFFIX = "/" + p.Channel.BLOB_REQ.value  # gf/v1/{device}/blob/req


class Controller:
    """Everything ``greenfleet controller run`` runs. Construct, :meth:`start`, :meth:`stop`."""

    def __init__(
        self,
        home: Home,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsConfig | None = None,
        allow_plaintext: bool = False,
        reconcile_interval_s: float = 2.0,
        resend_after: timedelta = timedelta(seconds=30),
        client_id: str = "gf-controller",
        api: ApiServer | None = None,
        workers: WorkerPool | None = None,
    ) -> None:
        self.home = home
        self.api = api  # the read-only HTTP API served in-process (controller.api_commands)
        # telemetry ingest in worker processes on a shared subscription (ingest_workers)
        self.workers = workers
        shared = workers is not None and workers.count > 0
        self.reconcile_interval_s = reconcile_interval_s
        self.resend_after = resend_after
        self._reconcile_lock = threading.Lock()
        self._again = threading.Event()  # reconcile_soon during a pass: run another
        self.session = p.new_id()[:16]
        self.link = MqttLink(
            client_id=client_id,
            host=host,
            port=port,
            username=username,
            password=password,
            # TLS with the fleet CA pinned (controller.identity); plain TCP only to loopback
            # unless allow_plaintext, refused by MqttLink with a ConfigError otherwise
            tls=tls,
            allow_plaintext=allow_plaintext,
            # acknowledged to the broker once stored (Ingest), so a message in the ingest
            # queue when the controller dies is delivered again to its persistent session
            on_message_acked=self._on_message,
            subscriptions=[
                (p.subscription(channel), 1)
                for channel in (
                    p.Channel.STATE,
                    p.Channel.REPLY,
                    p.Channel.EVENTS,
                    *([] if shared else [p.Channel.TELEMETRY]),
                    p.Channel.BLOB_REQ,
                )
            ],
            max_inflight=256,
            # presence for agents (protocol.ControllerState): published after the subscriptions
            # on every connect, so "online" always means "subscribed on this connection"
            birth=self._presence,
            will=Will(p.CONTROLLER_TOPIC, self._presence(online=False)[1]),
        )
        if shared:
            # the session is persistent: drop a telemetry subscription an earlier run without
            # workers left in it, or both would store every record
            self.link.unsubscribe(p.subscription(p.Channel.TELEMETRY))
        self.blobs = BlobServer(self._resolve_blob, self._publish_chunk, allowed=self._was_sent)
        self._sent: set[tuple[str, str]] = set()  # (device, sha256) of every Deploy sent
        self.ingest = Ingest(home.database, on_change=self.reconcile_soon, on_stored=self._stored)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._profile_cache: dict[str, DeviceProfile] | None = None
        self._measured: tuple[float, dict[tuple[str, str], Measured]] | None = None
        self._last_notes: dict[tuple[str, str], str] = {}
        self._config: tuple[bytes | None, ControllerConfig] | None = None
        self._signer: Signer | None = None

    def start(self) -> None:
        self.home.prepare()
        self._controller_config()  # a bad controller.yaml stops the start, naming the key
        if self.api is not None:
            self.api.start()  # first: a port in use stops the start before anything runs
        self._db = open_db(self.home.database)  # reconcile's own connection
        self._catalog = Catalog(self._db, self.home.store)
        self._sent.update(
            (row[0], row[1])
            for row in self._db.execute("SELECT DISTINCT device, sha256 FROM deployments")
        )
        self.blobs.start()
        self.ingest.start()
        if self.workers is not None:
            self.workers.start()  # first retires the sessions of surplus workers, if any
        self.link.start()
        self.scheduler.add_job(
            self.reconcile,
            "interval",
            seconds=self.reconcile_interval_s,
            id="reconcile",
            max_instances=1,
            coalesce=True,
        )
        # rollouts live in SQLite: this job picks up where a killed controller stopped
        self._rollouts = RolloutsJob(open_db(self.home.database), self._controller_config)
        self.scheduler.add_job(
            self.advance_rollouts,
            "interval",
            seconds=self.reconcile_interval_s,
            id="rollouts",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.start()
        log.info(
            "controller started; home %s, broker %s:%s",
            self.home.root,
            self.link.host,
            self.link.port,
        )

    def _presence(self, online: bool = True) -> tuple[str, bytes]:
        state = p.ControllerState(online=online, session=self.session, since=p.utcnow())
        return p.CONTROLLER_TOPIC, p.encode(state)

    def stop(self) -> None:
        if self.api is not None:
            self.api.stop()
        self.scheduler.shutdown(wait=False)
        self.blobs.stop()  # first: it deletes its retained chunks while the link is up
        self.link.stop(last=self._presence(online=False))
        if self.workers is not None:
            self.workers.stop()
        self.ingest.stop()

    def _on_message(self, topic: str, payload: bytes, ack: Callable[[], None]) -> None:
        if topic.endswith(BLOB_REQ_SUFFIX):  # served, not stored: controller.blobs
            self.blobs.offer(topic, payload)
            ack()
            return
        self.ingest.offer(topic, payload, ack)

    def _clear_revoked_states(self, db: Any) -> None:
        """Delete the retained birth of every revoked device from the broker (an empty retained
        message): its last will never comes (the ACL denies it everything), and a retained
        birth would show it online to every reader and to this controller after a restart."""
        for device in registry.states_to_clear(db):
            self.link.publish(p.topic(device, p.Channel.STATE), b"", qos=1, retain=True)
            registry.state_cleared(db, device)
            log.info("revoked device %s: deleted its retained state from the broker", device)

    def _stored(self, acks: dict[str, tuple[list[str], list[str]]]) -> None:
        """Tell agents what ingest stored (protocol.Stored); QoS 0: a lost one costs a resend."""
        for topic, payload in stored_messages(acks):
            self.link.publish(topic, payload, qos=0)

    def _publish_chunk(self, topic: str, data: bytes) -> None:
        self.link.publish(topic, data, qos=1, retain=True)  # retained: controller.blobs

    def _was_sent(self, device: str, sha256: str) -> bool:
        """Whether a Deploy of this artifact went to this device (blob thread; see blobs)."""
        return (device, sha256) in self._sent

    def _resolve_blob(self, sha256: str) -> Path | None:
        path = self.home.store / sha256
        return path if path.is_file() else None

    def reconcile_soon(self) -> None:
        """A device changed state: reconcile (and advance rollouts) now, not at the next tick."""
        self._again.set()
        for job_id in ("rollouts", "reconcile"):
            if job_id == "reconcile" and self._reconcile_lock.locked():
                continue  # the pass under way sees _again and runs once more
            job = self.scheduler.get_job(job_id)
            if job is not None:
                job.modify(next_run_time=p.utcnow())

    def advance_rollouts(self) -> None:
        """One decision for every live rollout; reconcile sends what it changed right away."""
        if self._rollouts.tick(p.utcnow()):
            self.reconcile()  # here, not via the scheduler: a running pass would make it skip

    def _resolve(
        self, views: list[DeviceView], rows: dict[str, dict[str, Any]] | None = None
    ) -> list[DeviceView]:
        """Replace a planned desired version by the variant the plan picks for each device.

        A device with no variant that fits keeps its current model; the reason is recorded as
        a controller event on the device once, not at every tick.
        """
        planned = [
            v for v in views if v.desired_model and is_planned(self._catalog, v.desired_model)
        ]
        if not planned:
            return views
        if rows is None:
            rows = {r["id"]: r for r in registry.devices(self._db)}
        planned_rows = [rows[v.id] for v in planned]
        choices = {
            item.device: item.decision
            for item in plan(
                self._db,
                self._catalog,
                self._profiles(),
                planned_rows,
                telemetry=self._telemetry(),
            )
        }
        resolved = []
        for view in views:
            decision = choices.get(view.id)
            if decision is None:
                resolved.append(view)
                continue
            if decision.chosen is None:
                self._note(
                    view.id,
                    "plan_failed",
                    f"keeps {view.active_model or 'no model'}: {decision.reason}",
                    key=f"failed: {decision.reason}",
                )
                resolved.append(replace(view, desired_model=view.active_model))
                continue
            self._note(
                view.id, "planned", f"{decision.chosen}: {decision.reason}", key=decision.chosen
            )
            resolved.append(replace(view, desired_model=decision.chosen))
        return resolved

    def _with_fallbacks(
        self, views: list[DeviceView], rows: dict[str, dict[str, Any]]
    ) -> list[DeviceView]:
        """Set the fallback variant of every online device that runs its desired model.

        Only those can be sent one (reconcile.plan_fallback_deploys), so the others are not
        worth the catalog reads at every tick. The choice is recorded as a controller event
        on the device when it changes.
        """
        ready = [
            v for v in views if v.online and v.desired_model and v.active_model == v.desired_model
        ]
        if not ready:
            return views
        choices = fallbacks(
            self._catalog,
            self._profiles(),
            [(rows[v.id], v.desired_model or "") for v in ready],
        )
        out = []
        for view in views:
            choice = choices.get(view.id)
            if choice is None:
                out.append(view)
                continue
            if choice.chosen is None:
                message, key = f"no fallback variant: {choice.reason}", f"none: {choice.reason}"
            else:
                message, key = f"{choice.chosen}: {choice.reason}", choice.chosen
            self._note(view.id, "fallback_planned", message, key=key, topic="fallback")
            out.append(replace(view, desired_fallback=choice.chosen))
        return out

    def _controller_config(self) -> ControllerConfig:
        """controller.yaml, parsed again when its content changes (a small read per pass).

        At start a bad file is an error (InvalidRequest, naming the key); later, a bad edit is
        logged and the last good settings stay in force.
        """
        path = self.home.config
        try:
            stamp: bytes | None = path.read_bytes()
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            if self._config is None:
                raise InvalidRequest(f"cannot read {path}: {exc}") from exc
            log.error("cannot read %s (%s); keeping the settings read before", path, exc)
            return self._config[1]
        if self._config is not None and self._config[0] == stamp:
            return self._config[1]
        try:
            config = load_controller_config(path)
        except InvalidRequest as exc:
            if self._config is None:
                raise
            log.error("%s; keeping the settings read before", exc)
            self._config = (stamp, self._config[1])
            return self._config[1]
        if self._config is not None:
            log.info("read %s again", path)
        self._config = (stamp, config)
        return config

    def _with_windows(
        self, views: list[DeviceView], rows: dict[str, dict[str, Any]], now: datetime
    ) -> list[DeviceView]:
        """Mark the devices outside their site's maintenance window (the ``site`` label), which
        may fetch their desired model but not activate it. An explicit rollback does not wait:
        it is a repair, not a change."""
        config = self._controller_config()
        out = []
        for view in views:
            row = rows[view.id]
            if (
                not config.sites
                or view.desired_model in (None, view.active_model)
                or row.get("desired_rollback")
            ):
                out.append(view)
                continue
            windows = config.windows(json.loads(row["labels"] or "{}").get("site"))
            if inside(windows, now):
                out.append(view)
                continue
            opens = describe(next_opening(windows, now))
            out.append(replace(view, may_activate=False, window_opens=opens))
        return out

    def _telemetry(self) -> dict[tuple[str, str], Measured]:
        """Telemetry per (device class, variant), aggregated at most every TELEMETRY_REFRESH_S:
        the query scans the whole telemetry table, and reconcile runs every couple of seconds."""
        now = time.monotonic()
        if self._measured is None or now - self._measured[0] > TELEMETRY_REFRESH_S:
            self._measured = (now, measured(self._db))
        return self._measured[1]

    def _profiles(self) -> dict[str, DeviceProfile]:
        if self._profile_cache is None:
            try:
                self._profile_cache = load_profiles()
            except ProfileError as exc:
                log.error("device profiles unusable, planning disabled: %s", exc)
                self._profile_cache = {}
        return self._profile_cache

    def _note(self, device: str, event: str, message: str, key: str, topic: str = "plan") -> None:
        """Record a controller-side event for a device when ``key`` (what it says about
        ``topic``: the plan, the fallback) changes."""
        if self._last_notes.get((device, topic)) == key:
            return
        self._last_notes[(device, topic)] = key
        log.info("%s: %s", device, message)
        with self._db.conn:
            self._db.table("events").insert(
                {
                    "id": p.new_id(),
                    "device": device,
                    "ts": registry.iso(p.utcnow()),
                    "session": "controller",
                    "event": event,
                    "message": message,
                    "detail": "{}",
                },
                pk="id",
            )

    def reconcile(self) -> int:
        """Send Deploy to every online device whose desired model differs from its active one,
        and a fallback-slot Deploy to those that run it but lack their fallback variant.

        A change noted while a pass runs (``reconcile_soon``) gets a pass of its own right
        after: the scheduler skips a job that is still running, which delayed such changes by a
        whole interval."""
        sent = 0
        while True:
            self._again.clear()
            sent += self._reconcile_once()
            if not self._again.is_set():
                return sent

    def _reconcile_once(self) -> int:
        if not self.link.connected.is_set():
            return 0
        with self._reconcile_lock:
            db = self._db
            self._clear_revoked_states(db)
            formats = {m.id: m.format.value for m in self._catalog.all()}
            now = p.utcnow()
            rows = {r["id"]: r for r in registry.devices(db)}
            resolved = self._with_fallbacks(
                self._resolve(registry.views(db, list(rows.values())), rows), rows
            )
            resolved = self._with_windows(resolved, rows, now)
            last = {slot: registry.last_deploys(db, slot.value) for slot in p.Slot}
            last_active = last[p.Slot.ACTIVE]
            decisions, skips = plan_deploys(
                resolved,
                formats,
                last_active,
                now,
                resend_after=self.resend_after,
                last_preloads=last[p.Slot.PRELOAD],
            )
            for skip in skips:
                if "maintenance window" in skip.reason:
                    self._note(skip.device, "window_wait", skip.reason, skip.reason, "window")
            staging, _ = plan_fallback_deploys(
                resolved,
                formats,
                last_active,
                last[p.Slot.FALLBACK],
                now,
                resend_after=self.resend_after,
            )
            busy = {
                device
                for per_slot in last.values()
                for device, deploy in per_slot.items()
                if deploy.status == "sent"
                and now - deploy.sent_at < TRANSFER_STALE
                and device in rows
                and rows[device]["online"]  # one that dropped off does not hold its slot
            }
            sending, waiting = limit_transfers(
                [*decisions, *staging], busy, self._controller_config().max_concurrent_transfers
            )
            if waiting:
                log.info("%d deploys wait for a transfer slot: %s", len(waiting), waiting[0].reason)
            for decision in sending:
                self._send(decision, rows[decision.device], now)
            return len(sending)

    def _grant(self, device: str, sha256: str, now: datetime) -> p.SignedManifest:
        """A signed RollbackGrant: enrolled agents accept an older version only with one."""
        if self._signer is None:
            self._signer = Signer.load_or_create(self.home.keys)
        grant = p.RollbackGrant(
            device=device, sha256=sha256, issued=now, expires=now + ROLLBACK_GRANT_TTL
        )
        return self._signer.sign(grant)

    def _send(self, decision: DeployDecision, row: dict[str, Any], now: datetime) -> None:
        """Record a Deploy in the deployments table, then publish it (QoS 1)."""
        db = self._db
        model = self._catalog.get(decision.model)
        slot = p.Slot(decision.slot)
        # a fallback is a variant of the version the device already runs: never older
        rollback = slot is not p.Slot.FALLBACK and bool(row.get("desired_rollback"))
        # the budgets the plan chose against travel with the model, so the agent falls on them
        profile = self._profiles().get(row.get("device_class") or "")
        budgets = (
            device_budgets(row, profile) if slot is p.Slot.ACTIVE and profile is not None else None
        )
        command = p.Deploy(
            model=model.ref,
            artifact=model.artifact(),
            rollback=rollback,
            rollback_grant=self._grant(decision.device, model.sha256, now) if rollback else None,
            manifest=model.manifest,
            slot=slot,
            budgets=budgets,
        )
        self._sent.add((decision.device, model.sha256))
        with db.conn:
            db.table("deployments").insert(
                {
                    "id": command.id,
                    "device": decision.device,
                    "model": decision.model,
                    "sha256": model.sha256,
                    "sent_at": registry.iso(now),
                    "status": "sent",
                    "error": None,
                    "replied_at": None,
                    "slot": slot.value,
                },
                pk="id",
            )
        self.link.publish(p.topic(decision.device, p.Channel.CMD), p.encode(command), qos=1)
        log.info("sent %s deploy of %s to %s", slot.value, decision.model, decision.device)
