"""``greenfleet demo`` runs to the end on a fresh home and shows what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_demo_runs_the_pipeline_delivers_and_detects_the_fault(tmp_path: Path) -> None:
    env = {**os.environ, "GREENFLEET_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "controller.cli", "demo"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=170,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for model in ("vibration-ae", "surface-cnn", "bearing-diagnosis"):
        built = re.search(rf"{model}: (\d+) variants, (\d+) eligible", out)
        assert built and int(built[2]) >= 3, f"{model} went through the pipeline"
    # deployed through the plan: each gateway got a variant chosen for its hardware class
    plans = re.findall(r"plan: (\S+) \((\S+)\) -> vibration-ae:1\.0\.0\+(\S+): least energy", out)
    assert {device for device, _, _ in plans} == {"gw-press-01", "gw-pump-02", "ipc-line-03"}
    assert re.search(r"predicted fleet energy per inference .* \((\d+)% less\)", out)
    summary = out[out.index("summary") :]
    pump = next(line for line in summary.splitlines() if "gw-pump-02" in line)
    press = next(line for line in summary.splitlines() if "gw-press-01" in line)
    assert pump.rstrip(" │").endswith("yes"), pump
    assert press.rstrip(" │").endswith("no"), press
    assert (tmp_path / "home" / "keys" / "signing.key").exists()
    # fp32 and the planned variant of the diagnosis model, side by side from telemetry
    measured = out[out.index("measured saving on x86-ipc") :]
    arms = re.findall(r"(ipc-fan-0[45]) +│ (\S+) +│ ([\d,]+) +│ [\d.]+ +│ ([\d.]+) +│", measured)
    assert [(device, variant) for device, variant, _, _ in arms][:1] == [("ipc-fan-04", "fp32")]
    assert len(arms) == 2 and all(int(n.replace(",", "")) > 0 for _, _, n, _ in arms), measured
    saving = re.search(r"measured: \S+ spends (-?\d+)% less energy per inference than fp32", out)
    fp32_mj, chosen_mj = float(arms[0][3]), float(arms[1][3])
    assert saving and abs(int(saving[1]) - 100 * (1 - chosen_mj / fp32_mj)) <= 1, measured
