"""Blob budget: the most one device's chunk requests can make the controller publish (issue 15).

A hostile device, with its own valid login, sends chunk requests on its own ``blob/req`` topic:
every 2 s for 90 s (simulated time, the server's own clock), 64 requests for up to 64 chunks of
an artifact it was sent, each with another chunk size (262,144 - k bytes, 1 MiB, 4 MiB), plus
requests for an artifact the controller sent only to another device. Measured: the most bytes
the controller's blob server (controller.blobs.BlobServer, in process, publishing into a
counter) published in any ``REPUBLISH_AFTER_S`` window, as a ratio to the artifact's size.
Baseline, same run: one honest device fetching the artifact once (one copy: ratio 1.0 by
definition; its bytes are reported). Target: at most 1.0x per window; before the controller
owned the chunking one 222-byte request could make it publish 60 MB.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from agent import protocol as p
from benchmarks.rig import Outcome, outcome
from controller.blobs import REPUBLISH_AFTER_S, BlobServer

NAME = "blob_budget"
ARTIFACT_BYTES = 8 * 1024 * 1024
ATTACK_S = 90.0
EVERY_S = 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serve(store: Path, clock: Clock, published: list[tuple[float, int]]) -> BlobServer:
    mine, other = "a" * 64, "b" * 64

    def resolve(sha: str) -> Path | None:
        return store / sha if sha in (mine, other) else None

    return BlobServer(
        resolve,
        lambda topic, data: published.append((clock.now, len(data))) if data else None,
        linger_s=0.0,
        clock=clock,
        allowed=lambda device, sha: (device, sha) in {("hostile", mine), ("honest", mine)},
    )


def worst_window(published: list[tuple[float, int]]) -> int:
    """The most bytes published in any REPUBLISH_AFTER_S-long window."""
    best = 0
    for start, _ in published:
        best = max(best, sum(n for t, n in published if start <= t < start + REPUBLISH_AFTER_S))
    return best


def run(quick: bool) -> Outcome:
    mine, other = "a" * 64, "b" * 64
    chunks = -(-ARTIFACT_BYTES // p.DEFAULT_CHUNK_SIZE)
    with tempfile.TemporaryDirectory(prefix="gf-bench-blobs-") as tmp:
        store = Path(tmp)
        for sha in (mine, other):
            (store / sha).write_bytes(bytes(ARTIFACT_BYTES))
        clock = Clock()
        honest: list[tuple[float, int]] = []
        server = serve(store, clock, honest)
        for first in range(0, chunks, 16):
            ask = p.BlobRequest(sha256=mine, first=first, count=16, chunk_size=p.DEFAULT_CHUNK_SIZE)
            server._admit("honest", ask)
            server.flush(clock.now)
        clock = Clock()
        hostile: list[tuple[float, int]] = []
        server = serve(store, clock, hostile)
        sizes = [p.DEFAULT_CHUNK_SIZE - k for k in range(62)] + [1024 * 1024, 4 * 1024 * 1024]
        requests = 0
        while clock.now < ATTACK_S:
            for size in sizes:
                for sha in (mine, other):
                    server._admit(
                        "hostile",
                        p.BlobRequest(sha256=sha, first=0, count=p.MAX_WINDOW, chunk_size=size),
                    )
                    requests += 1
            server.flush(clock.now)
            clock.now += EVERY_S
        refused = server.stats.refused
    honest_bytes = sum(n for _, n in honest)
    worst = worst_window(hostile)
    ratio = worst / ARTIFACT_BYTES
    return outcome(
        NAME,
        "Blob budget: bytes one device's requests make the controller publish",
        measured=(
            f"{worst / 1e6:.1f} MB in the worst {REPUBLISH_AFTER_S:.0f} s of a {ATTACK_S:.0f} s "
            f"attack ({requests} requests, {refused} refused)"
        ),
        baseline=f"one honest fetch: {honest_bytes / 1e6:.1f} MB (the {ARTIFACT_BYTES >> 20} MiB "
        "artifact once)",
        ratio=ratio,
        target=f"<= 1.0x the artifact per {REPUBLISH_AFTER_S:.0f} s",
        passed=ratio <= 1.0,
        numbers={
            "worst_window_bytes": worst,
            "artifact_bytes": ARTIFACT_BYTES,
            "honest_bytes": honest_bytes,
            "requests": requests,
            "refused": refused,
            "window_s": REPUBLISH_AFTER_S,
        },
    )
