"""Broker fan-out of model chunks: the controller's coalescing (pure logic, a fake clock), the
shared chunk topics, and the ACL that lets devices read them and only the controller write."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from agent import protocol as p
from agent.transfer import ChunkTopics
from controller import blobs
from controller.blobs import CLEAR_AFTER_S, REPUBLISH_AFTER_S, BlobServer, Coalescer
from controller.broker_config import acl_text
from tests.conftest import Probe, wait_until

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_chunk_asked_for_by_many_devices_is_due_once_after_the_linger() -> None:
    c = Coalescer(linger_s=0.5)
    assert c.add((SHA, 4, 0), 10.0)
    assert not c.add((SHA, 4, 0), 10.2)  # joins the pending publish
    assert c.add((SHA, 4, 1), 10.3)
    assert c.due(10.4) == []
    assert c.next_due() == 10.5
    assert c.due(10.5) == [(SHA, 4, 0)]
    assert c.due(10.79) == []
    assert c.due(10.8) == [(SHA, 4, 1)]
    assert len(c) == 0 and c.next_due() is None


def test_the_coalescer_forgets_a_chunk_once_it_is_due() -> None:
    c = Coalescer(linger_s=0.0)
    c.add((SHA, 4, 3), 1.0)
    assert c.due(1.0) == [(SHA, 4, 3)]
    assert c.add((SHA, 4, 3), 1.1)
    assert c.due(1.1) == [(SHA, 4, 3)]


def test_due_keeps_first_request_order_and_keys_by_chunk_size() -> None:
    c = Coalescer(linger_s=0.0)
    other = "a" * 64
    for key in [(other, 4, 2), (SHA, 4, 0), (SHA, 8, 0), (other, 4, 2)]:
        c.add(key, 0.0)
    assert c.due(0.0) == [(other, 4, 2), (SHA, 4, 0), (SHA, 8, 0)]


def _server(tmp_path: Path, data: bytes) -> tuple[BlobServer, list[tuple[str, bytes]], Clock]:
    store = tmp_path / SHA
    store.write_bytes(data)
    sent: list[tuple[str, bytes]] = []
    clock = Clock()
    server = BlobServer(
        lambda sha: store if sha == SHA else None,
        lambda topic, payload: sent.append((topic, payload)),
        linger_s=0.5,
        clock=clock,
        chunk_size=4,
    )
    return server, sent, clock


def test_server_publishes_each_chunk_once_on_the_shared_topic(tmp_path: Path) -> None:
    data = bytes(range(10))
    server, sent, clock = _server(tmp_path, data)
    for device in [f"dev-{i}" for i in range(50)]:  # 50 devices ask for the same window
        server._admit(device, p.BlobRequest(sha256=SHA, first=0, count=3, chunk_size=4))
    server._admit("late", p.BlobRequest(sha256=SHA, first=2, count=5, chunk_size=4))
    server.flush(clock.now)
    assert sent == []  # still lingering
    clock.now += 0.5
    server.flush(clock.now)
    assert sent == [
        (p.shared_blob_topic(SHA, 0), data[0:4]),
        (p.shared_blob_topic(SHA, 1), data[4:8]),
        (p.shared_blob_topic(SHA, 2), data[8:10]),
    ]
    assert server.stats.requests == 51
    assert server.stats.chunks_requested == 151
    assert server.stats.chunks_published == 3
    assert server.stats.bytes_published == 10


def test_a_late_request_is_served_by_the_retained_copy_until_it_is_old(tmp_path: Path) -> None:
    data = bytes(range(8))
    server, sent, clock = _server(tmp_path, data)
    ask = p.BlobRequest(sha256=SHA, first=0, count=2, chunk_size=4)
    server._admit("early", ask)
    clock.now += 0.5
    server.flush(clock.now)
    assert len(sent) == 2
    clock.now += 10
    server._admit("late", ask)  # subscribed just before: the broker gave it the retained copy
    clock.now += 1
    server.flush(clock.now)
    assert len(sent) == 2 and server.stats.chunks_retained == 2
    clock.now += REPUBLISH_AFTER_S
    server._admit("lost", ask)  # long after: publish again (the broker may have lost it)
    clock.now += 0.5
    server.flush(clock.now)
    assert sent[2:] == sent[:2]


def test_retained_chunks_are_deleted_when_nobody_asks_and_when_the_server_stops(
    tmp_path: Path,
) -> None:
    other = "a" * 64
    store = {SHA: tmp_path / SHA, other: tmp_path / other}
    for path in store.values():
        path.write_bytes(b"12345678")
    sent: list[tuple[str, bytes]] = []
    clock = Clock()
    server = BlobServer(
        store.get, lambda t, b: sent.append((t, b)), linger_s=0.0, clock=clock, chunk_size=4
    )
    server._admit("d", p.BlobRequest(sha256=SHA, first=0, count=2, chunk_size=4))
    server.flush(clock.now)
    clock.now += CLEAR_AFTER_S - 1
    server._admit("d", p.BlobRequest(sha256=other, first=1, count=1, chunk_size=4))
    server.flush(clock.now)
    server.clear()
    assert [b for _, b in sent] == [b"1234", b"5678", b"5678"]  # nothing idle long enough
    clock.now += 1
    server.clear()  # SHA idle for CLEAR_AFTER_S: its two retained chunks are deleted
    assert sent[3:] == [(p.shared_blob_topic(SHA, 0), b""), (p.shared_blob_topic(SHA, 1), b"")]
    server.clear(everything=True)  # stopping: the rest go too
    assert sent[5:] == [(p.shared_blob_topic(other, 1), b"")]


def test_server_ignores_unknown_artifacts_and_chunks_past_the_end(tmp_path: Path) -> None:
    server, sent, clock = _server(tmp_path, b"x" * 8)
    server._admit("d", p.BlobRequest(sha256="b" * 64, first=0, count=1, chunk_size=4))
    server._admit("d", p.BlobRequest(sha256=SHA, first=2, count=1, chunk_size=4))
    clock.now += 1
    server.flush(clock.now)
    assert sent == [] and server.stats.chunks_published == 0


def test_server_thread_publishes_after_the_linger(tmp_path: Path) -> None:
    store = tmp_path / SHA
    store.write_bytes(b"abcdefgh")
    sent: list[tuple[str, bytes]] = []
    server = BlobServer(
        lambda sha: store, lambda t, b: sent.append((t, b)), linger_s=0.05, chunk_size=4
    )
    server.start()
    try:
        for device in ("a", "b", "c"):
            server.request(device, p.BlobRequest(sha256=SHA, first=0, count=2, chunk_size=4))
        deadline = time.monotonic() + 5
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        server.stop()
    chunks = [p.shared_blob_topic(SHA, 0), p.shared_blob_topic(SHA, 1)]
    assert sent[:2] == list(zip(chunks, [b"abcd", b"efgh"], strict=True))
    assert sent[2:] == [(t, b"") for t in chunks]  # stopping deletes the retained copies


def test_raw_requests_are_decoded_by_the_server_and_bad_ones_counted(tmp_path: Path) -> None:
    """The controller hands blob/req messages to the server undecoded (never through ingest):
    the server serves the good one and counts every malformed or misplaced one."""
    store = tmp_path / SHA
    store.write_bytes(b"abcdefgh")
    sent: list[tuple[str, bytes]] = []
    server = BlobServer(lambda sha: store, lambda t, b: sent.append((t, b)), chunk_size=4)
    good = p.encode(p.BlobRequest(sha256=SHA, first=1, count=1, chunk_size=4))
    server.start()
    try:
        server.offer(p.topic("d1", p.Channel.BLOB_REQ), b"{garbage")
        server.offer(p.topic("d1", p.Channel.BLOB_REQ), p.encode(p.Ping()))
        server.offer(p.topic("d1", p.Channel.EVENTS), good)  # a request on the wrong topic
        server.offer("gf/v1/bad id/blob/req", good)
        server.offer(p.topic("d1", p.Channel.BLOB_REQ), good)
        wait_until(lambda: len(sent) == 1, 5, "the good request served")
    finally:
        server.stop()
    assert sent[0] == (p.shared_blob_topic(SHA, 1), b"efgh")
    assert server.stats.rejected == 4 and server.stats.requests == 1


def test_a_flood_of_requests_is_dropped_and_counted_not_queued_without_bound(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A device that floods blob/req cannot grow the controller's memory or block its network
    thread: past the queue's limit requests are dropped (agents ask again after a stall)."""
    monkeypatch.setattr(blobs, "QUEUE_LIMIT", 10)
    server = BlobServer(lambda sha: None, lambda t, b: None)  # not started: nothing drains
    request = p.encode(p.BlobRequest(sha256=SHA, first=0, count=1, chunk_size=4))
    for _ in range(15):
        server.offer(p.topic("d1", p.Channel.BLOB_REQ), request)  # never blocks
    assert server.stats.dropped == 5


def test_shared_topics_round_trip_and_sit_outside_the_device_tree() -> None:
    topic = p.shared_blob_topic(SHA, 7)
    assert topic == f"gf/blobs/v1/{SHA}/7"
    assert p.parse_topic(topic) == p.ParsedTopic("", p.Channel.BLOB, SHA, 7)
    assert not topic.startswith(p.ROOT + "/")
    for bad in (f"gf/blobs/v1/{SHA}/x", "gf/blobs/v1/zz/1", f"gf/blobs/v1/{SHA}/²"):
        with pytest.raises(p.ProtocolError, match="malformed blob topic"):
            p.parse_topic(bad)
    with pytest.raises(p.ProtocolError):
        p.shared_blob_topic("+", 0)


def test_acl_lets_devices_read_shared_chunks_and_only_the_controller_write_them() -> None:
    text = acl_text()
    assert f"pattern read {p.BLOB_ROOT}/+/+" in text
    controller = text.split("user ", 1)[1]
    assert f"topic write {p.BLOB_ROOT}/+/+" in controller
    assert f"pattern write {p.BLOB_ROOT}" not in text
    assert f"pattern readwrite {p.BLOB_ROOT}" not in text


def test_link_unsubscribes_offline_at_the_next_connect() -> None:
    """The agent's session is persistent: a dropped chunk subscription must reach the broker."""

    from agent.link import MqttLink

    link = MqttLink(
        client_id="t", host="127.0.0.1", port=1, on_message=lambda t, b: None, subscriptions=[]
    )
    calls: list[tuple[str, str]] = []

    class Client:
        def subscribe(self, topic: Any, qos: int = 0) -> Any:
            for t in topic if isinstance(topic, list) else [(topic, qos)]:
                calls.append(("sub", t[0]))

        def unsubscribe(self, topic: Any) -> Any:
            for t in topic if isinstance(topic, list) else [topic]:
                calls.append(("unsub", t))
            return (4, None)  # MQTT_ERR_NO_CONN: offline

    link._client = Client()  # type: ignore[assignment]
    shared = p.shared_blob_topic(SHA, 0)
    link.subscribe(shared, 1)
    link.unsubscribe(shared)
    assert link._subscriptions == [] and link._dropped == [shared]
    calls.clear()
    link._on_connect(Client(), None, None, _Ok(), None)  # type: ignore[arg-type]
    assert ("unsub", shared) in calls and ("sub", shared) not in calls
    assert link._dropped == []


class _Ok:
    is_failure = False


def test_a_device_follows_each_chunk_from_asking_for_it_until_it_arrives() -> None:
    calls: list[tuple[str, list[str]]] = []
    chunks = ChunkTopics(lambda t: calls.append(("sub", t)), lambda t: calls.append(("unsub", t)))
    topic = [p.shared_blob_topic(SHA, i) for i in range(5)]
    chunks.asking(SHA, 0, 3)
    chunks.asking(SHA, 1, 3)  # a re-ask of 1 and 2 subscribes again: the retained copy comes
    assert calls == [("sub", topic[0:3]), ("sub", topic[1:4])], "one SUBSCRIBE per request"
    calls.clear()
    chunks.arrived(SHA, 0)
    chunks.arrived(SHA, 0)  # a duplicate: nothing left to drop
    assert calls == [], "dropped with the next request, not one UNSUBSCRIBE per chunk"
    chunks.asking(SHA, 4, 1)
    assert calls == [("unsub", [topic[0]]), ("sub", [topic[4]])]
    calls.clear()
    chunks.keep_only(SHA)
    assert calls == []
    chunks.arrived(SHA, 1)
    chunks.keep_only(None)  # transfer over: the rest go, in one UNSUBSCRIBE
    assert len(calls) == 1 and calls[0][0] == "unsub"
    assert sorted(calls[0][1]) == topic[1:5]
    assert chunks.topics == set()


def test_a_late_device_gets_the_retained_chunk_and_a_device_that_has_it_gets_no_copy(
    mosquitto: Any,
) -> None:
    """On a real broker: the controller publishes chunk 0 once, retained. Device A, subscribed
    before, gets it live; device C, subscribing later, gets the retained copy at its SUBSCRIBE
    with no second publish; a re-publish reaches only devices still following chunk 0."""
    ctl = Probe(mosquitto.port)
    devices = {name: Probe(mosquitto.port) for name in ("a", "c")}
    follow = {name: ChunkTopics(*_client_calls(d)) for name, d in devices.items()}
    chunk0, chunk1 = p.shared_blob_topic(SHA, 0), p.shared_blob_topic(SHA, 1)

    def settle(expected: dict[str, int]) -> None:
        """Wait for each device's SUBACKs: the broker has also done what came before them on
        that connection (the UNSUBSCRIBE of the chunks that arrived)."""
        wait_until(
            lambda: all(devices[n]._subscribed >= k for n, k in expected.items()), 10, "SUBACKs"
        )

    try:
        follow["a"].asking(SHA, 0, 2)
        settle({"a": 1})
        ctl.client.publish(chunk0, b"chunk-0", qos=1, retain=True).wait_for_publish(5)
        devices["a"].wait_for(lambda t, b: b == b"chunk-0", 10, "chunk 0 at A")
        follow["a"].arrived(SHA, 0)
        follow["c"].asking(SHA, 0, 1)  # C comes late: the broker has the retained copy
        devices["c"].wait_for(lambda t, b: b == b"chunk-0", 10, "retained chunk 0 at C")
        follow["c"].arrived(SHA, 0)
        follow["a"].asking(SHA, 2, 1)  # the next requests drop chunk 0's topic
        follow["c"].asking(SHA, 1, 1)
        settle({"a": 2, "c": 2})
        ctl.client.publish(chunk0, b"chunk-0 again", qos=1, retain=True).wait_for_publish(5)
        ctl.publish(chunk1, b"chunk-1")  # both follow chunk 1; it comes after the re-publish
        for name in ("a", "c"):
            devices[name].wait_for(lambda t, b: b == b"chunk-1", 10, f"chunk 1 at {name}")
            assert [b for _, b in devices[name].history] == [b"chunk-0", b"chunk-1"], name
    finally:
        ctl.client.publish(chunk0, b"", qos=1, retain=True).wait_for_publish(5)  # clean broker
        for probe in (ctl, *devices.values()):
            probe.close()


def _client_calls(probe: Probe) -> tuple[Any, Any]:
    return (
        lambda topics: probe.client.subscribe([(t, 1) for t in topics]),
        lambda topics: probe.client.unsubscribe(topics),
    )


def test_a_request_cannot_choose_the_chunking_nor_an_artifact_not_sent_to_it(
    tmp_path: Path,
) -> None:
    """Issue 15 (2): the controller owns the chunking; a device asks only for what it was sent.
    Requests with other chunk sizes (each one, before, a new set of retained chunks that
    overwrote the canonical ones) and requests for another device's artifact are refused,
    counted, and publish nothing."""
    data = bytes(range(10))
    store = tmp_path / SHA
    store.write_bytes(data)
    sent: list[tuple[str, bytes]] = []
    server = BlobServer(
        lambda sha: store,
        lambda t, b: sent.append((t, b)),
        linger_s=0.0,
        clock=Clock(),
        allowed=lambda device, sha: device == "mine",
        chunk_size=4,
    )
    for size in (1, 3, 5, 4 * 1024 * 1024):
        server._admit("mine", p.BlobRequest(sha256=SHA, first=0, count=3, chunk_size=size))
    server._admit("other", p.BlobRequest(sha256=SHA, first=0, count=3, chunk_size=4))
    server.flush(100.0)
    assert sent == [] and server.stats.refused == 5
    server._admit("mine", p.BlobRequest(sha256=SHA, first=0, count=3, chunk_size=4))
    server.flush(100.0)
    assert [payload for _, payload in sent] == [data[0:4], data[4:8], data[8:10]]
