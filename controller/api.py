"""The controller's read-only HTTP API, Prometheus ``/metrics`` and the dashboard, in one app.

``create_app(home)`` builds a FastAPI application over the controller database:

* ``/api/v1/...``: JSON read endpoints (devices, telemetry, models, rollouts, events, energy,
  health). Each answers from the same read models as the CLI (controller.views,
  controller.model_commands, controller.rollout_commands, controller.energy), so a table, its
  ``--json`` and the API always agree. The schema is at ``/openapi.json``; FastAPI's ``/docs``
  pages are off because they load Swagger UI from a CDN.
* ``/metrics``: the Prometheus exposition of controller.metrics, read from the database at
  scrape time.
* ``/``: the dashboard (``controller/dashboard/``) when it is installed, else a JSON pointer.

Only GET and HEAD routes exist. Every request opens its own database connection (WAL: it reads
while the daemon writes) and closes it when the answer is built, so no connection is ever
shared between the server's worker threads.

Access (:func:`refusal`): a client on the same machine (TCP peer on loopback, no proxy
forwarding headers, a loopback ``Host``) needs nothing. Anyone else needs ``allow_remote`` and
``Authorization: Bearer <token>``; otherwise 401 with a JSON message. The Host check keeps a web
page on another site from reading a loopback API through DNS rebinding.
"""

from __future__ import annotations

import hmac
import json
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlite_utils
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Receive, Scope, Send

from agent import link
from agent.protocol import utcnow
from agent.version import __version__
from controller import registry, rollout_store, views
from controller.config import load_controller_config
from controller.db import MIGRATIONS, open_db
from controller.energy import build_energy, energy_report, totals
from controller.errors import DatabaseError, InvalidRequest, NotFound
from controller.home import Home
from controller.metrics import FleetCollector
from controller.model_commands import variant_row, version_row
from controller.planning import baseline_per_class, measured, priced_on_class
from controller.pricing import FleetPrice, fleet_price, ratio
from controller.rollout_commands import detail as rollout_detail
from controller.rollout_commands import summary as rollout_summary
from controller.selection import Estimate, Measured
from device_configs.schema import DeviceProfile, ProfileError, load_profiles
from model_store.catalog import Catalog, Variant

PREFIX = "/api/v1"
DASHBOARD = Path(__file__).parent / "dashboard"
MIN_TOKEN_LENGTH = 16
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
# The dashboard is self-contained: this keeps every asset and request on the controller.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": CONTENT_SECURITY_POLICY,
}


# ------------------------------------------------------------------------------------ access


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address or a name, without a port) is this machine (the one rule,
    agent.link.is_loopback)."""
    return bool(host) and link.is_loopback(host or "")


def _host_name(host_header: str) -> str:
    """``localhost`` of ``localhost:8080``; ``::1`` of ``[::1]:8080``."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


def is_local(client_host: str | None, headers: Mapping[str, str]) -> bool:
    """A request straight from this machine: loopback peer, not relayed by a proxy (a proxy
    here would be relaying someone else), and addressed to a loopback name (not a DNS name
    that a foreign web page made resolve to 127.0.0.1)."""
    if not is_loopback(client_host):
        return False
    if any(h in headers for h in FORWARDING_HEADERS):
        return False
    return is_loopback(_host_name(headers.get("host", "")))


def bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def refusal(
    client_host: str | None,
    headers: Mapping[str, str],
    token: str | None,
    allow_remote: bool,
) -> str | None:
    """Why a request is refused (the 401 message), or None when it may be answered."""
    if is_local(client_host, headers):
        return None
    if not allow_remote or token is None:
        return (
            "this greenfleet API answers only clients on the controller's own machine; "
            "serve it with `greenfleet api run --bind HOST --token-file FILE` for remote access"
        )
    presented = bearer(headers)
    if presented is None:
        return "authentication required: send the header 'Authorization: Bearer <token>'"
    if not hmac.compare_digest(presented.encode(), token.encode()):
        return "invalid token"
    return None


def check_token(token: str | None, allow_remote: bool) -> str | None:
    """The token to use (stripped); InvalidRequest when remote access lacks a usable one."""
    if token is not None:
        token = token.strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise InvalidRequest(
                f"the API token must be at least {MIN_TOKEN_LENGTH} characters "
                "(make one with `greenfleet api token FILE`)"
            )
    if allow_remote and token is None:
        raise InvalidRequest(
            "remote access to the API needs a token: pass --token-file FILE or set "
            "GREENFLEET_API_TOKEN"
        )
    return token


DATA_PATHS = ("/api/", "/metrics", "/openapi.json")  # everything else is the static page


class Guard:
    """ASGI middleware: :func:`refusal` for every HTTP request, security headers on answers,
    and HEAD answered as GET without a body."""

    def __init__(self, app: ASGIApp, token: str | None, allow_remote: bool) -> None:
        self.app = app
        self.token = token
        self.allow_remote = allow_remote

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # none are served
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        client = scope.get("client")
        why = refusal(client[0] if client else None, headers, self.token, self.allow_remote)
        if (
            why is not None
            and self.allow_remote
            and self.token is not None
            and not scope["path"].startswith(DATA_PATHS)
        ):  # the page and its scripts hold no data (a browser cannot send a header to load
            why = None  # them); the data they fetch needs the token (app.js: ?token=...)
        is_head = scope["method"] == "HEAD"

        async def guarded_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    out.setdefault(key, value)
                path = scope["path"]
                if path.startswith(DATA_PATHS):
                    out.setdefault("cache-control", "no-store")
            elif message["type"] == "http.response.body" and is_head:
                message = {**message, "body": b""}
            await send(message)

        if why is not None:
            response = JSONResponse(
                {"detail": why},
                status_code=401,
                headers={"www-authenticate": 'Bearer realm="greenfleet"'},
            )
            await response(scope, receive, guarded_send)
            return
        if is_head:  # FastAPI routes are GET only; HEAD is the same answer without its body
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, guarded_send)


# ---------------------------------------------------------------------------------- schemas


class _Open(BaseModel):
    """A response shape that documents its fields and passes through any the views add."""

    model_config = ConfigDict(extra="allow")


class Health(BaseModel):
    status: str = Field(description="ok")
    version: str
    schema_version: int
    devices: int
    online: int
    time: str


class Device(_Open):
    """A fleet row: registry facts, intent and the newest telemetry window."""

    id: str
    device_class: str | None = None
    labels: dict[str, str] = Field(default_factory=dict, description="site, line, ...")
    online: bool
    revoked: bool = Field(False, description="revoked: never online again unless re-enrolled")
    revoked_at: str | None = None
    rejected_messages: int = Field(0, description="Messages of the device the controller refused.")
    outbox_dropped: int = Field(
        0, description="Messages the agent itself dropped: it could neither store nor send them."
    )
    agent_version: str | None = None
    runtimes: list[str] = Field(default_factory=list)
    active_model: str | None = Field(None, description="NAME:VERSION+VARIANT now running")
    tier: str | None = Field(None, description="active, last_good, fallback, rules or none")
    fallback_model: str | None = None
    desired_model: str | None = None
    pinned: bool = False
    pin_reason: str | None = None
    last_seen: str | None = None
    inferences: int | None = None
    window_s: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    errors: int | None = None
    power_w: float | None = None
    energy_per_inference_j: float | None = None
    power_method: str | None = Field(None, description="estimate, rapl, hwmon, pmic or nvml")


class Event(_Open):
    ts: str
    device: str | None = None
    event: str
    message: str = ""
    detail: dict[str, Any] = Field(default_factory=dict)
    rollout: str | None = None


class DeviceDetail(Device):
    hardware: dict[str, Any] = Field(default_factory=dict)
    hardware_check: list[dict[str, str]] = Field(default_factory=list)
    session: str | None = None
    first_seen: str | None = None
    last_good_model: str | None = None
    fallback_sha256: str | None = None
    tier_at: str | None = None
    preloaded_model: str | None = None
    last_rejection: str | None = Field(None, description="Why its last refused message was.")
    deploy_retry: dict[str, Any] | None = Field(
        None, description="Its newest deploy failed: model, error, failures in a row, next_try."
    )
    budgets: dict[str, Any] | None = Field(
        None,
        description="Latency and power budgets: 'applied' as the agent reports them, 'planned' "
        "as the controller sends them with the next active deploy (class profile, labels "
        "latency_budget_ms / power_budget_w); each figure names where it came from.",
    )
    recent_events: list[Event] = Field(default_factory=list)
    recent_tier_changes: list[Event] = Field(default_factory=list)
    recent_deployments: list[dict[str, Any]] = Field(default_factory=list)


class TelemetryPoint(BaseModel):
    """One telemetry window of a device."""

    start: str = Field(description="start of the window, UTC")
    window_s: float
    model: str | None = None
    tier: str | None = None
    inferences: int
    errors: int
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    power_w: float | None = None
    energy_per_inference_j: float | None = None
    power_method: str | None = None


class VariantEnergy(BaseModel):
    """A variant priced on one device class, on the plan's basis."""

    device_class: str
    energy_j: float = Field(description="joules per inference")
    latency_ms: float
    source: str = Field(
        description="telemetry (enough measured on that class), 'profile x1.23 (field "
        "correction)' (the profile estimate times the median measured/profile ratio of the "
        "variants that ran on the class), or profile (nothing ran there to correct by)"
    )
    vs_fp32: float | None = Field(
        None, description="energy against the fp32 variant on this class, same basis"
    )


class ModelVariant(_Open):
    id: str
    variant: str
    format: str
    precision: str | None = None
    technique: str | None = None
    size: int = Field(description="bytes")
    size_ratio: float | None = Field(None, description="size against fp32 (or the source)")
    latency_p50_ms: dict[str, float] = Field(default_factory=dict, description="per runtime")
    latency_p95_ms: dict[str, float] = Field(default_factory=dict)
    metric: str | None = Field(None, description="fidelity metric: roc_auc, accuracy, r2")
    metric_value: float | None = None
    agreement: float | None = None
    eligible: bool
    reason: str | None = None
    energy_j: float | None = Field(
        None,
        description="joules per inference for the fleet: the plain mean of energy_by_class, "
        "over the same device classes for every variant of the version",
    )
    energy_source: str | None = Field(
        None,
        description="how the per-class figures were obtained: telemetry, profile, "
        "field-corrected profile, or mixed (see energy_by_class)",
    )
    vs_fp32: float | None = Field(
        None, description="energy_j against the fp32 variant's, same classes and basis"
    )
    energy_by_class: list[VariantEnergy] = Field(default_factory=list)
    build_j: float | None = Field(
        None, description="joules its compress run spent on it: its builder and the shared steps"
    )
    build_energy: str | None = Field(None, description="measured (RAPL) or estimated")


class Model(_Open):
    """A model version and its variants."""

    id: str
    task: str | None = None
    accuracy_floor: float | None = None
    threshold: float | None = None
    variants: int
    eligible: int
    has_rules: bool
    created: str | None = None
    compressed: str | None = None
    build_cost: dict[str, Any] | None = Field(
        None, description="the last compress: CPU s, wall s, joules and method, per step and total"
    )
    variant_list: list[ModelVariant]


class ModelDetail(Model):
    rules: dict[str, Any] | None = None


class Rollout(_Open):
    """A rollout as ``rollout list`` shows it: counts of members per status."""

    id: str
    model: str
    status: str = Field(description="running, paused, aborting, aborted or completed")
    wave: int = Field(description="0 is the canary")
    waves: int
    updated: int
    total: int
    failed: int = 0
    missed: int = 0
    rolling_back: int = 0
    rolled_back: int = 0
    skipped: int = 0
    reason: str = ""
    created: str
    wave_started: str | None = None
    soak_started: str | None = None
    soak_s: float


class RolloutMember(_Open):
    device: str
    wave: int = Field(description="-1: in no wave (skipped when it joined)")
    status: str
    previous_model: str | None = None
    since: str | None = None
    reason: str = ""


class Gate(_Open):
    name: str
    value: float | None = None
    limit: float
    judged: bool
    breached: bool
    detail: str = ""


class Gates(_Open):
    wave: int | None = None
    at: str | None = None
    results: list[Gate] = Field(default_factory=list)


class RolloutEvent(_Open):
    ts: str
    device: str | None = None
    event: str
    message: str = ""


class RolloutDetail(Rollout):
    spec: dict[str, Any]
    members: list[RolloutMember]
    gates: Gates
    events: list[RolloutEvent]


class EnergyRow(_Open):
    site: str
    model: str
    variant: str
    devices: int
    inferences: int
    device_kwh: float
    measured_kwh: float
    estimated_kwh: float
    co2e_kg: float
    grid_g_co2e_per_kwh: float
    j_per_inference: float | None = None
    fp32_j_per_inference: float | None = None
    saving_vs_fp32: float | None = Field(None, description="share of inference energy saved")
    saved_j: float | None = Field(None, description="inference joules saved against fp32")
    build_j: float | None = Field(None, description="joules the compress run spent on it")
    build_energy: str | None = Field(None, description="measured (RAPL) or estimated")
    payback_inferences: float | None = Field(
        None, description="inferences after which the saving has paid for the build"
    )
    period_s: float | None = Field(
        None,
        description="the period rates are taken over: from the first telemetry window of the "
        "report (at or after since) to the end of the last",
    )
    payback_s: float | None = Field(
        None,
        description="seconds after which the saving has paid for the build, at this row's "
        "inferences per second of the period",
    )
    paid_back: bool | None = Field(
        None, description="whether the joules saved in the period already cover the build"
    )
    daily_saving_j: float | None = Field(
        None, description="inference joules a day saved against fp32 at the period's rate"
    )
    sci_g_co2e_per_1000_inferences: float | None = Field(
        None, description="SCI (ISO/IEC 21031) per 1,000 inferences, operational part E x I"
    )
    sci_embodied: str | None = Field(None, description="the embodied part M, or why not known")
    methods: list[str]


class EnergyTotal(_Open):
    inferences: int
    device_kwh: float
    measured_kwh: float
    estimated_kwh: float
    co2e_kg: float
    saving_vs_fp32: float | None = None
    period_s: float | None = Field(None, description="the period every row's rates are over")
    daily_saving_j: float | None = Field(
        None, description="inference joules a day the fleet saves against fp32, all rows"
    )


class EnergyReport(_Open):
    """What ``greenfleet energy report --json`` prints, for the same site and period."""

    site: str | None = None
    since: str | None = None
    rows: list[EnergyRow]
    total: EnergyTotal


class ErrorMessage(BaseModel):
    detail: str


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorMessage}}


# ------------------------------------------------------------------------------- read models


def telemetry_series(
    db: sqlite_utils.Database, device: str, since: str, limit: int
) -> list[dict[str, Any]]:
    """The device's telemetry windows that started at ``since`` (UTC ISO) or later, oldest
    first; the newest ``limit`` of them when there are more."""
    rows = db.execute(
        "SELECT start, window_s, model, tier, inferences, errors, latency_p50_ms, "
        "latency_p95_ms, latency_p99_ms, power_w, energy_per_inference_j, power_method "
        "FROM telemetry WHERE device = ? AND start >= ? ORDER BY start DESC LIMIT ?",
        [device, since, limit],
    )
    cols = [c[0] for c in rows.description]
    return [dict(zip(cols, r, strict=True)) for r in reversed(rows.fetchall())]


def events(db: sqlite_utils.Database, device: str | None, limit: int) -> list[dict[str, Any]]:
    """Newest first; with ``device``, that device's only. Messages as ``devices show`` words
    them (views.event_text)."""
    out = []
    for e in db.table("events").rows_where(
        "device = ?" if device else None,
        [device] if device else [],
        order_by="ts DESC, rowid DESC",
        limit=limit,
    ):
        detail = json.loads(e["detail"] or "{}")
        out.append(
            {
                "ts": e["ts"],
                "device": e["device"] or None,
                "event": e["event"],
                "message": views.event_text(e["event"], e["message"] or "", detail),
                "detail": detail,
                "rollout": e.get("rollout"),
            }
        )
    return out


def variant_energy(
    variants: Sequence[Variant],
    classes: Sequence[str],
    profiles: Mapping[str, DeviceProfile],
    field: Mapping[tuple[str, str], Measured],
) -> dict[str, dict[str, Any]]:
    """Energy per inference of each variant of one version, by variant id: on each device
    class of the fleet, and one figure for the fleet.

    Every figure is on the plan's basis (controller.pricing.class_prices): telemetry of that
    class where there is enough, else the profile estimate corrected by what the class
    measured (its field cost per inference).
    The fleet figure is the plain mean over the classes where the version's variants can be
    priced, the same classes for every variant, so the Models page, the plan and the energy
    report's saving agree. ``vs_fp32`` is the ratio to the fp32 variant (the source file when
    nothing was built) on the same basis.
    """
    reference = next((v.id for v in variants if v.variant == "fp32"), None) or next(
        (v.id for v in variants if v.variant == ""), None
    )
    priced: dict[str, list[tuple[str, Estimate]]] = {v.id: [] for v in variants}
    for device_class in classes:
        on_class = priced_on_class(variants, device_class, profiles.get(device_class), field)
        for variant_id, price in on_class.items():
            priced[variant_id].append((device_class, price))
    fleet = {variant_id: fleet_price([p for _, p in rows]) for variant_id, rows in priced.items()}
    base_by_class = dict(priced.get(reference or "", []))
    base_fleet = fleet.get(reference or "")

    def joules(price: Estimate | FleetPrice | None) -> float | None:
        return None if price is None else price.energy_j

    out: dict[str, dict[str, Any]] = {}
    for variant_id, rows in priced.items():
        mean = fleet[variant_id]
        out[variant_id] = {
            "energy_j": joules(mean),
            "energy_source": None if mean is None else mean.source,
            "vs_fp32": ratio(joules(mean), joules(base_fleet)),
            "energy_by_class": [
                {
                    "device_class": device_class,
                    "energy_j": price.energy_j,
                    "latency_ms": price.latency_ms,
                    "source": price.source,
                    "vs_fp32": ratio(price.energy_j, joules(base_by_class.get(device_class))),
                }
                for device_class, price in rows
            ],
        }
    return out


# --------------------------------------------------------------------------------------- app


class _Profiles:
    """Device profiles ship with the package: read once, on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: dict[str, DeviceProfile] | None = None

    def __call__(self) -> dict[str, DeviceProfile]:
        with self._lock:
            if self._value is None:
                try:
                    self._value = load_profiles()
                except ProfileError:
                    self._value = {}
            return self._value


def create_app(
    home: Home,
    *,
    token: str | None = None,
    allow_remote: bool = False,
    dashboard: Path | None = DASHBOARD,
) -> FastAPI:
    """The API, /metrics and the dashboard over ``home``'s database.

    ``allow_remote``: answer clients on other machines that send ``token`` (required then).
    Without it only local clients are answered. ``dashboard``: the directory served at ``/``
    (None or missing: ``/`` answers a JSON pointer to the API).
    """
    token = check_token(token, allow_remote)
    profiles = _Profiles()

    @contextmanager
    def connect() -> Iterator[sqlite_utils.Database]:
        db = open_db(home.database)
        try:
            yield db
        finally:
            db.conn.close()

    app = FastAPI(
        title="greenfleet controller API",
        version=__version__,
        description="Read-only view of a greenfleet fleet: devices, telemetry, models and "
        "their variants, rollouts, events and energy. Local clients need nothing; remote "
        "ones send 'Authorization: Bearer <token>'.",
        docs_url=None,  # Swagger UI and ReDoc load their assets from a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.add_middleware(Guard, token=token, allow_remote=allow_remote)
    app.state.home = home
    app.state.connect = connect

    @app.exception_handler(NotFound)
    def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InvalidRequest)
    def _invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(DatabaseError)
    def _database(request: Request, exc: DatabaseError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    _routes(app, home, connect, profiles)
    metrics_registry = CollectorRegistry(auto_describe=False)
    metrics_registry.register(FleetCollector(connect))
    for standard in (ProcessCollector, PlatformCollector, GCCollector):  # the serving process
        standard(registry=metrics_registry)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics_registry), media_type=content_type)

    if dashboard is not None and (dashboard / "index.html").is_file():
        app.mount("/", StaticFiles(directory=dashboard, html=True), name="dashboard")
    else:

        @app.get("/", include_in_schema=False)
        def root() -> dict[str, str]:
            return {
                "name": "greenfleet controller API",
                "api": PREFIX,
                "openapi": "/openapi.json",
                "metrics": "/metrics",
                "dashboard": "not installed (controller/dashboard/index.html is missing)",
            }

    return app


def _routes(
    app: FastAPI,
    home: Home,
    connect: Callable[[], AbstractContextManager[sqlite_utils.Database]],
    profiles: Callable[[], dict[str, DeviceProfile]],
) -> None:
    @app.get(f"{PREFIX}/health", response_model=Health, tags=["fleet"])
    def health() -> dict[str, Any]:
        """Whether the database answers; device counts."""
        with connect() as db:
            online, total = db.execute(
                "SELECT COALESCE(SUM(online), 0), COUNT(*) FROM devices"
            ).fetchone()
        return {
            "status": "ok",
            "version": __version__,
            "schema_version": len(MIGRATIONS),
            "devices": total,
            "online": online,
            "time": registry.iso(utcnow()),
        }

    @app.get(f"{PREFIX}/devices", response_model=list[Device], tags=["fleet"])
    def devices() -> list[dict[str, Any]]:
        """Every device with its newest telemetry window (``greenfleet devices list``)."""
        with connect() as db:
            return views.fleet(db)

    @app.get(
        f"{PREFIX}/devices/{{device}}",
        response_model=DeviceDetail,
        responses=NOT_FOUND,
        tags=["fleet"],
    )
    def device(device: str, events: int = Query(10, ge=0, le=500)) -> dict[str, Any]:
        """One device: facts, hardware check, recent events, tier changes, deployments."""
        with connect() as db:
            return views.device_detail(db, device, events=events)

    @app.get(
        f"{PREFIX}/devices/{{device}}/telemetry",
        response_model=list[TelemetryPoint],
        responses=NOT_FOUND,
        tags=["fleet"],
    )
    def telemetry(
        device: str,
        minutes: float = Query(60, gt=0, le=60 * 24 * 31, description="how far back"),
        limit: int = Query(500, ge=1, le=10_000, description="at most this many (the newest)"),
    ) -> list[dict[str, Any]]:
        """The device's telemetry windows of the last ``minutes``, oldest first."""
        since = (utcnow() - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%S")
        with connect() as db:
            registry.get_device(db, device)  # NotFound: 404
            return telemetry_series(db, device, since, limit)

    @app.get(f"{PREFIX}/events", response_model=list[Event], tags=["fleet"])
    def recent_events(
        device: str | None = Query(None, description="only this device's"),
        limit: int = Query(50, ge=1, le=1000),
    ) -> list[dict[str, Any]]:
        """Device and controller events, newest first."""
        with connect() as db:
            return events(db, device, limit)

    def _build(cost: tuple[float, str] | None) -> dict[str, Any]:
        joules, how = cost if cost is not None else (None, None)
        return {"build_j": joules, "build_energy": how}

    def model_views(db: sqlite_utils.Database, version_ids: list[str]) -> list[dict[str, Any]]:
        """``models show --json`` of each version, with each variant's energy per inference
        on the fleet's device classes (the generic class for an empty fleet)."""
        catalog = Catalog(db, home.store)
        classes = sorted({r["device_class"] for r in registry.devices(db) if r["device_class"]})
        known = profiles()
        if not classes and "generic" in known:
            classes = ["generic"]
        field = measured(db)
        build = build_energy(catalog)
        out = []
        for version_id in version_ids:
            version = catalog.version_or_none(version_id)
            if version is None:
                raise NotFound(f"no model version {version_id}; see {PREFIX}/models")
            variants = catalog.variants(version.id)
            reference = next((v for v in variants if v.variant == "fp32"), None) or next(
                (v for v in variants if v.variant == ""), None
            )
            energy = variant_energy(variants, classes, known, field)
            rows = [
                {
                    **variant_row(v, reference.size if reference else None),
                    **energy[v.id],
                    **_build(build(v.id) if v.variant else None),
                }
                for v in variants
            ]
            out.append(
                {**version_row(version, variants), "variant_list": rows, "rules": version.rules}
            )
        return out

    @app.get(f"{PREFIX}/models", response_model=list[Model], tags=["models"])
    def models() -> list[dict[str, Any]]:
        """Model versions with their variants: size, latency, fidelity, energy, eligibility.

        Energy per inference is priced as the plan prices it: per device class of the fleet,
        telemetry where that class ran the variant enough, else the profile estimate times the
        class's field correction (its cost per inference); the fleet figure is the mean over
        the fleet's classes, the same classes for every variant, so ``vs_fp32`` agrees with
        the energy report's saving.
        """
        with connect() as db:
            return model_views(db, [v.id for v in Catalog(db, home.store).versions()])

    @app.get(
        f"{PREFIX}/models/{{model}}",
        response_model=ModelDetail,
        responses=NOT_FOUND,
        tags=["models"],
    )
    def model(model: str) -> dict[str, Any]:
        """One model version (NAME:VERSION), its variants and its rule baseline."""
        with connect() as db:
            return model_views(db, [model.partition("+")[0]])[0]

    @app.get(f"{PREFIX}/rollouts", response_model=list[Rollout], tags=["rollouts"])
    def rollouts() -> list[dict[str, Any]]:
        """Every rollout, oldest first (``greenfleet rollout list``)."""
        with connect() as db:
            return [rollout_summary(s) for s in rollout_store.load_all(db)]

    @app.get(
        f"{PREFIX}/rollouts/{{rollout}}",
        response_model=RolloutDetail,
        responses=NOT_FOUND,
        tags=["rollouts"],
    )
    def rollout(rollout: str, events: int = Query(20, ge=0, le=500)) -> dict[str, Any]:
        """Members, gate values of the last decision, and events (``greenfleet rollout show``)."""
        with connect() as db:
            return rollout_detail(db, rollout_store.load(db, rollout), events=events)

    @app.get(f"{PREFIX}/energy", response_model=EnergyReport, tags=["energy"])
    def energy(
        site: str | None = Query(None, description="only this site (the device label)"),
        hours: float | None = Query(None, gt=0, description="only the last hours (default all)"),
    ) -> dict[str, Any]:
        """kWh and CO2e per site, model and variant; measured against estimated energy; the
        saving against fp32 (``greenfleet energy report --json``)."""
        since = (
            None
            if hours is None
            else (utcnow() - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S")
        )
        with connect() as db:
            config = load_controller_config(home.config)
            catalog = Catalog(db, home.store)
            baseline = baseline_per_class(catalog, profiles(), measured(db))
            rows = energy_report(
                db, config, baseline, site=site, since=since, build=build_energy(catalog)
            )
        return {
            "site": site,
            "since": since,
            "rows": [r.as_dict() for r in rows],
            "total": totals(rows),
        }
