"""The outbox: order across restarts, bounds, drops counted, replay within a window, bad disks."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.outbox import Outbox, OutboxSender

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeLink:
    """Records what was published; the test plays the controller's acknowledgements."""

    def __init__(self, up: bool = True) -> None:
        self.up = up
        self.sent: list[bytes] = []

    def publish(self, topic: str, payload: bytes) -> None:
        if topic == "bad/#":
            raise ValueError("Publish topic cannot contain wildcards.")
        self.sent.append(payload)

    def connected(self) -> bool:
        return self.up

    def payloads(self) -> list[bytes]:
        return list(self.sent)


def keys(*payloads: bytes) -> list[str]:
    return [payload.decode() for payload in payloads]


def opened(path: Path, **kwargs: object) -> Outbox:
    box = Outbox(path, **kwargs)  # type: ignore[arg-type]
    box.open()
    return box


def msgs(n: int, start: int = 0) -> list[bytes]:
    return [f"m{i}".encode() for i in range(start, start + n)]


def fill(box: Outbox, payloads: list[bytes]) -> None:
    """Each message keyed by its payload (the agent keys by the envelope id)."""
    for payload in payloads:
        box.put("gf/v1/d/telemetry", payload, payload.decode())


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


def test_sender_keeps_at_most_window_unacknowledged_and_deletes_what_is_stored(
    tmp_path: Path,
) -> None:
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(10))
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    assert sender.pump(window=4) == 0
    assert link.payloads() == msgs(4)
    sender.pump(window=4)
    assert link.payloads() == msgs(4), "window is full: nothing more is sent"
    sender.stored(keys(b"m0", b"m2"))  # acknowledgements may come in any order
    assert sender.pump(window=4) == 2
    assert link.payloads() == msgs(6)
    assert sender.in_flight == 4
    assert [e.payload for e in box.pending(100)] == [b"m1", *msgs(7, start=3)]
    while box.stats()["pending"]:
        sender.stored(keys(*msgs(10)))
        sender.pump(window=4)
    assert link.payloads() == msgs(10), "each sent once"
    box.close()


def test_a_broker_confirmation_deletes_nothing_only_the_controller_does(tmp_path: Path) -> None:
    """A PUBACK is not proof of storage: the sender waits for the controller, then sends
    everything unacknowledged again, oldest first, with a growing wait."""
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(5))
    link = FakeLink()
    clock = Clock(0.0)
    sender = OutboxSender(box, link.publish, link.connected, ack_timeout_s=(10, 25), clock=clock)
    sender.pump(window=3)
    clock.now = 9.9
    sender.pump(window=3)
    assert link.payloads() == msgs(3)
    clock.now = 10.0
    sender.pump(window=3)
    assert link.payloads() == msgs(3) + msgs(3), "no acknowledgement in 10 s: all again"
    clock.now = 29.9
    sender.pump(window=3)
    assert len(link.sent) == 6, "the second wait is twice the first"
    clock.now = 30.0
    sender.pump(window=3)
    assert len(link.sent) == 9
    clock.now = 55.0
    sender.pump(window=3)
    assert len(link.sent) == 12, "the wait stops growing at the longest"
    sender.stored(keys(b"m0"))
    assert sender.pump(window=3) == 1
    assert link.payloads()[12:] == [b"m3"]
    assert box.stats()["pending"] == 4
    clock.now = 64.9
    sender.pump(window=3)
    assert len(link.sent) == 13, "an acknowledgement brings the first wait back"
    clock.now = 65.0
    sender.pump(window=3)
    assert link.payloads()[13:] == msgs(3, start=1)
    box.close()


def test_a_reconnect_restarts_the_clock_and_resends_nothing_itself(tmp_path: Path) -> None:
    """After a reconnect the MQTT client resends what the broker had not confirmed; sending it
    here too would put every message of a stalled link on the wire twice."""
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(5))
    link = FakeLink()
    clock = Clock(0.0)
    sender = OutboxSender(box, link.publish, link.connected, clock=clock)
    sender.pump(window=3)
    link.up = False
    clock.now = 60.0  # no clock runs while the link is down
    sender.pump(window=3)
    link.up = True
    sender.reset()  # what the agent's on_connected hook calls
    sender.pump(window=3)
    assert link.payloads() == msgs(3), "nothing sent twice"
    sender.stored(keys(*msgs(3)))
    sender.pump(window=3)
    assert link.payloads() == msgs(5)
    box.close()


def test_what_the_controller_refuses_for_good_is_dropped_and_counted(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(3))
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    sender.pump(window=8)
    sender.stored(keys(b"m0", b"m2"), rejected=keys(b"m1"))
    assert sender.pump(window=8) == 3
    assert box.stats()["pending"] == 0
    assert box.stats()["dropped_rejected"] == 1
    box.close()


def test_an_outbox_file_of_schema_1_is_keyed_by_its_payloads(tmp_path: Path) -> None:
    """An agent upgraded with messages waiting: they are acknowledged by their JSON ids."""
    path = tmp_path / "outbox.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
        "payload BLOB NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "PRAGMA user_version=1;"
    )
    db.execute(
        "INSERT INTO messages (topic, payload, created, size) VALUES (?, ?, ?, ?)",
        ("t", b'{"id": "old-1", "kind": "event"}', time.time(), 10),
    )
    db.commit()
    db.close()
    box = opened(path)
    link = FakeLink()
    sender = OutboxSender(box, link.publish, link.connected)
    sender.pump(window=8)
    assert link.payloads() == [b'{"id": "old-1", "kind": "event"}']
    sender.stored(["old-1"])
    assert sender.pump(window=8) == 1
    assert box.stats()["pending"] == 0
    box.close()


def test_a_message_the_client_refuses_is_dropped_and_counted(tmp_path: Path) -> None:
    box = opened(tmp_path / "outbox.db")
    box.put("t", b"m0", "m0")
    box.put("bad/#", b"never", "never")
    box.put("t", b"m1", "m1")
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
        sender.stored(keys(*link.sent))
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


@pytest.mark.parametrize("resend", [False, True], ids=["same-connection", "new-connection"])
def test_held_for_the_controller_then_released(tmp_path: Path, resend: bool) -> None:
    """While the controller is offline nothing new goes out; when it is back on a connection
    the sender has not seen, everything unacknowledged goes again from the oldest."""
    box = opened(tmp_path / "outbox.db")
    fill(box, msgs(5))
    link = FakeLink()
    clock = Clock(0.0)
    sender = OutboxSender(box, link.publish, link.connected, clock=clock)
    sender.pump(window=2)  # m0, m1 sent
    sender.hold()
    clock.now = 600.0  # no clock runs while held
    sender.pump(window=2)
    assert link.payloads() == msgs(2), "nothing new is sent while held"
    link.sent.clear()
    sender.release(resend)
    sender.pump(window=5)
    if resend:
        assert link.payloads() == msgs(5), "the broker took them for nobody: all again"
    else:
        assert link.payloads() == msgs(3, start=2)
    assert box.stats()["pending"] == 5, "nothing is deleted without the controller"
    box.close()


def test_a_message_the_disk_cannot_take_is_sent_unstored_or_dropped_and_counted(
    tmp_path: Path,
) -> None:
    """Issue 15 (4): a full disk loses nothing while the link is up."""
    box = opened(tmp_path / "outbox.db")
    box.close()  # stands for a disk that cannot take a write
    sent: list[bytes] = []
    box.put("t", b"m0", "m0", fallback=lambda: bool(sent.append(b"m0")) or True)
    assert sent == [b"m0"] and box.dropped == 0 and box.stats()["sent_unstored"] == 1
    box.put("t", b"m1", "m1", fallback=lambda: False)  # offline as well: dropped, counted
    assert box.dropped == 1 and box.stats()["dropped_disk"] == 1
