"""Telemetry ingest: broker -> SQLite through the real controller, against raw paho QoS 1.

(a) Throughput. A publisher process sends single-record TelemetryBatch messages (QoS 1, 100
    device ids, (session, seq) numbered) as fast as the broker takes them for DURATION seconds
    (60, or 20 with --quick) while the real controller daemon (``greenfleet controller run``,
    its own process) ingests them; then rows are counted until none are missing or nothing
    moves for 30 s. Records per second = rows / (time of the last row - publish start). The
    baseline is the same count of the same messages through the same broker to a bare paho
    subscriber process, in the same run. Target: ratio >= 0.5 and 0 records lost.
(b) Fleet load. N simulated devices (``greenfleet simulate``, its own process), one telemetry
    message each per second, against the controller daemon: the controller's CPU share (of one
    core) and RSS over a steady window, and the end-to-end delay p50/p99 from a record's publish
    (the simulator stamps start + window_s = publish time) to its row (received_at). N = 1000,
    and 100 and 5000 for the growth curve unless --quick.
(c) Scale-out: backlog drain with 0, 1 and 2 ingest workers (``controller run --ingest-workers
    N``: MQTT 5 shared subscription, ack after commit). The controller subscribes, stops; a
    backlog of COUNT records is published into its broker sessions (what a controller restart
    after an outage meets); it starts again and the rate from its first row to its last is
    measured, so the load generator does not share the CPU. Baseline, same run, same broker:
    a bare persistent paho subscriber draining the same backlog.

    python -m benchmarks.ingest [--quick]          # or: python -m benchmarks.run ingest

One 2-core machine runs broker, publisher/simulator and controller at once: they share its CPU,
so the absolute figures are a floor for a real deployment where the broker and devices are
elsewhere.
"""

from __future__ import annotations

import argparse
import ast
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from benchmarks.rig import Outcome, mosquitto, outcome, percentile

PUBLISH_DEVICES = 100
DRAIN_STALL_S = 30.0


# ------------------------------------------------------------------------ child processes


def _publisher_main(port: int, duration_s: float | None, count: int | None) -> None:
    """Publish single-record telemetry batches flat out; print ``published N SECONDS``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent import protocol as p

    sessions = [p.new_id()[:16] for _ in range(PUBLISH_DEVICES)]
    topics = [p.topic(f"bench-{i:03d}", p.Channel.TELEMETRY) for i in range(PUBLISH_DEVICES)]
    start = p.utcnow()

    def message(n: int) -> tuple[str, bytes]:
        i, seq = n % PUBLISH_DEVICES, n // PUBLISH_DEVICES
        record = p.TelemetryRecord(
            seq=seq,
            start=start + timedelta(seconds=seq),
            window_s=1.0,
            model=None,
            inferences=10,
            errors=0,
            latency_p50_ms=1.0,
            latency_p95_ms=1.5,
            cpu_s=0.01,
            power_w=3.0,
        )
        return topics[i], p.encode(p.TelemetryBatch(session=sessions[i], records=[record]))

    acked = 0
    lock = threading.Condition()
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-pub")
    client.max_inflight_messages_set(1000)

    def on_publish(*_: Any) -> None:
        nonlocal acked
        with lock:
            acked += 1
            lock.notify()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()  # go
    began = time.monotonic()
    n = 0
    while (count is not None and n < count) or (
        duration_s is not None and time.monotonic() - began < duration_s
    ):
        with lock:
            while n - acked >= 2000:
                lock.wait(0.1)
        client.publish(*message(n), qos=1)
        n += 1
    with lock:
        while acked < n:
            lock.wait(0.1)
    print(f"published {n} {time.monotonic() - began:.3f}", flush=True)
    client.disconnect()
    client.loop_stop()


def _subscriber_main(port: int, count: int) -> None:
    """The bare paho baseline: print ``ready``, then ``done`` when ``count`` messages arrived."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    received = 0
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-sub", clean_session=True
    )
    client.on_connect = lambda c, *_: c.subscribe("gf/v1/+/telemetry", 1)
    client.on_subscribe = lambda *_: print("ready", flush=True)

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received
        received += 1
        if received == count:
            print("done", flush=True)

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_forever()


def _drainer_main(port: int, count: int) -> None:
    """Baseline of (c): a persistent bare paho subscriber. ``count`` 0: subscribe, print
    ``ready``, leave the session behind. Otherwise: print ``drained N SECONDS`` (first message
    to the ``count``-th) for what the session holds."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    received, first = 0, 0.0
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-drain",
        clean_session=False,
    )
    client.on_connect = lambda c, *_: c.subscribe("gf/v1/+/telemetry", 1)

    def on_subscribe(c: mqtt.Client, *_: Any) -> None:
        if count == 0:
            print("ready", flush=True)
            c.disconnect()

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received, first
        received += 1
        if received == 1:
            first = time.monotonic()
        if received == count:
            print(f"drained {count} {time.monotonic() - first:.3f}", flush=True)
            c.disconnect()

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_forever()


def _python(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kwargs
    )


def _line(proc: subprocess.Popen[str], expect: str, timeout_s: float = 60.0) -> str:
    assert proc.stdout is not None
    result: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(expect):
                result.append(line.strip())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not result:
        raise RuntimeError(f"no {expect!r} line from {proc.args!r} in {timeout_s} s")
    return result[0]


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def _controller(
    home: Path, port: int, log: Path, workers: int = 0, settle_s: float = 2.0
) -> Iterator[subprocess.Popen[Any]]:
    """``greenfleet controller run`` as its own process, as in production."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller.cli",
                "--home",
                str(home),
                "--log-level",
                "WARNING",
                "controller",
                "run",
                "--plain",
                "--broker",
                f"127.0.0.1:{port}",
                "--ingest-workers",
                str(workers),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (home / "greenfleet.db").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(settle_s)  # connected and subscribed (its presence is retained; good enough)
        yield proc
    finally:
        _stop(proc)


def _rows(db: Path, where: str = "") -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(conn.execute(f"SELECT count(*) FROM telemetry {where}").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- (a) throughput


def throughput(workdir: Path, duration_s: float) -> dict[str, Any]:
    with mosquitto(workdir) as broker:
        home = workdir / "home-a"
        with _controller(home, broker.port, workdir / "controller-a.log") as ctl:
            pub = _python("-m", "benchmarks.ingest", "publish", "--port", str(broker.port),
                          "--duration", str(duration_s))  # fmt: skip
            _line(pub, "ready")
            cpu0 = psutil.Process(ctl.pid).cpu_times()
            began = time.monotonic()
            assert pub.stdin is not None
            pub.stdin.write("go\n")
            pub.stdin.flush()
            rows, last_change, last_rows = 0, time.monotonic(), 0
            published: int | None = None
            pub_s = 0.0
            while True:
                time.sleep(0.25)
                if published is None and pub.poll() is not None:
                    assert pub.stdout is not None
                    words = pub.stdout.read().split()
                    published, pub_s = int(words[1]), float(words[2])
                rows = _rows(home / "greenfleet.db")
                if rows != last_rows:
                    last_rows, last_change = rows, time.monotonic()
                if published is not None and rows >= published:
                    break
                if time.monotonic() - last_change > DRAIN_STALL_S:
                    break
            ingest_s = last_change - began
            cpu1 = psutil.Process(ctl.pid).cpu_times()
            rss = psutil.Process(ctl.pid).memory_info().rss
        assert published is not None
        # the baseline: the same messages, the same count, a bare paho subscriber
        sub = _python("-m", "benchmarks.ingest", "subscribe", "--port", str(broker.port),
                      "--count", str(published))  # fmt: skip
        _line(sub, "ready")
        pub = _python("-m", "benchmarks.ingest", "publish", "--port", str(broker.port),
                      "--count", str(published))  # fmt: skip
        _line(pub, "ready")
        began = time.monotonic()
        assert pub.stdin is not None
        pub.stdin.write("go\n")
        pub.stdin.flush()
        _line(sub, "done", timeout_s=600)
        raw_s = time.monotonic() - began
        _stop(pub)
        _stop(sub)
    return {
        "duration_s": duration_s,
        "published": published,
        "publish_s": round(pub_s, 2),
        "rows": rows,
        "lost": published - rows,
        "ingest_s": round(ingest_s, 2),
        "ingest_per_s": round(rows / ingest_s, 1),
        "raw_s": round(raw_s, 2),
        "raw_per_s": round(published / raw_s, 1),
        "controller_cpu_s": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 1),
        "controller_rss_mib": round(rss / 2**20, 1),
    }


# ---------------------------------------------------------------------------- (b) fleet load


def _parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def fleet_load(workdir: Path, devices: int, window_s: float) -> dict[str, Any]:
    """``devices`` simulated devices at 1 msg/s against the controller process."""
    with mosquitto(workdir / f"mq-{devices}") as broker:
        home = workdir / f"home-b-{devices}"
        with _controller(home, broker.port, workdir / f"controller-b-{devices}.log") as ctl:
            sim = _python("-m", "controller.cli", "--log-level", "WARNING", "simulate",
                          "--devices", str(devices), "--broker", f"127.0.0.1:{broker.port}",
                          "--interval", "1", "--prefix", "load")  # fmt: skip
            try:
                _line(sim, "simulator:", timeout_s=120)  # all connected
                time.sleep(max(5.0, devices / 500))  # warm up: births, first records
                proc = psutil.Process(ctl.pid)
                cpu0, t0 = proc.cpu_times(), time.monotonic()
                started = datetime.now().astimezone()
                time.sleep(window_s)
                cpu1, t1 = proc.cpu_times(), time.monotonic()
                ended = datetime.now().astimezone()
                rss = proc.memory_info().rss
                online = (
                    sqlite3.connect(home / "greenfleet.db")
                    .execute("SELECT count(*) FROM devices WHERE online")
                    .fetchone()[0]
                )
            finally:
                sim.send_signal(2)
                try:
                    sim.wait(60)
                except subprocess.TimeoutExpired:
                    _stop(sim)
            assert sim.stdout is not None
            done = [line for line in sim.stdout.read().splitlines() if "done" in line]
            time.sleep(3)
            conn = sqlite3.connect(home / "greenfleet.db")
            got = conn.execute(
                "SELECT start, window_s, received_at FROM telemetry WHERE device LIKE 'load-%'"
            ).fetchall()
            conn.close()
    sent_total = None
    if done:  # every record the simulator sent (its stats), against every row stored
        sent_total = int(ast.literal_eval(done[-1].split("done ", 1)[1])["records_sent"])
    delays = []
    for start, window, received in got:
        sent = _parse_ts(start) + timedelta(seconds=window)
        if started <= sent <= ended:
            delays.append((_parse_ts(received) - sent).total_seconds() * 1000)
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
    return {
        "devices": devices,
        "online": online,
        "window_s": window_s,
        "records_in_window": len(delays),
        "expected_in_window": int(devices * window_s),
        "controller_cpu_share": round(cpu, 3),
        "controller_rss_mib": round(rss / 2**20, 1),
        "delay_p50_ms": round(percentile(delays, 50), 1) if delays else None,
        "delay_p99_ms": round(percentile(delays, 99), 1) if delays else None,
        "delay_max_ms": round(max(delays), 1) if delays else None,
        "records_sent": sent_total,
        "rows_stored": len(got),
        "lost": None if sent_total is None else sent_total - len(got),
        "simulator": done[-1] if done else "",
    }


# ----------------------------------------------------------------------- (c) scale-out


def _publish(port: int, count: int) -> None:
    pub = _python("-m", "benchmarks.ingest", "publish", "--port", str(port), "--count", str(count))
    _line(pub, "ready")
    assert pub.stdin is not None
    pub.stdin.write("go\n")
    pub.stdin.flush()
    _line(pub, "published", timeout_s=600)
    _stop(pub)


def drain(workdir: Path, workers: int, count: int) -> dict[str, Any]:
    """A backlog of ``count`` records drained by the controller with ``workers`` workers."""
    with mosquitto(workdir / f"mq-c-{workers}") as broker:
        home = workdir / f"home-c-{workers}"
        log = workdir / f"controller-c-{workers}.log"
        with _controller(home, broker.port, log, workers):
            time.sleep(2.0)  # workers subscribed too
        _publish(broker.port, count)
        db = home / "greenfleet.db"
        first: tuple[float, int] | None = None
        last_change, last_rows = time.monotonic(), _rows(db)
        with _controller(home, broker.port, log, workers, settle_s=0.0) as ctl:
            while last_rows < count and time.monotonic() - last_change < DRAIN_STALL_S:
                time.sleep(0.1)
                rows = _rows(db)
                if rows != last_rows:
                    now = time.monotonic()
                    if first is None:
                        first = (now, rows)
                    last_rows, last_change = rows, now
            procs = [psutil.Process(ctl.pid), *psutil.Process(ctl.pid).children()]
            cpu = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
            rss = sum(p.memory_info().rss for p in procs)
        # the baseline: the same backlog, a bare persistent paho subscriber
        sub = _python("-m", "benchmarks.ingest", "drain", "--port", str(broker.port),
                      "--count", "0")  # fmt: skip
        _line(sub, "ready")
        _stop(sub)
        _publish(broker.port, count)
        sub = _python("-m", "benchmarks.ingest", "drain", "--port", str(broker.port),
                      "--count", str(count))  # fmt: skip
        raw_s = float(_line(sub, "drained", timeout_s=600).split()[2])
        _stop(sub)
    assert first is not None, "no row arrived"
    span = last_change - first[0]
    rate = (last_rows - first[1]) / span if span > 0 else float("nan")
    return {
        "workers": workers,
        "backlog": count,
        "rows": last_rows,
        "lost": count - last_rows,
        "drain_s": round(span, 2),
        "rows_per_s": round(rate, 1),
        "raw_per_s": round(count / raw_s, 1),
        "ratio": round(rate / (count / raw_s), 2),
        "cpu_s_total": round(cpu, 1),
        "rss_mib_total": round(rss / 2**20, 1),
    }


def run(quick: bool) -> Outcome:
    duration = 20.0 if quick else 60.0
    sizes = [1000] if quick else [100, 1000, 5000]
    window = 20.0 if quick else 30.0
    with tempfile.TemporaryDirectory(prefix="gf-bench-ingest-") as tmp:
        workdir = Path(tmp)
        a = throughput(workdir, duration)
        loads = [fleet_load(workdir, n, window) for n in sizes]
        backlog = 50_000 if quick else 150_000
        scale = [drain(workdir, w, backlog) for w in (0, 1, 2)]
    ratio = a["ingest_per_s"] / a["raw_per_s"]
    thousand = next(x for x in loads if x["devices"] == 1000)
    return outcome(
        "ingest",
        "Telemetry ingest: broker -> SQLite through the controller, vs raw paho QoS 1",
        measured=f"{a['ingest_per_s']:.0f} rec/s, {a['lost']} lost",
        baseline=f"{a['raw_per_s']:.0f} msg/s raw paho",
        ratio=ratio,
        target=">= 0.50, 0 lost",
        passed=ratio >= 0.5 and a["lost"] == 0,
        numbers={
            "throughput": a,
            "fleet": loads,
            "scale_out": scale,
            "p99_ms_at_1000": thousand["delay_p99_ms"],
            "cpus": os.cpu_count(),
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ingest")
    sub = parser.add_subparsers(dest="cmd")
    pub = sub.add_parser("publish")
    pub.add_argument("--port", type=int, required=True)
    pub.add_argument("--duration", type=float)
    pub.add_argument("--count", type=int)
    subs = sub.add_parser("subscribe")
    subs.add_argument("--port", type=int, required=True)
    subs.add_argument("--count", type=int, required=True)
    drains = sub.add_parser("drain")
    drains.add_argument("--port", type=int, required=True)
    drains.add_argument("--count", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale-only", action="store_true", help="run (c) only")
    args = parser.parse_args(argv)
    if args.cmd == "publish":
        _publisher_main(args.port, args.duration, args.count)
    elif args.cmd == "subscribe":
        _subscriber_main(args.port, args.count)
    elif args.cmd == "drain":
        _drainer_main(args.port, args.count)
    elif args.scale_only:
        import json

        with tempfile.TemporaryDirectory(prefix="gf-bench-scale-") as tmp:
            count = 50_000 if args.quick else 150_000
            result = [drain(Path(tmp), w, count) for w in (0, 1, 2)]
        print(json.dumps(result, indent=1))
    else:
        import json

        print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()
