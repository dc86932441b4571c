"""Agent memory: peak RSS of a running agent against bare Python processes, same run.

The agent is the real ``python -m agent.cli run`` with the sample model vibration-ae already
active (its state dir is pre-seeded the way a finished deploy leaves it), inferring at 20 Hz
and connected to a real Mosquitto. It is measured once it has published results for a few
seconds, twice:

- **as a device runs it** (the judged figure): its input is windows of samples published on a
  topic of the broker (``input.type: mqtt``, what a PLC bridge or sensor gateway feeds), here
  512 samples at 20 Hz from this process;
- **with the simulated sensor** (``input.type: vibration``, demos and tests): the simulator
  draws its noise from ``numpy.random``, whose import alone costs ~6 MiB that no device with a
  real sensor loads; reported, not judged.

Baselines: Python that only imports onnxruntime, and Python that also opens an
InferenceSession on the same model and runs it once. A third reference process, not part of
the target, imports onnxruntime and LiteRT (the agent checks for every backend at start
without importing it) to show where an agent's memory could go. Peak is the kernel's VmHWM
from /proc/PID/status.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol as p
from agent.activation import Pointer
from agent.sources.vibration import VibrationSimulator
from benchmarks.rig import (
    AGENT_START_TIMEOUT_S,
    REPO,
    Outcome,
    Watcher,
    agent_process,
    check_alive,
    mosquitto,
    outcome,
    peak_rss_kib,
    write_agent_config,
)
from model_store.catalog import file_sha256

NAME = "agent_memory"
TITLE = "Agent peak RSS vs a bare process holding a session"
DEVICE = "bench-mem-1"
SAMPLE = Path(__file__).resolve().parents[1] / "model_store" / "samples" / "vibration-ae.onnx"
TARGET_RATIO = 1.25  # issue 14: against a bare process holding a session on the same model
RATE_HZ = 20.0

_HOLD = "import sys\nprint('ready', flush=True)\nsys.stdin.read()\n"
BARE_IMPORT = "import onnxruntime\n" + _HOLD
BARE_SESSION = (
    "import sys\n"
    "import numpy as np\n"
    "import onnxruntime as ort\n"
    "o = ort.SessionOptions()\n"
    "o.intra_op_num_threads = 1\n"
    "s = ort.InferenceSession(sys.argv[1], sess_options=o, providers=['CPUExecutionProvider'])\n"
    "s.run(None, {'window': np.zeros((1, 512), np.float32)})\n" + _HOLD
)
IMPORT_BOTH_RUNTIMES = "import onnxruntime\nimport ai_edge_litert.interpreter\n" + _HOLD


def agent_requirements() -> list[str]:
    """What ``pip install greenfleet[agent]`` puts on a device: the bare install and the agent
    extra, read from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["agent"]]


def agent_python() -> tuple[str, str]:
    """The interpreter of a virtualenv holding only the agent's install (``.venv-agent``, made
    on first use, remade when the requirements change), and a word for the report.

    The development venv is not what a device runs: it also holds what the controller, the
    tests and the browser tests need, and some of it changes what the agent loads (selenium
    brings PySocks, and with PySocks installed paho loads urllib.request, http.client and the
    email package at every connect to look for a proxy). Where the venv cannot be made (no
    package index), the development venv is measured and the report says so."""
    venv = REPO / ".venv-agent"
    python = venv / "bin" / "python"
    stamp = venv / ".greenfleet-requirements"
    requirements = agent_requirements()
    wanted = "\n".join(requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return str(python), "agent-only venv"
    try:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
            check=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"agent_memory: cannot make {venv} ({exc}); measuring the dev venv", file=sys.stderr)
        return sys.executable, "dev venv: the agent-only venv could not be made"
    stamp.write_text(wanted)
    return str(python), "agent-only venv"


def measure_script(code: str, *args: str, python: str = sys.executable) -> dict[str, int]:
    """Peak and current RSS (KiB) of ``python -c code`` once it says ready."""
    child = subprocess.Popen(
        [python, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"baseline process said {line!r}")
        time.sleep(0.3)
        rss = psutil.Process(child.pid).memory_info().rss // 1024
        return {"peak_kib": peak_rss_kib(child.pid), "rss_kib": rss}
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def seed_state(state_dir: Path) -> None:
    """Leave the sample model active in ``state_dir`` as a finished deploy would."""
    sha256, _size = file_sha256(SAMPLE)
    active = p.ActiveModel(
        model=p.ModelRef(name="vibration-ae", version="1.0.0"),
        sha256=sha256,
        format=p.ModelFormat.ONNX,
    )
    models = state_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAMPLE, models / f"{sha256}.onnx")
    (state_dir / "active.json").write_bytes(p.encode(Pointer(active=active)))


INPUT_TOPIC = f"plant/{DEVICE}/vibration"


class SensorFeed:
    """Publishes SensorReading windows of the simulated sensor on INPUT_TOPIC at RATE_HZ, the
    way a sensor gateway feeds an agent whose input is MQTT."""

    def __init__(self, port: int) -> None:
        sim = VibrationSimulator(seed=1)
        self._payloads = [
            p.encode(p.SensorReading(values=sim.read().tolist(), sample_rate_hz=12800.0))
            for _ in range(16)
        ]
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-mem-feed")
        self._client.connect("127.0.0.1", port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_at, i = time.monotonic(), 0
        while not self._stop.is_set():
            self._client.publish(INPUT_TOPIC, self._payloads[i % len(self._payloads)], qos=0)
            i += 1
            next_at += 1.0 / RATE_HZ
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> SensorFeed:
        self._client.loop_start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.loop_stop()
        self._client.disconnect()


def measure_agent(workdir: Path, run_s: float, source: str, python: str) -> dict[str, int]:
    """Peak and current RSS (KiB) of a real agent after ``run_s`` seconds of inference, with
    its input from ``source``: "mqtt" (a sensor feed on the broker) or "vibration" (the
    simulated sensor inside the agent)."""
    input_config: dict[str, Any] = (
        {"type": "mqtt", "topic": INPUT_TOPIC}
        if source == "mqtt"
        else {"type": "vibration", "seed": 1}
    )
    with mosquitto(workdir) as broker:
        config = write_agent_config(
            workdir / "agent",
            DEVICE,
            broker.port,
            input_config=input_config,
            rate_hz=RATE_HZ,
            telemetry_interval_s=1.0,
        )
        seed_state(workdir / "agent" / "state")
        results = p.topic(DEVICE, p.Channel.RESULTS)
        log_path = workdir / "agent.log"
        feed = SensorFeed(broker.port) if source == "mqtt" else contextlib.nullcontext()
        with (
            Watcher(broker.port, [results], "bench-mem-watch") as watcher,
            agent_process(config, log_path, python) as process,
            feed,
        ):
            deadline = time.monotonic() + AGENT_START_TIMEOUT_S
            while watcher.messages.empty():  # the first result: model loaded, inferring
                check_alive(process, log_path)
                if time.monotonic() > deadline:
                    raise TimeoutError("the agent published no results")
                time.sleep(0.05)
            first = time.monotonic()
            time.sleep(run_s)
            check_alive(process, log_path)
            count = watcher.messages.qsize()
            models = set()
            for _ in range(count):
                _at, _topic, payload = watcher.messages.get_nowait()
                models.add(json.loads(payload)["model"]["name"])
            if models != {"vibration-ae"}:
                raise RuntimeError(f"agent results named models {models}")
            rss = psutil.Process(process.pid).memory_info().rss // 1024
            return {
                "peak_kib": peak_rss_kib(process.pid),
                "rss_kib": rss,
                "results": count,
                "seconds": round(time.monotonic() - first, 2),
            }


def compile_agent() -> None:
    """Write the agent package's bytecode, as ``pip install`` does on a device. Without it (a
    fresh checkout, or PYTHONDONTWRITEBYTECODE set) the agent compiles its own sources at every
    start, and the compiler's garbage stays in its peak: ~3 MiB that no installed agent pays."""
    agent_dir = Path(p.__file__).resolve().parent
    if not compileall.compile_dir(agent_dir, quiet=1):
        raise RuntimeError(f"could not write the bytecode of {agent_dir}")


def run(quick: bool) -> Outcome:
    run_s = 2.0 if quick else 4.0
    compile_agent()
    python, env_label = agent_python()
    bare = measure_script(BARE_IMPORT, python=python)
    session = measure_script(BARE_SESSION, str(SAMPLE), python=python)
    both = measure_script(IMPORT_BOTH_RUNTIMES)  # LiteRT is not in the agent's venv
    with tempfile.TemporaryDirectory(prefix="gf-bench-mem-") as tmp:
        agent = measure_agent(Path(tmp) / "mqtt", run_s, "mqtt", python)
        simulated = measure_agent(Path(tmp) / "vibration", run_s, "vibration", python)
    ratio = agent["peak_kib"] / session["peak_kib"]
    return outcome(
        NAME,
        TITLE,
        measured=f"{agent['peak_kib'] / 1024:.1f} MiB (agent; "
        f"{simulated['peak_kib'] / 1024:.1f} with the simulated sensor; {env_label})",
        baseline=f"{session['peak_kib'] / 1024:.1f} MiB (session), {bare['peak_kib'] / 1024:.1f} "
        f"MiB (import; {agent['peak_kib'] / bare['peak_kib']:.2f}x)",
        ratio=ratio,
        target=f"<= {TARGET_RATIO}x bare session",
        passed=ratio <= TARGET_RATIO,
        numbers={
            "environment": env_label,
            "agent": agent,
            "agent_with_simulated_sensor": simulated,
            "ratio_with_simulated_sensor": round(simulated["peak_kib"] / session["peak_kib"], 3),
            "bare_import": bare,
            "bare_session": session,
            "import_onnxruntime_and_litert": both,
            "ratio_vs_bare_import": round(agent["peak_kib"] / bare["peak_kib"], 3),
            "ratio_vs_bare_session": round(ratio, 3),
        },
    )
