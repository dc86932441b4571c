"""The operator CLI: tables for people, JSON for scripts, one-line errors with exit code 1."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import protocol as p
from controller import registry
from controller.cli import main
from controller.db import open_db

SAMPLES = Path(__file__).parents[2] / "model_store" / "samples"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GREENFLEET_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_home_is_honoured_and_lists_take_json(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "models",
                "add",
                str(SAMPLES / "vibration-ae.onnx"),
                "--name",
                "vib",
                "--version",
                "1.0.0",
            ]
        )
        == 0
    )
    assert (home / "greenfleet.db").exists()
    db = open_db(home / "greenfleet.db")
    hw = p.HardwareFacts(arch="aarch64", cores=4, memory_mb=4096, os="Linux", python="3.11")
    birth = p.Birth(
        session="s",
        agent_version="0.1.0",
        device_class="rpi4",
        labels={"site": "a"},
        runtimes=[p.ModelFormat.ONNX],
        hardware=hw,
    )
    registry.apply_birth(db, "gw-1", birth, datetime.now(UTC))
    capsys.readouterr()
    assert main(["devices", "list"]) == 0
    table = capsys.readouterr().out
    assert "gw-1" in table and "rpi4" in table and "online" in table
    assert main(["deploy", "vib:1.0.0", "--selector", "site=a", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "model": "vib:1.0.0",
        "devices": ["gw-1"],
        "retried": 0,
    }
    assert main(["devices", "show", "gw-1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["desired_model"] == "vib:1.0.0" and shown["hardware"]["arch"] == "aarch64"
    assert main(["models", "list", "--json"]) == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)] == ["vib:1.0.0"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["devices", "show", "ghost"], "no device 'ghost'"),
        (["deploy", "nope:1.0", "--device", "x"], "no model nope:1.0"),
        (["deploy", "nope", "--device", "x"], "must look like NAME:VERSION"),
        (
            ["models", "add", "/nonexistent.onnx", "--name", "a", "--version", "1.0.0"],
            "no such file",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code_1(
    home: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("greenfleet: ") and needle in err and "Traceback" not in err


def test_models_compress_and_show(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model_store.samples.calibration import calibration_set

    calibration = tmp_path / "calib.npz"
    calibration_set("surface-cnn", n=120).save(calibration)
    model = str(SAMPLES / "surface-cnn.onnx")
    meta = str(SAMPLES / "surface-cnn.json")
    assert (
        main(["models", "add", model, "--name", "surf", "--version", "1.0.0", "--meta", meta]) == 0
    )
    argv = ["models", "compress", "surf:1.0.0", "--calibration", str(calibration)]
    assert main([*argv, "--only", "fp16,int8-static,nope"]) == 1
    assert "unknown builders ['nope']" in capsys.readouterr().err
    capsys.readouterr()
    assert main([*argv, "--only", "fp16,int8-static", "--runs", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"fp32", "fp16", "int8-static-qdq", "int8-static-qop"} <= {
        r["variant"] for r in report["variants"]
    }
    assert report["failures"] == []
    assert main(["models", "show", "surf:1.0.0"]) == 0
    table = capsys.readouterr().out
    assert "int8-static-qop" in table and "acc " in table
    assert main(["models", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["task"], listed["accuracy_floor"], listed["variants"]) == (
        "classification",
        0.9,
        5,
    )


def test_an_ineligible_variant_is_not_deployed_without_force(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from controller.db import open_db
    from model_store.catalog import Catalog

    assert (
        main(
            [
                "models",
                "add",
                str(SAMPLES / "vibration-ae.onnx"),
                "--name",
                "vib",
                "--version",
                "1.0.0",
            ]
        )
        == 0
    )
    catalog = Catalog(open_db(home / "greenfleet.db"), home / "store")
    catalog.update_variant(
        "vib:1.0.0", eligible=0, reason="AUC 0.80 is below the accuracy floor 0.95"
    )
    db = open_db(home / "greenfleet.db")
    hw = p.HardwareFacts(arch="x86_64", cores=2, memory_mb=1, os="Linux", python="3.11")
    birth = p.Birth(session="s", agent_version="0", device_class="x", runtimes=[], hardware=hw)
    registry.apply_birth(db, "gw-1", birth, datetime.now(UTC))
    capsys.readouterr()
    assert main(["deploy", "vib:1.0.0", "--device", "gw-1"]) == 1
    assert "not eligible: AUC 0.80 is below the accuracy floor" in capsys.readouterr().err
    assert main(["deploy", "vib:1.0.0", "--device", "gw-1", "--force"]) == 0


def test_devices_show_the_tier_and_the_staged_fallback(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = open_db(home / "greenfleet.db")
    hw = p.HardwareFacts(arch="aarch64", cores=4, memory_mb=4096, os="Linux", python="3.11")
    small = p.ActiveModel(
        model=p.ModelRef(name="vib", version="1.0.0+int8-dynamic"),
        sha256="c" * 64,
        format=p.ModelFormat.ONNX,
    )
    birth = p.Birth(
        session="s",
        agent_version="0.1.0",
        device_class="rpi4",
        runtimes=[p.ModelFormat.ONNX],
        hardware=hw,
        fallback=small,
        tier=p.Tier.FALLBACK,
    )
    registry.apply_birth(db, "gw-1", birth, datetime.now(UTC))
    change = p.Event(
        event=p.EventKind.TIER_CHANGED,
        session="s",
        detail={"from": "last_good", "to": "fallback", "cause": "power budget breached"},
    )
    db.table("events").insert(
        {
            "id": change.id,
            "device": "gw-1",
            "ts": registry.iso(change.ts),
            "session": "s",
            "event": "tier_changed",
            "message": "",
            "detail": json.dumps(change.detail),
        }
    )
    capsys.readouterr()
    assert main(["devices", "list"]) == 0
    table = capsys.readouterr().out
    assert "tier" in table and "fallback" in table
    assert main(["devices", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["tier"] == "fallback"
    assert main(["devices", "show", "gw-1"]) == 0
    shown = capsys.readouterr().out
    assert "tier fallback" in shown and "fallback vib:1.0.0+int8-dynamic" in shown
    assert "recent tier changes" in shown and "power budget breached" in shown
    assert main(["devices", "show", "gw-1", "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert (detail["tier"], detail["fallback_model"]) == ("fallback", "vib:1.0.0+int8-dynamic")
    (listed,) = detail["recent_tier_changes"]
    assert listed["detail"]["cause"] == "power budget breached"
    assert listed["message"] == "last_good -> fallback: power budget breached"


def test_models_add_signs_a_manifest_enrolled_agents_accept(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.verify import load_public_key, verify_manifest
    from model_store.catalog import Catalog

    capsys.readouterr()
    argv = ["models", "add", str(SAMPLES / "vibration-ae.onnx"), "--name", "vib"]
    assert main([*argv, "--version", "1.0.0", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["signed_by"] and added["unsigned_because"] is None
    key = load_public_key((home / "keys" / "signing.pub").read_text())
    variant = Catalog(open_db(home / "greenfleet.db"), home / "store").get("vib:1.0.0")
    manifest = verify_manifest(
        variant.manifest, [key], now=datetime.now(UTC), device_class="rpi4", active=None
    )
    assert manifest.artifact.sha256 == added["sha256"] and manifest.golden


def test_models_add_again_with_a_task_updates_the_version_and_judges_its_variants(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Re-adding the same file with a stricter floor says "updated" and judges the stored
    variants against it (here one whose agreement with fp32 was 0.93)."""
    from agent.protocol import Fidelity, Profile
    from model_store.catalog import Catalog

    argv = ["models", "add", str(SAMPLES / "vibration-ae.onnx"), "--name", "vib"]
    assert main([*argv, "--version", "1.0.0"]) == 0
    catalog = Catalog(open_db(home / "greenfleet.db"), home / "store")
    version = catalog.version("vib:1.0.0")
    source = catalog.get("vib:1.0.0")
    profile = Profile(
        size_bytes=1,
        parameters=1,
        macs=1,
        fidelity=Fidelity(samples=50, agreement=0.93, correlation=0.99),
        host="test",
    )
    catalog.put_variant(
        version,
        "int8",
        source.path,
        source.format,
        precision="int8",
        technique="quantize",
        eligible=True,
        reason=None,
        notes=(),
        details={},
        profile=profile,
    )
    capsys.readouterr()
    assert main([*argv, "--version", "1.0.0", "--task", "anomaly", "--accuracy-floor", "0.95"]) == 0
    out = capsys.readouterr().out
    assert "updated vib:1.0.0: task anomaly (was None)" in out
    assert "updated vib:1.0.0: accuracy floor 0.95 (was None)" in out
    int8 = catalog.get("vib:1.0.0+int8")
    assert not int8.eligible and "agreement with fp32 0.930 is below the accuracy floor" in (
        int8.reason or ""
    )
    assert main([*argv, "--version", "1.0.0", "--task", "classification"]) != 0
    assert "task does not change" in capsys.readouterr().err


def test_a_model_added_as_tflite_alone_is_profiled_on_litert_and_can_be_planned(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16: a model added as .tflite only was "not profiled on litert" and no device could
    be planned on it. ``models add`` now profiles every file on its own runtime."""
    from controller.planning import candidate
    from controller.selection import DeviceNeeds, select_variant
    from model_store.catalog import Catalog

    argv = ["models", "add", str(SAMPLES / "surface-cnn.tflite"), "--name", "surf"]
    assert main([*argv, "--version", "1.0.0", "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["unprofiled_because"] is None
    assert added["profile"]["latency"]["litert"]["p50_ms"] > 0 and added["profile"]["macs"] > 0
    variant = Catalog(open_db(home / "greenfleet.db"), home / "store").get("surf:1.0.0")
    gateway = DeviceNeeds(
        id="gw-1",
        device_class="rpi4",
        runtimes=frozenset({"tflite"}),
        precisions=frozenset({"fp32", "int8"}),
        model_memory_mb=256,
        storage_mb=1024,
        latency_budget_ms=100,
        speed={"fp32": 4.0},
        active_w_per_core=1.0,
    )
    decision = select_variant(gateway, [candidate(variant)], {})
    assert decision.chosen == "surf:1.0.0", decision


def test_models_add_with_a_bad_name_says_so_in_one_line(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["models", "add", str(SAMPLES / "vibration-ae.onnx"), "--name", "Bad_Name"]
    assert main([*argv, "--version", "1.0.0"]) != 0
    err = capsys.readouterr().err
    assert "invalid model name or version Bad_Name:1.0.0" in err and "Traceback" not in err


def test_an_imported_variant_is_profiled_but_stays_deployable_until_compress_judges_it(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model_store.catalog import Catalog

    argv = ["models", "add", str(SAMPLES / "vibration-ae.onnx"), "--name", "vib"]
    assert main([*argv, "--version", "1.0.0"]) == 0
    tflite = ["models", "add", str(SAMPLES / "vibration-ae.tflite"), "--name", "vib"]
    assert main([*tflite, "--version", "1.0.0+tflite"]) == 0
    variant = Catalog(open_db(home / "greenfleet.db"), home / "store").get("vib:1.0.0+tflite")
    assert variant.profile is not None and "litert" in variant.profile.latency
    assert variant.eligible and variant.reason is None


CLASS = {
    "latency_ms": 50.0,
    "latency_from": "class rpi4",
    "power_w": 7.5,
    "power_from": "class rpi4",
}


@pytest.mark.parametrize(
    "applied, planned, shows, warns",
    [
        (CLASS, CLASS, "latency 50 ms (class rpi4), power 7.5 W (class rpi4)", False),
        (None, CLASS, "not reported by the agent yet", True),
        (
            {"latency_ms": None, "latency_from": "", "power_w": None, "power_from": ""},
            CLASS,
            "latency none (not checked), power none (not checked)",
            True,
        ),
        (
            {**CLASS, "power_w": 3.0, "power_from": "agent.yaml"},
            CLASS,
            "power 3 W (agent.yaml)",
            False,  # a local setting is a decision, not drift
        ),
    ],
)
def test_devices_show_says_which_budgets_apply_and_where_they_came_from(
    applied: dict[str, object] | None, planned: dict[str, object], shows: str, warns: bool
) -> None:
    from controller.cli import budgets_text

    text = budgets_text({"applied": applied, "planned": planned})
    assert shows in text
    hostile = {**CLASS, "latency_from": "[blink]agent.yam[/blink]"}  # what a device may send
    assert "\\[blink]" in budgets_text({"applied": hostile, "planned": CLASS})
    assert ("sent with the next active deploy" in text) is warns
