"""Pulling one model artifact in chunks, streamed to disk and resumable after any interruption.

The agent asks the controller for windows of chunks (``BlobRequest``) and writes every chunk
at its offset in ``<sha256>.part``; a sidecar ``<sha256>.chunks`` records which chunks are on
disk (written after the data is fsynced, every ``RECORD_BYTES`` or ``FLUSH_PERIOD_S``), so a
restart or a reconnect only asks for what is missing. The finished file is checked against the
announced sha256 and size before it is renamed into place; nothing unverified is ever loaded.

Disk work stays off the receive path. Every ``FLUSH_BYTES`` (or ``FLUSH_PERIOD_S``) a
background thread fsyncs what was written and feeds the chunks that now form an unbroken
prefix to a running sha256 (read back from the page cache); every fourth flush (or one a
period after the last) also writes the sidecar. A chunk's arrival costs one ``pwrite``; when
the last one lands only the tail is left to sync and hash. Done on the worker thread, every
16th chunk blocked it for a 4 MiB fsync (~14 ms) and the whole file was read and hashed again
at the end (~60 ms for 20 MiB on a 2-core EPYC): a third of the transfer time
(benchmarks/README.md, "Model push").

Nor does the window wait for the disk: a chunk leaves it when it arrives (:meth:`Download.arrived`,
on the network thread), not when the worker has written it, so the next request goes out at
once; a whole window of chunks waiting to be written holds requests back instead.

Chunks come on the artifact's shared topic (``gf/blobs/v1/{sha256}/{index}``, fanned out by the
broker to every agent fetching it; controller/blobs.py), so some arrive that this agent did not
ask for, or already has: :meth:`Download.accept` writes a chunk once and ignores repeats.

A full disk is a :class:`NoSpaceError` (an ``OSError`` with ENOSPC) whose message says how much
the download still needs, how much is free and what to do; it is raised by :meth:`Download.open`
when the rest of the artifact cannot fit, and by :meth:`Download.accept` when a write fails for
lack of space. The caller then discards the partial file (:meth:`Download.discard`), which
gives the space back (tests/faults/test_disk_full.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec.json

from agent.errors import IntegrityError, TransferError
from agent.protocol import BLOB_ROOT, Artifact, shared_blob_topic

FLUSH_BYTES = 1 << 20  # bytes between background flushes (fsync): the tail left to sync at the end
RECORD_BYTES = 4 << 20  # bytes between sidecar writes: a crash re-fetches at most this...
FLUSH_PERIOD_S = 1.0  # ...or at most this many seconds' worth, for slow links

log = logging.getLogger(__name__)


class _Flusher:
    """One long-lived daemon thread that runs the background flushes, one at a time (an agent
    fetches one download at a time). Starting a thread per flush cost the receive path up to
    ~20 ms each time: Thread.start() waits for the new thread to take the GIL, which paho's
    network thread holds while it reads."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> threading.Event:
        """Queue ``job``; the event is set once it has run."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="gf-download-flush", daemon=True
                )
                self._thread.start()
        done = threading.Event()
        self._jobs.put((job, done))
        return done

    def _run(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                job()
            except Exception:  # the job keeps what it expects; this thread serves the next
                log.exception("background flush failed")
            finally:
                done.set()


_FLUSHER = _Flusher()


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class NoSpaceError(OSError):
    """The disk that holds a download is full; ``str()`` is the whole message for an operator."""

    def __init__(
        self, directory: Path, needed: int, free: int | None, total: int | None = None
    ) -> None:
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        self.directory, self.needed, self.free = directory, needed, free
        if total is not None and needed > total:  # no freeing of space will ever make it fit
            self.message = (
                f"the model needs {needed:,} bytes, more than the whole {total:,}-byte disk "
                f"holding {directory} ({free:,} free): deploy a smaller model or variant"
            )
            return
        self.message = (
            f"the disk holding {directory} is full: the model needs {needed:,} more bytes"
            + (f" and {free:,} are free" if free is not None else "")
            + ". Free space on that disk (other files, or models this device no longer needs) "
            "and deploy again"
        )

    def __str__(self) -> str:
        return self.message


def free_bytes(directory: Path) -> int | None:
    """Free space for an unprivileged writer in ``directory``, or None if it cannot be read.
    (os.statvfs, as shutil.disk_usage does: shutil would load the archive codecs, ~0.5 MiB of
    an agent that never packs an archive.)"""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def total_bytes(directory: Path) -> int | None:
    """The size of the file system holding ``directory``, or None if it cannot be read."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def request_batch(window: int) -> int:
    """The fewest chunks a request asks for while others are still in flight.

    Asking for each chunk as the one before lands costs a request, a SUBSCRIBE and an
    UNSUBSCRIBE per chunk at every hop (agent, broker, controller); waiting for half of the
    window to free cuts those messages eightfold (to 0.375 per chunk at every hop) and keeps at
    least half of it in flight. A quarter kept more in flight, which mattered while requests
    waited for the worker to write the chunks before them; asked for from the network thread as
    chunks land (Download.arrived), half a window (2 MiB by default) outlasts a request's trip,
    and on a 2-core host the messages saved were worth more (benchmarks/README.md, "Model push:
    issue 14, item 1"). A link whose round trip is longer than half a window takes to arrive
    (2 MiB at 10 MB/s: 0.2 s) no longer keeps the whole window busy.
    """
    return max(1, window // 2)


class Download:
    """One artifact being assembled in ``directory``; survives process restarts."""

    def __init__(
        self,
        directory: Path,
        artifact: Artifact,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.artifact = artifact
        self.part = directory / f"{artifact.sha256}.part"
        self.sidecar = directory / f"{artifact.sha256}.chunks"
        self._clock = clock
        # Flow control is shared by two threads: the network thread counts a chunk as arrived
        # (:meth:`arrived`) and asks for the next ones at once; the worker writes it.
        self._lock = threading.Lock()
        self._received: set[int] = set()  # on disk (written; durable after the next flush)
        self._arrived: set[int] = set()  # arrived, not yet written by the worker
        self._in_flight: dict[int, float] = {}
        self._last_arrival = float("-inf")  # any chunk of this artifact, wanted or not
        self._unflushed = 0  # bytes written since the last flush started
        self._flushed_at = clock()
        self._fh: int | None = None
        # Owned by the flusher (one at a time; the caller's thread after wait_flushed()):
        self._flusher: threading.Event | None = None  # set once the flush has run
        self._closing = False  # close() is under way: a background flush writes no sidecar
        # The sidecar last written lists this many chunks, written at this time (flusher):
        self._recorded = 0
        self._recorded_at = clock()
        self._flush_error: OSError | IntegrityError | None = None
        self._digest = hashlib.sha256()
        self._hashed = 0  # chunks 0 .. _hashed - 1 are in _digest

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> int:
        """Create or resume the partial file; return how many chunks are already on disk.

        NoSpaceError (nothing is left on disk) if the rest of the artifact cannot fit: refusing
        now beats failing halfway through the transfer.
        """
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self._received = self._load_sidecar() if self.part.exists() else set()
        free = free_bytes(self.part.parent)
        if free is not None and free < self._missing_bytes():
            needed = self._missing_bytes()
            self.discard()
            raise NoSpaceError(self.part.parent, needed, free, total_bytes(self.part.parent))
        self._fh = os.open(self.part, os.O_RDWR | os.O_CREAT, 0o644)
        self._closing = False
        self._recorded, self._recorded_at = len(self._received), self._clock()
        try:
            os.ftruncate(self._fh, self.artifact.size)  # sparse where the filesystem allows
        except OSError as exc:
            self.discard()
            if exc.errno in NO_SPACE:  # a filesystem without sparse files (FAT on an SD card)
                raise self._no_space() from exc
            raise
        except OverflowError:
            self.discard()
            raise
        return len(self._received)

    def _chunk_length(self, index: int) -> int:
        size, count = self.artifact.chunk_size, self.artifact.chunk_count
        return size if index < count - 1 else self.artifact.size - size * (count - 1)

    def _missing_bytes(self) -> int:
        """Bytes still to be written (the last chunk may be short; close enough for a check)."""
        return max(self.artifact.size - len(self._received) * self.artifact.chunk_size, 0)

    def _no_space(self) -> NoSpaceError:
        return NoSpaceError(self.part.parent, self._missing_bytes(), free_bytes(self.part.parent))

    def _load_sidecar(self) -> set[int]:
        try:
            state = msgspec.json.decode(self.sidecar.read_bytes())
        except (OSError, ValueError):
            return set()
        if not isinstance(state, dict) or state.get("chunk_size") != self.artifact.chunk_size:
            return set()
        count = self.artifact.chunk_count
        return {i for i in state.get("received", []) if isinstance(i, int) and 0 <= i < count}

    def _flush(
        self,
        fh: int,
        received: frozenset[int],
        record: bool = True,
        synced: bool = False,
        background: bool = False,
    ) -> None:
        """Make the chunks in ``received`` durable (``synced``: the caller has fsynced them),
        hash the unbroken prefix they complete and (``record``) list them in the sidecar: a
        chunk is listed only once its bytes are on disk. A ``background`` flush writes the
        sidecar only once ``RECORD_BYTES`` or ``FLUSH_PERIOD_S`` have passed since the last
        one, and never while the download closes (:meth:`close` writes it, or renames the
        file). Written after every 1 MiB flush, the sidecar (a new file and a rename, each a
        journal entry for the next fsync) cost the 20 MiB push 8 ms of CPU in 20 writes."""
        if not synced:
            os.fsync(fh)
        size, count = self.artifact.chunk_size, self.artifact.chunk_count
        while self._hashed < count and self._hashed in received:
            expected = self._chunk_length(self._hashed)
            data = os.pread(fh, expected, self._hashed * size)
            if len(data) != expected:
                raise IntegrityError(f"{self.part} is shorter than announced; it was discarded")
            self._digest.update(data)
            self._hashed += 1
        if record and (not background or self._record_due(received)):
            tmp = self.sidecar.with_suffix(".chunks.tmp")
            tmp.write_bytes(msgspec.json.encode({"chunk_size": size, "received": sorted(received)}))
            os.replace(tmp, self.sidecar)
            self._recorded, self._recorded_at = len(received), self._clock()

    def _record_due(self, received: frozenset[int]) -> bool:
        """Whether a background flush of ``received`` writes the sidecar."""
        if self._closing:
            return False
        fresh = (len(received) - self._recorded) * self.artifact.chunk_size
        return fresh >= RECORD_BYTES or self._clock() - self._recorded_at >= FLUSH_PERIOD_S

    def _flush_in_background(self) -> None:
        """Start a flush of what is written so far, unless one is still running (the next
        chunk tries again)."""
        if self._fh is None or (self._flusher is not None and not self._flusher.is_set()):
            return
        fh, received = self._fh, frozenset(self._received)
        self._unflushed = 0
        self._flushed_at = self._clock()

        def flush() -> None:
            try:
                self._flush(fh, received, background=True)
            except (OSError, IntegrityError) as exc:  # the next accept() or close() raises it
                self._flush_error = exc

        self._flusher = _FLUSHER.submit(flush)

    def wait_flushed(self) -> None:
        """Wait for a background flush to end; raise what it failed with: an OSError (a full
        disk as NoSpaceError) or an IntegrityError (the file shrank under us)."""
        if self._flusher is not None:
            self._flusher.wait()  # flush() keeps its error in _flush_error
            self._flusher = None
        error, self._flush_error = self._flush_error, None
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            raise self._no_space() from error
        if error is not None:
            raise error

    def close(self, record: bool = True) -> None:
        """Flush progress so a later ``open`` resumes from here (``record=False``: sync and
        hash only, for a file about to be verified and renamed).

        The final fsync does not wait for a background flush still syncing an earlier part:
        both run at once (an fsync covers every write before it), and only the hashing, which
        must go in file order, waits for that flush to end. One at a time, they cost a transfer
        two disk syncs in a row (4-20 ms each here) after its last chunk.
        """
        if self._fh is None:
            return
        self._closing = True
        try:
            received = frozenset(self._received)
            try:
                os.fsync(self._fh)
            finally:
                self.wait_flushed()  # never hash (or close the file) beside a running flush
            self._flush(self._fh, received, record, synced=True)
        finally:
            os.close(self._fh)
            self._fh = None

    def discard(self) -> None:
        """Forget everything fetched so far and give its disk space back (after an integrity
        failure, a full disk, a failed deploy); never raises for a file already gone."""
        with contextlib.suppress(OSError, TransferError):
            self.wait_flushed()  # never close the file under a running flush
        if self._fh is not None:
            with contextlib.suppress(OSError):
                os.close(self._fh)
            self._fh = None
        for path in (self.part, self.sidecar, self.sidecar.with_suffix(".chunks.tmp")):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        with self._lock:
            self._received.clear()
            self._arrived.clear()
            self._in_flight.clear()
        self._digest, self._hashed = hashlib.sha256(), 0

    # -- flow control -------------------------------------------------------------------------

    @property
    def received(self) -> int:
        return len(self._received)

    @property
    def complete(self) -> bool:
        return len(self._received) == self.artifact.chunk_count

    def requests(self, window: int, timeout_s: float) -> list[tuple[int, int]]:
        """Ranges ``(first, count)`` to ask for now, keeping at most ``window`` chunks in flight.

        Any thread may call this (the worker, and the network thread as chunks arrive).

        A chunk is in flight from the request until it arrives (:meth:`arrived`, or
        :meth:`accept` for a caller that does not count arrivals). Chunks asked for more than
        ``timeout_s`` ago without arriving are asked for again (a lost message, a broker
        restart), but only once no chunk at all has arrived for ``timeout_s``: while chunks keep
        coming the rest are queued behind them (a slow link, a busy broker), and asking again
        would only have them published and delivered twice. Ranges are contiguous runs of
        missing chunks. While chunks are in flight, nothing is asked until half of the window is
        free (:func:`request_batch`). Nothing is asked either while a whole window of
        arrived chunks waits to be written: a slow disk holds the transfer back, and the agent
        never holds more than two windows of chunks in memory.
        """
        with self._lock:
            now = self._clock()
            stalled = now - self._last_arrival > timeout_s
            for index, asked in list(self._in_flight.items()):
                if stalled and now - asked > timeout_s:
                    del self._in_flight[index]
            budget = window - len(self._in_flight)
            if self._in_flight and budget < request_batch(window):
                return []
            if len(self._arrived) >= window:
                return []
            wanted: list[int] = []
            if budget > 0:
                for index in range(self.artifact.chunk_count):
                    if (
                        index not in self._received
                        and index not in self._in_flight
                        and index not in self._arrived
                    ):
                        wanted.append(index)
                        if len(wanted) == budget:
                            break
            ranges: list[tuple[int, int]] = []
            for index in wanted:
                self._in_flight[index] = now
                if ranges and ranges[-1][0] + ranges[-1][1] == index:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
                else:
                    ranges.append((index, 1))
            return ranges

    def reset_in_flight(self) -> None:
        """Forget outstanding requests (after a reconnect they will not be answered)."""
        with self._lock:
            self._in_flight.clear()

    def _check(self, index: int, length: int) -> None:
        """TransferError unless chunk ``index`` exists and has ``length`` bytes."""
        count = self.artifact.chunk_count
        if not 0 <= index < count:
            raise TransferError(
                f"chunk {index} is out of range: artifact {self.artifact.sha256[:12]} has "
                f"{count} chunks"
            )
        expected = self._chunk_length(index)
        if length != expected:
            raise TransferError(
                f"chunk {index} of {self.artifact.sha256[:12]} has {length} bytes, "
                f"expected {expected}"
            )

    def arrived(self, index: int, length: int) -> bool:
        """Network thread: chunk ``index`` (``length`` bytes) came and is queued for
        :meth:`accept`; it leaves the window now, so the next request need not wait for the
        worker to write it. False (nothing changes) for a chunk that does not fit the artifact
        (accept() refuses it, and it is asked again after a stall) or is already here."""
        try:
            self._check(index, length)
        except TransferError:
            return False
        with self._lock:
            self._last_arrival = self._clock()
            if index in self._received or index in self._arrived:
                return False
            self._in_flight.pop(index, None)
            self._arrived.add(index)
            return True

    def accept(self, index: int, data: bytes) -> bool:
        """Write chunk ``index``; return False for a duplicate.

        TransferError if the chunk does not fit the artifact; NoSpaceError if the disk is full;
        another OSError if the disk fails otherwise. After an OSError, :meth:`discard`. A chunk
        that could not be written leaves the arrived set, so it is asked for again after a
        stall instead of being waited for forever.
        """
        try:
            return self._write(index, data)
        except BaseException:
            with self._lock:
                self._arrived.discard(index)
            raise

    def _write(self, index: int, data: bytes) -> bool:
        if self._fh is None:
            raise TransferError("download is not open")
        self._check(index, len(data))
        with self._lock:
            self._in_flight.pop(index, None)
            self._last_arrival = self._clock()
            if index in self._received:
                return False
        size = self.artifact.chunk_size
        try:
            if self._flush_error is not None:
                self.wait_flushed()  # raises what the background flush met
            written = 0
            while written < len(data):  # a nearly full disk may take part of a write
                written += os.pwrite(self._fh, data[written:], index * size + written)
            with self._lock:
                self._received.add(index)
                self._arrived.discard(index)
            self._unflushed += len(data)
            if self.complete:
                return True  # the last chunk: finish() syncs and hashes the rest at once
            if self._unflushed >= FLUSH_BYTES or self._clock() - self._flushed_at >= FLUSH_PERIOD_S:
                self._flush_in_background()
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise self._no_space() from exc
            raise
        return True

    def finish(self, destination: Path) -> Path:
        """Verify size and sha256 and move the file to ``destination`` atomically.

        The sha256 is the running one of the flushes (every chunk, read back from disk after
        its fsync, in order), so the file is not read again here.
        """
        if not self.complete:
            raise TransferError("download is not complete")
        try:
            self.close(record=False)  # the last flush hashes the tail
        except IntegrityError:
            self.discard()
            raise
        total = os.stat(self.part).st_size
        digest = self._digest.hexdigest()
        if total != self.artifact.size or digest != self.artifact.sha256:
            self.discard()
            raise IntegrityError(
                f"downloaded artifact does not match: sha256 {digest[:12]}..., "
                f"{total} bytes; expected {self.artifact.sha256[:12]}..., "
                f"{self.artifact.size} bytes. The file was discarded; check the model store."
            )
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.part, destination)
        fsync_dir(destination.parent)
        self.sidecar.unlink(missing_ok=True)
        return destination


Topics = Callable[[list[str]], object]  # one SUBSCRIBE or UNSUBSCRIBE for all of them


class ChunkTopics:
    """The shared chunk topics (``gf/blobs/v1/{sha256}/{index}``) one device is subscribed to.

    A device subscribes to the topic of each chunk just before it asks for it (same connection,
    in order: the broker has the subscription when the controller publishes) and drops it once
    the chunk has arrived, so a chunk the controller publishes again for a late device reaches
    only the devices still missing it. A single ``{sha256}/+`` filter per transfer sent every
    re-publish to every device still fetching: at 1,000 simulated devices the broker delivered
    the model ~17 times per device, and at 5,000 it ran out of memory. The agent and the fleet
    simulator both keep one of these.

    The topics of arrived chunks are dropped in one UNSUBSCRIBE with the next request's
    SUBSCRIBE (or when the transfer ends), not one packet per chunk.
    """

    def __init__(self, subscribe: Topics, unsubscribe: Topics):
        self._subscribe, self._unsubscribe = subscribe, unsubscribe
        self.topics: set[str] = set()
        self._arrived: list[str] = []  # still subscribed; dropped at the next asking()

    def asking(self, sha256: str, first: int, count: int) -> None:
        """About to ask for chunks ``first`` .. ``first + count - 1``: subscribe to each, again
        for a re-ask, because a SUBSCRIBE makes the broker send the chunk's retained copy
        (controller.blobs) and a chunk asked for again never came."""
        self._drop_arrived()
        topics = [shared_blob_topic(sha256, index) for index in range(first, first + count)]
        self.topics.update(topics)
        self._subscribe(topics)

    def arrived(self, sha256: str, index: int) -> None:
        """Chunk ``index`` came: stop following its topic (with the next request)."""
        topic = f"{BLOB_ROOT}/{sha256}/{index}"
        if topic in self.topics:
            self.topics.discard(topic)
            self._arrived.append(topic)

    def keep_only(self, sha256: str | None) -> None:
        """Drop the subscriptions of every artifact but ``sha256`` (all of them for None)."""
        keep = "" if sha256 is None else f"{BLOB_ROOT}/{sha256}/"
        gone = [t for t in self.topics if not (keep and t.startswith(keep))]
        self.topics.difference_update(gone)
        self._arrived.extend(gone)
        if gone or sha256 is None:
            self._drop_arrived()

    def _drop_arrived(self) -> None:
        if self._arrived:
            topics, self._arrived = self._arrived, []
            self._unsubscribe(topics)

    def forget(self) -> None:
        """The broker dropped them (a clean session reconnected): subscribe again on demand."""
        self.topics.clear()
        self._arrived.clear()
