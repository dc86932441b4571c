"""``greenfleet demo``: a broker, the controller and three agents on this machine, end to end.

It runs both sample models (vibration anomaly, surface defects) through the model store, so
their variants are built, profiled and signed; deploys three variants of the vibration model,
one per gateway (the TFLite build, int8, the distilled student); shows the fleet with live
latency and energy; injects a bearing fault on one machine so that its anomaly score rises past
the model's threshold; and prints a summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from agent import protocol as p
from controller import registry, views
from controller.broker import EmbeddedBroker, Mosquitto, mosquitto_path
from controller.daemon import Controller
from controller.db import open_db
from controller.home import Home
from controller.model_commands import variant_row, variants_table
from controller.output import (
    console,
    energy_mj,
    fleet_table,
    progress_bar,
    stage_progress,
)
from controller.planning import PlannedDevice, field_checks, fleet_saving, measured, plan
from device_configs.schema import load_profiles
from model_store.catalog import Catalog, Declared
from model_store.pipeline import compress
from model_store.samples.calibration import calibration_set
from model_store.signing import Signer

SAMPLES = Path(__file__).resolve().parent.parent / "model_store" / "samples"
FAULTY = "gw-pump-02"
SAMPLE_MODELS = ("vibration-ae", "surface-cnn", "bearing-diagnosis")


@dataclass(frozen=True)
class DemoDevice:
    id: str
    device_class: str
    labels: dict[str, str]
    rpm: float
    window: int = 512  # samples per inference, as the model's input asks


MODEL = "vibration-ae:1.0.0"  # the plan picks each gateway's variant
DEVICES = (
    DemoDevice("gw-press-01", "rpi4", {"site": "plant-a", "line": "1"}, 1500),
    DemoDevice(FAULTY, "jetson-orin-nano", {"site": "plant-a", "line": "2"}, 1800),
    DemoDevice("ipc-line-03", "x86-ipc", {"site": "plant-b", "line": "1"}, 2400),
)
# The measured comparison: two fan IPCs of one class diagnose their bearings with the 1-D CNN
# (4096-sample windows), one on the fp32 reference, the other on the variant the plan picks
# from what `models compress` built. This host stands in for the x86 IPC class (it is one).
DIAGNOSIS = "bearing-diagnosis:1.0.0"
CONTROL = DemoDevice("ipc-fan-04", "x86-ipc", {"site": "plant-b", "line": "2"}, 1500, 4096)
TREATED = DemoDevice("ipc-fan-05", "x86-ipc", {"site": "plant-b", "line": "2"}, 1650, 4096)
FANS = (CONTROL, TREATED)
# What the demo compresses, and with which builders (None: all of them).
COMPRESS: dict[str, tuple[str, ...] | None] = {
    "vibration-ae": None,
    "surface-cnn": None,
    "bearing-diagnosis": ("fp16", "int8-static"),  # the quick ones: the demo stays under 90 s
}


class ScoreWatch:
    """Subscribes to every device's results and keeps recent anomaly scores."""

    def __init__(self, port: int) -> None:
        self.scores: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=40))
        self.marks: dict[str, list[float]] = defaultdict(list)
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="gf-demo-watch"
        )
        self._client.on_connect = lambda c, *_: c.subscribe(p.subscription(p.Channel.RESULTS), 0)
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", port)
        self._client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            result = p.decode(msg.payload)
            device = p.parse_topic(msg.topic).device
        except p.ProtocolError:
            return
        if isinstance(result, p.Result) and "score" in result.outputs:
            score = result.outputs["score"][0]
            self.scores[device].append(score)
            self.marks[device].append(score)

    def mean(self, device: str) -> float | None:
        values = self.scores.get(device)
        return sum(values) / len(values) if values else None

    def take(self, device: str) -> list[float]:
        values, self.marks[device] = self.marks[device], []
        return values

    def inject(self, device: str, fault: p.FaultKind, severity: float) -> None:
        cmd = p.InjectFault(fault=fault, severity=severity)
        self._client.publish(p.topic(device, p.Channel.CMD), p.encode(cmd), qos=1)

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


def _threshold() -> float:
    meta = json.loads((SAMPLES / "vibration-ae.json").read_text())
    return float(meta["threshold"])


def _screen(db: Any, watch: ScoreWatch, threshold: float, phase: str) -> Group:
    rows = views.fleet(db)
    scores = Table(
        "device",
        "anomaly score (mean of last 40)",
        "threshold",
        "verdict",
        title="anomaly scores",
        title_justify="left",
    )
    for r in rows:
        if r["id"] not in {d.id for d in DEVICES}:
            continue  # the fans run the diagnosis model, which gives classes, not a score
        mean = watch.mean(r["id"])
        verdict = (
            "-"
            if mean is None
            else ("[bold red]FAULT[/]" if mean > threshold else "[green]healthy[/]")
        )
        scores.add_row(r["id"], "-" if mean is None else f"{mean:.3f}", f"{threshold:.3f}", verdict)
    return Group(f"[bold]{phase}[/]", fleet_table(rows), scores)


def _build_variants(home: Home, db: Any, workdir: Path) -> None:
    """Both sample models through the whole model-store pipeline: add, compress, profile, sign."""
    catalog = Catalog(db, home.store)
    signer = Signer.load_or_create(home.keys)
    for name in SAMPLE_MODELS:
        catalog.add(
            SAMPLES / f"{name}.onnx",
            name,
            "1.0.0",
            declared=Declared.from_json(SAMPLES / f"{name}.json"),
        )
    catalog.add(SAMPLES / "vibration-ae.tflite", "vibration-ae", "1.0.0+tflite")
    for name in SAMPLE_MODELS:
        with progress_bar(f"[bold]3/7[/] compress {name}", transient=True) as bar:
            report = compress(
                catalog,
                signer,
                f"{name}:1.0.0",
                calibration_set(name, n=400),
                home.scratch,
                only=COMPRESS[name],
                progress=stage_progress(bar),
                latency_runs=50,
            )
        variants = catalog.variants(report.version.id)
        fp32 = next(v for v in variants if v.variant == "fp32")
        rows = [variant_row(v, fp32.size) for v in variants]
        console.print(
            variants_table(
                f"3/7 {name}: {len(rows)} variants, {sum(r['eligible'] for r in rows)} eligible "
                f"(signed with key {signer.key_id})",
                rows,
            )
        )
        for variant, reason in report.failures:
            console.print(f"    not built: {variant}: {escape(reason)}")


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"demo: timed out after {timeout:.0f} s waiting for {what}")


def write_agent_config(
    workdir: Path,
    device: DemoDevice,
    port: int,
    seed: int,
    keys: Path | None,
    *,
    rate_hz: float = 20,
    telemetry_s: float = 2,
) -> Path:
    """A demo agent's config. ``keys``: the controller's signing keys, whose public key the
    agent is enrolled with (it then runs only signed manifests); None for an agent that also
    takes unsigned deploys (benchmarks/rollout_abort.py adds models without manifests)."""
    power = load_profiles()[device.device_class].power
    config: dict[str, object] = {
        "device_id": device.id,
        "device_class": device.device_class,
        "labels": device.labels,
        "state_dir": str(workdir / device.id),
        "broker": {"host": "127.0.0.1", "port": port},
        "input": {"type": "vibration", "rpm": device.rpm, "seed": seed, "window": device.window},
        "inference": {"rate_hz": rate_hz},
        "telemetry": {"interval_s": telemetry_s},
        # What an enrollment bundle would carry: the class profile's power figures, and the
        # controller's signing key.
        "power": {"idle_w": power.idle_w, "active_w_per_core": power.active_w_per_core},
    }
    if keys is not None:
        config["controller_keys"] = [Signer.load_or_create(keys).public_raw.hex()]
    path = workdir / f"{device.id}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_demo(home: Home, *, keep_running: bool = False, embedded: bool = False) -> int:
    started = time.monotonic()
    logging.getLogger().setLevel(logging.WARNING)
    home.prepare()
    workdir = home.root / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    use_mosquitto = not embedded and mosquitto_path() is not None
    broker: Mosquitto | EmbeddedBroker
    if use_mosquitto:
        broker = Mosquitto(workdir / "mosquitto").start()
        console.print(f"[bold]1/7[/] Mosquitto on 127.0.0.1:{broker.port}")
    else:
        broker = EmbeddedBroker().start()
        console.print(
            f"[bold]1/7[/] embedded broker on 127.0.0.1:{broker.port} "
            "(demo only: it loses queued QoS 1 messages across reconnects; use Mosquitto)"
        )
    controller = Controller(
        home, "127.0.0.1", broker.port, reconcile_interval_s=1.0, client_id="gf-controller-demo"
    )
    agents: list[subprocess.Popen[bytes]] = []
    watch: ScoreWatch | None = None
    try:
        controller.start()
        db = open_db(home.database)
        for seed, device in enumerate(DEVICES + FANS, start=1):
            config = write_agent_config(workdir, device, broker.port, seed, home.keys)
            with (workdir / f"{device.id}.log").open("ab") as log:
                agents.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        console.print(f"[bold]2/7[/] controller up; {len(DEVICES) + len(FANS)} agents starting")
        _build_variants(home, db, workdir)
        ids = {d.id for d in DEVICES}
        everyone = ids | {d.id for d in FANS}
        _wait(
            lambda: everyone <= {r["id"] for r in views.fleet(db) if r["online"]},
            60,
            f"{len(everyone)} agents to come online",
        )
        console.print(f"[bold]4/7[/] {len(everyone)} agents online: " + ", ".join(sorted(everyone)))
        registry.set_desired(db, sorted(ids), MODEL)
        registry.set_desired(db, [CONTROL.id], f"{DIAGNOSIS}+fp32")
        registry.set_desired(db, [TREATED.id], DIAGNOSIS)
        wanted = {d: MODEL if d in ids else DIAGNOSIS for d in everyone}
        _wait(
            lambda: all(
                (r["active_model"] or "").partition("+")[0] == wanted[r["id"]]
                for r in views.fleet(db)
                if r["id"] in everyone
            ),
            60,
            "the chosen variants to be active everywhere",
        )
        rows = registry.devices(db)
        planned = plan(
            db, Catalog(db, home.store), load_profiles(), [r for r in rows if r["id"] in ids]
        )
        treated = plan(
            db, Catalog(db, home.store), load_profiles(), [r for r in rows if r["id"] == TREATED.id]
        )[0]
        for item in planned:
            console.print(
                f"[bold]5/7[/] plan: {item.device} ({item.device_class}) -> "
                f"{item.decision.chosen}: {escape(item.decision.reason)}"
            )
        fleet = fleet_saving(planned)
        if fleet is not None:
            console.print(
                f"[bold]5/7[/] predicted fleet energy per inference {fleet.plan_j * 1000:.3f} "
                f"mJ against {fleet.fp32_j * 1000:.3f} mJ for fp32 everywhere "
                f"({fleet.saving:.0%} less); delivered in {time.monotonic() - started:.0f} s"
            )
        console.print(
            f"[bold]5/7[/] plan: {TREATED.id} ({TREATED.device_class}) -> "
            f"{treated.decision.chosen}: {escape(treated.decision.reason)}; "
            f"{CONTROL.id} runs {DIAGNOSIS}+fp32 beside it, to measure the saving"
        )
        watch = ScoreWatch(broker.port)
        threshold = _threshold()
        with Live(console=console, refresh_per_second=2) as live:
            end = time.monotonic() + 20
            while time.monotonic() < end:
                live.update(_screen(db, watch, threshold, "6/7 healthy machines: live fleet"))
                time.sleep(0.5)
            before = {d.id: watch.take(d.id) for d in DEVICES}
            watch.inject(FAULTY, p.FaultKind.OUTER_RACE, 1.0)
            end = time.monotonic() + 20
            while time.monotonic() < end:
                live.update(
                    _screen(
                        db, watch, threshold, f"7/7 outer-race bearing fault injected on {FAULTY}"
                    )
                )
                time.sleep(0.5)
            after = {d.id: watch.take(d.id) for d in DEVICES}
        console.print()
        _summary(db, before, after, threshold)
        _measured_saving(db, Catalog(db, home.store), treated)
        console.print(
            f"demo finished in {time.monotonic() - started:.0f} s; state in {home.database}"
        )
        if keep_running:
            console.print("running until Ctrl-C (--keep-running)")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        return 0
    finally:
        if watch is not None:
            watch.stop()
        for proc in agents:
            proc.terminate()
        for proc in agents:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        controller.stop()
        broker.stop()


def _summary(
    db: Any,
    before: dict[str, list[float]],
    after: dict[str, list[float]],
    threshold: float,
) -> None:
    table = Table(
        "device",
        "model",
        "inferences",
        "mean p50 ms",
        "mean p95 ms",
        "mJ/inf (estimate)",
        "score before",
        "score after",
        "alarm",
        title="summary",
        title_justify="left",
    )
    totals = {
        r[0]: r[1:]
        for r in db.execute(
            "SELECT device, SUM(inferences), AVG(latency_p50_ms), AVG(latency_p95_ms), "
            "SUM(energy_per_inference_j * inferences) / NULLIF(SUM(inferences), 0) "
            "FROM telemetry GROUP BY device"
        ).fetchall()
    }
    rows = {r["id"]: r for r in views.fleet(db)}
    for device in DEVICES:
        inferences, p50, p95, energy = totals.get(device.id, (0, None, None, None))
        b, a = before.get(device.id) or [0.0], after.get(device.id) or [0.0]
        mean_b, mean_a = sum(b) / len(b), sum(a) / len(a)
        table.add_row(
            device.id,
            rows[device.id]["active_model"] or "-",
            str(inferences or 0),
            "-" if p50 is None else f"{p50:.3f}",
            "-" if p95 is None else f"{p95:.3f}",
            energy_mj(energy),
            f"{mean_b:.3f}",
            f"{mean_a:.3f}",
            "[bold red]yes[/]" if mean_a > threshold else "no",
        )
    console.print(table)


def _measured_saving(db: Any, catalog: Catalog, treated: PlannedDevice) -> None:
    """fp32 and the variant the plan chose, side by side on one device class over the same
    minute, from telemetry alone (what a customer measures), next to what the profiles
    predicted before either had run, and what the plan predicts for each once corrected by
    the other's telemetry (controller.selection.field_check)."""
    chosen = treated.decision.chosen or "-"
    checks = {
        check.variant: check
        for device_class, check in field_checks(catalog, load_profiles(), measured(db))
        if device_class == TREATED.device_class
    }
    table = Table(
        "device",
        "variant",
        "inferences",
        "p50 ms",
        "mJ/inf measured",
        "method",
        "profile mJ",
        "error",
        "corrected by the other",
        "error",
        title=f"measured saving on {TREATED.device_class} (telemetry of the same period)",
        title_justify="left",
    )
    energy: dict[str, float] = {}
    for device, variant in ((CONTROL.id, f"{DIAGNOSIS}+fp32"), (TREATED.id, chosen)):
        inferences, joules, p50, methods = db.execute(
            "SELECT SUM(inferences), "
            "SUM(energy_per_inference_j * inferences) / NULLIF(SUM(inferences), 0), "
            "SUM(latency_p50_ms * inferences) / NULLIF(SUM(inferences), 0), "
            "GROUP_CONCAT(DISTINCT power_method) "
            "FROM telemetry WHERE device = ? AND model = ? AND inferences > 0",
            [device, variant],
        ).fetchone()
        if joules is not None:
            energy[variant] = joules
        check = checks.get(variant)
        profile_error = None if check is None else check.profile_error
        corrected_error = None if check is None else check.corrected_error
        table.add_row(
            device,
            variant.partition("+")[2] or variant,
            f"{inferences or 0:,}",
            "-" if p50 is None else f"{p50:.3f}",
            energy_mj(joules),
            methods or "-",
            energy_mj(None if check is None else check.profile_j),
            "-" if profile_error is None else f"{profile_error:+.0%}",
            energy_mj(None if check is None else check.corrected_j),
            "-" if corrected_error is None else f"{corrected_error:+.0%}",
        )
    console.print(table)
    fp32, ours = energy.get(f"{DIAGNOSIS}+fp32"), energy.get(chosen)
    before, after = checks.get(f"{DIAGNOSIS}+fp32"), checks.get(chosen)
    if fp32 and ours is not None:
        forecast = ""
        if before is not None and after is not None and before.profile_j > 0:
            change = after.profile_j / before.profile_j - 1
            forecast = (
                f"; the profiles had predicted {abs(change):.0%} {'more' if change > 0 else 'less'}"
            )
        console.print(
            f"measured: {chosen} spends {1 - ours / fp32:.0%} less energy per inference than "
            f"fp32 on {TREATED.device_class}{forecast} (energy 'estimate' = the agent's "
            "inference CPU time x the class's per-core power; this host has no power meter)"
        )
