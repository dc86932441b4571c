"""The controller daemon: MQTT link, ingest, blob server and the reconcile loop, wired together."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from agent import protocol as p
from agent.link import MqttLink
from controller import registry
from controller.blobs import BlobServer
from controller.db import open_db
from controller.home import Home
from controller.ingest import Ingest
from controller.planning import is_planned, measured, plan
from controller.reconcile import DeviceView, plan_deploys
from controller.selection import Measured
from device_configs.schema import DeviceProfile, ProfileError, load_profiles
from model_store.catalog import Catalog

log = logging.getLogger(__name__)

TELEMETRY_REFRESH_S = 30.0  # how stale the plan's field figures may be


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
        reconcile_interval_s: float = 2.0,
        resend_after: timedelta = timedelta(seconds=30),
        client_id: str = "gf-controller",
    ) -> None:
        self.home = home
        self.reconcile_interval_s = reconcile_interval_s
        self.resend_after = resend_after
        self._reconcile_lock = threading.Lock()
        self.link = MqttLink(
            client_id=client_id,
            host=host,
            port=port,
            username=username,
            password=password,
            on_message=self._on_message,
            subscriptions=[
                (p.subscription(channel), 1)
                for channel in (
                    p.Channel.STATE,
                    p.Channel.REPLY,
                    p.Channel.EVENTS,
                    p.Channel.TELEMETRY,
                    p.Channel.BLOB_REQ,
                )
            ],
            max_inflight=256,
        )
        self.blobs = BlobServer(self._resolve_blob, self._publish_chunk)
        self.ingest = Ingest(home.database, self.blobs.request, on_change=self.reconcile_soon)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._profile_cache: dict[str, DeviceProfile] | None = None
        self._measured: tuple[float, dict[tuple[str, str], Measured]] | None = None
        self._last_notes: dict[str, str] = {}

    def start(self) -> None:
        self.home.prepare()
        self._db = open_db(self.home.database)  # reconcile's own connection
        self._catalog = Catalog(self._db, self.home.store)
        self.blobs.start()
        self.ingest.start()
        self.link.start()
        self.scheduler.add_job(
            self.reconcile,
            "interval",
            seconds=self.reconcile_interval_s,
            id="reconcile",
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

    def stop(self) -> None:
        self.scheduler.shutdown(wait=False)
        self.link.stop()
        self.ingest.stop()
        self.blobs.stop()

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.ingest.offer(topic, payload)

    def _publish_chunk(self, topic: str, data: bytes) -> None:
        self.link.publish(topic, data, qos=1)

    def _resolve_blob(self, sha256: str) -> Path | None:
        path = self.home.store / sha256
        return path if path.is_file() else None

    def reconcile_soon(self) -> None:
        """A device changed state: reconcile now instead of at the next tick."""
        job = self.scheduler.get_job("reconcile")
        if job is not None:
            job.modify(next_run_time=p.utcnow())

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

    def _note(self, device: str, event: str, message: str, key: str) -> None:
        """Record a controller-side event for a device when ``key`` (what it is about) changes."""
        if self._last_notes.get(device) == key:
            return
        self._last_notes[device] = key
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
        """Send Deploy to every online device whose desired model differs from its active one."""
        if not self.link.connected.is_set():
            return 0
        with self._reconcile_lock:
            db = self._db
            formats = {m.id: m.format.value for m in self._catalog.all()}
            now = p.utcnow()
            rows = {r["id"]: r for r in registry.devices(db)}
            decisions, _ = plan_deploys(
                self._resolve(registry.views(db, list(rows.values())), rows),
                formats,
                registry.last_deploys(db),
                now,
                resend_after=self.resend_after,
            )
            for decision in decisions:
                model = self._catalog.get(decision.model)
                row = rows[decision.device]
                command = p.Deploy(
                    model=model.ref,
                    artifact=model.artifact(),
                    rollback=bool(row.get("desired_rollback")),
                    manifest=model.manifest,
                )
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
                        },
                        pk="id",
                    )
                self.link.publish(p.topic(decision.device, p.Channel.CMD), p.encode(command), qos=1)
                log.info("sent deploy of %s to %s", decision.model, decision.device)
            return len(decisions)
