"""A bounded, durable, ordered outbox for the agent's QoS 1 messages (telemetry and events).

Every message is appended to an SQLite file (WAL mode) in the agent's state dir before it is
sent, so a broker outage or an agent restart loses nothing that fits the bounds. The bounds
are a total size (topics + payloads; the oldest messages go first) and an age; every message
dropped is counted by reason (``size``: over the size bound; ``age``: too old; ``disk``: could
not be stored, e.g. a full disk; ``rejected``: the MQTT client refused it), and the counts
survive restarts. :class:`OutboxSender` replays the outbox oldest first with at most
``window`` messages awaiting their PUBACK, and deletes a message only once the broker has
confirmed it; after a reconnect it resends, in order, the unconfirmed ones that the MQTT
client does not resend by itself. Duplicates are
possible by design: the controller de-duplicates telemetry on (session, seq), and events
carry unique ids.

The outbox never raises into its callers for storage trouble: a corrupt file is set aside
(renamed with a timestamp suffix) and replaced by an empty one, a full disk drops the new
message and counts it, and a file that cannot be opened at all is replaced by an in-memory
store (``stats()["durable"]`` is then false).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 16 * MiB
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DROP_REASONS = ("size", "age", "disk", "rejected")
WARN_EVERY_S = 60.0  # each kind of recurring storage warning is logged at most this often
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# SQLite primary result codes (extended codes carry them in the low byte).
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored message; ``id`` grows with every put and is never reused."""

    id: int
    topic: str
    payload: bytes
    created: float


class _Unusable(Exception):
    """The file opened but is not an outbox we can use (corrupt, or an unknown schema)."""


def _is_corrupt(exc: BaseException) -> bool:
    if isinstance(exc, _Unusable):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


class Outbox:
    """Messages waiting for the broker, in order, bounded by ``max_bytes`` and ``max_age_s``.

    Thread-safe: one lock guards the one connection, so the inference thread can ``put``
    while the worker thread sends. Construct, then :meth:`open`.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.time,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        """``synchronous="NORMAL"`` survives a killed process; ``"FULL"`` also survives power
        loss without losing the last commits, at the cost of an fsync on every put."""
        if max_bytes <= 0 or max_age_s <= 0:
            raise ValueError("max_bytes and max_age_s must be positive")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be 'NORMAL' or 'FULL'")
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._synchronous = synchronous
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._durable = False
        self._count = 0
        self._bytes = 0
        self._last_id = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._dirty = False  # counters changed since they were last written
        self._warned: dict[str, float] = {}
        self._puts: Counter[str] = Counter()  # messages offered per topic, by this object
        self._dropped_at_open = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create) the file; never raises for a bad file, see the module docstring."""
        with self._lock:
            if self._db is None:
                self._attach(recovering=False)
                self._dropped_at_open = sum(self._dropped.values())

    def close(self) -> None:
        """Write pending counters and close; unsent messages stay for the next open."""
        with self._lock:
            if self._db is not None:
                self._save_counters()
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None

    # -- storing ------------------------------------------------------------------------------

    def put(self, topic: str, payload: bytes) -> None:
        """Append one message; drop the oldest (counted) to stay within the bounds."""
        size = len(topic.encode()) + len(payload)
        with self._lock:
            self._puts[topic] += 1
            if self._db is None:
                self._drop("disk", 1)
                self._warn("closed", "outbox %s is not open; dropped a message", self.path)
                return
            if size > self.max_bytes:
                self._drop("size", 1)
                self._warn(
                    "size",
                    "a %d-byte message on %s is larger than the outbox (%d bytes); dropped",
                    size,
                    topic,
                    self.max_bytes,
                )
                self._save_counters()
                return
            for attempt in (1, 2):
                try:
                    with self._transaction() as db:
                        now = self._clock()
                        self._expire(db, now)
                        self._make_room(db, size)
                        cursor = db.execute(
                            "INSERT INTO messages (topic, payload, created, size) "
                            "VALUES (?, ?, ?, ?)",
                            (topic, payload, now, size),
                        )
                        self._count += 1
                        self._bytes += size
                        self._last_id = max(self._last_id, cursor.lastrowid or 0)
                    return
                except sqlite3.Error as exc:
                    if attempt == 1 and _is_corrupt(exc):
                        self._recover(exc)
                        continue
                    self._drop("disk", 1)
                    self._warn(
                        "disk",
                        "cannot store a message in the outbox %s (%s); dropped it "
                        "(%d dropped for this reason so far)",
                        self.path,
                        exc,
                        self._dropped["disk"],
                    )
                    return

    def has_after(self, after: int) -> bool:
        """Whether anything is stored beyond id ``after``: a memory check, no query.

        The sender calls this after every message the worker handles (every model chunk), so
        the common answer, "nothing new", must not cost a database round trip.
        """
        return self._count > 0 and self._last_id > after

    def pending(self, limit: int, *, after: int = 0) -> list[Entry]:
        """Up to ``limit`` stored messages with ids above ``after``, oldest first."""
        with self._lock:
            if self._db is None:
                return []
            try:
                now = self._clock()
                if self._has_expired(self._db, now):
                    with self._transaction() as db:
                        self._expire(db, now)
                rows = self._db.execute(
                    "SELECT id, topic, payload, created FROM messages WHERE id > ? "
                    "ORDER BY id LIMIT ?",
                    (after, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                self._failed(exc, "read")
                return []
        return [Entry(int(i), str(t), bytes(p), float(c)) for i, t, p, c in rows]

    def ack(self, ids: Sequence[int]) -> None:
        """Delete messages the broker has confirmed (unknown ids are ignored)."""
        self._delete(ids, None)

    def reject(self, ids: Sequence[int]) -> None:
        """Delete messages that can never be sent, counting them as dropped (``rejected``)."""
        self._delete(ids, "rejected")

    # -- diagnostics --------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Messages dropped for any reason, over the life of the file."""
        with self._lock:
            return sum(self._dropped.values())

    @property
    def dropped_since_open(self) -> int:
        """Messages dropped for any reason since :meth:`open` (this run of the agent)."""
        with self._lock:
            return sum(self._dropped.values()) - self._dropped_at_open

    def puts(self, topic: str) -> int:
        """Messages offered on ``topic`` through this object (stored or dropped): what the agent
        produced in this run, for the account it gives when it stops."""
        with self._lock:
            return self._puts[topic]

    def stats(self) -> dict[str, Any]:
        """Pending count and bytes, drops by reason, the oldest message's age, durability."""
        with self._lock:
            oldest: float | None = None
            if self._db is not None:
                try:
                    row = self._db.execute(
                        "SELECT created FROM messages ORDER BY id LIMIT 1"
                    ).fetchone()
                except sqlite3.Error:
                    row = None
                if row is not None:
                    oldest = max(self._clock() - float(row[0]), 0.0)
            return {
                "pending": self._count,
                "pending_bytes": self._bytes,
                **{f"dropped_{reason}": n for reason, n in self._dropped.items()},
                "oldest_age_s": oldest,
                "durable": self._durable and self._db is not None,
            }

    # -- internals (all called with the lock held) --------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; on failure the in-memory totals are rolled back with it."""
        db = self._db
        assert db is not None
        saved = (self._count, self._bytes, self._last_id, dict(self._dropped), self._dirty)
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            if self._dirty:
                db.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(f"dropped_{reason}", n) for reason, n in self._dropped.items()],
                )
            db.execute("COMMIT")
            self._dirty = False
        except BaseException:
            if db.in_transaction:  # SQLite may already have rolled back (e.g. on SQLITE_FULL)
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            self._count, self._bytes, self._last_id, self._dropped, self._dirty = saved
            raise

    def _has_expired(self, db: sqlite3.Connection, now: float) -> bool:
        cutoff = now - self.max_age_s
        return (
            db.execute("SELECT 1 FROM messages WHERE created < ? LIMIT 1", (cutoff,)).fetchone()
            is not None
        )

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        """Delete messages older than ``max_age_s`` (a clock set back expires nothing)."""
        cutoff = now - self.max_age_s
        count, freed = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE created < ?", (cutoff,)
        ).fetchone()
        if count:
            db.execute("DELETE FROM messages WHERE created < ?", (cutoff,))
            self._count -= count
            self._bytes -= freed
            self._drop("age", count)
            self._warn(
                "age",
                "outbox: dropped %d message(s) older than %.0f s (%d for age so far)",
                count,
                self.max_age_s,
                self._dropped["age"],
            )

    def _make_room(self, db: sqlite3.Connection, size: int) -> None:
        """Delete the oldest messages until ``size`` more bytes fit."""
        excess = self._bytes + size - self.max_bytes
        if excess <= 0:
            return
        freed = count = last = 0
        for row_id, row_size in db.execute("SELECT id, size FROM messages ORDER BY id"):
            freed += row_size
            count += 1
            last = row_id
            if freed >= excess:
                break
        db.execute("DELETE FROM messages WHERE id <= ?", (last,))
        self._count -= count
        self._bytes -= freed
        self._drop("size", count)
        self._warn(
            "size",
            "outbox is full (%d bytes): dropped the %d oldest message(s) (%d for size so far)",
            self.max_bytes,
            count,
            self._dropped["size"],
        )

    def _delete(self, ids: Sequence[int], reason: str | None) -> None:
        if not ids:
            return
        with self._lock:
            if self._db is None:
                return
            try:
                with self._transaction() as db:
                    for start in range(0, len(ids), 500):
                        part = list(ids[start : start + 500])
                        marks = ",".join("?" * len(part))
                        count, freed = db.execute(
                            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages "
                            f"WHERE id IN ({marks})",
                            part,
                        ).fetchone()
                        db.execute(f"DELETE FROM messages WHERE id IN ({marks})", part)
                        self._count -= count
                        self._bytes -= freed
                        if reason is not None and count:
                            self._drop(reason, count)
            except sqlite3.Error as exc:
                # The messages stay and are sent again: a duplicate, never a loss.
                self._failed(exc, "delete sent messages")

    def _save_counters(self) -> None:
        """Write changed drop counters now (they are otherwise written with the next change)."""
        if self._dirty and self._db is not None:
            with contextlib.suppress(sqlite3.Error), self._transaction():
                pass

    def _drop(self, reason: str, count: int) -> None:
        self._dropped[reason] += count
        self._dirty = True

    def _failed(self, exc: sqlite3.Error, doing: str) -> None:
        if _is_corrupt(exc):
            self._recover(exc)
        else:
            self._warn("disk", "outbox %s: cannot %s: %s", self.path, doing, exc)

    def _warn(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning(message, *args)

    def _recover(self, exc: BaseException) -> None:
        """The file went bad while open: set it aside and go on with an empty one."""
        log.error(
            "outbox %s is corrupt (%s); setting it aside and starting an empty one; "
            "the messages it held are lost",
            self.path,
            exc,
        )
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._set_aside()
        self._attach(recovering=True)

    def _attach(self, *, recovering: bool) -> None:
        """Connect to the file, setting a corrupt one aside; fall back to memory if need be."""
        try:
            self._connect(str(self.path), recovering)
            self._durable = True
            return
        except (sqlite3.Error, _Unusable, OSError) as exc:
            error: BaseException = exc
            if _is_corrupt(exc) and not recovering:
                log.error(
                    "outbox %s is unreadable (%s); setting it aside and starting an empty one",
                    self.path,
                    exc,
                )
                self._set_aside()
                try:
                    self._connect(str(self.path), recovering)
                    self._durable = True
                    return
                except (sqlite3.Error, _Unusable, OSError) as again:
                    error = again
        log.error(
            "cannot use the outbox %s (%s); buffering in memory until the agent restarts",
            self.path,
            error,
        )
        self._connect(":memory:", True)
        self._durable = False

    def _connect(self, name: str, keep_counters: bool) -> None:
        if name != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(name, isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute(f"PRAGMA journal_size_limit={4 * MiB}")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise _Unusable(f"integrity check failed: {check[0] if check else 'no answer'}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise _Unusable(f"unknown outbox schema version {version}")
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            count, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages"
            ).fetchone()
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
            last_id = int(row[0]) if row else 0
            if last_id < self._last_id:
                # A replacement file: continue the ids, so a late ack of an old id cannot
                # delete a new message.
                db.execute("DELETE FROM sqlite_sequence WHERE name = 'messages'")
                db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)",
                    (self._last_id,),
                )
                last_id = self._last_id
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except BaseException:
            db.close()
            raise
        self._db = db
        self._count, self._bytes, self._last_id = int(count), int(size), last_id
        if keep_counters:
            self._dirty = True  # write what we counted so far into the new file
        else:
            self._dropped = {r: int(stored.get(f"dropped_{r}", 0)) for r in DROP_REASONS}
            self._dirty = False

    def _set_aside(self) -> None:
        """Rename the file (and its WAL and shared-memory files) to ``*.corrupt-<UTC time>``."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm"):
            source = self.path.with_name(self.path.name + suffix)
            if not source.exists():
                continue
            try:
                source.rename(target.with_name(target.name + suffix))
            except OSError as exc:
                log.error("cannot set aside %s (%s); deleting it", source, exc)
                with contextlib.suppress(OSError):
                    source.unlink()


class PublishHandle(Protocol):
    """What a publish returns (paho's ``MQTTMessageInfo`` is one; so is the link's Delivery).

    A handle may also have a true attribute ``resent_on_reconnect``: the MQTT client keeps the
    message until its PUBACK and sends it again itself after a reconnect (paho does, for QoS 1).
    """

    def is_published(self) -> bool: ...


def _client_resends(handle: PublishHandle) -> bool:
    return bool(getattr(handle, "resent_on_reconnect", False))


class OutboxSender:
    """Sends the outbox oldest first, at most ``window`` unconfirmed, and acks confirmed ones.

    ``publish(topic, payload)`` must send with QoS 1 and return a handle whose
    ``is_published()`` turns true on the PUBACK; ``connected()`` says whether the link is up.
    Call :meth:`pump` often from one thread, and :meth:`reset` when the link (re)connects.

    After a disconnect, unconfirmed messages are sent again from the oldest, except those whose
    handle says the client resends them itself (``resent_on_reconnect``): the sender keeps
    waiting for their PUBACK. Sending those too put every message of a stalled link on the wire
    twice after the reconnect, once from paho and once from here (tests/faults/test_network_cut).

    :meth:`hold` and :meth:`release` follow the controller's presence (agent.protocol
    ControllerState): while held nothing new is sent, and what the broker confirms is kept in
    the outbox, because a broker that restarted without persistence confirms messages that no
    subscriber receives. :meth:`release` then acks them (the controller's subscription never
    lapsed) or sends everything unacknowledged again from the oldest (it lapsed; the controller
    de-duplicates on (session, seq)).
    """

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[str, bytes], PublishHandle],
        connected: Callable[[], bool],
    ) -> None:
        self._outbox = outbox
        self._publish = publish
        self._connected = connected
        self._in_flight: list[tuple[Entry, PublishHandle]] = []
        self._resend = threading.Event()
        self._lock = threading.Lock()
        self._held = False
        self._release: bool | None = None  # pending release: whether the subscription lapsed
        self._limbo: list[int] = []  # confirmed by the broker while held

    @property
    def held(self) -> bool:
        return self._held

    def hold(self) -> None:
        """The controller may not be subscribed: send nothing new (safe from any thread)."""
        with self._lock:
            self._held, self._release = True, None

    def release(self, lapsed: bool) -> None:
        """The controller is subscribed; ``lapsed``: its subscription lapsed while held."""
        with self._lock:
            if self._held:
                self._held, self._release = False, lapsed

    @property
    def in_flight(self) -> int:
        """Messages sent and not yet confirmed."""
        return len(self._in_flight)

    def reset(self) -> None:
        """Resend every unconfirmed message on the next pump (safe from any thread)."""
        self._resend.set()

    def pump(self, window: int) -> int:
        """Ack what the broker confirmed, then send what fits the window; return acks."""
        if window < 1:
            raise ValueError("window must be at least 1")
        with self._lock:
            held, released, self._release = self._held, self._release, None
        if released is not None:
            if released:  # what the broker confirmed went nowhere: all again from the oldest
                self._limbo.clear()
                self._in_flight = []
            else:
                self._outbox.ack(self._limbo)
                self._limbo.clear()
        confirmed: list[int] = []
        waiting: list[tuple[Entry, PublishHandle]] = []
        first_broken: int | None = None
        for entry, handle in self._in_flight:
            try:
                done = handle.is_published()
            except (RuntimeError, ValueError) as exc:
                # paho: the message was never queued (or not while connected): send it again.
                log.debug("outbox: resending message %d: %s", entry.id, exc)
                done = False
                if first_broken is None:
                    first_broken = len(waiting)
            if done:
                confirmed.append(entry.id)
            else:
                waiting.append((entry, handle))
        if held:
            self._limbo.extend(confirmed)
        else:
            self._outbox.ack(confirmed)
        self._in_flight = waiting
        connected = self._connected() and not held
        if first_broken is not None or self._resend.is_set() or not connected:
            # Start again from the oldest unconfirmed message the client will not resend by
            # itself, so the order holds and nothing goes out twice.
            self._resend.clear()
            keep = 0
            for _, handle in waiting:
                if keep == first_broken or not _client_resends(handle):
                    break
                keep += 1
            self._in_flight = waiting[:keep]
            if not connected:
                return len(confirmed)
        room = window - len(self._in_flight)
        after = self._in_flight[-1][0].id if self._in_flight else 0
        if room > 0 and self._outbox.has_after(after):
            for entry in self._outbox.pending(room, after=after):
                try:
                    handle = self._publish(entry.topic, entry.payload)
                except ValueError as exc:  # paho: an invalid topic or an oversized payload
                    log.error("outbox: dropped unsendable message on %s: %s", entry.topic, exc)
                    self._outbox.reject([entry.id])
                    continue
                self._in_flight.append((entry, handle))
        return len(confirmed)
