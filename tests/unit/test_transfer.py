"""Chunked, resumable artifact download: ordering, windows, resume, and integrity."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from pathlib import Path

import msgspec
import pytest

from agent import transfer
from agent.errors import IntegrityError, TransferError
from agent.protocol import Artifact, ModelFormat
from agent.transfer import Download, NoSpaceError

DATA = os.urandom(10_000)
CHUNK = 1024  # 10 chunks, the last one 784 bytes


def artifact(data: bytes = DATA) -> Artifact:
    return Artifact(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        format=ModelFormat.ONNX,
        chunk_size=CHUNK,
    )


def chunk(i: int, data: bytes = DATA) -> bytes:
    return data[i * CHUNK : (i + 1) * CHUNK]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_chunks_in_any_order_assemble_the_verified_file(tmp_path: Path) -> None:
    dl = Download(tmp_path, artifact())
    assert dl.open() == 0
    for i in [9, 3, 0, 1, 2, 8, 7, 6, 5, 4]:
        assert dl.accept(i, chunk(i))
    assert not dl.accept(4, chunk(4)), "a duplicate chunk is ignored"
    out = dl.finish(tmp_path / "models" / "m.onnx")
    assert out.read_bytes() == DATA
    assert not dl.part.exists() and not dl.sidecar.exists()


def test_requests_keep_a_window_in_flight_and_re_ask_after_timeout(tmp_path: Path) -> None:
    clock = Clock()
    dl = Download(tmp_path, artifact(), clock=clock)
    dl.open()
    assert dl.requests(window=4, timeout_s=5) == [(0, 4)]
    assert dl.requests(window=4, timeout_s=5) == [], "window is full"
    dl.accept(0, chunk(0))
    dl.accept(2, chunk(2))
    assert dl.requests(window=4, timeout_s=5) == [(4, 2)]
    clock.now = 6.0  # nothing more arrived: every chunk in flight is asked for again
    assert dl.requests(window=4, timeout_s=5) == [(1, 1), (3, 3)]
    dl.accept(1, chunk(1))
    assert dl.requests(window=4, timeout_s=5) == [], "one slot free: not worth asking"
    dl.accept(3, chunk(3))
    assert dl.requests(window=4, timeout_s=5) == [(6, 2)]


def test_overdue_chunks_are_not_asked_again_while_others_keep_arriving(tmp_path: Path) -> None:
    """A slow link or a busy broker delivers a window late but steadily: asking again would
    only have the same chunks published and delivered twice."""
    clock = Clock()
    dl = Download(tmp_path, artifact(), clock=clock)
    dl.open()
    assert dl.requests(window=4, timeout_s=5) == [(0, 4)]
    clock.now = 6.0  # chunk 0 lands 6 s after it was asked for: 1-3 are overdue as well
    dl.accept(0, chunk(0))
    assert dl.requests(window=4, timeout_s=5) == [], "one slot free: not worth asking"
    clock.now = 7.0
    dl.accept(1, chunk(1))
    assert dl.requests(window=4, timeout_s=5) == [(4, 2)], "the freed slots only, not 2-3"
    clock.now = 13.0
    dl.accept(2, chunk(2))
    assert dl.requests(window=4, timeout_s=5) == [], "3 is 13 s overdue, but chunks still come"
    clock.now = 18.5  # then nothing for 5.5 s: the transfer stalled, ask again
    assert dl.requests(window=4, timeout_s=5) == [(3, 4)]  # 3-5 overdue by now, and 6


def test_while_chunks_are_in_flight_a_request_waits_for_half_of_the_window() -> None:
    data = os.urandom(CHUNK * 44)
    with tempfile.TemporaryDirectory() as tmp:
        dl = Download(Path(tmp), artifact(data))
        dl.open()
        assert dl.requests(window=16, timeout_s=5) == [(0, 16)]
        for i in range(7):
            dl.accept(i, chunk(i, data))
            assert dl.requests(window=16, timeout_s=5) == [], f"{i + 1} free: not worth asking"
        dl.accept(7, chunk(7, data))
        assert dl.requests(window=16, timeout_s=5) == [(16, 8)]
        for i in range(8, 20):
            dl.accept(i, chunk(i, data))
        assert dl.requests(window=16, timeout_s=5) == [(24, 12)]
        for i in range(20, 36):
            dl.accept(i, chunk(i, data))
        assert dl.requests(window=16, timeout_s=5) == [(36, 8)], "the end of the file"
        dl.discard()


def test_an_arrived_chunk_leaves_the_window_before_it_is_written() -> None:
    """The network thread counts arrivals: the next request need not wait for the worker to
    write the chunks queued before it. What arrived is not asked for again, and a whole window
    of arrived chunks not yet written holds further requests back (a slow disk)."""
    data = os.urandom(CHUNK * 40)
    with tempfile.TemporaryDirectory() as tmp:
        dl = Download(Path(tmp), artifact(data))
        dl.open()
        assert dl.requests(window=8, timeout_s=5) == [(0, 8)]
        assert dl.arrived(0, CHUNK) and dl.arrived(1, CHUNK)
        assert not dl.arrived(1, CHUNK), "a second copy counts once"
        assert not dl.arrived(2, 10), "a chunk of the wrong size does not leave the window"
        assert not dl.arrived(40, CHUNK), "nor one past the end"
        for i in range(2, 4):
            assert dl.arrived(i, CHUNK)
        assert dl.requests(window=8, timeout_s=5) == [(8, 4)], "nothing written yet"
        for i in range(4, 8):
            assert dl.arrived(i, CHUNK)
        assert dl.requests(window=8, timeout_s=5) == [], "a window arrived and is not written"
        dl.accept(0, chunk(0, data))
        assert not dl.arrived(0, CHUNK), "written: a late copy is no arrival"
        assert dl.requests(window=8, timeout_s=5) == [(12, 4)], "room again: 0-7 are not asked"
        for i in range(1, 8):
            dl.accept(i, chunk(i, data))
        assert dl.received == 8
        dl.discard()


def test_the_running_sha256_covers_chunks_in_any_order_and_a_resume(tmp_path: Path) -> None:
    """The hash is fed by the background flushes in file order, whatever order the chunks
    came in and across a restart; a corrupted chunk on disk is caught."""
    data = os.urandom(CHUNK * 40 + 5)
    order = list(range(41))
    random.Random(7).shuffle(order)
    dl = Download(tmp_path, artifact(data), clock=Clock())
    dl.open()
    for i in order[:25]:
        dl.accept(i, chunk(i, data))
    dl.close()
    again = Download(tmp_path, artifact(data))
    assert again.open() == 25
    for i in order[25:]:
        again.accept(i, chunk(i, data))
    assert again.finish(tmp_path / "m.onnx").read_bytes() == data
    bad = Download(tmp_path, artifact(data))
    bad.open()
    for i in range(41):
        bad.accept(i, chunk(i, data))
    with open(bad.part, "r+b") as fh:  # the disk returns other bytes than were written
        fh.seek(CHUNK * 39)
        fh.write(b"\x00" * 8)
    with pytest.raises(IntegrityError, match="does not match"):
        bad.finish(tmp_path / "m2.onnx")


def test_wrong_sized_and_out_of_range_chunks_are_refused(tmp_path: Path) -> None:
    dl = Download(tmp_path, artifact())
    dl.open()
    with pytest.raises(TransferError, match=r"chunk 2 .* has 10 bytes, expected 1024"):
        dl.accept(2, b"x" * 10)
    with pytest.raises(TransferError, match=r"chunk 10 is out of range.*10 chunks"):
        dl.accept(10, chunk(0))
    with pytest.raises(TransferError, match="expected 784"):
        dl.accept(9, chunk(0))
    assert dl.received == 0


def test_resume_after_restart_asks_only_for_missing_chunks(tmp_path: Path) -> None:
    dl = Download(tmp_path, artifact())
    dl.open()
    for i in range(6):
        dl.accept(i, chunk(i))
    dl.close()  # the agent stops mid-transfer
    again = Download(tmp_path, artifact())
    assert again.open() == 6
    assert again.requests(window=8, timeout_s=5) == [(6, 4)]
    for i in range(6, 10):
        again.accept(i, chunk(i))
    assert again.finish(tmp_path / "m.onnx").read_bytes() == DATA


def test_sidecar_with_other_chunk_size_starts_over(tmp_path: Path) -> None:
    dl = Download(tmp_path, artifact())
    dl.open()
    dl.accept(0, chunk(0))
    dl.close()
    other = msgspec.structs.replace(artifact(), chunk_size=2048)
    assert Download(tmp_path, other).open() == 0


def test_bytes_that_do_not_match_the_sha256_are_discarded(tmp_path: Path) -> None:
    wrong = bytes(len(DATA))
    announced = artifact()  # sha256 of DATA, but the sender serves zeros
    dl = Download(tmp_path, announced)
    dl.open()
    for i in range(announced.chunk_count):
        dl.accept(i, chunk(i, wrong))
    with pytest.raises(IntegrityError, match="does not match"):
        dl.finish(tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    assert not dl.part.exists(), "the bad bytes are not kept for a resume"


def test_progress_reaches_disk_within_a_second_on_a_slow_link(tmp_path: Path) -> None:
    clock = Clock()
    dl = Download(tmp_path, artifact(), clock=clock)
    dl.open()
    dl.accept(0, chunk(0))
    assert not dl.sidecar.exists()
    clock.now = 1.5
    dl.accept(1, chunk(1))
    dl.wait_flushed()  # the flush runs in the background
    assert dl.sidecar.exists(), "a crash now loses nothing already received"
    assert Download(tmp_path, artifact()).open() == 2


def test_on_a_fast_link_the_sidecar_is_written_every_record_bytes_not_every_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every flush syncs (the tail left at the end stays small); the sidecar, a new file and a
    rename each time, is written once RECORD_BYTES more are on disk, and by close()."""
    monkeypatch.setattr(transfer, "FLUSH_BYTES", 2 * CHUNK)
    monkeypatch.setattr(transfer, "RECORD_BYTES", 6 * CHUNK)
    dl = Download(tmp_path, artifact(), clock=Clock())
    dl.open()

    def recorded() -> int:
        dl.wait_flushed()
        return Download(tmp_path, artifact()).open() if dl.sidecar.exists() else 0

    for i in range(4):  # two flushes of two chunks
        dl.accept(i, chunk(i))
        dl.wait_flushed()
    assert recorded() == 0, "4 chunks synced, fewer than RECORD_BYTES: no sidecar yet"
    for i in range(4, 6):
        dl.accept(i, chunk(i))
    assert recorded() == 6, "RECORD_BYTES on disk: the flush lists them"
    dl.accept(6, chunk(6))
    dl.close()
    assert Download(tmp_path, artifact()).open() == 7, "close() lists everything written"


def test_a_disk_error_in_the_background_flush_reaches_the_next_chunk(tmp_path: Path) -> None:
    """The flush runs on its own thread; what it meets (a full disk here) is raised by the
    next accept(), as a write error would be, and discard() still gives everything back."""
    data = os.urandom(CHUNK * 4)
    clock = Clock()
    dl = Download(tmp_path, artifact(data), clock=clock)
    dl.open()
    full = OSError(28, "No space left on device")

    def failing_flush(*args: object, **kwargs: object) -> None:
        raise full

    dl._flush = failing_flush  # type: ignore[method-assign]
    clock.now = 2.0  # past FLUSH_PERIOD_S: this chunk starts a background flush
    dl.accept(0, chunk(0, data))
    dl._flusher.wait()  # type: ignore[union-attr]
    with pytest.raises(NoSpaceError, match="is full"):
        dl.accept(1, chunk(1, data))
    dl.discard()
    assert not dl.part.exists() and not dl.sidecar.exists()


def test_a_model_larger_than_the_whole_disk_is_not_called_a_full_disk(tmp_path: Path) -> None:
    """Issue 15: a manifest declaring 1 TiB was refused with "the disk ... is full"."""
    huge = Artifact(sha256="0" * 64, size=2**40, format=ModelFormat.ONNX)
    dl = Download(tmp_path, huge)
    with pytest.raises(NoSpaceError) as refused:
        dl.open()
    message = str(refused.value)
    assert "is full" not in message and f"needs {2**40:,} bytes" in message, message
    assert "more than the whole" in message and "smaller model" in message


def test_a_chunk_that_arrived_but_could_not_be_written_is_asked_for_again() -> None:
    """Found in review: the network thread counts a chunk as arrived; if writing it then fails
    (an error the background flush left, a closed download), it must not stay "arrived" for
    ever, or the download waits on a chunk nobody asks for."""
    data = os.urandom(CHUNK * 4)
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock()
        dl = Download(Path(tmp), artifact(data), clock=clock)
        dl.open()
        assert dl.requests(window=4, timeout_s=5) == [(0, 4)]
        assert dl.arrived(0, CHUNK)
        dl._flush_error = transfer.IntegrityError("the part file is shorter than announced")
        with pytest.raises(transfer.IntegrityError):
            dl.accept(0, chunk(0, data))
        dl._flush_error = None
        for i in range(1, 4):
            dl.accept(i, chunk(i, data))
        clock.now = 10.0  # nothing more comes: the stalled transfer asks for what is missing
        assert dl.requests(window=4, timeout_s=5) == [(0, 1)]
        dl.accept(0, chunk(0, data))
        assert dl.complete
        dl.discard()
