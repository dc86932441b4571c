"""The read-only HTTP API (controller.api) against a controller home with a real database."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from controller import api_commands
from controller.api import create_app, refusal
from controller.api_commands import ApiServer
from controller.cli import main
from controller.errors import InvalidRequest
from controller.home import Home
from tests.unit.api_fleet import FP32, INT8, Fleet, build_fleet

TOKEN = "s3cret-token-for-the-tests-0123456789"
LOCAL = ("127.0.0.1", 50000)
REMOTE = ("10.20.30.40", 50000)
ENDPOINTS = [
    "/api/v1/health",
    "/api/v1/devices",
    "/api/v1/devices/{device}",
    "/api/v1/devices/{device}/telemetry",
    "/api/v1/models",
    "/api/v1/models/{model}",
    "/api/v1/rollouts",
    "/api/v1/rollouts/{rollout}",
    "/api/v1/events",
    "/api/v1/energy",
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    return build_fleet(tmp_path_factory.mktemp("api") / "home")


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> TestClient:
    """A client on the controller's machine: needs no token."""
    app = create_app(fleet.home, dashboard=None)
    return TestClient(app, base_url="http://127.0.0.1:8080", client=LOCAL)


def test_devices_are_the_fleet_rows(client: TestClient, fleet: Fleet) -> None:
    response = client.get("/api/v1/devices")
    assert response.status_code == 200
    rows = {r["id"]: r for r in response.json()}
    assert set(rows) == {"gw-1", "gw-2"}
    one, two = rows["gw-1"], rows["gw-2"]
    assert (one["online"], two["online"]) == (True, False)
    assert one["labels"] == {"site": "a", "line": "1"} and one["device_class"] == "x86-ipc"
    assert (one["active_model"], one["tier"], one["desired_model"]) == (
        INT8,
        "fallback",
        "vib:2.0.0",  # the rollout's canary
    )
    newest = fleet.of("gw-1")[-1]
    assert one["latency_p95_ms"] == newest.p95 and one["power_w"] == newest.power_w
    assert one["energy_per_inference_j"] == newest.energy_j
    assert (one["power_method"], two["power_method"]) == ("estimate", "rapl")
    assert one["last_seen"]


def test_device_detail_and_404(client: TestClient) -> None:
    shown = client.get("/api/v1/devices/gw-1").json()
    assert shown["hardware"]["arch"] == "x86_64" and shown["session"] == "gw-1-s"
    assert [e["event"] for e in shown["recent_tier_changes"]] == ["tier_changed"]
    assert shown["recent_tier_changes"][0]["message"] == (
        "active -> fallback: latency budget breached"
    )
    assert "activated" in [e["event"] for e in shown["recent_events"]]
    missing = client.get("/api/v1/devices/ghost")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no device 'ghost'; see `greenfleet devices list`"}
    assert client.get("/api/v1/devices/ghost/telemetry").status_code == 404


def test_telemetry_is_a_time_series_oldest_first(client: TestClient, fleet: Fleet) -> None:
    points = client.get("/api/v1/devices/gw-1/telemetry").json()
    recent = [w for w in fleet.of("gw-1") if w.minutes_ago < 60]  # the default: 60 minutes
    assert [p["inferences"] for p in points] == [w.inferences for w in recent]
    assert points == sorted(points, key=lambda p: p["start"])
    first = points[0]
    assert set(first) == {
        "start",
        "window_s",
        "model",
        "tier",
        "inferences",
        "errors",
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "power_w",
        "energy_per_inference_j",
        "power_method",
    }
    assert (first["model"], first["power_method"], first["window_s"]) == (INT8, "estimate", 60)
    assert points[-1]["tier"] == "fallback"
    everything = client.get("/api/v1/devices/gw-1/telemetry?minutes=600").json()
    assert len(everything) == len(fleet.of("gw-1"))
    newest = client.get("/api/v1/devices/gw-1/telemetry?minutes=600&limit=2").json()
    assert [p["inferences"] for p in newest] == [w.inferences for w in fleet.of("gw-1")[-2:]]
    assert client.get("/api/v1/devices/gw-1/telemetry?minutes=0").status_code == 422


def test_models_list_versions_with_variants_and_energy(client: TestClient, fleet: Fleet) -> None:
    models = {m["id"]: m for m in client.get("/api/v1/models").json()}
    assert set(models) == {"vib:1.0.0", "vib:2.0.0"}
    vib = models["vib:1.0.0"]
    assert (vib["task"], vib["variants"], vib["eligible"]) == ("anomaly", 4, 3)
    variants = {v["id"]: v for v in vib["variant_list"]}
    int8 = variants[INT8]
    assert (int8["size"], int8["metric"], int8["metric_value"], int8["eligible"]) == (
        int8["size"],
        "roc_auc",
        0.96,
        True,
    )
    assert int8["size"] > 0 and int8["latency_p50_ms"] == {"onnxruntime": 0.25}
    # where it ran: the inference-weighted energy per inference of its telemetry there
    ran = fleet.of("gw-1")
    expected = sum(w.energy_j * w.inferences for w in ran) / sum(w.inferences for w in ran)
    by_class = {e["device_class"]: e for e in int8["energy_by_class"]}
    assert by_class["x86-ipc"]["source"] == "telemetry"
    assert by_class["x86-ipc"]["energy_j"] == pytest.approx(expected)
    # never ran on rpi4: its profile, plus the cost per inference fp32 measured there over its
    # profile
    assert by_class["rpi4"]["source"].endswith("(field cost per inference)"), by_class
    # the fleet figure: each class once, the same classes for every variant
    assert int8["energy_source"] == "mixed"
    assert int8["energy_j"] == pytest.approx(
        (by_class["x86-ipc"]["energy_j"] + by_class["rpi4"]["energy_j"]) / 2
    )
    pruned = variants["vib:1.0.0+int8-pruned"]
    assert pruned["eligible"] is False and "accuracy floor" in pruned["reason"]
    assert pruned["energy_source"] == "field-corrected profile" and pruned["energy_j"] > 0
    assert variants["vib:1.0.0"]["energy_j"] is None  # the source file was never profiled
    assert variants["vib:1.0.0"]["vs_fp32"] is None
    fp32 = variants[FP32]
    assert fp32["energy_source"] == "mixed" and fp32["vs_fp32"] == pytest.approx(1.0)
    assert {e["device_class"]: e["vs_fp32"] for e in fp32["energy_by_class"]} == {
        "rpi4": pytest.approx(1.0),
        "x86-ipc": pytest.approx(1.0),
    }
    assert int8["vs_fp32"] == pytest.approx(int8["energy_j"] / fp32["energy_j"])


def test_the_models_page_and_the_energy_report_price_fp32_alike(
    client: TestClient, fleet: Fleet
) -> None:
    """int8 ran on x86-ipc (gw-1), fp32 never did: the Models page's two figures for that
    class and the energy report's saving there are one ratio, not two contradicting ones."""
    (vib,) = [m for m in client.get("/api/v1/models").json() if m["id"] == "vib:1.0.0"]
    priced = {
        v["id"]: {e["device_class"]: e for e in v["energy_by_class"]} for v in vib["variant_list"]
    }
    int8, fp32 = priced[INT8]["x86-ipc"], priced[FP32]["x86-ipc"]
    report = client.get("/api/v1/energy?site=a").json()
    (row,) = [r for r in report["rows"] if r["variant"] == "int8-dynamic"]  # gw-1 only
    assert row["j_per_inference"] == pytest.approx(int8["energy_j"])
    assert row["fp32_j_per_inference"] == pytest.approx(fp32["energy_j"])
    assert 1 - row["saving_vs_fp32"] == pytest.approx(int8["energy_j"] / fp32["energy_j"])
    assert int8["vs_fp32"] == pytest.approx(1 - row["saving_vs_fp32"])


def test_model_detail_and_404(client: TestClient) -> None:
    shown = client.get("/api/v1/models/vib:1.0.0").json()
    assert shown["id"] == "vib:1.0.0" and "rules" in shown and len(shown["variant_list"]) == 4
    assert client.get(f"/api/v1/models/{INT8}").json()["id"] == "vib:1.0.0"
    missing = client.get("/api/v1/models/nope:9.9.9")
    assert missing.status_code == 404 and "no model version nope:9.9.9" in missing.json()["detail"]


def test_rollouts_list_and_detail(client: TestClient, fleet: Fleet) -> None:
    (listed,) = client.get("/api/v1/rollouts").json()
    assert (listed["id"], listed["model"], listed["status"]) == ("r1", "vib:2.0.0", "running")
    assert (listed["wave"], listed["updated"], listed["total"]) == (0, 0, 1)
    shown = client.get("/api/v1/rollouts/r1").json()
    (member,) = shown["members"]
    assert (member["device"], member["status"], member["previous_model"]) == (
        "gw-1",
        "updating",
        INT8,
    )
    gates = {g["name"]: g for g in shown["gates"]["results"]}
    assert gates["error_rate"] == {
        "name": "error_rate",
        "value": 0.01,
        "limit": 0.05,
        "judged": True,
        "breached": False,
        "detail": "2 of 200 inferences",
    }
    assert gates["latency_regression"]["value"] is None
    assert shown["gates"] == fleet.rollout["gates"]
    assert {"rollout_started", "wave_started"} <= {e["event"] for e in shown["events"]}
    assert shown["spec"]["selector"] == {"site": "a"}
    missing = client.get("/api/v1/rollouts/r9")
    assert missing.status_code == 404 and "no rollout 'r9'" in missing.json()["detail"]


def test_events_newest_first_and_by_device(client: TestClient) -> None:
    events = client.get("/api/v1/events?limit=100").json()
    assert events == sorted(events, key=lambda e: e["ts"], reverse=True)
    assert {"activated", "tier_changed", "rollout_started"} <= {e["event"] for e in events}
    mine = client.get("/api/v1/events?device=gw-1").json()
    assert mine and {e["device"] for e in mine} == {"gw-1"}
    changed = next(e for e in mine if e["event"] == "tier_changed")
    assert changed["message"] == "active -> fallback: latency budget breached"
    assert changed["detail"]["to"] == "fallback"
    assert len(client.get("/api/v1/events?limit=1").json()) == 1


def test_energy_is_what_the_cli_reports(
    client: TestClient, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    for query, argv in (("", []), ("?site=a", ["--site", "a"])):
        capsys.readouterr()
        assert main(["--home", str(fleet.home.root), "energy", "report", "--json", *argv]) == 0
        cli = json.loads(capsys.readouterr().out)
        served = client.get(f"/api/v1/energy{query}").json()
        assert served["rows"] == cli["rows"] and served["total"] == cli["total"]
    report = client.get("/api/v1/energy").json()
    sites = {r["site"]: r for r in report["rows"]}
    assert sites["a"]["estimated_kwh"] > 0 and sites["a"]["measured_kwh"] == 0
    assert sites["b"]["measured_kwh"] > 0 and sites["b"]["methods"] == ["rapl"]
    kwh = sum(w.power_w * w.window_s for w in fleet.windows) / 3.6e6
    assert report["total"]["device_kwh"] == pytest.approx(kwh)
    assert report["total"]["co2e_kg"] > 0
    assert sites["a"]["saving_vs_fp32"] is not None
    recent = client.get("/api/v1/energy?hours=1").json()
    assert recent["total"]["inferences"] == sum(
        w.inferences for w in fleet.windows if w.minutes_ago < 60
    )
    assert recent["since"] is not None


def test_energy_rows_give_payback_time_and_daily_saving(client: TestClient) -> None:
    """Rates are over the report's period: the fleet's first window (gw-1, 180 min ago) to the
    end of its last (gw-2, 5 min ago, 60 s)."""
    report = client.get("/api/v1/energy").json()
    period = report["total"]["period_s"]
    assert period == pytest.approx((180 - 5) * 60 + 60, abs=1)
    daily = []
    for row in report["rows"]:
        assert {"payback_s", "paid_back", "daily_saving_j"} <= set(row), row
        assert row["period_s"] == period
        assert row["daily_saving_j"] == pytest.approx(row["saved_j"] / period * 86_400)
        assert row["payback_s"] is None and row["paid_back"] is None, "no build cost recorded"
        daily.append(row["daily_saving_j"])
    assert report["total"]["daily_saving_j"] == pytest.approx(sum(daily))
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"payback_s", "paid_back", "daily_saving_j"} <= set(schema["EnergyRow"]["properties"])


def test_health(client: TestClient) -> None:
    health = client.get("/api/v1/health").json()
    assert (health["status"], health["devices"], health["online"]) == ("ok", 2, 1)


def test_read_only_and_schema(client: TestClient) -> None:
    app = client.app
    assert isinstance(app, FastAPI)
    for route in app.routes:
        if isinstance(route, APIRoute):
            assert (route.methods or set()) <= {"GET", "HEAD"}, route.path
    for path in ("/api/v1/devices", "/api/v1/devices/gw-1", "/api/v1/rollouts/r1", "/metrics"):
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            assert client.request(method, path).status_code == 405, (method, path)
    head = client.head("/api/v1/devices")
    assert head.status_code == 200 and head.content == b""
    schema = client.get("/openapi.json").json()
    assert sorted(schema["paths"]) == sorted(ENDPOINTS)
    assert all(set(ops) == {"get"} for ops in schema["paths"].values())
    assert {"Device", "TelemetryPoint", "Model", "RolloutDetail", "EnergyReport"} <= set(
        schema["components"]["schemas"]
    )
    for cdn_page in ("/docs", "/redoc"):  # Swagger UI and ReDoc would load a CDN's assets
        assert client.get(cdn_page).status_code == 404
    assert client.get("/").json()["api"] == "/api/v1"  # no dashboard installed here


def test_dashboard_is_served_when_installed(fleet: Fleet, tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>greenfleet</title>")
    (tmp_path / "app.js").write_text("console.log('hi')")
    app = create_app(fleet.home, dashboard=tmp_path)
    client = TestClient(app, base_url="http://localhost:8080", client=LOCAL)
    page = client.get("/")
    assert page.status_code == 200 and "<title>greenfleet</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/app.js").text == "console.log('hi')"
    assert client.get("/api/v1/health").status_code == 200  # the API is not shadowed
    assert client.post("/").status_code == 405


# ------------------------------------------------------------------------------------ access


def test_remote_clients_need_the_token(fleet: Fleet) -> None:
    app = create_app(fleet.home, token=TOKEN, allow_remote=True, dashboard=None)
    remote = TestClient(app, base_url="http://controller.plant:8080", client=REMOTE)
    assert remote.get("/").status_code == 200, "the page holds no data: a browser can load it"
    for path in ("/api/v1/devices", "/metrics", "/openapi.json"):
        refused = remote.get(path)
        assert refused.status_code == 401, path
        assert "Authorization: Bearer" in refused.json()["detail"]
        assert refused.headers["www-authenticate"].startswith("Bearer")
    wrong = remote.get("/api/v1/devices", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json() == {"detail": "invalid token"}
    good = remote.get("/api/v1/devices", headers={"Authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200 and len(good.json()) == 2
    assert remote.post("/api/v1/devices").status_code == 401  # refused before routing
    local = TestClient(app, base_url="http://127.0.0.1:8080", client=LOCAL)
    assert local.get("/api/v1/devices").status_code == 200  # loopback needs no token


def test_without_remote_access_only_local_clients_are_answered(client: TestClient) -> None:
    remote = TestClient(client.app, client=REMOTE)
    refused = remote.get("/api/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (
        refused.status_code == 401
        and "only clients on the controller's own machine" in (refused.json()["detail"])
    )


@pytest.mark.parametrize(
    "peer, headers, allowed",
    [
        ("127.0.0.1", {"host": "127.0.0.1:8080"}, True),
        ("::1", {"host": "[::1]:8080"}, True),
        ("127.0.0.1", {"host": "localhost"}, True),
        ("10.0.0.5", {"host": "127.0.0.1:8080"}, False),
        # a proxy on this machine relays someone else
        ("127.0.0.1", {"host": "localhost", "x-forwarded-for": "10.0.0.5"}, False),
        # DNS rebinding: a foreign page's name resolved to 127.0.0.1
        ("127.0.0.1", {"host": "evil.example:8080"}, False),
        ("10.0.0.5", {"host": "gw", "authorization": f"Bearer {TOKEN}"}, True),
        ("10.0.0.5", {"host": "gw", "authorization": f"bearer {TOKEN}"}, True),
        ("10.0.0.5", {"host": "gw", "authorization": f"Basic {TOKEN}"}, False),
        ("10.0.0.5", {"host": "gw", "authorization": f"Bearer {TOKEN}x"}, False),
    ],
)
def test_refusal(peer: str, headers: dict[str, str], allowed: bool) -> None:
    assert (refusal(peer, headers, TOKEN, allow_remote=True) is None) is allowed


def test_remote_access_needs_a_usable_token(fleet: Fleet) -> None:
    with pytest.raises(InvalidRequest, match="--token-file FILE or set GREENFLEET_API_TOKEN"):
        create_app(fleet.home, allow_remote=True)
    with pytest.raises(InvalidRequest, match="at least 16 characters"):
        create_app(fleet.home, token="short", allow_remote=True)


def test_cli_refuses_a_public_bind_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(api_commands.TOKEN_ENV, raising=False)
    home = str(tmp_path / "home")
    assert main(["--home", home, "api", "run", "--bind", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "without a token" in err and "--token-file" in err and "GREENFLEET_API_TOKEN" in err
    argv = ["--home", home, "controller", "run", "--api", "--api-bind", "0.0.0.0"]
    assert main(argv) == 1
    assert "--api-token-file" in capsys.readouterr().err
    monkeypatch.setenv(api_commands.TOKEN_ENV, TOKEN)
    assert api_commands.access("0.0.0.0", None) == TOKEN
    token_file = tmp_path / "token"
    assert main(["api", "token", str(token_file)]) == 0
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    written = api_commands.access("::", str(token_file))
    assert written is not None and written != TOKEN and len(written) >= 32
    assert main(["api", "token", str(token_file)]) == 1  # never overwritten silently


def test_the_server_serves_over_http(fleet: Fleet) -> None:
    server = ApiServer(fleet.home, "127.0.0.1", 0).start()
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"{server.url}/api/v1/health", timeout=10) as answer:
            assert json.load(answer)["devices"] == 2
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as answer:
            assert b"greenfleet_device_up" in answer.read()
        with pytest.raises(InvalidRequest, match="cannot serve the API"):
            ApiServer(fleet.home, "127.0.0.1", server.port).start()  # the port is taken
        request = urllib.request.Request(f"{server.url}/api/v1/devices", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 405
        refused.value.close()
    finally:
        server.stop()
    assert not server.alive()


def test_the_daemon_serves_the_api_in_process(tmp_path: Path) -> None:
    from controller.daemon import Controller

    home = Home(tmp_path / "home")
    api = ApiServer(home, "127.0.0.1", 0)
    controller = Controller(home, "127.0.0.1", 1, api=api)  # no broker there: it retries
    controller.start()
    try:
        with urllib.request.urlopen(f"{api.url}/api/v1/health", timeout=10) as answer:
            assert json.load(answer)["status"] == "ok"
    finally:
        controller.stop()
    assert not api.alive()


def test_home_is_read_through_its_own_connections(fleet: Fleet) -> None:
    """Each request opens and closes its own connection: no file handle is left open."""
    app = create_app(Home(fleet.home.root), dashboard=None)
    client = TestClient(app, base_url="http://127.0.0.1", client=LOCAL)
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(20):
        assert client.get("/api/v1/devices").status_code == 200
        assert client.get("/metrics").status_code == 200
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) <= before + 2
