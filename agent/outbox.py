"""A bounded, durable, ordered outbox for the agent's QoS 1 messages (telemetry and events).

Every message is appended to an SQLite file (WAL mode) in the agent's state dir before it is
sent, so a broker outage or an agent restart loses nothing that fits the bounds. The bounds
are a total size (topics + payloads; the oldest messages go first) and an age; every message
dropped is counted by reason (``size``: over the size bound; ``age``: too old; ``disk``: could
not be stored, e.g. a full disk; ``rejected``: the MQTT client or the controller refused it
for good), and the counts survive restarts. :class:`OutboxSender` sends the outbox oldest
first with at most ``window`` messages the controller has not acknowledged, and deletes a
message only once the controller says it stored it (protocol.Stored: an end-to-end
acknowledgement, not the broker's PUBACK); what stays unacknowledged is sent again. Duplicates
are possible by design: the controller de-duplicates telemetry on (session, seq), and events
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
from pathlib import Path
from typing import Any, Literal

import msgspec
import msgspec.json

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 16 * MiB
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DROP_REASONS = ("size", "age", "disk", "rejected")
WARN_EVERY_S = 60.0  # each kind of recurring storage warning is logged at most this often
SCHEMA_VERSION = 2  # 2: the key column (the envelope id the controller acknowledges)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    key TEXT
);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

# SQLite primary result codes (extended codes carry them in the low byte).
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


class Entry(msgspec.Struct, frozen=True):
    """One stored message; ``id`` grows with every put and is never reused; ``key`` is the
    envelope id the controller names when it has stored the message (protocol.Stored)."""

    id: int
    topic: str
    payload: bytes
    created: float
    key: str


class _Unusable(Exception):
    """The file opened but is not an outbox we can use (corrupt, or an unknown schema)."""


def _payload_id(payload: bytes) -> str:
    """The JSON ``id`` of a payload stored without a key (a schema 1 file), or ``""``."""
    try:
        value = msgspec.json.decode(payload).get("id")
    except (ValueError, AttributeError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""


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
        self._sent_unstored = 0  # could not be stored, sent by the fallback instead
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

    def put(
        self,
        topic: str,
        payload: bytes,
        key: str = "",
        *,
        fallback: Callable[[], bool] | None = None,
    ) -> None:
        """Append one message; drop the oldest (counted) to stay within the bounds. ``key``:
        the id the controller acknowledges it by (by default the payload's JSON ``id``).
        ``fallback``: called when the message cannot be stored (a full disk); True if it sent
        the message another way (counted as ``sent_unstored``, not dropped)."""
        size = len(topic.encode()) + len(payload)
        with self._lock:
            self._puts[topic] += 1
            if self._db is None:
                if not self._sent_instead(fallback):
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
                            "INSERT INTO messages (topic, payload, created, size, key) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (topic, payload, now, size, key or None),
                        )
                        self._count += 1
                        self._bytes += size
                        self._last_id = max(self._last_id, cursor.lastrowid or 0)
                    return
                except sqlite3.Error as exc:
                    if attempt == 1 and _is_corrupt(exc):
                        self._recover(exc)
                        continue
                    if self._sent_instead(fallback):
                        self._warn(
                            "unstored",
                            "cannot store a message in the outbox %s (%s); sent it unstored "
                            "(%d so far)",
                            self.path,
                            exc,
                            self._sent_unstored,
                        )
                        return
                    self._drop("disk", 1)
                    self._warn(
                        "disk",
                        "cannot store a message in the outbox %s (%s) nor send it; dropped it "
                        "(%d dropped for this reason so far)",
                        self.path,
                        exc,
                        self._dropped["disk"],
                    )
                    return

    def _sent_instead(self, fallback: Callable[[], bool] | None) -> bool:
        """Called with the lock held; the fallback must not call back into the outbox."""
        if fallback is not None and fallback():
            self._sent_unstored += 1
            return True
        return False

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
                    "SELECT id, topic, payload, created, key FROM messages WHERE id > ? "
                    "ORDER BY id LIMIT ?",
                    (after, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                self._failed(exc, "read")
                return []
        return [
            Entry(int(i), str(t), bytes(p), float(c), k or _payload_id(bytes(p)))
            for i, t, p, c, k in rows
        ]

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
                "sent_unstored": self._sent_unstored,
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
            if version not in (0, 1, SCHEMA_VERSION):
                raise _Unusable(f"unknown outbox schema version {version}")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(messages)")}
            if "key" not in columns:  # a schema 1 file: its messages are keyed by their payload
                db.execute("ALTER TABLE messages ADD COLUMN key TEXT")
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


ACK_TIMEOUT_S = (10.0, 120.0)  # first and longest wait for the controller's Stored


class OutboxSender:
    """Sends the outbox oldest first, at most ``window`` messages the controller has not yet
    said it stored, and deletes each one when it does (protocol.Stored, via :meth:`stored`).

    ``publish(topic, payload)`` sends with QoS 1 (the MQTT client keeps the message through a
    reconnect and sends it again itself); ``connected()`` says whether the link is up. Call
    :meth:`pump` often from one thread; :meth:`stored`, :meth:`hold`, :meth:`release` and
    :meth:`reset` are safe from any thread.

    A broker's PUBACK deletes nothing: a broker restarted without persistence, or one whose
    controller has not subscribed yet, acknowledges messages it hands to nobody. What the
    controller has not acknowledged is sent again, from the oldest, in order:

    - when the controller's presence shows a connection of it this sender has not seen
      (``release(resend=True)``): a subscription that lapsed, or a controller seen for the first
      time, got nothing of what the broker took before;
    - when the oldest unacknowledged message waited ``ack_timeout_s[0]`` while the link was up
      and the controller online (a Stored lost, a controller that lost messages); the wait
      doubles, up to ``ack_timeout_s[1]``, each time it runs out, and starts again at the first
      once an acknowledgement comes.

    A reconnect alone sends nothing again, it only restarts the clock: the MQTT client resends
    what the broker had not confirmed, and doing it here as well put every message of a stalled
    link on the wire twice (tests/faults/test_network_cut). Duplicates remain possible (a late
    acknowledgement); the controller stores a message once and names it again.

    While :meth:`hold` (the controller is offline) nothing new is sent and no clock runs.
    """

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[str, bytes], object],
        connected: Callable[[], bool],
        *,
        ack_timeout_s: tuple[float, float] = ACK_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outbox = outbox
        self._publish = publish
        self._connected = connected
        self._clock = clock
        self._timeouts = ack_timeout_s
        self._timeout = ack_timeout_s[0]
        self._sent: dict[str, tuple[int, float]] = {}  # key -> (outbox id, sent at), in order
        self._last_sent = 0  # outbox id of the newest message sent
        self._lock = threading.Lock()
        self._acked: list[str] = []
        self._refused: list[str] = []
        self._held = False
        self._resend = False
        self._paused = True  # the clocks must start again when sending resumes

    @property
    def held(self) -> bool:
        return self._held

    @property
    def in_flight(self) -> int:
        """Messages sent and not yet acknowledged by the controller."""
        return len(self._sent)

    def stored(self, ids: Sequence[str], rejected: Sequence[str] = ()) -> None:
        """The controller stored ``ids`` and refused ``rejected`` for good (protocol.Stored)."""
        with self._lock:
            self._acked.extend(ids)
            self._refused.extend(rejected)

    def hold(self) -> None:
        """The controller is offline: send nothing new until :meth:`release`."""
        with self._lock:
            self._held = True

    def release(self, resend: bool) -> None:
        """The controller is online; ``resend``: on a connection this sender has not seen, so
        everything unacknowledged goes again from the oldest."""
        with self._lock:
            self._held = False
            self._resend |= resend

    def reset(self) -> None:
        """The link connected again: the clocks of the unacknowledged messages start again."""
        with self._lock:
            self._paused = True

    def pump(self, window: int) -> int:
        """Delete what the controller acknowledged, then send what fits the window; return the
        number of messages acknowledged."""
        if window < 1:
            raise ValueError("window must be at least 1")
        with self._lock:
            acked, self._acked = self._acked, []
            refused, self._refused = self._refused, []
            held, resend, paused = self._held, self._resend, self._paused
        done = self._settle(acked, refused)
        if held or not self._connected():
            with self._lock:
                self._paused = True
            return done
        now = self._clock()
        with self._lock:
            self._resend = self._paused = False
        if paused:
            self._sent = {key: (row, now) for key, (row, _) in self._sent.items()}
        elif self._sent and now - next(iter(self._sent.values()))[1] >= self._timeout:
            log.info(
                "outbox: the controller acknowledged none of %d message(s) in %.0f s; "
                "sending them again",
                len(self._sent),
                self._timeout,
            )
            self._timeout = min(self._timeout * 2, self._timeouts[1])
            resend = True
        if resend:
            self._sent.clear()
            self._last_sent = 0
        room = window - len(self._sent)
        if room > 0 and self._outbox.has_after(self._last_sent):
            for entry in self._outbox.pending(room, after=self._last_sent):
                self._last_sent = entry.id
                if not entry.key:
                    log.error("outbox: dropped a message on %s that names no id", entry.topic)
                    self._outbox.reject([entry.id])
                    continue
                try:
                    self._publish(entry.topic, entry.payload)
                except ValueError as exc:  # paho: an invalid topic or an oversized payload
                    log.error("outbox: dropped unsendable message on %s: %s", entry.topic, exc)
                    self._outbox.reject([entry.id])
                    continue
                self._sent[entry.key] = (entry.id, now)
        return done

    def _settle(self, acked: list[str], refused: list[str]) -> int:
        """Delete acknowledged messages; drop (counted) those the controller refused."""
        if not acked and not refused:
            return 0
        stored = [self._sent.pop(key)[0] for key in acked if key in self._sent]
        bad = [self._sent.pop(key)[0] for key in refused if key in self._sent]
        if bad:
            log.error("outbox: the controller refused %d message(s) for good; dropped", len(bad))
        self._outbox.ack(stored)
        self._outbox.reject(bad)
        if stored or bad:
            self._timeout = self._timeouts[0]
        return len(stored) + len(bad)
