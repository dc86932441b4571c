"""Fleet rollout: a 5 MB model to N simulated devices through the real controller daemon.

N simulated devices (``greenfleet simulate``, its own process) connect to Mosquitto; the real
controller (``controller.daemon.Controller``, in this process so that its blob server's counters
can be read) gets a fresh ~5 MB ONNX model in its catalog, and ``registry.set_desired`` names it
for every simulated device at once. Measured: the time from set_desired until every device
reports the model active (``devices.active_model``), and the bytes the controller published
(``BlobServer.stats``), against N x the model size, which is what one copy per device (the
design before broker fan-out) publishes. Target: at most 5% of that (the broker does the
fan-out; a chunk asked for again after it went out is published again, so devices that start
their transfer at different moments cost a few extra copies, not one each).

    python -m benchmarks.fleet_rollout [--quick] [--devices 100 1000]
    python -m benchmarks.run fleet_rollout

One 2-core machine runs broker, simulator and controller at once, so the times are a floor.
"""

from __future__ import annotations

import argparse
import ast
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import model_push
from benchmarks.rig import Outcome, mosquitto, outcome
from controller import registry
from controller.daemon import Controller
from controller.db import open_db
from controller.home import Home
from model_store.catalog import Catalog

ROWS, COLS = 1024, 1220  # one float32 MatMul weight: ~5.0 MB
ROLLOUT_TIMEOUT_S = 600.0


def build_model(path: Path, seed: int = 5) -> Path:
    """A ~5 MB ONNX model, y = x @ W, with random weights."""
    return model_push.build_model(path, seed, ROWS, COLS)


def _count(db: Path, sql: str, *params: Any) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute(sql, params).fetchone()[0])
    finally:
        conn.close()


def _ids(db: Path, prefix: str) -> list[str]:
    conn = sqlite3.connect(db, timeout=30)
    try:
        rows = conn.execute(
            "SELECT id FROM devices WHERE online AND id LIKE ?", (f"{prefix}-%",)
        ).fetchall()
    finally:
        conn.close()
    return [r[0] for r in rows]


def rollout(workdir: Path, devices: int) -> dict[str, Any]:
    """Roll a fresh ~5 MB model out to ``devices`` simulated devices; return the figures."""
    prefix = f"roll{devices}"
    with mosquitto(workdir / f"mq-{devices}") as broker:
        home = Home(workdir / f"home-{devices}")
        controller = Controller(
            home, "127.0.0.1", broker.port, reconcile_interval_s=0.5, client_id="bench-rollout"
        )
        controller.start()
        command = [sys.executable, "-m", "controller.cli", "--log-level", "WARNING", "simulate",
                   "--devices", str(devices), "--broker", f"127.0.0.1:{broker.port}",
                   "--interval", "5", "--prefix", prefix]  # fmt: skip
        sim_log = workdir / f"simulator-{devices}.log"
        with sim_log.open("w") as out:
            sim = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert controller.link.connected.wait(10)
            deadline = time.monotonic() + 120
            while len(ids := _ids(home.database, prefix)) < devices:
                if time.monotonic() > deadline or sim.poll() is not None:
                    raise RuntimeError(f"only {len(ids)} of {devices} simulated devices online")
                time.sleep(0.5)
            db = open_db(home.database)
            version = Catalog(db, home.store).add(
                build_model(workdir / f"model-{devices}.onnx"), "bench-rollout", "1.0.0"
            )
            ref = str(version.ref)
            before = controller.blobs.stats.bytes_published
            t0 = time.monotonic()
            registry.set_desired(db, ids, ref)
            controller.reconcile_soon()
            active, times = 0, []
            while active < devices:
                if time.monotonic() - t0 > ROLLOUT_TIMEOUT_S:
                    raise TimeoutError(f"{active}/{devices} active after {ROLLOUT_TIMEOUT_S} s")
                for name, proc in (("mosquitto", broker.process), ("simulator", sim)):
                    if proc is not None and proc.poll() is not None:
                        raise RuntimeError(
                            f"{name} died (exit {proc.returncode}) at {active} active"
                        )
                time.sleep(0.25)
                now = _count(
                    home.database,
                    "SELECT count(*) FROM devices WHERE active_model = ? AND id LIKE ?",
                    ref,
                    f"{prefix}-%",
                )
                if now != active:
                    active = now
                    times.append((time.monotonic() - t0, now))
            elapsed = time.monotonic() - t0
            stats = controller.blobs.stats
            published = stats.bytes_published - before
        finally:
            sim.send_signal(2)
            try:
                sim.wait(60)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
            controller.stop()
    done = [line for line in sim_log.read_text().splitlines() if "simulator: done" in line]
    sim_stats = ast.literal_eval(done[-1].split("done ", 1)[1]) if done else {}
    delivered = int(sim_stats.get("chunk_bytes_delivered", 0))
    half = next(t for t, n in times if n >= devices / 2)
    return {
        "devices": devices,
        "model_bytes": version.size,
        "time_to_all_active_s": round(elapsed, 2),
        "time_to_half_active_s": round(half, 2),
        "controller_published_bytes": published,
        "per_device_copies_bytes": devices * version.size,
        "published_ratio": round(published / (devices * version.size), 4),
        "model_copies_published": round(published / version.size, 2),
        # what the broker sent the devices, duplicates included; 1.0 = each got one copy
        "delivered_copies_per_device": round(delivered / (devices * version.size), 2),
        "chunks_requested": stats.chunks_requested,
        "chunks_published": stats.chunks_published,
        "requests": stats.requests,
    }


def run(quick: bool, sizes: list[int] | None = None) -> Outcome:
    sizes = sizes or ([100] if quick else [100, 1000])
    results = []
    with tempfile.TemporaryDirectory(prefix="gf-bench-rollout-") as tmp:
        for n in sizes:
            results.append(rollout(Path(tmp), n))
            print(f"fleet_rollout: {results[-1]}", file=sys.stderr, flush=True)
    largest = results[-1]
    copies = largest["model_copies_published"]
    return outcome(
        "fleet_rollout",
        f"Rollout of a 5 MB model to {largest['devices']} simulated devices, bytes published",
        measured=(
            f"{largest['time_to_all_active_s']:.1f} s to all active, "
            f"{largest['controller_published_bytes'] / 1e6:.1f} MB published"
        ),
        baseline=f"{largest['per_device_copies_bytes'] / 1e6:.0f} MB (one copy per device)",
        ratio=largest["published_ratio"],
        target="<= 0.05 of N x model size",
        passed=all(r["published_ratio"] <= 0.05 for r in results),
        numbers={"rollouts": results, "copies_at_largest": copies},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_rollout")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--devices", type=int, nargs="*")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.devices), indent=1))


if __name__ == "__main__":
    main()
