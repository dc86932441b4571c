"""The outbox: order across restarts, bounds, drops counted, replay within a window, bad disks."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.outbox import Outbox, OutboxSender

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Handle:
    def __init__(self) -> None:
        self.published = False
        self.error: Exception | None = None

    def is_published(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.published


class FakeLink:
    """Records what was published; the test decides when the broker confirms."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.sent: list[tuple[bytes, Handle]] = []

    def publish(self, topic: str, payload: bytes) -> Handle:
        if topic == "bad/#":
            raise ValueError("Publish topic cannot contain wildcards.")
        handle = Handle()
        self.sent.append((payload, handle))
        return handle

    def connected(self) -> bool:
        return self.up

    def payloads(self) -> list[bytes]:
        return [payload for payload, _ in self.sent]

    def confirm(self, *payloads: bytes) -> None:
        for payload, handle in self.sent:
            if payload in payloads:
                handle.published = True


def opened(path: Path, **kwargs: object) -> Outbox:
    box = Outbox(path, **kwargs)  # type: ignore[arg-type]
    box.open()
    return box


def msgs(n: int, start: int = 0) -> list[bytes]:
    return [f"m{i}".encode() for i in range(start, start + n)]


def fill(box: Outbox, payloads: list[bytes]) -> None:
    for payload in payloads:
        box.put("gf/v1/d/telemetry", payload)


def test_messages_survive_a_restart_in_order(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(5))
    box.close()
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(3, start=5))
    entries = box.pending(100)
    assert [e.payload for e in entries] == msgs(8)
    assert [e.id for e in entries] == sorted(e.id for e in entries)
    assert {e.topic for e in entries} == {"gf/v1/d/telemetry"}
    box.ack([entries[0].id, entries[1].id])
    assert [e.payload for e in box.pending(2)] == msgs(2, start=2)
    assert [e.payload for e in box.pending(100, after=entries[6].id)] == [b"m7"]
    box.close()


def test_size_bound_drops_oldest_first_and_counts_across_restarts(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db", max_bytes=1000)
    payloads = [bytes([65 + i]) * 99 for i in range(15)]  # 1-byte topic + 99 = 100 bytes each
    for payload in payloads:
        box.put("t", payload)
    assert [e.payload for e in box.pending(100)] == payloads[5:]
    stats = box.stats()
    assert (stats["pending"], stats["pending_bytes"], stats["dropped_size"]) == (10, 1000, 5)
    box.put("t", b"x" * 5000)  # larger than the whole outbox: only it is dropped
    assert box.stats()["pending"] == 10
    box.close()
    box = opened(tmp_path / "outbox.db", max_bytes=1000)
    assert box.stats()["dropped_size"] == 6
    assert box.dropped == 6
    box.close()


def test_messages_older_than_max_age_expire(tmp_path: Path) -> None:
    clock = Clock()
    box = opened(tmp_path / "outbox.db", max_age_s=100, clock=clock)
    box.put("t", b"old")
    clock.now += 50
    box.put("t", b"newer")
    clock.now += 70  # "old" is 120 s old, "newer" 70 s
    assert [e.payload for e in box.pending(10)] == [b"newer"]
    stats = box.stats()
    assert stats["dropped_age"] == 1 and stats["pending"] == 1
    assert stats["oldest_age_s"] == pytest.approx(70)
    clock.now -= 10_000  # a clock set back expires nothing
    box.put("t", b"later")
    assert [e.payload for e in box.pending(10)] == [b"newer", b"later"]
    box.close()


def test_sender_sends_nothing_while_disconnected(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(3))
    link = FakeLink(up=False)
    sender = OutboxSender(box, link.publish, link.connected)
    assert sender.pump(window=8) == 0
    assert link.sent == []
    box.close()


def test_sender_keeps_at_most_window_in_flight_and_acks_confirmed(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(10))
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    assert sender.pump(window=4) == 0
    assert link.payloads() == msgs(4)
    sender.pump(window=4)
    assert link.payloads() == msgs(4), "window is full: nothing more is sent"
    link.confirm(b"m0", b"m2")  # PUBACKs may come in any order
    assert sender.pump(window=4) == 2
    assert link.payloads() == msgs(6)
    assert sender.in_flight == 4
    assert [e.payload for e in box.pending(100)] == [b"m1", *msgs(7, start=3)]
    link.confirm(*msgs(10))
    while box.stats()["pending"]:
        sender.pump(window=4)
        link.confirm(*msgs(10))
    assert link.payloads() == msgs(10)
    box.close()


def test_unconfirmed_messages_are_resent_in_order_after_a_reconnect(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(6))
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    sender.pump(window=4)
    link.confirm(b"m0", b"m2")
    link.up = False
    assert sender.pump(window=4) == 2, "confirmations that arrived are still acked"
    assert len(link.sent) == 4
    link.up = True
    link.sent.clear()
    sender.pump(window=4)
    assert link.payloads() == [b"m1", b"m3", b"m4", b"m5"]
    box.close()


def test_reset_resends_after_a_reconnect_the_pump_did_not_see(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(5))
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    sender.pump(window=3)
    sender.reset()  # what the link's on_connected hook calls
    link.sent.clear()
    sender.pump(window=3)
    assert link.payloads() == msgs(3)
    link.sent[1][1].error = RuntimeError("Message publish failed: The client is not connected.")
    link.confirm(b"m0")
    link.sent.clear()
    assert sender.pump(window=3) == 1
    assert link.payloads() == msgs(3, start=1), "a failed handle resends from the oldest unacked"
    box.close()


def test_a_message_the_client_refuses_is_dropped_and_counted(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db")
    box.put("t", b"m0")
    box.put("bad/#", b"never")
    box.put("t", b"m1")
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    sender.pump(window=8)
    assert link.payloads() == [b"m0", b"m1"]
    assert box.stats()["dropped_rejected"] == 1
    box.close()


def test_put_from_one_thread_while_another_sends_loses_and_reorders_nothing(
    tmp_path: Path,
) -> None:
    box = opened(tmp_path / "outbox.db")
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    payloads = msgs(300)
    producer = threading.Thread(target=fill, args=(box, payloads))
    producer.start()
    while producer.is_alive() or box.stats()["pending"]:
        sender.pump(window=16)
        for _, handle in link.sent:
            handle.published = True
    producer.join()
    assert link.payloads() == payloads
    box.close()


KILLED_WRITER = """
import os, signal, sys, threading
from pathlib import Path
from agent.outbox import Outbox

box = Outbox(Path(sys.argv[1]))
box.open()
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGKILL)).start()
i = 0
while True:
    box.put("t", str(i).encode() * 50)
    print(i, flush=True)
    i += 1
"""


def test_a_killed_process_loses_no_message_put_returned_for(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    child = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(path)],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    returned = len(child.stdout.split())
    assert returned > 0
    box = opened(path)
    entries = box.pending(10**6)
    assert len(entries) >= returned  # the last put may have committed before its print
    assert [e.payload for e in entries] == [str(i).encode() * 50 for i in range(len(entries))]
    box.close()


def test_a_file_that_is_not_a_database_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.write_bytes(b"this is not sqlite" * 500)
    box = opened(path)
    box.put("t", b"fresh")
    assert [e.payload for e in box.pending(10)] == [b"fresh"]
    assert box.stats()["durable"]
    aside = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not sqlite")
    box.close()


def test_a_damaged_database_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = opened(path)
    fill(box, [bytes([i]) * 1000 for i in range(100)])
    box.close()
    with path.open("r+b") as f:  # overwrite pages in the middle of the table
        f.seek(4096 * 3)
        f.write(b"\xa5" * 4096 * 4)
    box = opened(path)
    box.put("t", b"fresh")
    assert [e.payload for e in box.pending(10)] == [b"fresh"]
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1
    box.close()


def test_an_unopenable_path_falls_back_to_memory(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.mkdir()  # a directory where the file should be
    box = opened(path)
    box.put("t", b"kept in memory")
    assert [e.payload for e in box.pending(10)] == [b"kept in memory"]
    assert box.stats()["durable"] is False
    box.close()


def test_a_full_disk_drops_the_message_and_counts_it(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = opened(path)
    box.put("t", b"before")
    db = box._db  # the seam: SQLite's own size cap stands in for a full filesystem
    assert db is not None
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    for _ in range(20):
        box.put("t", b"x" * 8000)  # must not raise
    stats = box.stats()
    assert stats["dropped_disk"] > 0
    assert stats["pending"] + stats["dropped_disk"] == 21
    assert box.pending(1)[0].payload == b"before"
    db.execute("PRAGMA max_page_count = 1000000")  # space freed
    box.put("t", b"after")
    assert box.pending(100)[-1].payload == b"after"
    dropped = box.stats()["dropped_disk"]
    box.close()
    box = opened(path)
    assert box.stats()["dropped_disk"] == dropped
    box.close()


class Malformed:
    """A connection whose file went bad while open (SQLite reports it on the next statement)."""

    in_transaction = False

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, *args: object) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    def close(self) -> None:
        self._db.close()


def test_corruption_found_while_running_sets_the_file_aside_and_keeps_going(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    box = opened(path)
    fill(box, msgs(3))
    old_ids = [e.id for e in box.pending(10)]
    assert box._db is not None
    box._db = Malformed(box._db)  # type: ignore[assignment]
    box.put("t", b"after")  # must not raise
    entries = box.pending(10)
    assert [e.payload for e in entries] == [b"after"]
    assert entries[0].id > max(old_ids), "ids continue, so a late ack cannot hit a new message"
    box.ack(old_ids)
    assert box.stats()["pending"] == 1
    assert len(list(tmp_path.glob("outbox.db.corrupt-*"))) == 1
    box.close()


@pytest.mark.parametrize("lapsed", [False, True], ids=["subscription-kept", "subscription-lapsed"])
def test_held_for_the_controller_then_released(tmp_path: Path, lapsed: bool) -> None:
    """While the controller may not be subscribed nothing new goes out, and what the broker
    confirms stays in the outbox until the release says whether it reached the controller."""
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(5))
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    sender.pump(window=2)  # m0, m1 in flight
    sender.hold()
    link.confirm(b"m0", b"m1")  # e.g. paho's own resend, confirmed by a restarted broker
    assert sender.pump(window=2) == 2
    assert link.payloads() == msgs(2), "nothing new is sent while held"
    assert box.stats()["pending"] == 5, "confirmed while held: kept until the release"
    link.sent.clear()
    sender.release(lapsed)
    sender.pump(window=5)
    if lapsed:
        assert link.payloads() == msgs(5), "the broker's confirmations went nowhere: all again"
    else:
        assert link.payloads() == msgs(3, start=2)
        assert box.stats()["pending"] == 3
    box.close()
