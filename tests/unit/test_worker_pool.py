"""The ingest worker pool's bookkeeping, with stand-in worker commands (small Python scripts):
retiring surplus sessions, remembering a retirement that failed, and restarting a worker that
exits. The real workers run in tests/e2e/test_ingest_workers.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from controller import ingest_workers
from controller.home import Home
from controller.ingest_workers import WorkerPool, count_file

# a stand-in worker: appends its argv to a log; --retire of index 3 fails; a ready fd gets a
# line; a normal worker lives until killed, or exits at once with EXIT set
SCRIPT = """
import os, sys, time
args = sys.argv[1:]
with open(os.environ["LOG"], "a") as fh:
    fh.write(" ".join(args) + "\\n")
index = args[args.index("--index") + 1]
if "--retire" in args:
    sys.exit(1 if index == "3" else 0)
if "--ready-fd" in args:
    fd = int(args[args.index("--ready-fd") + 1])
    os.write(fd, b"subscribed\\n")
    os.close(fd)
if os.environ.get("EXIT"):
    sys.exit(int(os.environ["EXIT"]))
time.sleep(60)
"""


def pool(tmp_path: Path, count: int, monkeypatch: pytest.MonkeyPatch, exit: str = "") -> WorkerPool:
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    monkeypatch.setenv("LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("EXIT", exit)
    home = Home(tmp_path / "home").prepare()
    return WorkerPool(home, count, [sys.executable, str(script)])


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls.log"
    return sorted(path.read_text().splitlines()) if path.exists() else []


def test_fewer_workers_retire_the_surplus_and_a_failed_retirement_is_kept_for_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = pool(tmp_path, 1, monkeypatch)
    count_file(first.home).write_text(json.dumps({"workers": 3}))
    first.start()
    try:
        assert calls(tmp_path) == [
            "--index 1 --ready-fd " + calls(tmp_path)[0].rsplit(" ", 1)[1],
            "--index 2 --retire",
            "--index 3 --retire",
        ]
        # index 3 could not be retired: the next start must try it again
        assert json.loads(count_file(first.home).read_text()) == {"workers": 3}
        assert set(first.pids()) == {1}
    finally:
        first.stop()
    assert first.pids() == {}


def test_a_worker_that_exits_is_restarted_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_workers, "RESTART_S", (0.2, 0.4))
    workers = pool(tmp_path, 1, monkeypatch, exit="7")
    workers.start()
    try:
        deadline = time.monotonic() + 10
        while workers.restarts < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers.restarts >= 3
        assert all(line.startswith("--index 1") for line in calls(tmp_path))
    finally:
        workers.stop()


def test_a_worker_refused_by_the_broker_is_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_workers, "RESTART_S", (0.1, 0.2))
    workers = pool(tmp_path, 1, monkeypatch, exit="3")  # 3: credentials refused
    workers.start()
    try:
        time.sleep(1.5)
        assert workers.restarts == 0 and len(calls(tmp_path)) == 1
    finally:
        workers.stop()
