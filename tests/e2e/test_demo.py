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
    for model in ("vibration-ae", "surface-cnn"):
        built = re.search(rf"{model}: (\d+) variants, (\d+) eligible", out)
        assert built and int(built[2]) >= 5, f"{model} went through the pipeline"
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
