"""Maintenance windows: the pure window arithmetic, controller.yaml, and how reconcile uses them
(preload outside the window, activate inside), down to the daemon's deploys."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import yaml

from agent import protocol as p
from controller import registry, views
from controller.config import load_controller_config
from controller.errors import InvalidRequest
from controller.reconcile import DeployDecision, DeviceView, LastDeploy, plan_deploys
from controller.windows import Window, describe, inside, next_opening, parse_duration

SAMPLES = Path(__file__).parents[2] / "model_store" / "samples"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def w(cron: str, duration: str | int = "2h", timezone: str = "Europe/Berlin") -> Window:
    return Window.model_validate({"cron": cron, "duration": duration, "timezone": timezone})


NIGHTLY = w("0 22 * * *")  # 22:00-24:00 Berlin: 21-23 UTC in winter, 20-22 UTC in summer
LONG_NIGHT = w("0 22 * * *", "4h")  # across midnight
WEEK = [w("0 22 * * 1-5"), w("0 6 * * 6,0", "1h30m")]  # weeknights, weekend mornings


@pytest.mark.parametrize(
    "windows, now, expected",
    [
        pytest.param([], "2026-11-26T12:00", True, id="no-windows-always-open"),
        pytest.param([NIGHTLY], "2026-11-26T12:00", False, id="midday"),
        pytest.param([NIGHTLY], "2026-11-26T20:59:59", False, id="a-second-before"),
        pytest.param([NIGHTLY], "2026-11-26T21:00", True, id="opens-22-berlin"),
        pytest.param([NIGHTLY], "2026-11-26T22:59:59", True, id="last-second"),
        pytest.param([NIGHTLY], "2026-11-26T23:00", False, id="closed-after-2h"),
        pytest.param([LONG_NIGHT], "2026-11-26T23:30", True, id="midnight-before"),
        pytest.param([LONG_NIGHT], "2026-11-27T00:30", True, id="midnight-after"),
        pytest.param([LONG_NIGHT], "2026-11-27T01:00", False, id="midnight-closed"),
        pytest.param([LONG_NIGHT], "2026-01-01T00:59", True, id="across-new-year"),
        # clocks go forward on 2026-03-29: 22:00 Berlin is 21:00 UTC on the 28th, 20:00 after
        pytest.param([NIGHTLY], "2026-03-28T20:30", False, id="dst-spring-before"),
        pytest.param([NIGHTLY], "2026-03-28T21:30", True, id="dst-spring-before-open"),
        pytest.param([NIGHTLY], "2026-03-29T20:30", True, id="dst-spring-after"),
        pytest.param([NIGHTLY], "2026-03-29T22:00", False, id="dst-spring-after-closed"),
        # clocks go back on 2026-10-25: 20:00 UTC on the 24th, 21:00 UTC on the 25th
        pytest.param([NIGHTLY], "2026-10-24T20:30", True, id="dst-autumn-before"),
        pytest.param([NIGHTLY], "2026-10-25T20:30", False, id="dst-autumn-after"),
        pytest.param([NIGHTLY], "2026-10-25T22:30", True, id="dst-autumn-after-open"),
        # a window through the change lasts its duration of real time: 00:00-03:00 UTC
        pytest.param([w("0 1 * * *", "3h")], "2026-03-29T02:59", True, id="through-dst"),
        pytest.param([w("0 1 * * *", "3h")], "2026-03-29T03:00", False, id="through-dst-end"),
        # several windows; cron day numbers: 0 is Sunday, 1-5 Monday to Friday
        pytest.param(WEEK, "2026-11-27T21:30", True, id="friday-night"),
        pytest.param(WEEK, "2026-11-28T21:30", False, id="saturday-night"),
        pytest.param(WEEK, "2026-11-28T05:15", True, id="saturday-morning"),
        pytest.param(WEEK, "2026-11-28T06:30", False, id="saturday-after-90m"),
        pytest.param(WEEK, "2026-11-29T05:10", True, id="sunday-is-0"),
        pytest.param(WEEK, "2026-11-30T05:10", False, id="monday-morning"),
        pytest.param(WEEK, "2026-11-30T21:10", True, id="monday-night"),
        pytest.param([w("0 9 * * *", 3600, "America/New_York")], "2026-11-26T14:30", True, id="ny"),
        pytest.param([w("*/15 * * * *", "5m", "UTC")], "2026-11-26T14:31", True, id="every-15"),
        pytest.param([w("*/15 * * * *", "5m", "UTC")], "2026-11-26T14:36", False, id="15-closed"),
    ],
)
def test_inside(windows: list[Window], now: str, expected: bool) -> None:
    assert inside(windows, utc(now)) is expected
    # the same instant in another zone is the same answer
    assert inside(windows, utc(now).astimezone(ZoneInfo("Asia/Tokyo"))) is expected


@pytest.mark.parametrize(
    "windows, now, expected",
    [
        ([NIGHTLY], "2026-11-26T12:00", "2026-11-26 22:00 Europe/Berlin"),
        ([NIGHTLY], "2026-11-26T21:30", "2026-11-27 22:00 Europe/Berlin"),  # open: the next
        (WEEK, "2026-11-27T23:30", "2026-11-28 06:00 Europe/Berlin"),
        (WEEK, "2026-11-29T06:00", "2026-11-30 22:00 Europe/Berlin"),
        ([NIGHTLY, w("30 20 * * *", "1h", "UTC")], "2026-11-26T12:00", "2026-11-26 20:30 UTC"),
        ([], "2026-11-26T12:00", "a window that never opens"),
    ],
)
def test_next_opening(windows: list[Window], now: str, expected: str) -> None:
    assert describe(next_opening(windows, utc(now))) == expected


@pytest.mark.parametrize(
    "text, seconds",
    [("90m", 5400), ("2h", 7200), ("1h30m", 5400), (5400, 5400), ("5400", 5400), ("45s", 45)],
)
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


def write(path: Path, sites: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump({"sites": sites}))
    return path


def test_config_a_site_may_have_only_windows(tmp_path: Path) -> None:
    config = load_controller_config(
        write(
            tmp_path / "controller.yaml",
            {
                "plant-a": {
                    "grid_g_co2e_per_kwh": 350,
                    "maintenance": [{"cron": "0 22 * * *", "duration": "2h", "timezone": "UTC"}],
                },
                "plant-b": {
                    "maintenance": [
                        {"cron": "0 22 * * 1-5", "duration": "1h30m", "timezone": "Europe/Berlin"},
                        {"cron": "0 6 * * 0", "duration": 5400, "timezone": "Europe/Berlin"},
                    ]
                },
            },
        )
    )
    assert config.grid_intensity("plant-a") == 350
    assert config.grid_intensity("plant-b") == 480, "no figure: the default intensity"
    assert [x.duration for x in config.windows("plant-b")] == [timedelta(minutes=90)] * 2
    assert config.windows("plant-c") == [] and config.windows(None) == []


@pytest.mark.parametrize(
    "window, needle",
    [
        ({"cron": "0 25 * * *"}, r"maintenance\.0\.cron: expected a cron expression of 5 fields"),
        ({"cron": "0 22 * *"}, r"maintenance\.0\.cron: .*got 4 fields"),
        ({"cron": "0 0 30 2 *"}, r"maintenance\.0\.cron: .*never fires"),
        (
            {"timezone": "Europe/Atlantis"},
            r"maintenance\.0\.timezone: unknown time zone 'Europe/Atlantis': expected an IANA",
        ),
        ({"duration": "2 hours"}, r"maintenance\.0\.duration: expected a duration like \"90m\""),
        ({"duration": -5}, r"maintenance\.0\.duration: expected a duration"),
        ({"timezone": None}, r"maintenance\.0\.timezone: expected an IANA time zone"),
        ({"start": "22:00"}, r"maintenance\.0\.start: Extra inputs"),
    ],
)
def test_config_errors_name_site_index_key_and_what_is_expected(
    tmp_path: Path, window: dict[str, object], needle: str
) -> None:
    good = {"cron": "0 22 * * *", "duration": "2h", "timezone": "UTC"}
    path = write(tmp_path / "controller.yaml", {"plant-a": {"maintenance": [{**good, **window}]}})
    with pytest.raises(InvalidRequest, match=r"sites\.plant-a\." + needle):
        load_controller_config(path)


def test_config_a_missing_time_zone_is_required(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        {"s": {"maintenance": [{"cron": "0 22 * * *", "duration": "2h"}, {"cron": "x"}]}},
    )
    with pytest.raises(InvalidRequest) as err:
        load_controller_config(path)
    assert "sites.s.maintenance.0.timezone: Field required" in str(err.value)
    assert "sites.s.maintenance.1.cron: expected a cron expression" in str(err.value)


# ------------------------------------------------------------------------------ plan_deploys

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
FORMATS = {"m:1": "onnx", "m:2": "onnx"}
OPENS = "2026-11-26 22:00 Europe/Berlin"


def dev(
    may_activate: bool = False,
    preloaded: str | None = None,
    active: str | None = "m:1",
    online: bool = True,
) -> DeviceView:
    return DeviceView(
        "d",
        online,
        active,
        "m:2",
        frozenset({"onnx"}),
        may_activate=may_activate,
        preloaded_model=preloaded,
        window_opens=OPENS,
    )


def sent(model: str, ago_s: float, status: str = "sent") -> LastDeploy:
    return LastDeploy(model, NOW - timedelta(seconds=ago_s), status)


@pytest.mark.parametrize(
    "device, last_active, last_preload, slot, skip_reason",
    [
        pytest.param(dev(), None, None, "preload", None, id="outside-preload"),
        pytest.param(
            dev(preloaded="m:2"),
            None,
            sent("m:2", 60, "ok"),
            None,
            f"m:2 preloaded; waiting for the maintenance window at {OPENS}",
            id="outside-preloaded-waits",
        ),
        pytest.param(dev(preloaded="m:1"), None, None, "preload", None, id="stale-preload"),
        pytest.param(dev(), None, sent("m:2", 10), None, "preload of m:2 sent", id="no-resend"),
        pytest.param(dev(), None, sent("m:2", 31), "preload", None, id="resend-unreported"),
        pytest.param(dev(), None, sent("m:2", 120, "failed"), None, "failed", id="failed-backoff"),
        pytest.param(dev(), None, sent("m:2", 360, "failed"), "preload", None, id="retry"),
        pytest.param(dev(), sent("m:2", 1), None, "preload", None, id="window-just-closed"),
        pytest.param(dev(online=False), None, None, None, "offline", id="offline"),
        pytest.param(dev(active="m:2"), None, None, None, None, id="already-active"),
        pytest.param(dev(True), None, None, "active", None, id="inside-activates"),
        pytest.param(
            dev(True, preloaded="m:2"), None, None, "active", None, id="inside-activates-preloaded"
        ),
        pytest.param(dev(True), None, sent("m:2", 1), "active", None, id="preload-in-flight"),
        pytest.param(
            dev(True), sent("m:2", 10), None, None, "deploy of m:2 sent", id="inside-wait"
        ),
    ],
)
def test_plan_deploys_with_windows(
    device: DeviceView,
    last_active: LastDeploy | None,
    last_preload: LastDeploy | None,
    slot: str | None,
    skip_reason: str | None,
) -> None:
    deploys, skips = plan_deploys(
        [device],
        FORMATS,
        {"d": last_active} if last_active else {},
        NOW,
        last_preloads={"d": last_preload} if last_preload else {},
    )
    assert deploys == ([DeployDecision("d", "m:2", slot)] if slot else [])
    if skip_reason:
        assert len(skips) == 1 and skip_reason in skips[0].reason, skips
    else:
        assert skips == []


# ------------------------------------------------------------------------- the daemon's part


def test_daemon_preloads_outside_the_window_and_activates_inside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The controller's half against a real catalog and database, with a fake MQTT link:
    controller.yaml decides per site label; a changed file is read at the next pass."""
    from controller.cli import main
    from controller.daemon import Controller
    from controller.db import open_db
    from controller.home import Home
    from model_store.catalog import Catalog

    home = Home(tmp_path / "home").prepare()
    db = open_db(home.database)
    catalog = Catalog(db, home.store)
    variant = catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0.0")
    model = p.ActiveModel(model=variant.ref, sha256=variant.sha256, format=variant.format)

    def born(active: p.ActiveModel | None = None, preloaded: p.ActiveModel | None = None) -> None:
        birth = p.Birth(
            session="s",
            agent_version="0.1.0",
            device_class="x86-ipc",
            labels={"site": "plant-a"},
            runtimes=[p.ModelFormat.ONNX],
            hardware=p.HardwareFacts(arch="x86_64", cores=2, memory_mb=1, os="L", python="3"),
            active=active,
            preloaded=preloaded,
        )
        registry.apply_birth(db, "d1", birth, NOW)

    def site(cron: str, duration: str) -> None:
        windows = [{"cron": cron, "duration": duration, "timezone": "UTC"}]
        write(home.config, {"plant-a": {"maintenance": windows}})

    closed = (datetime.now(UTC) + timedelta(hours=12)).hour
    site(f"0 {closed} * * *", "1m")  # opens in about 12 hours
    born()
    controller = Controller(home)
    controller._db, controller._catalog = db, catalog  # the seams start() would open
    sent: list[p.Deploy] = []
    connected = threading.Event()
    connected.set()
    controller.link = SimpleNamespace(  # type: ignore[assignment]
        connected=connected, publish=lambda topic, payload, qos: sent.append(decode(payload))
    )

    def deploys() -> list[tuple[str, p.Slot]]:
        found = [(str(d.model), d.slot) for d in sent]
        sent.clear()
        return found

    registry.set_desired(db, ["d1"], "vib:1.0.0")
    controller.reconcile()
    assert deploys() == [("vib:1.0.0", p.Slot.PRELOAD)]
    controller.reconcile()
    assert deploys() == [], "not re-sent at every pass"
    born(preloaded=model)
    controller.reconcile()
    assert deploys() == []
    (note,) = db.table("events").rows_where("event = 'window_wait'")
    assert f"waiting for the maintenance window at {datetime.now(UTC):%Y}" in note["message"]
    assert f"{closed:02d}:00 UTC" in note["message"]

    assert main(["--home", str(home.root), "devices", "show", "d1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preloaded_model"] == "vib:1.0.0"
    assert main(["--home", str(home.root), "devices", "show", "d1"]) == 0
    assert "preloaded vib:1.0.0" in capsys.readouterr().out

    home.config.write_text("sites: {plant-a: {maintenance: [{cron: 1}]}}")  # a bad edit
    controller.reconcile()
    assert deploys() == [], "a bad edit is logged; the windows read before stay"

    site("* * * * *", "1m")  # open now
    controller.reconcile()
    assert deploys() == [("vib:1.0.0", p.Slot.ACTIVE)]
    controller.reconcile()
    assert deploys() == []
    born(active=model)
    assert views.device_detail(db, "d1")["preloaded_model"] is None
    controller.reconcile()
    assert deploys() == []

    # an explicit rollback is a repair: it does not wait for the window
    site(f"0 {closed} * * *", "1m")
    catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "0.9.0")
    registry.set_desired(db, ["d1"], "vib:0.9.0", rollback=True)
    controller.reconcile()
    assert deploys() == [("vib:0.9.0", p.Slot.ACTIVE)]


def decode(payload: bytes) -> p.Deploy:
    command = p.decode_command(payload)
    assert isinstance(command, p.Deploy)
    return command


def test_the_daemon_refuses_to_start_with_bad_windows(tmp_path: Path) -> None:
    from controller.daemon import Controller
    from controller.home import Home

    home = Home(tmp_path / "home")
    home.prepare()
    write(home.config, {"plant-a": {"maintenance": [{"cron": "0 22 * * *", "duration": "2h"}]}})
    with pytest.raises(InvalidRequest, match=r"sites\.plant-a\.maintenance\.0\.timezone"):
        Controller(home).start()
