"""The controller database: SQLite in WAL mode, schema changed only by numbered migrations.

Every thread opens its own connection (``open_db``); WAL lets the CLI read while the daemon
writes. A migration is a function appended to ``MIGRATIONS``; never edit one that shipped.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from controller.errors import DatabaseError


def _m1_initial(db: sqlite_utils.Database) -> None:
    db.table("devices").create(
        {
            "id": str,
            "device_class": str,
            "labels": str,
            "online": int,
            "session": str,
            "agent_version": str,
            "runtimes": str,
            "hardware": str,
            "active_model": str,
            "active_sha256": str,
            "desired_model": str,
            "first_seen": str,
            "last_seen": str,
            "state_changed": str,
        },
        pk="id",
        not_null={"id"},
    )
    db.table("models").create(
        {
            "id": str,
            "name": str,
            "version": str,
            "format": str,
            "sha256": str,
            "size": int,
            "path": str,
            "created": str,
        },
        pk="id",
    )
    db.table("models").create_index(["sha256"])
    db.table("deployments").create(
        {
            "id": str,
            "device": str,
            "model": str,
            "sha256": str,
            "sent_at": str,
            "status": str,
            "error": str,
            "replied_at": str,
        },
        pk="id",
    )
    db.table("deployments").create_index(["device", "sent_at"])
    db.table("telemetry").create(
        {
            "device": str,
            "session": str,
            "seq": int,
            "start": str,
            "window_s": float,
            "model": str,
            "tier": str,
            "inferences": int,
            "errors": int,
            "latency_p50_ms": float,
            "latency_p95_ms": float,
            "latency_p99_ms": float,
            "cpu_s": float,
            "power_w": float,
            "energy_per_inference_j": float,
            "power_method": str,
            "received_at": str,
        },
        pk=("device", "session", "seq"),
    )
    db.table("telemetry").create_index(["device", "start"])
    db.table("events").create(
        {
            "id": str,
            "device": str,
            "ts": str,
            "session": str,
            "event": str,
            "message": str,
            "detail": str,
        },
        pk="id",
    )
    db.table("events").create_index(["device", "ts"])
    db.table("replies").create(
        {"id": str, "device": str, "ref": str, "ts": str, "ok": int, "error": str, "detail": str},
        pk="id",
    )
    db.table("replies").create_index(["ref"])


def _m2_variants(db: sqlite_utils.Database) -> None:
    """Model versions (task, signature, accuracy floor); variants with profile and manifest."""
    db.table("model_versions").create(
        {
            "id": str,  # name:version, without the variant's "+build" part
            "name": str,
            "version": str,
            "task": str,
            "inputs": str,  # JSON list of TensorSignature
            "outputs": str,
            "accuracy_floor": float,
            "threshold": float,  # decision threshold for anomaly scores, if the model has one
            "rules": str,  # JSON rule baseline for the agent's last fallback tier
            "created": str,
            "compressed": str,
        },
        pk="id",
    )
    models = db.table("models")
    for column, kind in (
        ("base", str),
        ("variant", str),
        ("precision", str),
        ("technique", str),
        ("eligible", int),
        ("reason", str),
        ("notes", str),
        ("details", str),
        ("profile", str),
        ("manifest", str),
    ):
        models.add_column(column, kind)
    for model_id, name, version, created in db.execute(
        "SELECT id, name, version, created FROM models"
    ).fetchall():
        base_version, _, variant = version.partition("+")
        base = f"{name}:{base_version}"
        models.update(model_id, {"base": base, "variant": variant, "eligible": 1})
        db.table("model_versions").insert(
            {"id": base, "name": name, "version": base_version, "created": created},
            pk="id",
            ignore=True,
        )


def _m3_rollback(db: sqlite_utils.Database) -> None:
    """Devices report their last-good model; a desired model can be an explicit rollback."""
    devices = db.table("devices")
    devices.add_column("last_good_model", str)
    devices.add_column("desired_rollback", int)


def _m4_fallback_tier(db: sqlite_utils.Database) -> None:
    """Devices report a staged fallback variant and the tier serving now; deploys name a slot.

    ``tier_at`` is the agent's timestamp of the newest tier report, so an older report that
    arrives later (telemetry replayed after a reconnect) cannot overwrite a newer one. Deploys
    sent before this migration all went to the active slot.
    """
    devices = db.table("devices")
    devices.add_column("fallback_model", str)
    devices.add_column("fallback_sha256", str)
    devices.add_column("tier", str)
    devices.add_column("tier_at", str)
    db.table("deployments").add_column("slot", str, not_null_default="active")
    db.table("deployments").create_index(["device", "slot", "sent_at"])


def _m5_preload(db: sqlite_utils.Database) -> None:
    """Devices report a model fetched and staged ahead of its maintenance window (preloaded)."""
    devices = db.table("devices")
    devices.add_column("preloaded_model", str)
    devices.add_column("preloaded_sha256", str)


def _m6_rollouts(db: sqlite_utils.Database) -> None:
    """Staged rollouts (controller.rollout) and their members; devices can be pinned.

    ``gates`` holds the gate results of the rollout's last decision (for ``rollout show`` and
    ``watch``); ``extra`` holds any state field this schema has no column for, as JSON.
    Rollout events go to the events table, their rollout id in the new ``rollout`` column.
    """
    db.table("rollouts").create(
        {
            "id": str,
            "model": str,
            "spec": str,  # RolloutSpec JSON
            "status": str,
            "wave": int,
            "waves": int,
            "wave_started": str,
            "soak_started": str,
            "metrics_since": str,
            "reason": str,
            "created": str,
            "updated": str,
            "gates": str,
            "extra": str,
        },
        pk="id",
        not_null={"id"},
    )
    db.table("rollouts").create_index(["status"])
    db.table("rollout_members").create(
        {
            "rollout": str,
            "device": str,
            "wave": int,
            "previous_model": str,
            "status": str,
            "since": str,
            "reason": str,
            "extra": str,
        },
        pk=("rollout", "device"),
        foreign_keys=[("rollout", "rollouts", "id")],
    )
    db.table("rollout_members").create_index(["device"])
    devices = db.table("devices")
    devices.add_column("pinned", int, not_null_default=0)
    devices.add_column("pin_reason", str)
    db.table("events").add_column("rollout", str)
    db.table("events").create_index(["rollout", "ts"])


def _m7_identities(db: sqlite_utils.Database) -> None:
    """Broker identities (controller.identity): who may connect, and the broker's settings.

    ``identities`` holds one row per enrolled device (and one for the controller): its auth
    kind, the ``$7$`` hash of its password (never the password), its current certificate's
    serial, and whether it is revoked. ``certificates`` lists every client certificate ever
    issued, so the CRL names old serials too. ``settings`` keeps small JSON documents such as
    the last ``broker config`` options, so later commands regenerate the same broker files.
    """
    db.table("identities").create(
        {
            "id": str,
            "kind": str,  # device | controller
            "device_class": str,
            "labels": str,
            "auth": str,  # password | cert
            "password_hash": str,
            "cert_serial": str,
            "created": str,
            "issued": str,
            "revoked": int,
            "revoked_at": str,
            "revoke_reason": str,
        },
        pk="id",
        not_null={"id"},
    )
    db.table("certificates").create(
        {
            "serial": str,  # lower-case hex
            "identity": str,
            "subject": str,
            "issued": str,
            "not_after": str,
            "revoked_at": str,
            "reason": str,
        },
        pk="serial",
        not_null={"serial"},
    )
    db.table("certificates").create_index(["identity"])
    db.table("settings").create({"key": str, "value": str}, pk="key", not_null={"key"})


TOTALS_KEY = "device, model, tier, power_method"


def _m8_telemetry_rollups(db: sqlite_utils.Database) -> None:
    """Running totals and the newest window per device, kept by triggers on ``telemetry``.

    Metrics scrapes, the plan's field figures and ``devices list`` used to aggregate the whole
    telemetry table: with 1,000 devices x 1,000 windows (1M rows, under 17 minutes of a
    1,000-device fleet at 1 msg/s) a /metrics scrape took 1.06 s, the plan's figures 0.63 s and
    the newest window per device 0.26 s, growing with the table. The triggers fire only for
    rows actually inserted (a replayed record that INSERT OR IGNORE skips adds nothing), in the
    same transaction as the row. ``telemetry_totals`` keys model by '' for "no model"; its sums
    stay NULL until a window reports the quantity, as SQL's SUM over NULLs does.
    """
    db.execute(
        "CREATE TABLE telemetry_totals ("
        " device TEXT NOT NULL, model TEXT NOT NULL, tier TEXT NOT NULL,"
        " power_method TEXT NOT NULL, windows INTEGER NOT NULL, inferences INTEGER NOT NULL,"
        " errors INTEGER NOT NULL, energy_j REAL, device_j REAL, p50_x_n REAL, p95_x_n REAL,"
        f" PRIMARY KEY ({TOTALS_KEY}))"
    )
    db.execute(
        "CREATE TABLE telemetry_latest (device TEXT PRIMARY KEY, start TEXT NOT NULL,"
        " row INTEGER NOT NULL)"
    )
    add = "CASE WHEN {new} IS NULL THEN {old} ELSE COALESCE({old}, 0) + {new} END"
    db.execute(
        "CREATE TRIGGER telemetry_rollups AFTER INSERT ON telemetry BEGIN "
        f"INSERT INTO telemetry_totals ({TOTALS_KEY}, windows, inferences, errors, energy_j,"
        " device_j, p50_x_n, p95_x_n) VALUES (NEW.device, COALESCE(NEW.model, ''),"
        " COALESCE(NEW.tier, ''), COALESCE(NEW.power_method, ''), 1, NEW.inferences,"
        " NEW.errors, NEW.energy_per_inference_j * NEW.inferences, NEW.power_w * NEW.window_s,"
        " NEW.latency_p50_ms * NEW.inferences, NEW.latency_p95_ms * NEW.inferences)"
        f" ON CONFLICT ({TOTALS_KEY}) DO UPDATE SET windows = windows + 1,"
        " inferences = inferences + excluded.inferences, errors = errors + excluded.errors,"
        f" energy_j = {add.format(old='energy_j', new='excluded.energy_j')},"
        f" device_j = {add.format(old='device_j', new='excluded.device_j')},"
        f" p50_x_n = {add.format(old='p50_x_n', new='excluded.p50_x_n')},"
        f" p95_x_n = {add.format(old='p95_x_n', new='excluded.p95_x_n')};"
        " INSERT INTO telemetry_latest (device, start, row) VALUES (NEW.device, NEW.start,"
        " NEW.rowid) ON CONFLICT (device) DO UPDATE SET start = excluded.start,"
        " row = excluded.row WHERE excluded.start >= telemetry_latest.start; "
        "END"
    )
    # what is already there
    db.execute(
        f"INSERT INTO telemetry_totals ({TOTALS_KEY}, windows, inferences, errors, energy_j,"
        " device_j, p50_x_n, p95_x_n) SELECT device, COALESCE(model, ''), COALESCE(tier, ''),"
        " COALESCE(power_method, ''), COUNT(*), SUM(inferences), SUM(errors),"
        " SUM(energy_per_inference_j * inferences), SUM(power_w * window_s),"
        " SUM(latency_p50_ms * inferences), SUM(latency_p95_ms * inferences) FROM telemetry"
        " GROUP BY device, COALESCE(model, ''), COALESCE(tier, ''), COALESCE(power_method, '')"
    )
    db.execute(
        "INSERT INTO telemetry_latest (device, start, row) SELECT device, start, rowid FROM"
        " telemetry t WHERE rowid = (SELECT rowid FROM telemetry WHERE device = t.device"
        " ORDER BY start DESC LIMIT 1)"
    )


def _m9_revoked(db: sqlite_utils.Database) -> None:
    """Revoked devices and refused messages (issue 15): ``revoked`` takes a device out of
    plans, rollouts and live figures at once; ``clear_state`` asks the controller to delete
    its retained birth, which the broker keeps because the ACL's ``deny #`` also blocks the
    device's last will; ``rejected_messages`` counts what ingest refused of the device."""
    devices = db.table("devices")
    devices.add_column("revoked", int, not_null_default=0)
    devices.add_column("revoked_at", str)
    devices.add_column("clear_state", int, not_null_default=0)
    # messages of the device that ingest refused (malformed, out of bounds, failing alone)
    devices.add_column("rejected_messages", int, not_null_default=0)
    devices.add_column("last_rejection", str)
    devices.add_column("rejection_event_at", str)
    # messages the agent's own outbox dropped (it reports the count in telemetry and births)
    devices.add_column("outbox_dropped", int, not_null_default=0)


def _m10_build_cost(db: sqlite_utils.Database) -> None:
    """What the last ``compress`` of a version cost (issue 16): CPU seconds, wall seconds and
    energy, measured (RAPL) or estimated, per step and in total, as JSON."""
    db.table("model_versions").add_column("build_cost", str)


def _m11_budgets(db: sqlite_utils.Database) -> None:
    """The latency and power budgets the agent applies, as its birth reports them (issue 17):
    JSON of agent.protocol.Budgets, each with where it came from."""
    db.table("devices").add_column("budgets", str)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _m1_initial,
    _m2_variants,
    _m3_rollback,
    _m4_fallback_tier,
    _m5_preload,
    _m6_rollouts,
    _m7_identities,
    _m8_telemetry_rollups,
    _m9_revoked,
    _m10_build_cost,
    _m11_budgets,
]


def migrate(db: sqlite_utils.Database) -> int:
    """Apply the migrations this database has not seen; return the schema version."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied TEXT)"
    )
    current = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
    if current > len(MIGRATIONS):
        raise DatabaseError(
            f"database schema version {current} is newer than this greenfleet "
            f"({len(MIGRATIONS)}); upgrade greenfleet"
        )
    for version, migration in enumerate(MIGRATIONS[current:], start=current + 1):
        with db.conn:
            migration(db)
            db.execute("INSERT INTO schema_version VALUES (?, datetime('now'))", [version])
    return len(MIGRATIONS)


def open_db(path: Path) -> sqlite_utils.Database:
    """Open (creating and migrating if needed) the database at ``path`` for this thread."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
        db = sqlite_utils.Database(conn)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=30000")
        migrate(db)
    except (sqlite3.Error, OSError) as exc:
        raise DatabaseError(f"cannot open the controller database {path}: {exc}") from exc
    return db
