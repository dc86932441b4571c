"""A new gateway end to end, as a plant engineer does it: a locked-down broker from
`greenfleet broker config`, `devices add`, `greenfleet-agent install BUNDLE`, the agent over
TLS with the fleet CA pinned, and a signed model deployed to it by the real controller."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import SAMPLES, Processes, configured_broker, unique, wait_until

pytestmark = pytest.mark.e2e


def test_an_enrolled_agent_connects_over_tls_and_receives_a_deployment(
    processes: Processes, tmp_path: Path
) -> None:
    with configured_broker(processes, tmp_path) as port:
        added = processes.cli(
            "models", "add", str(SAMPLES / "vibration-ae.onnx"), "--name", "vibration-ae",
            "--version", "1.0.0", "--json",
        )  # fmt: skip
        assert added.returncode == 0 and json.loads(added.stdout)["signed_by"], added.stderr
        device = unique("gw")
        bundle = tmp_path / "bundle.yaml"
        enrolled = processes.cli(
            "devices", "add", device, "--profile", "x86-ipc", "--site", "plant-t",
            "--labels", "line=9", "--broker", f"127.0.0.1:{port}", "--out", str(bundle),
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        assert bundle.stat().st_mode & 0o077 == 0, "the bundle holds secrets: owner only"

        env = {
            **processes.env,
            "HOME": str(tmp_path / "device-home"),
            "XDG_CONFIG_HOME": str(tmp_path / "device-home" / ".config"),
            "XDG_STATE_HOME": str(tmp_path / "device-home" / ".local" / "state"),
        }
        install = subprocess.run(
            [sys.executable, "-m", "agent.cli", "install", str(bundle), "--user"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert install.returncode == 0, install.stdout + install.stderr
        config = tmp_path / "device-home" / ".config" / "greenfleet" / "agent.yaml"
        installed = yaml.safe_load(config.read_text())
        assert installed["broker"]["tls"]["ca_file"], "the fleet CA is pinned"
        assert installed["controller_keys"], "the agent runs only what the controller signed"
        # the estimate meter, so the test does not depend on this host's power sensors
        installed["power"]["meters"] = ["estimate"]
        installed["telemetry"] = {"interval_s": 1}
        config.write_text(yaml.safe_dump(installed))
        processes.agent(config, name=device)
        controller = processes.start(
            "controller",
            "-m",
            "controller.cli",
            "controller",
            "run",
            "--broker",
            f"127.0.0.1:{port}",
            "--reconcile-interval",
            "0.5",
        )  # fmt: skip  (TLS and the gf-controller login come from the home, made by broker config)

        def show() -> dict[str, object]:
            shown = processes.cli("devices", "show", device, "--json")
            return json.loads(shown.stdout) if shown.returncode == 0 else {}

        logs = lambda: processes.log(device)[-3000:] + processes.log("controller")[-3000:]  # noqa: E731
        wait_until(lambda: show().get("online"), 40, f"{device} online over TLS", logs)
        deploy = processes.cli("deploy", "vibration-ae:1.0.0", "--device", device)
        assert deploy.returncode == 0, deploy.stderr
        wait_until(
            lambda: show().get("active_model") == "vibration-ae:1.0.0",
            60,
            "the signed model active on the enrolled device",
            logs,
        )
        assert "plain TCP" not in processes.log(device), "no plain-text fallback"
        assert controller.poll() is None

        # the same device with a wrong password: refused by the broker, fatal, and says why
        installed["broker"]["password"] = "not-the-password"
        installed["state_dir"] = str(tmp_path / "wrong-state")  # not the running agent's
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(yaml.safe_dump(installed))
        refused = processes.agent(wrong, name="wrong-password")
        assert refused.wait(timeout=30) == 3, "bad credentials are fatal, not a reconnect storm"
        log = processes.log("wrong-password")
        assert "refused the connection" in log and "Check the username/password" in log
