"""Property-based fuzzing of every decoder on the agent's receive path.

Arbitrary bytes, arbitrary JSON, message look-alikes and mutated golden messages go into the
topic and payload decoders, the MQTT input source, the chunk writer, the config loader and the
agent's own worker loop (no broker: a stand-in link records what the agent publishes). The
contract: a decoder returns a valid value or raises its own error type, nothing else escapes,
every malformed command is answered, and inference keeps working afterwards.

The explicit tests at the end pin the inputs with which this fuzzing first broke the agent
(non-ASCII chunk indexes, JSON the json module cannot load, ids that cannot be echoed, huge
artifact sizes, NaN results, bad environment values); each was fixed in the agent.
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import queue
import random
import tempfile
import threading
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import protocol as p
from agent.config import (
    ENV_PREFIX,
    AgentConfig,
    MqttInput,
    VibrationInput,
    apply_env_overrides,
    load_config,
)
from agent.errors import ConfigError, IntegrityError, TransferError
from agent.hardware import read_hardware
from agent.outbox import OutboxSender
from agent.runtime import available_formats, load_model
from agent.runtime.base import LoadedModel
from agent.service import Agent, Serving
from agent.sources import source_class
from agent.sources.base import Reading
from agent.sources.mqtt import MqttSource, parse_reading
from agent.telemetry import TelemetryWindow
from agent.transfer import Download

REPO = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO / "tests" / "golden"
SAMPLE_MODEL = REPO / "model_store" / "samples" / "vibration-ae.onnx"
DEVICE = "press-7"
INPUT_FILTER = "plant/+/vib"
KNOWN_COMMANDS = f"known commands: {', '.join(p.COMMAND_KINDS)}"

# Values numpy cannot hold in float32 (1e300) become inf with a RuntimeWarning, which the
# project's filterwarnings=error would turn into an exception that production never sees.
float32_overflow = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def fuzz(examples: int) -> Callable[[Any], Any]:
    """Hypothesis settings for this file: bounded, no deadline, no example database on disk."""
    return settings(max_examples=examples, deadline=None, database=None)


# ------------------------------------------------------------------------------ wire vocabulary

MESSAGE_TYPES: tuple[type[p.Envelope], ...] = typing.get_args(p.Message)
COMMAND_TYPES: tuple[type[p.Envelope], ...] = typing.get_args(p.Command)
KINDS = sorted(p.MESSAGE_KINDS)
_NESTED: tuple[type[p.Strict], ...] = (
    p.Artifact,
    p.ModelRef,
    p.ActiveModel,
    p.HardwareFacts,
    p.TelemetryRecord,
    p.Manifest,
)
FIELD_NAMES = sorted({name for t in (*MESSAGE_TYPES, *_NESTED) for name in t.__struct_fields__})
GOLDEN: dict[str, dict[str, Any]] = {
    path.stem: json.loads(path.read_text()) for path in sorted(GOLDEN_DIR.glob("*.json"))
}


def _without(message: p.Strict, keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in p.to_builtins(message).items() if k not in keys}


# ----------------------------------------------------------------------------------- strategies

# Lone surrogates are legal in JSON text ("\ud800") and come out of json.loads as Python str;
# they are a sliver of all code points, so a second branch draws them on purpose.
ANY_TEXT = st.text(max_size=12) | st.text(
    st.characters(categories=["Cs"]) | st.characters(codec="ascii"), max_size=12
)
# Integers at the edges of C and JSON number types, where Python ints stop fitting.
EDGE_INTS = st.sampled_from([-1, 0, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1])
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), EDGE_INTS, st.floats(), ANY_TEXT)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


def _to_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def _paths(node: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside a JSON document (not the root)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        yield (*at, key)
        if isinstance(value, dict | list) and value:
            yield from _paths(value, (*at, key))


def _retype(value: Any) -> Any:
    """The same content in another JSON type: the classic schema-drift mistake."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values())
    return 0


def _mutate(draw: st.DrawFn, document: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` with one to three fields removed, replaced, retyped or added."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(document))))
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        action = draw(st.sampled_from(["remove", "replace", "retype", "add"]))
        if action == "remove":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "retype":
            parent[key] = _retype(parent[key])
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(FIELD_NAMES) | ANY_TEXT)] = draw(JSON_VALUES)
        else:
            parent.append(draw(JSON_VALUES))
        if not document:
            break
    return document


@st.composite
def mutated_golden(draw: st.DrawFn) -> dict[str, Any]:
    """A golden message with a few fields removed, replaced, retyped or added."""
    return _mutate(draw, GOLDEN[draw(st.sampled_from(sorted(GOLDEN)))])


MESSAGE_LIKE = st.builds(
    lambda kind, fields: {**fields, "kind": kind},
    st.sampled_from(KINDS),
    st.dictionaries(st.sampled_from(FIELD_NAMES) | ANY_TEXT, JSON_VALUES, max_size=6),
)
# Commands with an id and the fields of the real commands, any of them missing or wrong.
COMMAND_FIELDS = sorted(
    {name for t in COMMAND_TYPES for name in t.__struct_fields__} - {"kind", "id"}
)
COMMAND_LIKE = st.fixed_dictionaries(
    {"kind": st.sampled_from(p.COMMAND_KINDS) | ANY_TEXT, "id": JSON_SCALARS},
    optional=dict.fromkeys(COMMAND_FIELDS, JSON_VALUES),
)
PAYLOADS = st.one_of(
    st.binary(max_size=64),
    st.text().map(str.encode),
    JSON_VALUES.map(_to_bytes),
    # ensure_ascii=False plus surrogatepass: a surrogate as raw (invalid) UTF-8 bytes
    JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    MESSAGE_LIKE.map(_to_bytes),
    COMMAND_LIKE.map(_to_bytes),
    mutated_golden().map(_to_bytes),
    st.sampled_from(sorted(GOLDEN)).map(lambda name: _to_bytes(GOLDEN[name])),
)
TEXT_PAYLOADS = st.one_of(
    st.text(),
    JSON_VALUES.map(json.dumps),
    MESSAGE_LIKE.map(json.dumps),
    mutated_golden().map(json.dumps),
)
# Full 512-sample windows the sample model accepts, with a few samples made extreme.
WINDOWS = st.builds(
    lambda seed, odd: _to_bytes(
        [odd.get(i, x) for i, x in enumerate(random.Random(seed).gauss(0, 1) for _ in range(512))]
    ),
    st.integers(0, 2**16),
    st.dictionaries(
        st.integers(0, 511),
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -1e38, 1e300, 0.0]),
        max_size=3,
    ),
)
READING_PAYLOADS = st.one_of(
    PAYLOADS,
    WINDOWS,
    st.lists(st.floats() | st.integers(-(2**70), 2**70), max_size=20).map(_to_bytes),
    st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1).map(_to_bytes),
    st.builds(
        lambda values, rate: _to_bytes({"kind": "reading", "values": values, **rate}),
        st.lists(JSON_SCALARS, max_size=8) | st.lists(st.floats(), min_size=1, max_size=8),
        st.just({}) | st.fixed_dictionaries({"sample_rate_hz": JSON_SCALARS}),
    ),
)

SEGMENTS = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["gf", "v1", "cmd", "state", "blob", "req", "reply", "+", "#", "", DEVICE]),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,70}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{63,65}", fullmatch=True),
    st.integers(-5, 10**30).map(str),
)
TOPICS = st.one_of(
    st.text(),
    st.lists(SEGMENTS, min_size=1, max_size=6).map("/".join),
    st.lists(SEGMENTS, min_size=1, max_size=4).map(lambda parts: "gf/v1/" + "/".join(parts)),
    st.builds(lambda device, rest: f"gf/v1/{device}/{rest}", SEGMENTS, SEGMENTS),
)
# Chunk topics: a valid device and sha256 most of the time, and indexes made of anything that
# str.isdigit() accepts (Unicode has far more "digits" than 0-9).
DIGITS = st.characters(categories=["Nd"]) | st.characters(categories=["No"]).filter(str.isdigit)
CHUNK_TOPICS = st.builds(
    lambda device, sha, index: f"gf/v1/{device}/blob/{sha}/{index}",
    st.just(DEVICE) | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    SEGMENTS | st.text(DIGITS, min_size=1, max_size=3),
)
TOPICS = TOPICS | CHUNK_TOPICS


# ----------------------------------------------------------------------- 1. protocol decoders


@fuzz(600)
@given(PAYLOADS)
def test_decoders_return_a_message_or_protocol_error_for_any_bytes(payload: bytes) -> None:
    _check_decoders(payload)


@fuzz(200)
@given(TEXT_PAYLOADS)
def test_decoders_return_a_message_or_protocol_error_for_any_text(payload: str) -> None:
    _check_decoders(payload)


def _check_decoders(payload: bytes | str) -> None:
    try:
        message = p.decode(payload)
    except p.ProtocolError:
        message = None
    else:
        assert isinstance(message, MESSAGE_TYPES)
    try:
        command = p.decode_command(payload)
    except p.ProtocolError:
        pass
    else:
        assert isinstance(command, COMMAND_TYPES)
        assert type(command) is type(message), "a command is also a message, parsed the same way"
        defaults = {"id", "ts"}  # filled in afresh by each parse when the payload has none
        assert _without(command, defaults) == _without(message, defaults)
    ref = p.command_id(payload)
    assert isinstance(ref, str) and len(ref) <= 64


@fuzz(400)
@given(TOPICS)
def test_parse_topic_returns_a_parsed_topic_or_protocol_error(name: str) -> None:
    try:
        parsed = p.parse_topic(name)
    except p.ProtocolError:
        return
    if parsed.channel is p.Channel.BLOB:
        assert parsed.sha256 is not None and parsed.index is not None
        rebuilt = (
            p.blob_topic(parsed.device, parsed.sha256, parsed.index)
            if parsed.device
            else p.shared_blob_topic(parsed.sha256, parsed.index)  # the fleet's shared tree
        )
    else:
        assert parsed.sha256 is None and parsed.index is None
        rebuilt = p.topic(parsed.device, parsed.channel)
    assert p.parse_topic(rebuilt) == parsed


@fuzz(100)
@given(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True),
    st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    st.integers(min_value=0, max_value=p.MAX_ARTIFACT_BYTES),
    st.sampled_from([c for c in p.Channel if c is not p.Channel.BLOB]),
)
def test_every_topic_the_protocol_builds_parses_back(
    device: str, sha256: str, index: int, channel: p.Channel
) -> None:
    assert p.parse_topic(p.topic(device, channel)) == p.ParsedTopic(device, channel)
    blob = p.parse_topic(p.blob_topic(device, sha256, index))
    assert blob == p.ParsedTopic(device, p.Channel.BLOB, sha256, index)


# -------------------------------------------------------------------------- 2. MQTT input source


@float32_overflow
@fuzz(200)
@given(st.lists(READING_PAYLOADS, max_size=12))
def test_mqtt_source_queues_valid_readings_and_counts_the_rest(payloads: list[bytes]) -> None:
    source = MqttSource(MqttInput(topic="plant/line-1/vib", queue=100))
    valid = 0
    for payload in payloads:
        try:
            parse_reading(payload)
        except p.ProtocolError:
            pass
        else:
            valid += 1
        source.offer(payload)
    assert source.rejected == len(payloads) - valid
    assert source.dropped == 0
    queued = []
    while (reading := source.read(0)) is not None:
        queued.append(reading)
    assert len(queued) == valid
    for reading in queued:
        assert reading.values.dtype == np.float32
        assert reading.values.ndim == 1 and reading.values.size > 0


# ----------------------------------------------------------------------------- 3. chunk writer


@st.composite
def download_scenarios(draw: st.DrawFn) -> tuple[p.Artifact, bytes, list[tuple[Any, ...]]]:
    """An artifact, its bytes, and a sequence of chunk deliveries (good, bad, odd) and restarts."""
    size = draw(st.integers(1, 3000))
    chunk_size = draw(st.integers(1, 1024))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    artifact = p.Artifact(
        sha256=hashlib.sha256(data).hexdigest(),
        size=size,
        format=p.ModelFormat.ONNX,
        chunk_size=chunk_size,
    )
    count = artifact.chunk_count
    index = st.integers(-2, count + 2) | st.integers()
    op = st.one_of(
        st.tuples(st.just("good"), st.integers(0, count - 1)),
        st.tuples(st.just("bytes"), index, st.binary(max_size=1100)),
        st.tuples(st.just("length"), index, st.integers(0, 1100)),
        st.tuples(st.just("restart")),
    )
    return artifact, data, draw(st.lists(op, max_size=30))


@fuzz(200)
@given(download_scenarios())
def test_download_accepts_only_chunks_that_fit_and_never_grows_the_file(
    scenario: tuple[p.Artifact, bytes, list[tuple[Any, ...]]],
) -> None:
    artifact, data, ops = scenario
    size = artifact.chunk_size
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        download = Download(directory, artifact, clock=lambda: 0.0)
        with pytest.raises(TransferError):
            download.accept(0, data[:size])  # not open yet
        download.open()
        written: dict[int, bool] = {}  # accepted chunk -> whether it held the right bytes
        for op in ops:
            if op[0] == "restart":
                download.close()
                download = Download(directory, artifact, clock=lambda: 0.0)
                assert download.open() == len(written), "resume keeps exactly what was accepted"
                continue
            if op[0] == "good":
                index, chunk = op[1], data[op[1] * size : (op[1] + 1) * size]
            elif op[0] == "bytes":
                index, chunk = op[1], op[2]
            else:
                index, chunk = op[1], b"\x00" * op[2]
            before = download.received
            try:
                fresh = download.accept(index, chunk)
            except TransferError:
                assert download.received == before
            else:
                assert isinstance(fresh, bool)
                assert fresh == (index not in written)
                if fresh:
                    written[index] = chunk == data[index * size : (index + 1) * size]
                    with download.part.open("rb") as fh:
                        fh.seek(index * size)
                        assert fh.read(len(chunk)) == chunk
            assert download.part.stat().st_size == artifact.size
            assert download.received == len(written) <= artifact.chunk_count
        if download.complete:
            if all(written.values()):
                assert download.finish(directory / "m.onnx").read_bytes() == data
            else:
                with pytest.raises(IntegrityError):
                    download.finish(directory / "m.onnx")
        download.discard()


# --------------------------------------------------------------------- 4. the agent, end to end


class Delivered:
    """What paho's publish returns, for a broker that acknowledges everything at once."""

    def is_published(self) -> bool:
        return True


class StandInLink:
    """The MQTT seam: records what the agent publishes instead of sending it."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.subscriptions: list[tuple[str, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Delivered:
        self.published.append((topic, payload, qos, retain))
        return Delivered()

    def subscribe(self, topic: str, qos: int = 0) -> None:
        self.subscribe_all([topic], qos)

    def subscribe_all(self, topics: list[str], qos: int = 0) -> None:
        self.subscriptions.extend((topic, qos) for topic in topics)

    def unsubscribe(self, topic: str) -> None:
        self.unsubscribe_all([topic])

    def unsubscribe_all(self, topics: list[str]) -> None:
        self.subscriptions = [s for s in self.subscriptions if s[0] not in topics]

    def messages(self, channel: p.Channel) -> list[Any]:
        name = p.topic(DEVICE, channel)
        return [p.decode(payload) for topic, payload, _, _ in self.published if topic == name]


class DrainingInbox(queue.Queue[tuple[str, bytes]]):
    """Lets the real ``Agent._work`` run inline: it hands out what is queued, then stops it."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__(maxsize=10_000)
        self._stop_event = stop

    def get(self, block: bool = True, timeout: float | None = None) -> tuple[str, bytes]:
        try:
            return super().get(block=False)
        except queue.Empty:
            self._stop_event.set()
            raise


@functools.cache
def _model_bytes() -> dict[str, bytes]:
    """The sample model, a re-labelled copy of it (a new sha256) and bytes that are no model."""
    original = SAMPLE_MODEL.read_bytes()
    proto = onnx.load_from_string(original)
    proto.doc_string = "a copy for the fault tests"
    return {
        "original": original,
        "copy": proto.SerializeToString(),
        "junk": random.Random(7).randbytes(3000),
    }


@functools.cache
def _serving_model() -> LoadedModel:
    return load_model(SAMPLE_MODEL, p.ModelFormat.ONNX)


@functools.cache
def _host() -> tuple[Any, Any]:
    return read_hardware(), available_formats()


def _artifact(name: str) -> p.Artifact:
    data = _model_bytes()[name]
    return p.Artifact(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        format=p.ModelFormat.ONNX,
        chunk_size=1024 if name == "junk" else 256 * 1024,
    )


def _ref(version: str) -> p.ModelRef:
    return p.ModelRef(name="vibration-ae", version=version)


def _active(name: str, version: str) -> p.ActiveModel:
    artifact = _artifact(name)
    return p.ActiveModel(model=_ref(version), sha256=artifact.sha256, format=artifact.format)


def _deploy(name: str, version: str, manifest: p.SignedManifest | None = None) -> bytes:
    deploy = p.Deploy(
        id=f"deploy-{name}-{version}",
        model=_ref(version),
        artifact=_artifact(name),
        manifest=manifest,
    )
    return p.encode(deploy)


def _chunks(name: str) -> list[tuple[str, bytes]]:
    artifact, data = _artifact(name), _model_bytes()[name]
    size = artifact.chunk_size
    return [
        (p.blob_topic(DEVICE, artifact.sha256, i), data[i * size : (i + 1) * size])
        for i in range(artifact.chunk_count)
    ]


# An enrolled agent only activates manifests signed by its controller; the tests hold the key,
# so they can sign mutated manifests and reach every check behind the signature.
SIGNING_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUBLIC_RAW = SIGNING_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _sign(payload: str) -> p.SignedManifest:
    signature = base64.b64encode(SIGNING_KEY.sign(payload.encode())).decode()
    return p.SignedManifest(
        payload=payload, signature=signature, key_id=hashlib.sha256(PUBLIC_RAW).hexdigest()[:16]
    )


@functools.cache
def _manifest_of_copy() -> dict[str, Any]:
    """A manifest the enrolled agent accepts for the copy, with a golden case it reproduces."""
    model = _serving_model()
    window = np.linspace(-1.0, 1.0, 512, dtype=np.float32)
    outputs = model.run({model.inputs[0].name: window.reshape(1, 512)})
    manifest = p.Manifest(
        model=_ref("1.0.1"),
        artifact=_artifact("copy"),
        task=p.Task.ANOMALY,
        precision="fp32",
        technique="reference",
        inputs=[
            p.TensorSignature(name=s.name, dtype=s.dtype, shape=list(s.shape)) for s in model.inputs
        ],
        outputs=[
            p.TensorSignature(name=s.name, dtype=s.dtype, shape=list(s.shape))
            for s in model.outputs
        ],
        golden=[
            p.GoldenCase(
                inputs={model.inputs[0].name: window.tolist()},
                outputs={
                    k: np.asarray(v, dtype=np.float64).ravel().tolist() for k, v in outputs.items()
                },
            )
        ],
        created=p.utcnow() - timedelta(days=1),
    )
    return p.to_builtins(manifest)


@st.composite
def signed_manifests(draw: st.DrawFn) -> p.SignedManifest:
    """Manifests for the copy: intact, mutated then signed, tampered with, or from another key."""
    how = draw(st.sampled_from(["intact", "mutated", "payload", "signature", "key"]))
    document = _mutate(draw, _manifest_of_copy()) if how == "mutated" else _manifest_of_copy()
    signed = _sign(json.dumps(document))
    if how == "payload":
        return p.replace(signed, payload=signed.payload.replace("1", "2", 1))
    if how == "signature":
        return p.replace(signed, signature=draw(st.text(max_size=90)))
    if how == "key":
        return p.replace(signed, key_id=draw(st.sampled_from(["", "0" * 16])))
    return signed


CMD = p.topic(DEVICE, p.Channel.CMD)
STATE = p.topic(DEVICE, p.Channel.STATE)
VALID_COMMANDS = st.one_of(
    st.sampled_from(
        [
            p.encode(p.Ping(id="ping-1")),
            p.encode(p.InjectFault(id="fault-1", fault=p.FaultKind.BALL, severity=2.0)),
            _deploy("copy", "1.0.1"),
            _deploy("junk", "9.0.0"),
            _deploy("original", "1.0.0"),  # what the agent already runs
            _deploy("original", "1.0.2"),  # the same bytes under a new version
        ]
    ),
    signed_manifests().map(lambda manifest: _deploy("copy", "1.0.1", manifest)),
)


@st.composite
def transfers(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """A deploy and then its chunks: all or some, in any order, with duplicates."""
    name = draw(st.sampled_from(["copy", "junk"]))
    if name == "copy":
        signed = draw(signed_manifests()) if draw(st.integers(0, 3)) else None
        deploy = _deploy("copy", "1.0.1", signed)
    else:
        deploy = _deploy("junk", "9.0.0")
    chunks = _chunks(name)
    order = draw(st.permutations(chunks))
    sent = draw(st.integers(1, len(chunks) + 2))  # past the count: duplicates
    return [(CMD, deploy), *(order[i % len(order)] for i in range(sent))]


ODD_CHUNKS = st.builds(
    lambda name, index, data: [(f"gf/v1/{DEVICE}/blob/{_artifact(name).sha256}/{index}", data)],
    st.sampled_from(["copy", "junk"]),
    st.integers(-1, 4).map(str) | SEGMENTS | st.text(DIGITS, min_size=1, max_size=3),
    st.binary(max_size=16) | st.sampled_from([data for _, data in _chunks("junk")]),
)
STATE_PAYLOADS = st.one_of(
    PAYLOADS.map(bytes), st.sampled_from([_to_bytes(GOLDEN[k]) for k in ("birth", "death")])
)
# Each kind of traffic is drawn equally often (.map keeps one_of from flattening the nested
# choices, which would drown the valid commands in the many kinds of garbage).
E2E_MESSAGES = st.lists(
    st.one_of(
        st.tuples(st.just(CMD), PAYLOADS).map(lambda m: [m]),
        st.tuples(st.just(CMD), COMMAND_LIKE.map(_to_bytes)).map(lambda m: [m]),
        st.tuples(st.just(CMD), VALID_COMMANDS).map(lambda m: [m]),
        st.tuples(st.just(STATE), STATE_PAYLOADS).map(lambda m: [m]),
        transfers(),
        ODD_CHUNKS,
        st.tuples(TOPICS, PAYLOADS).map(lambda m: [m]),
        st.tuples(SEGMENTS.map(lambda s: f"plant/{s}/vib"), READING_PAYLOADS).map(lambda m: [m]),
        st.tuples(st.just("plant/line-1/vib"), WINDOWS).map(lambda m: [m]),
    ),
    min_size=1,
    max_size=10,
).map(lambda groups: [message for group in groups for message in group])


@contextmanager
def stand_alone_agent(
    input_config: VibrationInput | MqttInput, *, enrolled: bool = False
) -> Iterator[Agent]:
    """An Agent wired as ``Agent.start`` wires it, minus the broker and the threads."""
    with tempfile.TemporaryDirectory() as tmp:
        config = AgentConfig(
            device_id=DEVICE,
            state_dir=Path(tmp) / "state",
            input=input_config,
            controller_keys=[PUBLIC_RAW.hex()] if enrolled else [],
        )
        agent = Agent(config)
        agent.activation.prepare()
        agent.outbox.open()
        try:
            active = _active("original", "1.0.0")
            agent.activation.artifact_path(active).write_bytes(_model_bytes()["original"])
            agent.activation.activate(active)
            agent._serving = Serving(_serving_model(), active)
            agent.hardware, agent.runtimes = _host()
            link = StandInLink()
            agent.link = link  # type: ignore[assignment]
            agent.source = source_class(config.input.type)(config.input)
            agent._connect_input()
            agent.sender = OutboxSender(
                agent.outbox,
                lambda topic, payload: link.publish(topic, payload, qos=1),
                link.connected.is_set,
            )
            agent._inbox = DrainingInbox(agent._stop)
            yield agent
        finally:
            if agent._transfer is not None:
                agent._transfer.download.close()
            agent.outbox.close()


def _deliver(agent: Agent, messages: list[tuple[str, bytes]]) -> None:
    """What paho's thread and the worker thread do with these messages, run inline."""
    for topic, payload in messages:
        agent._on_message(topic, payload)
    agent._stop.clear()
    agent._work()
    assert agent.sender is not None
    for _ in range(1000):  # let the outbox hand every event to the (always acking) link
        agent._pump()
        if not agent.sender.in_flight and not agent.outbox.pending(1):
            break


def _on_cmd_channel(topic: str) -> bool:
    try:
        return p.parse_topic(topic).channel is p.Channel.CMD
    except p.ProtocolError:
        return False


def _expected_error_refs(messages: list[tuple[str, bytes]]) -> list[str]:
    """The refs of the error replies the agent owes: one per malformed command, in order."""
    refs = []
    for topic, payload in messages:
        if not _on_cmd_channel(topic):
            continue
        try:
            p.decode_command(payload)
        except p.ProtocolError:
            refs.append(p.command_id(payload))
    return refs


def _commands(messages: list[tuple[str, bytes]]) -> Iterator[tuple[Any, str]]:
    """The commands among the messages, each with the id its payload carries ('' if none)."""
    for topic, payload in messages:
        if _on_cmd_channel(topic):
            with suppress(p.ProtocolError):
                yield p.decode_command(payload), p.command_id(payload)


def _good_window() -> Reading:
    return Reading(np.random.default_rng(1).normal(size=512).astype(np.float32), p.utcnow())


@float32_overflow
@pytest.mark.parametrize("variant", ["vibration", "mqtt-input", "enrolled"])
@fuzz(100)
@given(messages=E2E_MESSAGES)
def test_agent_survives_any_message_and_keeps_inferring(
    variant: str, messages: list[tuple[str, bytes]]
) -> None:
    input_config = (
        MqttInput(topic=INPUT_FILTER) if variant == "mqtt-input" else VibrationInput(seed=3)
    )
    with stand_alone_agent(input_config, enrolled=variant == "enrolled") as agent:
        link: StandInLink = agent.link  # type: ignore[assignment]
        _deliver(agent, messages)

        replies = link.messages(p.Channel.REPLY)
        errors = [r.ref for r in replies if not r.ok and (r.error or "").endswith(KNOWN_COMMANDS)]
        assert errors == _expected_error_refs(messages), "every malformed command is answered"
        pings = [ref for command, ref in _commands(messages) if isinstance(command, p.Ping)]
        answered = [r.ref for r in replies if r.ok and "session" in r.detail]
        assert len(answered) == len(pings), "every ping is answered"
        assert Counter(ref for ref in answered if ref) >= Counter(ref for ref in pings if ref)

        serving = agent._serving
        assert serving is not None, "the agent always has a model to serve"
        source = agent.source
        assert source is not None
        window = TelemetryWindow(p.utcnow(), 0.0)
        readings = 0
        while variant == "mqtt-input" and (reading := source.read(0)) is not None:
            agent._infer_once(serving, reading, window)  # fuzzed input: a result or an error
            readings += 1
        assert window.inferences + window.errors == readings
        # The simulated sensor (or, for the MQTT input, a clean 512-sample window) still gives
        # a result from the model being served, whatever the fuzzing did to it.
        fresh = _good_window() if variant == "mqtt-input" else source.read(0)
        assert fresh is not None
        before = len(link.published)
        agent._infer_once(serving, fresh, window)
        results = [pl for topic, pl, _, _ in link.published[before:] if topic.endswith("/results")]
        assert len(results) == 1
        result = p.decode(results[0])
        assert isinstance(result, p.Result) and result.model == serving.active.model
        for topic, payload, _, _ in link.published:
            assert p.parse_topic(topic).device == DEVICE
            p.decode(payload)  # everything the agent sent follows the wire contract


def test_agent_activates_a_deploy_whose_chunks_arrive_among_garbage() -> None:
    """The happy path still works through the same inline worker the fuzzer uses."""
    noise = [(CMD, b"\xff"), (STATE, b"{}"), ("gf/v1/x/blob/zz/1", b"")]
    with stand_alone_agent(VibrationInput(seed=3)) as agent:
        _deliver(agent, [*noise, (CMD, _deploy("copy", "1.0.1")), *noise, *_chunks("copy")[::-1]])
        assert agent._serving is not None
        assert str(agent._serving.active.model) == "vibration-ae:1.0.1"
        replies = agent.link.messages(p.Channel.REPLY)  # type: ignore[union-attr]
        assert any(r.ok and r.ref == "deploy-copy-1.0.1" for r in replies)


def test_the_next_chunks_are_asked_for_as_chunks_arrive_not_once_they_are_written() -> None:
    """paho's thread asks for the next chunks as each one lands (the worker, which writes
    them, lags behind it); a window of chunks not yet written holds further requests back, and
    no chunk is asked for twice."""
    data, size = _model_bytes()["copy"], 4096
    artifact = p.replace(_artifact("copy"), chunk_size=size)
    deploy = p.Deploy(id="deploy-flow", model=_ref("1.0.3"), artifact=artifact, window=8)

    def chunk(i: int) -> tuple[str, bytes]:
        return p.shared_blob_topic(artifact.sha256, i), data[i * size : (i + 1) * size]

    with stand_alone_agent(VibrationInput(seed=3)) as agent:
        link: StandInLink = agent.link  # type: ignore[assignment]

        def asked() -> list[tuple[int, int]]:
            return [(r.first, r.count) for r in link.messages(p.Channel.BLOB_REQ)]

        _deliver(agent, [(CMD, p.encode(deploy))])  # the worker asks for the first window
        assert asked() == [(0, 8)]
        for i in range(4):
            agent._on_message(*chunk(i))  # paho's thread alone: the worker does not run
        assert asked() == [(0, 8), (8, 4)], "half the window arrived: ask at once"
        for i in range(4, 8):
            agent._on_message(*chunk(i))
        assert asked() == [(0, 8), (8, 4)], "a window waits on the disk: nothing more"
        _deliver(agent, [])  # the worker writes them: room again
        assert asked()[2:] == [(12, 4)]
        _deliver(agent, [chunk(i) for i in range(8, artifact.chunk_count)])
        assert agent._serving is not None
        assert str(agent._serving.active.model) == "vibration-ae:1.0.3"
        indexes = [first + n for first, count in asked() for n in range(count)]
        assert sorted(indexes) == list(range(len(indexes))), "no chunk asked for twice"


def test_enrolled_agent_activates_a_signed_deploy_among_garbage() -> None:
    signed = _sign(json.dumps(_manifest_of_copy()))
    noise = [(CMD, _deploy("copy", "1.0.1")), (STATE, b"[]"), ("gf/v1/x/blob/zz/1", b"")]
    with stand_alone_agent(VibrationInput(seed=3), enrolled=True) as agent:
        _deliver(agent, [*noise, (CMD, _deploy("copy", "1.0.1", signed)), *_chunks("copy")])
        assert agent._serving is not None
        assert str(agent._serving.active.model) == "vibration-ae:1.0.1"
        replies = agent.link.messages(p.Channel.REPLY)  # type: ignore[union-attr]
        assert [r.ok for r in replies if r.ref == "deploy-copy-1.0.1"] == [False, True]


# ------------------------------------------------------------------------------------ 5. config

CONFIG_WORDS = [
    "device_id",
    "broker",
    "host",
    "port",
    "state_dir",
    "input",
    "type",
    "topic",
    "queue",
    "power",
    "meters",
    "idle_w",
    "labels",
    "inference",
    "rate_hz",
    "telemetry",
    "site",
]
CONFIG_PATHS = st.lists(
    st.sampled_from(CONFIG_WORDS) | st.text(max_size=8),
    min_size=0,
    max_size=4,
).map(lambda parts: "__".join(part.upper() for part in parts))
ENV_VALUES = st.one_of(
    st.text(max_size=20),
    JSON_VALUES.map(json.dumps),
    st.sampled_from(["", "~", "null", "true", "0", "-1", "1883", "1e400", ".nan", "[]", "{}"]),
    st.sampled_from(["mqtt", "vibration", "/tmp", "./state", "dev-2", "[rapl, rapl]", "a: b"]),
)
ENVIRONS = st.dictionaries(
    st.one_of(CONFIG_PATHS.map(lambda path: ENV_PREFIX + path), st.text(max_size=12)),
    ENV_VALUES,
    max_size=5,
)


@fuzz(300)
@given(ENVIRONS)
def test_load_config_gives_a_config_or_config_error_for_any_environment(
    environ: dict[str, str],
) -> None:
    unrelated = {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX)}
    assert apply_env_overrides({"device_id": "dev-1"}, unrelated) == {"device_id": "dev-1"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.yaml"
        path.write_text("device_id: dev-1\nstate_dir: state\n")
        try:
            config = load_config(path, environ)
        except ConfigError as exc:
            assert str(exc)
        else:
            assert isinstance(config, AgentConfig)
            assert config.state_dir.is_absolute()


# ---------------------------------------------------------- bugs the fuzzing found, now fixed

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
HUGE_INT = b"1" * 5000  # past Python's 4300-digit limit for int(str)
DEEP = b"[" * 100_000  # past the json module's recursion limit


@pytest.mark.parametrize("index", ["²", "9" * 5000])
def test_parse_topic_rejects_a_chunk_index_int_cannot_read(index: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_topic(f"gf/v1/{DEVICE}/blob/{SHA}/{index}")


@pytest.mark.parametrize("payload", [HUGE_INT, DEEP], ids=["huge-int", "deep-nesting"])
@pytest.mark.parametrize("decoder", [p.decode, p.decode_command, parse_reading])
def test_decoders_reject_json_python_cannot_load(
    decoder: Callable[[bytes], Any], payload: bytes
) -> None:
    with pytest.raises(p.ProtocolError):
        decoder(payload)


@pytest.mark.parametrize("payload", [HUGE_INT, DEEP], ids=["huge-int", "deep-nesting"])
def test_command_id_of_json_python_cannot_load_is_empty(payload: bytes) -> None:
    assert p.command_id(payload) == ""


@pytest.mark.parametrize("payload", [HUGE_INT, DEEP], ids=["huge-int", "deep-nesting"])
def test_mqtt_source_counts_json_python_cannot_load_as_rejected(payload: bytes) -> None:
    source = MqttSource(MqttInput(topic="plant/line-1/vib"))
    source.offer(payload)
    assert source.rejected == 1


def test_agent_worker_survives_a_chunk_topic_with_a_non_ascii_index() -> None:
    with stand_alone_agent(VibrationInput(seed=3)) as agent:
        _deliver(agent, [(f"gf/v1/{DEVICE}/blob/{SHA}/²", b"x")])


@pytest.mark.parametrize("payload", [HUGE_INT, DEEP], ids=["huge-int", "deep-nesting"])
def test_agent_answers_a_command_python_cannot_load(payload: bytes) -> None:
    with stand_alone_agent(VibrationInput(seed=3)) as agent:
        _deliver(agent, [(CMD, payload)])
        replies = agent.link.messages(p.Channel.REPLY)  # type: ignore[union-attr]
        assert [r.ok for r in replies] == [False]


def test_agent_answers_a_malformed_command_whose_id_is_not_utf8() -> None:
    with stand_alone_agent(VibrationInput(seed=3)) as agent:
        _deliver(agent, [(CMD, b'{"kind": "ping", "id": "\\ud800", "extra": 1}')])
        replies = agent.link.messages(p.Channel.REPLY)  # type: ignore[union-attr]
        assert [(r.ok, r.ref) for r in replies] == [(False, "")]


def test_agent_refuses_a_deploy_too_large_for_the_filesystem() -> None:
    deploy = json.loads(_deploy("junk", "9.0.0"))
    deploy["artifact"]["size"] = 2**63
    with stand_alone_agent(VibrationInput(seed=3)) as agent:
        _deliver(agent, [(CMD, _to_bytes(deploy))])
        replies = agent.link.messages(p.Channel.REPLY)  # type: ignore[union-attr]
        assert [r.ok for r in replies] == [False]


@float32_overflow
@pytest.mark.parametrize("sample", [b"NaN", b"1e30"])
def test_agent_never_publishes_a_result_the_protocol_rejects(sample: bytes) -> None:
    with stand_alone_agent(MqttInput(topic=INPUT_FILTER)) as agent:
        agent._on_message("plant/line-1/vib", b"[" + b",".join([sample] * 512) + b"]")
        reading = agent.source.read(0)  # type: ignore[union-attr]
        if reading is None:  # NaN never reaches the model: the source rejects it, counted
            assert agent.source.rejected == 1  # type: ignore[union-attr]
            return
        assert agent._serving is not None
        agent._infer_once(agent._serving, reading, TelemetryWindow(p.utcnow(), 0.0))
        for _, payload, _, _ in agent.link.published:  # type: ignore[union-attr]
            p.decode(payload)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BROKER__HOST", "["),
        ("BROKER__HOST", "!!python/object:os.system x"),
        ("BROKER__PORT", "1" * 5000),
        ("STATE_DIR", '"state\\0dir"'),
    ],
    ids=["unclosed-flow", "unsafe-tag", "huge-int", "nul-in-path"],
)
def test_load_config_reports_a_bad_environment_value_as_config_error(
    tmp_path: Path, name: str, value: str
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: dev-1\n")
    with pytest.raises(ConfigError):
        load_config(path, {ENV_PREFIX + name: value})
