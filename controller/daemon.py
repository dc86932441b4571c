"""The controller daemon: MQTT link, ingest, blob server and the reconcile loop, wired together."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler

from agent import protocol as p
from agent.link import MqttLink
from controller import registry
from controller.blobs import BlobServer
from controller.db import open_db
from controller.home import Home
from controller.ingest import Ingest
from controller.reconcile import plan_deploys
from model_store.catalog import Catalog

log = logging.getLogger(__name__)


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

    def reconcile(self) -> int:
        """Send Deploy to every online device whose desired model differs from its active one."""
        if not self.link.connected.is_set():
            return 0
        with self._reconcile_lock:
            db = self._db
            formats = {m.id: m.format.value for m in self._catalog.all()}
            now = p.utcnow()
            decisions, _ = plan_deploys(
                registry.views(db),
                formats,
                registry.last_deploys(db),
                now,
                resend_after=self.resend_after,
            )
            for decision in decisions:
                model = self._catalog.get(decision.model)
                command = p.Deploy(model=model.ref, artifact=model.artifact())
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
