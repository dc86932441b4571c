"""The dashboard in a real browser: headless Chromium (Debian's) driven by Selenium.

One small live fleet for the whole file: a real Mosquitto, the controller daemon, the HTTP API
(``greenfleet api run``) and three real agents on two sites, running the sample model
(compressed, so the models page has variants with fidelity and energy). Each test loads a page
and checks what a person sees there; each saves a screenshot under
``test-artifacts/screenshots/`` (ignored by git), also when it fails.

"Live" is checked for real: the pages are never reloaded while the fleet changes under them (a
marker set on ``window`` survives), yet a new agent appears, goes offline, and a rollout's
progress moves.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.broker import Mosquitto
from tests.conftest import (
    REPO,
    SAMPLES,
    Processes,
    agent_config,
    unique,
    wait_until,
)

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get install -y chromium chromium-driver (.ci/run does this)"
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
MODEL = "vibration-ae:1.0.0"
NEXT = "vibration-ae:2.0.0"
CLASSES = {"gw-": "x86-ipc", "rpi": "rpi4"}  # device class by id prefix (the plan uses it)


# ------------------------------------------------------------------------------------ fleet


@dataclass
class Fleet:
    procs: Processes
    tmp: Path
    broker_port: int
    api: str  # http://127.0.0.1:PORT
    sites: dict[str, list[str]]  # site -> its devices, sorted
    extra: list[str] = field(default_factory=list)

    @property
    def devices(self) -> list[str]:
        return [d for site in self.sites.values() for d in site]

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.api}/api/v1{path}", timeout=5) as answer:
            return json.loads(answer.read())

    def cli(self, *args: str) -> Any:
        result = self.procs.cli("--log-level", "WARNING", *args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def logs(self) -> str:
        names = ["controller", "api", *self.devices, *self.extra]
        return "\n".join(f"--- {n}\n{self.procs.log(n)[-2000:]}" for n in names)


def answers(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
        return bool(answer.status == 200)
    return False


@pytest.fixture(scope="module")
def fleet(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("dashboard")
    env = dict(os.environ)
    env["GREENFLEET_HOME"] = str(tmp / "home")
    env["PYTHONPATH"] = str(REPO)
    env.pop("GREENFLEET_BROKER", None)
    env.pop("GREENFLEET_API_TOKEN", None)
    procs = Processes(tmp, env)
    try:
        yield start_fleet(procs, tmp, mosquitto.port)
    finally:
        procs.stop_all()


def start_fleet(procs: Processes, tmp: Path, broker_port: int) -> Fleet:
    def ok(*args: str) -> None:
        result = procs.cli("--log-level", "WARNING", *args)
        assert result.returncode == 0, result.stderr

    # the catalog: the sample model with a few variants, profiled against a calibration set
    for version in ("1.0.0", "2.0.0"):
        sample = str(SAMPLES / "vibration-ae.onnx")
        meta = str(SAMPLES / "vibration-ae.json")
        ok("models", "add", sample, "--name", "vibration-ae", "--version", version, "--meta", meta)
    calibration = tmp / "calibration.npz"
    made = procs.start(
        "calibration",
        "-m",
        "model_store.samples.calibration",
        "vibration-ae",
        str(calibration),
        "--n",
        "200",
    )
    assert made.wait(60) == 0, procs.log("calibration")
    ok(
        "models",
        "compress",
        MODEL,
        "--calibration",
        str(calibration),
        "--only",
        "fp16,int8-dynamic",
        "--runs",
        "20",
    )

    procs.controller(broker_port)
    # port 0: the API picks a free one and says which
    procs.start("api", "-m", "controller.cli", "api", "run", "--port", "0")
    sites = {
        unique("plant"): sorted(unique("gw") for _ in range(2)),
        unique("plant"): [unique("rpi")],
    }
    for site, devices in sites.items():
        for line, device in enumerate(devices, 1):
            procs.agent(
                agent_config(
                    tmp / f"{device}.yaml",
                    device,
                    broker_port,
                    interval_s=0.5,
                    extra={
                        "labels": {"site": site, "line": str(line)},
                        "device_class": CLASSES.get(device[:3], "x86-ipc"),
                    },
                )
            )
    url = wait_until(
        lambda: re.search(r"API on (http://127\.0\.0\.1:\d+)/", procs.log("api")),
        20,
        "the API to listen",
        lambda: procs.log("api"),
    ).group(1)
    fleet = Fleet(procs, tmp, broker_port, url, sites)
    wait_until(lambda: answers(f"{fleet.api}/api/v1/health"), 20, "the API", fleet.logs)
    wait_until(
        lambda: {d["id"] for d in fleet.get("/devices") if d["online"]} >= set(fleet.devices),
        30,
        "agents online",
        fleet.logs,
    )
    for site in sites:
        ok("deploy", MODEL, "--selector", f"site={site}")
    wait_until(
        lambda: all(
            (d["active_model"] or "").startswith(MODEL) and d["latency_p95_ms"]
            for d in fleet.get("/devices")
            if d["id"] in fleet.devices
        ),
        40,
        f"{MODEL} active everywhere with telemetry",
        fleet.logs,
    )
    return fleet


# ---------------------------------------------------------------------------------- browser


def require_chromium() -> None:
    """Fail (never skip) when Debian's Chromium or its driver is not installed."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(f"headless Chromium is missing ({', '.join(missing)}): {INSTALL}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,800",
        "--force-device-scale-factor=1",
        "--lang=en-GB",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for failures
    # both paths given, and offline: Selenium Manager has nothing to fetch, and must not try
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    # the page itself at 1280x800, whatever the window around it takes
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield driver
    finally:
        driver.quit()


# Read what the page shows (innerText: what a person sees) through these, prepended to every
# script the tests run in the page.
READ = """
const cells = (row) => Object.fromEntries([...row.querySelectorAll('[data-col]')]
  .map((c) => [c.dataset.col, c.innerText.trim()]));
const chart = (id) => {
  const svg = document.getElementById(id);
  if (!svg) return null;
  const line = svg.querySelector('path.line');
  return {points: Number(svg.dataset.points), circles: svg.querySelectorAll('circle.point').length,
          path: line ? line.getAttribute('d') : '', width: svg.getBoundingClientRect().width,
          title: svg.querySelector('title').textContent};
};
const rollout = (id) => {
  const card = document.querySelector(`[data-rollout-id='${id}']`);
  if (!card) return null;
  const bar = card.querySelector('[data-testid=rollout-progress]');
  return {
    status: card.querySelector('[data-testid=rollout-status]').innerText,
    updated: Number(bar.getAttribute('aria-valuenow')),
    total: Number(bar.getAttribute('aria-valuemax')),
    waves: [...card.querySelectorAll('[data-testid=wave]')]
      .map((w) => [Number(w.dataset.wave), Number(w.dataset.updated), Number(w.dataset.total)]),
    gates: [...card.querySelectorAll('[data-testid=gate-row]')]
      .map((g) => ({name: g.dataset.gate, ...cells(g)})),
  };
};
const all = (selector) => [...document.querySelectorAll(selector)];
"""


class Page:
    """The dashboard in the browser: open a route, read what it shows, save a screenshot."""

    def __init__(self, driver: Any, fleet: Fleet, name: str) -> None:
        self.driver = driver
        self.fleet = fleet
        self.name = name

    def open(self, route: str) -> None:
        self.driver.get("about:blank")  # a fresh page load for every test
        self.driver.get(f"{self.fleet.api}/#/{route}")
        self.wait("the page to render", "return document.getElementById('view').dataset.ready")
        # a page reload would lose this: "updates live" means without one
        self.js("window.__notReloaded = true")

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(READ + script, *args)

    def console(self) -> list[dict[str, Any]]:
        return list(self.driver.get_log("browser"))

    def wait(self, what: str, script: str, *args: Any, timeout: float = 15) -> Any:
        def logs() -> str:
            console = "\n".join(str(entry) for entry in self.console())
            return f"browser console:\n{console}\n{self.fleet.logs()}"

        return wait_until(lambda: self.js(script, *args), timeout, what, logs)

    def assert_healthy(self) -> None:
        """Not reloaded since opened, no error banner, no error in the browser console, and
        nothing wider than the 1280 px window (no sideways scrolling)."""
        assert self.js("return window.__notReloaded === true"), "the page was reloaded"
        width = self.js("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1] == 1280, f"page {width[0]} px wide in a {width[1]} px window"
        banner = self.js(
            "const e = document.getElementById('api-error'); return e.hidden || e.innerText"
        )
        assert banner is True, banner
        errors = [e for e in self.console() if e.get("level") == "SEVERE"]
        assert not errors, errors

    def screenshot(self, suffix: str = "") -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{self.name}{suffix}.png"
        self.driver.save_screenshot(str(path))
        return path


@pytest.fixture
def page(browser: Any, fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[Page]:
    shown = Page(browser, fleet, request.node.name)
    try:
        yield shown
    finally:
        shown.screenshot()  # also of a failed test: what did it see?


def fleet_rows(page: Page) -> dict[str, dict[str, Any]]:
    rows = page.js(
        """return all('#fleet-table [data-testid=device-row]').map((r) => ({
             id: r.dataset.deviceId, online: r.dataset.online === 'true', cells: cells(r)}))"""
    )
    return {r["id"]: r for r in rows}


def device_row(state: str) -> str:
    selector = f"[data-device-id='${{arguments[0]}}'][data-online={state}]"
    return f"return !!document.querySelector(`{selector}`)"


# ------------------------------------------------------------------------------------ tests


def test_fleet_page_lists_devices_with_models_and_follows_the_fleet_live(
    page: Page, fleet: Fleet
) -> None:
    page.open("fleet")
    page.wait("every device listed", "return all('[data-testid=device-row]').length >= 3")
    rows = fleet_rows(page)
    assert set(fleet.devices) <= set(rows)
    for site, devices in fleet.sites.items():
        for line, device in enumerate(devices, 1):
            cells = rows[device]["cells"]
            assert rows[device]["online"] and cells["online"] == "online", cells
            assert cells["site"] == site and cells["line"] == str(line), cells
            assert cells["device_class"] == CLASSES[device[:3]], cells
            assert cells["tier"] == "active", cells
            assert cells["model"] == MODEL and cells["variant"], cells  # the plan's variant
            assert float(cells["latency_p95_ms"]) > 0, cells
            assert float(cells["power_w"].split()[0]) > 0, cells
            assert float(cells["energy_per_inference_j"]) > 0, cells
            assert cells["last_seen"].endswith("ago"), cells
    headers = page.js("return all('#fleet-table thead th').map((t) => t.innerText)")
    for header in ("State", "Site", "Line", "Class", "Model", "Variant", "Tier", "Last seen"):
        assert header in headers
    assert {"Latency p95 (ms)", "Power (W)", "Energy / inference (mJ)"} <= set(headers)

    # a device joins and leaves while the page stays open: the table follows, not reloaded
    newcomer = unique("gw-new")
    fleet.extra.append(newcomer)
    config = agent_config(
        fleet.tmp / f"{newcomer}.yaml",
        newcomer,
        fleet.broker_port,
        interval_s=0.5,
        extra={"labels": {"site": "late", "line": "9"}},
    )
    agent = fleet.procs.agent(config)
    page.wait(f"{newcomer} listed online", device_row("true"), newcomer, timeout=20)
    agent.terminate()
    agent.wait(10)
    page.wait(f"{newcomer} shown offline", device_row("false"), newcomer, timeout=20)
    assert fleet_rows(page)[newcomer]["cells"]["online"] == "offline"
    online = page.js("return document.querySelector('[data-testid=online-count]').innerText")
    assert int(online) == len(fleet.devices)
    page.assert_healthy()

    # a click on a device opens its page
    page.js(
        "document.querySelector(`[data-device-id='${arguments[0]}'] a`).click()", fleet.devices[0]
    )
    page.wait(
        "the device page",
        "return document.getElementById('device-title')?.innerText === arguments[0]",
        fleet.devices[0],
    )
    page.js("history.back()")  # and the browser's back button returns to the fleet
    page.wait("the fleet again", "return all('[data-testid=device-row]').length >= 3")
    page.assert_healthy()


def test_device_page_draws_latency_and_power_charts(page: Page, fleet: Fleet) -> None:
    device = fleet.devices[0]
    page.open(f"devices/{device}")
    charts = {
        name: page.wait(
            f"the {name} with 3 points or more",
            "const c = chart(arguments[0]); return c && c.points >= 3 && c",
            name,
        )
        for name in ("latency-chart", "power-chart")
    }
    for name, seen in charts.items():
        assert seen["circles"] >= 3 and seen["path"].startswith("M"), (name, seen)
        assert seen["width"] > 300, f"{name} drawn at a readable size"
        assert device in seen["title"]
    # telemetry arrives every half second: the chart grows while the page stays open
    page.wait(
        "new points on the power chart",
        "const c = chart('power-chart'); return c && c.points > arguments[0]",
        charts["power-chart"]["points"],
    )
    facts = page.js(
        "return Object.fromEntries(all('#device-facts dd')"
        ".map((d) => [d.dataset.fact, d.innerText]))"
    )
    assert facts["active-model"] == MODEL and facts["tier"].startswith("active"), facts
    assert facts["site"] in fleet.sites, facts
    events = page.js("return all('#events-table tbody tr').map((r) => r.innerText)")
    assert any("activated" in e for e in events), events
    page.assert_healthy()


def test_models_page_lists_variants_and_plots_energy_against_fidelity(
    page: Page, fleet: Fleet
) -> None:
    page.open("models")
    card = f"[data-model-id='{MODEL}']"
    page.wait("the sample model's card", "return !!document.querySelector(arguments[0])", card)
    rows = page.js("return all(arguments[0] + ' [data-testid=variant-row]').map(cells)", card)
    variants = {r["variant"]: r for r in rows}
    assert {"(source)", "fp32", "fp16", "int8-dynamic"} <= set(variants)
    for name in ("fp32", "fp16", "int8-dynamic"):
        row = variants[name]
        assert row["size"].endswith("KiB"), row
        assert float(row["latency_p50_ms"]) > 0 and float(row["latency_p95_ms"]) > 0, row
        assert row["fidelity"].startswith("AUC"), row
        assert float(row["energy"].split()[0]) > 0, row
        # priced on the plan's basis, as the energy report's saving is (1 - this)
        assert float(row["energy_vs_fp32"]) > 0, row
        assert row["eligible"].startswith("yes"), row
        # what making it cost (issue 16): joules, labelled estimated here (no RAPL in CI)
        joules, _, how = row["build"].partition(" ")
        assert float(joules) > 0 and how in ("est.", "RAPL"), row
    assert variants["(source)"]["build"] == "\u2013", "the source was added, not built (an en dash)"
    assert variants["fp32"]["energy_vs_fp32"] == "1.00", variants["fp32"]
    int8, fp32 = (float(variants[n]["size"].split()[0]) for n in ("int8-dynamic", "fp32"))
    assert int8 < fp32 / 2, "int8 weights are about a quarter of fp32"
    scatter = page.js(
        """const svg = document.querySelector(
             `${arguments[0]} [data-testid=energy-fidelity-chart]`);
           return {points: Number(svg.dataset.points),
             labels: [...svg.querySelectorAll('circle.point')].map((c) => c.dataset.label)}""",
        card,
    )
    assert scatter["points"] >= 4 and {"fp16", "int8-dynamic"} <= set(scatter["labels"]), scatter
    assert page.js("return !!document.querySelector(`[data-model-id='${arguments[0]}']`)", NEXT)
    page.assert_healthy()


def test_rollouts_page_shows_a_rollout_progressing_live(page: Page, fleet: Fleet) -> None:
    site, devices = next(iter(fleet.sites.items()))
    spec = fleet.tmp / "rollout.yaml"
    gates = {
        # three agents, a controller, an API and a browser share two cores: judged, loosely
        "min_inferences": 10,
        "max_latency_regression": 20.0,
        "max_energy_regression": 20.0,
    }
    rollout_spec = {"model": NEXT, "selector": {"site": site}, "canary": 1, "wave_size": 1}
    spec.write_text(yaml.safe_dump({**rollout_spec, "soak_s": 3, "gates": gates}))
    page.open("rollouts")
    rollout = fleet.cli("rollout", "create", "--file", str(spec))["id"]
    seen = [page.wait("the new rollout on the page", "return rollout(arguments[0])", rollout)]
    assert seen[0]["total"] == len(devices) and seen[0]["status"] == "running", seen
    page.screenshot("-running")  # mid-way, for a person to look at

    def finished() -> Any:
        now = page.js("return rollout(arguments[0])", rollout)
        if now != seen[-1]:
            seen.append(now)
        return now["status"] == "completed" and now

    last = wait_until(finished, 45, "the rollout to complete on the page", fleet.logs)
    progress = [s["updated"] for s in seen]
    assert progress[0] < progress[-1] == len(devices), progress
    assert progress == sorted(progress), progress
    assert len({s["status"] for s in seen}) >= 2, "running, then completed"
    assert last["waves"] == [[0, 1, 1], [1, 1, 1]], "the canary, then a wave of one"
    judged = {g["name"]: g for g in last["gates"]}
    assert judged["error_rate"]["verdict"] == "ok", judged
    assert all(g["limit"] and g["value"] for g in judged.values()), judged
    assert fleet.cli("rollout", "show", rollout)["status"] == "completed"
    page.assert_healthy()


def test_energy_page_shows_kwh_and_co2e_per_site(page: Page, fleet: Fleet) -> None:
    page.open("energy")
    rows = page.wait(
        "energy of both sites",
        """const rows = all('[data-testid=energy-row]').map((r) => ({site: r.dataset.site,
             kwh: Number(r.querySelector('[data-col=kwh]').dataset.kwh), text: cells(r)}));
           return arguments[0].every((s) => rows.some((r) => r.site === s && r.kwh > 0)) && rows""",
        list(fleet.sites),
    )
    ours = {r["site"]: r for r in rows if r["site"] in fleet.sites}
    for site, row in ours.items():
        text = row["text"]
        assert text["kwh"].endswith("Wh"), text  # kWh, Wh or mWh, as big as it is
        assert text["estimated_kwh"].endswith("Wh") and text["co2e"].endswith("g"), text
        assert int(text["inferences"].replace(",", "")) > 0, text
        assert int(text["devices"]) == len(fleet.sites[site]), text
    total = page.js(
        "return Number(document.querySelector('[data-testid=energy-total-kwh]').dataset.kwh)"
    )
    assert total >= sum(r["kwh"] for r in ours.values()) * 0.999
    headers = page.js("return all('#energy-table thead th').map((t) => t.innerText)")
    assert {"Site", "Energy (kWh)", "CO2e", "Saving vs fp32"} <= set(headers)
    # each deployed variant: its saving, what it saves a day, and when it pays for its build
    variants = page.js("return all('[data-testid=energy-variant-row]').map(cells)")
    assert variants, "a row per (site, model, variant)"
    duration = re.compile(r"(paid|\u2013|[\d.,]+ (s|min|h|d|y))")
    for row in variants:
        assert duration.fullmatch(row["payback"]), row
        assert row["daily_saving"] == "\u2013" or row["daily_saving"].endswith("Wh"), row
    shown = {(r["site"], r["variant"]): r["payback"] for r in variants}
    for r in fleet.get("/energy?hours=24")["rows"]:  # the page's period
        if r["paid_back"] and (r["site"], r["variant"]) in shown:
            assert shown[(r["site"], r["variant"])] == "paid", (r, shown)
    headers = page.js("return all('#energy-variants thead th').map((t) => t.innerText)")
    assert {"Variant", "Saved / day", "Payback"} <= set(headers)
    assert "from the first telemetry window" in page.js(
        "return document.getElementById('energy-period').innerText"
    )
    page.assert_healthy()


def test_the_page_says_when_the_api_is_gone_keeps_its_data_and_recovers(
    page: Page, fleet: Fleet
) -> None:
    page.open("fleet")
    page.wait("every device listed", "return all('[data-testid=device-row]').length >= 3")
    (api,) = [proc for proc, log in fleet.procs.procs if log.name == "api.log"]
    api.terminate()
    api.wait(10)
    banner = "const e = document.getElementById('api-error'); return !e.hidden && e.innerText"
    assert "Cannot reach the API" in page.wait("the error banner", banner)
    assert len(fleet_rows(page)) >= 3, "the last data stays on screen"
    port = fleet.api.rpartition(":")[2]
    fleet.procs.start("api", "-m", "controller.cli", "api", "run", "--port", port)
    page.wait("the banner gone", "return document.getElementById('api-error').hidden", timeout=20)
    page.console()  # the failed requests of the outage are logged there: not errors of the page
    page.assert_healthy()


def test_a_missing_chromium_fails_loudly_and_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent skip: without Chromium the browser tests fail, naming the apt command."""
    require_chromium()  # here it is installed
    monkeypatch.setattr(f"{__name__}.CHROMEDRIVER", "/nonexistent/chromedriver")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium chromium-driver"):
        require_chromium()
