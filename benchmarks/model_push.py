"""Model push: MB/s of a 20 MiB ONNX model from the controller to one agent, against raw paho.

Greenfleet path: ``set_desired`` -> reconcile sends Deploy -> the agent asks for windows of
256 KiB chunks -> the controller's blob server publishes them (QoS 1) -> the agent writes,
verifies the sha256, loads and smoke-tests the model and reports ``activated``. Transfer time
runs from the agent's ``deploy_started`` event to the verified file appearing in its models
directory; time-to-active runs from ``set_desired`` to the ``activated`` event.

Baseline, same broker, same run: one paho client publishes the same bytes as the same 256 KiB
QoS 1 chunks, as fast as paho will take them, to a paho subscriber in another process (as the
agent is); timed until the subscriber has every byte.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as mqtt
from onnx import TensorProto, helper, numpy_helper
from paho.mqtt.enums import CallbackAPIVersion

from agent import protocol as p
from benchmarks.rig import (
    AGENT_START_TIMEOUT_S,
    Outcome,
    Watcher,
    agent_process,
    check_alive,
    median,
    mosquitto,
    outcome,
    write_agent_config,
)
from controller import registry
from controller.daemon import Controller
from controller.db import open_db
from controller.home import Home
from model_store.catalog import Catalog

NAME = "model_push"
TITLE = "Model push, 20 MiB, controller -> agent"
DEVICE = "bench-push-1"
ROWS, COLS = 1024, 5120  # one float32 MatMul weight: 20 MiB
CHUNK = p.DEFAULT_CHUNK_SIZE
TARGET_RATIO = 0.8  # issue 14: one device gets at least 0.8 of what raw paho moves
PUSH_TIMEOUT_S = 120.0
MB = 1e6
RAW_PER_ROUND = 3  # the raw send takes ~50 ms, so it is sampled more often
REPO = Path(__file__).resolve().parents[1]


def build_model(path: Path, seed: int, rows: int = ROWS, cols: int = COLS) -> Path:
    """An ONNX model y = x @ W with random weights (distinct bytes for each seed); the default
    shape makes ~20 MiB."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.01).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "bench_push",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


# -- raw paho baseline ------------------------------------------------------------------------


def _expect_line(child: subprocess.Popen[str], word: str) -> str:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line.startswith(word):
        raise RuntimeError(f"raw subscriber said {line!r}, expected {word!r}")
    return line


def measure_raw(port: int, publisher: mqtt.Client, data: bytes, round_no: int) -> float:
    """Seconds for ``data`` to reach a subscriber process as 256 KiB QoS 1 messages."""
    prefix = f"bench/raw/{round_no}"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.paho_subscriber",
            "--port",
            str(port),
            "--topic",
            f"{prefix}/+",
            "--expect",
            str(len(data)),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        _expect_line(child, "ready")
        t0 = time.monotonic()
        for index, offset in enumerate(range(0, len(data), CHUNK)):
            publisher.publish(f"{prefix}/{index}", data[offset : offset + CHUNK], qos=1)
        _expect_line(child, "done")
        elapsed = time.monotonic() - t0
        child.wait(timeout=10)
        return elapsed
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _raw_publisher(port: int) -> mqtt.Client:
    """A paho client set up like the controller's link (MQTT 3.1.1, 256 in flight)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-raw-pub",
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
    client.max_inflight_messages_set(256)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


# -- greenfleet push --------------------------------------------------------------------------


def _wait_for_device(db: Any, device: str, process: Any, log_path: Path) -> None:
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while time.monotonic() < deadline:
        rows = list(db["devices"].rows_where("id = ? AND online = 1", [device]))
        if rows:
            return
        check_alive(process, log_path)
        time.sleep(0.05)
    raise TimeoutError(f"agent {device} did not register with the controller")


def push_once(
    db: Any,
    catalog: Catalog,
    watcher: Watcher,
    models_dir: Path,
    workdir: Path,
    round_no: int,
    process: Any,
    log_path: Path,
) -> dict[str, float]:
    """Deploy a fresh 20 MiB model; return its size and the transfer and activation times."""
    path = build_model(workdir / f"push-{round_no}.onnx", seed=round_no)
    version = catalog.add(path, "bench-push", f"1.0.{round_no}")
    ref = str(version.ref)
    stored_file = models_dir / f"{version.sha256}.onnx"
    while not watcher.messages.empty():
        watcher.messages.get_nowait()
    t0 = time.monotonic()
    registry.set_desired(db, [DEVICE], ref)
    started = stored = activated = None
    deadline = t0 + PUSH_TIMEOUT_S
    while activated is None:
        if stored is None and stored_file.exists():
            stored = time.monotonic()
        try:
            at, _topic, payload = watcher.messages.get(timeout=0.002)
        except queue.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ref} was not active after {PUSH_TIMEOUT_S:.0f} s") from None
            check_alive(process, log_path)
            continue
        message = p.decode(payload)
        if not isinstance(message, p.Event) or message.detail.get("model") != ref:
            continue
        if message.event is p.EventKind.DEPLOY_STARTED:
            started = at
        elif message.event is p.EventKind.ACTIVATED:
            activated = at
        elif message.event in (p.EventKind.DEPLOY_FAILED, p.EventKind.MODEL_LOAD_FAILED):
            raise RuntimeError(f"deploy of {ref} failed: {message.message}")
    if started is None:
        raise RuntimeError(f"no deploy_started event for {ref}")
    if stored is None:  # renamed into place between two polls and the activated event
        stored = activated
    return {
        "bytes": float(version.size),
        "transfer_s": stored - started,
        "command_s": started - t0,
        "time_to_active_s": activated - t0,
    }


def run(quick: bool) -> Outcome:
    rounds = 1 if quick else 9  # the VM's speed drifts within a run: more rounds, steadier medians
    raw_s: list[float] = []
    pushes: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="gf-bench-push-") as tmp:
        workdir = Path(tmp)
        with mosquitto(workdir) as broker:
            controller = Controller(
                Home(workdir / "home"),
                "127.0.0.1",
                broker.port,
                reconcile_interval_s=0.2,
                client_id="bench-controller",
            )
            controller.start()
            publisher = _raw_publisher(broker.port)
            try:
                db = open_db(controller.home.database)
                catalog = Catalog(db, controller.home.store)
                config = write_agent_config(
                    workdir / "agent",
                    DEVICE,
                    broker.port,
                    input_config={"type": "mqtt", "topic": "bench/in"},
                )
                log_path = workdir / "agent.log"
                events = p.topic(DEVICE, p.Channel.EVENTS)
                with (
                    Watcher(broker.port, [events], "bench-push-watch") as watcher,
                    agent_process(config, log_path) as process,
                ):
                    _wait_for_device(db, DEVICE, process, log_path)
                    for round_no in range(rounds):
                        data = build_model(workdir / "raw.onnx", seed=1000 + round_no).read_bytes()
                        for attempt in range(RAW_PER_ROUND):
                            raw_s.append(
                                measure_raw(
                                    broker.port, publisher, data, round_no * RAW_PER_ROUND + attempt
                                )
                            )
                        pushes.append(
                            push_once(
                                db,
                                catalog,
                                watcher,
                                workdir / "agent" / "state" / "models",
                                workdir,
                                round_no,
                                process,
                                log_path,
                            )
                        )
            finally:
                publisher.disconnect()
                publisher.loop_stop()
                controller.stop()
    size = pushes[0]["bytes"]
    raw_mbs = [size / MB / s for s in raw_s]
    push_mbs = [x["bytes"] / MB / x["transfer_s"] for x in pushes]
    active_mbs = [x["bytes"] / MB / x["time_to_active_s"] for x in pushes]
    raw, push = median(raw_mbs), median(push_mbs)
    ratio = push / raw
    time_to_active = median([x["time_to_active_s"] for x in pushes])
    return outcome(
        NAME,
        TITLE,
        measured=f"{push:.1f} MB/s transfer, active in {time_to_active:.2f} s",
        baseline=f"{raw:.1f} MB/s (raw paho)",
        ratio=ratio,
        target=f">= {TARGET_RATIO:.0%} of raw",
        passed=ratio >= TARGET_RATIO,
        numbers={
            "rounds": rounds,
            "raw_samples": len(raw_s),
            "model_bytes": int(size),
            "chunk_bytes": CHUNK,
            "raw_mb_s": [round(x, 2) for x in raw_mbs],
            "raw_s": [round(x, 4) for x in raw_s],
            "push_transfer_mb_s": [round(x, 2) for x in push_mbs],
            "push_transfer_s": [round(x["transfer_s"], 4) for x in pushes],
            "command_latency_s": [round(x["command_s"], 4) for x in pushes],
            "time_to_active_s": [round(x["time_to_active_s"], 4) for x in pushes],
            "time_to_active_mb_s": [round(x, 2) for x in active_mbs],
            "median_raw_mb_s": round(raw, 2),
            "median_push_transfer_mb_s": round(push, 2),
            "median_time_to_active_s": round(time_to_active, 4),
            "median_time_to_active_mb_s": round(median(active_mbs), 2),
        },
    )
