"""The budgets the plan chooses against reach the device (issue 17, item 5): an enrolled gateway
gets its class's latency budget and a label's power budget with its deploy, applies them, says
so in `devices show`, and falls a tier when it breaks the power budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SAMPLES, Processes, configured_broker, unique, wait_until

pytestmark = pytest.mark.e2e


def test_an_enrolled_device_applies_the_planned_budgets_and_falls_on_them(
    processes: Processes, tmp_path: Path
) -> None:
    with configured_broker(processes, tmp_path) as port:
        added = processes.cli(
            "models", "add", str(SAMPLES / "vibration-ae.onnx"), "--name", "vibration-ae",
            "--version", "1.0.0",
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        again = processes.cli(  # a second version, so there is a last-good tier to fall to
            "models", "add", str(SAMPLES / "vibration-ae.tflite"), "--name", "vibration-ae",
            "--version", "1.0.1",
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        device = unique("gw")
        bundle = tmp_path / "bundle.yaml"
        # rpi4: latency budget 50 ms, power budget 7.5 W; the label lowers the power budget
        # below the board's idle power (2.7 W), so every telemetry window breaks it
        enrolled = processes.cli(
            "devices", "add", device, "--profile", "rpi4", "--site", "plant-t",
            "--labels", "power_budget_w=2", "--broker", f"127.0.0.1:{port}",
            "--out", str(bundle),
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        env = {**processes.env, "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "HOME": str(tmp_path)}
        install = subprocess.run(
            [sys.executable, "-m", "agent.cli", "install", str(bundle), "--user"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert install.returncode == 0, install.stdout + install.stderr
        config = tmp_path / "cfg" / "greenfleet" / "agent.yaml"
        installed = yaml.safe_load(config.read_text())
        assert "latency_budget_ms" not in (installed.get("fallback") or {}), "not in the bundle"
        installed["power"]["meters"] = ["estimate"]  # idle 2.7 W at least, on any host
        installed["telemetry"] = {"interval_s": 1}
        installed["state_dir"] = str(tmp_path / "state")
        config.write_text(yaml.safe_dump(installed))
        processes.agent(config, name=device)
        processes.start(
            "controller", "-m", "controller.cli", "controller", "run",
            "--broker", f"127.0.0.1:{port}", "--reconcile-interval", "0.5",
        )  # fmt: skip

        def show() -> dict[str, Any]:
            shown = processes.cli("devices", "show", device, "--json")
            return json.loads(shown.stdout) if shown.returncode == 0 else {}

        logs = lambda: processes.log(device)[-3000:] + processes.log("controller")[-3000:]  # noqa: E731
        wait_until(lambda: show().get("online"), 40, f"{device} online", logs)
        before = show()["budgets"]
        assert before["applied"] == {
            "latency_ms": None, "latency_from": "", "power_w": None, "power_from": ""
        }, "nothing to fall on before the controller sends its budgets"  # fmt: skip
        assert before["planned"]["power_w"] == 2.0

        assert processes.cli("deploy", "vibration-ae:1.0.0", "--device", device).returncode == 0
        wait_until(
            lambda: (show().get("budgets") or {}).get("applied", {}).get("power_w") == 2.0,
            60,
            "the deploy's budgets applied on the device",
            logs,
        )
        applied = show()["budgets"]["applied"]
        assert (applied["latency_ms"], applied["latency_from"]) == (50.0, "class rpi4")
        assert applied["power_from"] == "label power_budget_w"
        text = processes.cli("devices", "show", device).stdout
        assert "budgets: latency 50 ms (class rpi4), power 2 W (label power_budget_w)" in text

        assert processes.cli("deploy", "vibration-ae:1.0.1", "--device", device).returncode == 0
        wait_until(
            lambda: show().get("last_good_model") == "vibration-ae:1.0.0",
            60,
            "1.0.1 active, 1.0.0 kept as last-good",
            logs,
        )

        def fell() -> list[dict[str, Any]]:
            return [
                e
                for e in show().get("recent_tier_changes", [])
                if "power budget" in str(e["detail"].get("cause"))
            ]

        wait_until(lambda: fell(), 60, "a fall on the 2 W power budget", logs)
        change = fell()[0]["detail"]
        assert (change["from"], change["to"]) == ("active", "last_good")
        assert "over the 2 W power budget" in change["cause"]
