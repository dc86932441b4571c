"""The greenfleet wire contract: MQTT topics and the JSON messages sent on them.

This is the only place where topics are built or parsed and where message shapes are
defined; controller, agent, simulator and tests all go through it. It imports nothing but
the standard library and msgspec, so that any process (and any test) can speak the
protocol without loading an inference runtime or an MQTT client.

Topics (root ``gf/v1``, versioned like Sparkplug's ``spBv1.0``)::

    gf/v1/{device}/state                    agent -> ctl, retained: Birth, or Death (last will)
    gf/v1/{device}/cmd                      ctl -> agent: Deploy, Ping, InjectFault
    gf/v1/{device}/reply                    agent -> ctl: Reply echoing the command id
    gf/v1/{device}/events                   agent -> ctl: Event (deploy progress, errors, ...)
    gf/v1/{device}/telemetry                agent -> ctl: TelemetryBatch, keyed (session, seq)
    gf/v1/{device}/results                  agent -> local consumers: Result
    gf/v1/{device}/blob/req                 agent -> ctl: BlobRequest for a window of chunks
    gf/v1/{device}/blob/{sha256}/{index}    ctl -> agent: raw chunk bytes for one device (not JSON)
    gf/blobs/v1/{sha256}/{index}            ctl -> agents: raw chunk bytes, shared by the fleet

Chunks of an artifact are published once on the shared tree ``gf/blobs/v1`` and the broker
fans them out to every agent subscribed to ``gf/blobs/v1/{sha256}/+`` (an agent subscribes
while it fetches that artifact); see controller/blobs.py. The tree is outside ``gf/v1/+`` so
no device id can collide with it and the controller's ``gf/v1/+/...`` filters never see it.
Agents still accept a chunk on their own ``blob`` topic (a controller may address one device).

Every JSON message carries the envelope fields ``v``, ``kind``, ``id`` and ``ts``; ``kind``
discriminates the union, and :func:`decode` is the one parser for all of them.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct, field

PROTOCOL_VERSION = 1
ROOT = "gf/v1"
BLOB_ROOT = "gf/blobs/v1"  # shared chunk tree: one copy per chunk, fanned out by the broker
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_CHUNK_SIZE = 4 * 1024 * 1024
MAX_WINDOW = 64
MAX_ARTIFACT_BYTES = 2**40

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INDEX = re.compile(r"[0-9]{1,13}")  # ASCII digits only (isdigit() accepts "²"); < 2**40 + 1

DeviceId = Annotated[
    str,
    Meta(
        pattern=_DEVICE_ID.pattern,
        description="Device identifier: letters, digits, '_', '.', '-'; at most 64 characters.",
    ),
]
Sha256 = Annotated[str, Meta(pattern=_SHA256.pattern, description="Lower-case hex SHA-256.")]


class ProtocolError(ValueError):
    """A topic or payload that does not follow the wire contract; the message says what is wrong."""


# --------------------------------------------------------------------------------------- topics


class Channel(StrEnum):
    """The per-device topic channels."""

    STATE = "state"
    CMD = "cmd"
    REPLY = "reply"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    RESULTS = "results"
    ACK = "ack"
    BLOB_REQ = "blob/req"
    BLOB = "blob"


def check_device_id(device: str) -> str:
    """Return ``device`` if it is a valid device id (no MQTT wildcards or separators)."""
    if not _DEVICE_ID.match(device):
        raise ProtocolError(
            f"invalid device id {device!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return device


# Retained by the controller: whether it is connected and subscribed (ControllerState).
CONTROLLER_TOPIC = "gf/controller/v1/state"


def topic(device: str, channel: Channel) -> str:
    """The topic of one JSON channel of one device, e.g. ``gf/v1/press-1/cmd``."""
    if channel is Channel.BLOB:
        raise ProtocolError("blob chunk topics need a sha256 and index: use blob_topic()")
    return f"{ROOT}/{check_device_id(device)}/{channel.value}"


def blob_topic(device: str, sha256: str, index: int) -> str:
    """The topic that carries chunk ``index`` of the artifact ``sha256`` to ``device``."""
    if not _SHA256.match(sha256):
        raise ProtocolError(f"invalid sha256 {sha256!r}")
    if not 0 <= index <= MAX_ARTIFACT_BYTES:
        raise ProtocolError(f"invalid chunk index {index}")
    return f"{ROOT}/{check_device_id(device)}/blob/{sha256}/{index}"


def shared_blob_topic(sha256: str, index: int) -> str:
    """The fleet-wide topic that carries chunk ``index`` of artifact ``sha256``; a device
    follows it from asking for the chunk until it arrives (``agent.transfer.ChunkTopics``)."""
    if not _SHA256.match(sha256):
        raise ProtocolError(f"invalid sha256 {sha256!r}")
    if not 0 <= index <= MAX_ARTIFACT_BYTES:
        raise ProtocolError(f"invalid chunk index {index}")
    return f"{BLOB_ROOT}/{sha256}/{index}"


def blob_subscription(device: str) -> str:
    """The filter an agent subscribes to for all chunks sent to it."""
    return f"{ROOT}/{check_device_id(device)}/blob/+/+"


def subscription(channel: Channel, device: str = "+") -> str:
    """A subscription filter for one channel of one device, or of all devices (``+``)."""
    if device != "+":
        check_device_id(device)
    return f"{ROOT}/{device}/{channel.value}"


class ParsedTopic(msgspec.Struct, frozen=True):
    """A topic taken apart: the device, the channel, and for chunks the sha256 and index.

    A chunk on the shared tree (``gf/blobs/v1/...``) has no device: ``device`` is ``""``.
    """

    device: str
    channel: Channel
    sha256: str | None = None
    index: int | None = None


def _chunk_index(text: str) -> int | None:
    """A chunk index as the topic builders accept it (0 .. MAX_ARTIFACT_BYTES), or None: 13
    digits alone would let a topic parse that no builder can make again."""
    if not _INDEX.fullmatch(text):
        return None
    index = int(text)
    return index if index <= MAX_ARTIFACT_BYTES else None


def parse_topic(name: str) -> ParsedTopic:
    """Take a greenfleet topic apart; raise ProtocolError for anything else."""
    parts = name.split("/")
    if len(parts) == 5 and "/".join(parts[:3]) == BLOB_ROOT:
        if _SHA256.match(parts[3]) and _chunk_index(parts[4]) is not None:
            return ParsedTopic("", Channel.BLOB, parts[3], int(parts[4]))
        raise ProtocolError(f"malformed blob topic {name!r}")
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != ROOT:
        raise ProtocolError(f"not a {ROOT} topic: {name!r}")
    device = check_device_id(parts[2])
    rest = parts[3:]
    if rest[0] == "blob":
        if rest[1:] == ["req"]:
            return ParsedTopic(device, Channel.BLOB_REQ)
        if len(rest) == 3 and _SHA256.match(rest[1]) and _chunk_index(rest[2]) is not None:
            return ParsedTopic(device, Channel.BLOB, rest[1], int(rest[2]))
        raise ProtocolError(f"malformed blob topic {name!r}")
    if len(rest) == 1:
        try:
            return ParsedTopic(device, Channel(rest[0]))
        except ValueError:
            pass
    raise ProtocolError(f"unknown channel in topic {name!r}")


# ------------------------------------------------------------------------------------- messages


def new_id() -> str:
    """A fresh message id (32 hex characters)."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (message timestamps are always UTC)."""
    return datetime.now(UTC)


class Strict(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every wire model: unknown fields are errors, so typos never pass silently.

    msgspec checks types and bounds when a message is decoded (:func:`decode`, :func:`load`,
    :func:`convert`), not when code builds one: what this process builds from its own values
    needs no second look (the agent builds a Result per inference), and whatever arrives from
    outside is decoded. Build from outside values, such as an operator's argument, through
    :func:`convert`.
    """


MessageId = Annotated[str, Meta(min_length=1, max_length=64)]
SessionId = Annotated[str, Meta(min_length=1, max_length=64)]

# Bounds on what a device may report (issue 15): every byte from a device is hostile input, and
# a value that passes the schema must never break the code that stores or sums it (a window of
# 1e300 s overflowed a timestamp and took its whole ingest batch with it).
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
MAX_WINDOW_S = 24 * 3600.0  # a telemetry window is seconds to hours
MAX_COUNT = 10**9  # inferences or errors in one window
MAX_SEQ = 2**53  # exact in JSON numbers and in SQLite
MAX_TEXT = 4096  # a free-text field (an event's message, a reply's error)
Name = Annotated[str, Meta(max_length=64)]


def _sane_time(value: datetime, field: str) -> None:
    """A timestamp between 2000 and 2100 (naive ones are read as UTC): wide enough for any
    clock, narrow enough that adding a window of hours can never overflow."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not EARLIEST <= aware <= LATEST:
        raise ValueError(f"{field}: timestamp {value.isoformat()} is outside 2000..2100")


MAX_ACKED = 1000  # ids one Stored message may name: twice the controller's ingest batch


class Envelope(Strict, frozen=True, kw_only=True):
    """Fields every JSON message carries."""

    v: Literal[1] = 1  # protocol version
    id: MessageId = field(default_factory=new_id)
    ts: datetime = field(default_factory=utcnow)  # when the sender created it (UTC)

    def __post_init__(self) -> None:
        _sane_time(self.ts, "ts")


class ModelFormat(StrEnum):
    """File formats an agent can run."""

    ONNX = "onnx"
    TFLITE = "tflite"


class ModelRef(Strict, frozen=True, kw_only=True):
    """A model version as the fleet names it: ``name:version``."""

    name: Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
    version: Annotated[str, Meta(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")]

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``name:version``; raise ProtocolError naming the expected form."""
        name, sep, version = text.partition(":")
        if not sep:
            raise ProtocolError(f"model reference {text!r} must look like NAME:VERSION")
        try:
            return convert({"name": name, "version": version}, cls)
        except ProtocolError as exc:
            raise ProtocolError(f"invalid model reference {text!r}: {exc}") from exc


class Artifact(Strict, frozen=True, kw_only=True):
    """One model file, addressed by content."""

    sha256: Sha256
    size: Annotated[int, Meta(gt=0, le=MAX_ARTIFACT_BYTES)]  # bytes, at most 1 TiB
    format: ModelFormat
    chunk_size: Annotated[int, Meta(gt=0, le=MAX_CHUNK_SIZE)] = DEFAULT_CHUNK_SIZE

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)


class Tier(StrEnum):
    """Which rung of the agent's fallback chain is answering, best first."""

    ACTIVE = "active"  # the model the controller deployed
    LAST_GOOD = "last_good"  # the one before it, kept on disk
    FALLBACK = "fallback"  # a small variant the controller staged in advance
    RULES = "rules"  # the rule baseline from the manifest: numpy only, no runtime
    NONE = "none"  # nothing can answer (no model ever received)


class Slot(StrEnum):
    """Where a deployed artifact goes on the agent."""

    ACTIVE = "active"  # verify, stage, and make it the active model
    FALLBACK = "fallback"  # verify, stage, and keep it ready as the fallback tier
    PRELOAD = "preload"  # verify, stage, keep it on disk; a later active deploy of the same
    #                      artifact activates it at once (maintenance windows: fetch any time)


class ActiveModel(Strict, frozen=True, kw_only=True):
    """What an agent is running."""

    model: ModelRef
    sha256: Sha256
    format: ModelFormat


class Budgets(Strict, frozen=True, kw_only=True):
    """The latency and power a device's model must stay within, and where each came from.

    The controller plans with its class's budgets (a device label may override them) and sends
    them with every active Deploy, so the agent falls on the same figures the plan chose
    against; a budget set in the agent's own ``fallback`` config wins on the device. The agent
    reports what it applies (its Birth), so ``devices show`` shows the effective values.
    """

    latency_ms: Annotated[float, Meta(gt=0, le=3_600_000)] | None = None
    latency_from: Name = ""  # "class rpi4", "label latency_budget_ms", "agent.yaml"
    power_w: Annotated[float, Meta(gt=0, le=100_000)] | None = None
    power_from: Name = ""


class HardwareFacts(Strict, frozen=True, kw_only=True):
    """What the agent read from its host at start."""

    arch: Name  # machine architecture, e.g. x86_64 or aarch64
    cpu_model: Annotated[str, Meta(max_length=256)] = ""  # CPU model name, if readable
    cpu_flags: Annotated[list[Name], Meta(max_length=256)] = field(default_factory=list)
    cores: Annotated[int, Meta(ge=1, le=4096)]
    memory_mb: Annotated[int, Meta(ge=0, le=2**40)]  # physical memory in MiB
    os: Annotated[str, Meta(max_length=256)]  # kernel and OS, e.g. 'Linux 6.1.0'
    python: Name


class Birth(Envelope, frozen=True, kw_only=True):
    """Retained on the state topic when an agent connects: who it is and what it runs."""

    kind: Literal["birth"] = "birth"
    session: SessionId  # new at every agent start
    agent_version: Name
    device_class: Name  # hardware class, a device_configs/ name
    labels: Annotated[dict[Name, Name], Meta(max_length=32)] = field(default_factory=dict)
    runtimes: list[ModelFormat]  # formats the agent can load
    hardware: HardwareFacts
    active: ActiveModel | None = None
    last_good: ActiveModel | None = None  # the previous model, kept for an instant rollback
    fallback: ActiveModel | None = None  # the small variant staged as a fallback tier
    tier: Tier = Tier.ACTIVE  # the fallback tier serving now
    preloaded: ActiveModel | None = None  # fetched and staged, waiting for a window
    # messages the agent's outbox dropped (full, too old, disk), over its life
    outbox_dropped: Annotated[int, Meta(ge=0, le=MAX_SEQ)] | None = None
    budgets: Budgets | None = None  # the latency and power budgets the agent applies


class Death(Envelope, frozen=True, kw_only=True):
    """The last will, retained on the state topic: the broker publishes it when the agent vanishes.

    An agent that stops cleanly publishes it itself.
    """

    kind: Literal["death"] = "death"
    session: SessionId
    reason: str = "connection lost"


class Deploy(Envelope, frozen=True, kw_only=True):
    """Controller -> agent: fetch this artifact, verify it, and make it the active model.

    ``rollback``: an explicit rollback, an older version is allowed; ``rollback_grant``: a
    signed RollbackGrant, without which an enrolled agent allows no older version;
    ``manifest``: the controller-signed manifest, which enrolled agents require; ``slot``:
    active runs it now, fallback keeps it ready as a tier, preload keeps it on disk until an
    active deploy of it.
    """

    kind: Literal["deploy"] = "deploy"
    model: ModelRef
    artifact: Artifact
    window: Annotated[int, Meta(ge=1, le=MAX_WINDOW)] = 16  # chunks in flight at once
    rollback: bool = False
    rollback_grant: SignedManifest | None = None
    manifest: SignedManifest | None = None
    slot: Slot = Slot.ACTIVE
    budgets: Budgets | None = None  # the device's budgets, for an active deploy


class Ping(Envelope, frozen=True, kw_only=True):
    """Controller -> agent: answer with a Reply; used for liveness and round-trip time."""

    kind: Literal["ping"] = "ping"


class FaultKind(StrEnum):
    """Bearing faults the simulated vibration sensor can inject."""

    NONE = "none"
    OUTER_RACE = "outer_race"
    INNER_RACE = "inner_race"
    BALL = "ball"


class InjectFault(Envelope, frozen=True, kw_only=True):
    """Controller -> agent: set the simulated sensor's bearing fault (demos and tests only).

    An agent whose input is not the simulated sensor refuses it with an error reply.
    """

    kind: Literal["inject_fault"] = "inject_fault"
    fault: FaultKind
    severity: Annotated[float, Meta(ge=0.0, le=10.0)] = 1.0


class ControllerState(Envelope, frozen=True, kw_only=True):
    """Controller -> agents, retained on CONTROLLER_TOPIC: is the controller subscribed?

    A broker restarted without persistence forgets the controller's subscriptions; telemetry an
    agent replays before the controller is back would be acknowledged by the broker and handed
    to nobody. So an agent that has seen this message holds its outbox until the controller is
    online again, and resends what the broker acknowledged meanwhile unless ``since`` shows the
    controller's connection never lapsed (the pattern of Sparkplug's primary host state).
    """

    kind: Literal["controller_state"] = "controller_state"
    online: bool
    session: SessionId
    since: datetime  # when this connection of the controller began


class Reply(Envelope, frozen=True, kw_only=True):
    """Agent -> controller: the outcome of one command, echoing its id in ``ref`` ('' if the
    command had none); ``error`` says what went wrong and what to do."""

    kind: Literal["reply"] = "reply"
    ref: Annotated[str, Meta(max_length=64)]
    ok: bool
    error: Annotated[str, Meta(max_length=MAX_TEXT)] | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class EventKind(StrEnum):
    """Things an agent tells the controller about."""

    DEPLOY_STARTED = "deploy_started"
    DEPLOY_PROGRESS = "deploy_progress"
    DEPLOY_FAILED = "deploy_failed"
    ACTIVATED = "activated"
    MODEL_LOAD_FAILED = "model_load_failed"
    INFERENCE_ERROR = "inference_error"
    COMMAND_REJECTED = "command_rejected"
    INPUT_ERROR = "input_error"
    POWER_METER = "power_meter"  # a meter failed or skipped a window; the reading says which
    TIER_CHANGED = "tier_changed"  # the fallback chain moved; detail: from, to, cause
    FALLBACK_STAGED = "fallback_staged"  # a fallback variant is verified and ready on disk
    PRELOADED = "preloaded"  # a model is verified and staged on disk, not yet active


class Stored(Envelope, frozen=True, kw_only=True):
    """Controller -> agent, on the device's ``ack`` topic: these outbox messages are stored.

    The end-to-end acknowledgement. A broker's PUBACK says only that the broker took a message:
    a broker restarted without persistence, or a controller not yet subscribed, takes it and
    hands it to nobody. So an agent deletes a telemetry batch or an event from its outbox only
    when the controller names its envelope ``id`` here, after the database transaction that
    stored it committed, and sends again what stays unnamed (agent.outbox.OutboxSender). A
    message stored before is named again (the controller de-duplicates on (session, seq) and
    event ids), so a resend is always answered. ``rejected`` names messages the controller will
    never store (malformed, out of bounds): the agent drops them, counted, instead of resending
    them for ever. Published at QoS 0: a lost acknowledgement costs a resend, not a record.
    """

    kind: Literal["stored"] = "stored"
    ids: Annotated[list[MessageId], Meta(max_length=MAX_ACKED)] = field(default_factory=list)
    rejected: Annotated[list[MessageId], Meta(max_length=MAX_ACKED)] = field(default_factory=list)


class Event(Envelope, frozen=True, kw_only=True):
    """Agent -> controller: something happened; ``message`` is for people, ``detail`` for code."""

    kind: Literal["event"] = "event"
    event: EventKind
    session: SessionId
    message: Annotated[str, Meta(max_length=MAX_TEXT)] = ""
    detail: dict[str, Any] = field(default_factory=dict)


class PowerMethod(StrEnum):
    """How a power figure was obtained; an estimate is never passed off as a measurement."""

    ESTIMATE = "estimate"
    RAPL = "rapl"
    HWMON = "hwmon"
    PMIC = "pmic"
    NVML = "nvml"


Latency = Annotated[float, Meta(ge=0, le=MAX_WINDOW_S * 1000)]


class TelemetryRecord(Strict, frozen=True, kw_only=True):
    """One telemetry window of one agent session; (session, seq) is unique. Every number is
    finite and bounded (see MAX_WINDOW_S and friends): the controller sums and stores them.

    ``seq`` counts the session's windows from 0 without gaps; ``start`` and ``window_s`` place
    the window (UTC, seconds); ``model`` and ``tier`` say what served it at its end; ``cpu_s``
    is the process CPU time spent in it; ``outbox_dropped`` counts the messages the agent's
    outbox dropped (full, too old, disk) over its life.
    """

    seq: Annotated[int, Meta(ge=0, le=MAX_SEQ)]
    start: datetime
    window_s: Annotated[float, Meta(gt=0, le=MAX_WINDOW_S)]
    model: ModelRef | None
    tier: Tier = Tier.ACTIVE
    inferences: Annotated[int, Meta(ge=0, le=MAX_COUNT)]
    errors: Annotated[int, Meta(ge=0, le=MAX_COUNT)]
    latency_p50_ms: Latency | None = None
    latency_p95_ms: Latency | None = None
    latency_p99_ms: Latency | None = None
    cpu_s: Annotated[float, Meta(ge=0, le=1e6)]
    power_w: Annotated[float, Meta(ge=0, le=1e5)] | None = None  # mean power in the window
    energy_per_inference_j: Annotated[float, Meta(ge=0, le=1e6)] | None = None
    power_method: PowerMethod = PowerMethod.ESTIMATE
    outbox_dropped: Annotated[int, Meta(ge=0, le=MAX_SEQ)] | None = None

    def __post_init__(self) -> None:
        _sane_time(self.start, "start")


class TelemetryBatch(Envelope, frozen=True, kw_only=True):
    """Agent -> controller: one or more telemetry records, oldest first."""

    kind: Literal["telemetry"] = "telemetry"
    session: SessionId
    records: Annotated[list[TelemetryRecord], Meta(min_length=1, max_length=1000)]


class Result(Envelope, frozen=True, kw_only=True):
    """Agent -> local consumers: the output of one inference, naming the model and tier.

    ``outputs`` maps each output name to its flattened values; ``input_ts`` is when the input
    was captured. The agent writes these with ``agent.results.ResultWriter``, byte for byte.
    """

    kind: Literal["result"] = "result"
    seq: Annotated[int, Meta(ge=0)]  # per-session inference counter
    model: ModelRef | None
    tier: Tier = Tier.ACTIVE
    latency_ms: Annotated[float, Meta(ge=0)]
    outputs: dict[str, list[float]]
    input_ts: datetime | None = None


class BlobRequest(Envelope, frozen=True, kw_only=True):
    """Agent -> controller: send chunks ``first`` .. ``first + count - 1`` of an artifact."""

    kind: Literal["blob_request"] = "blob_request"
    sha256: Sha256
    first: Annotated[int, Meta(ge=0)]
    count: Annotated[int, Meta(ge=1, le=MAX_WINDOW)]
    chunk_size: Annotated[int, Meta(gt=0, le=MAX_CHUNK_SIZE)]


class SensorReading(Envelope, frozen=True, kw_only=True):
    """A window of samples on a local input topic, for agents whose input source is MQTT.

    This is the one message on the wire that a third party (a PLC bridge, a sensor gateway)
    produces; the agent also accepts a bare JSON array of numbers on that topic.
    """

    kind: Literal["reading"] = "reading"
    values: Annotated[list[float], Meta(min_length=1)]
    sample_rate_hz: Annotated[float, Meta(gt=0)] | None = None


# ------------------------------------------------------------------------------------ manifests


class Task(StrEnum):
    """What a model computes; decides which fidelity metric applies."""

    ANOMALY = "anomaly"  # a score, higher is more anomalous; metric ROC AUC
    CLASSIFICATION = "classification"  # logits or probabilities per class; metric accuracy
    REGRESSION = "regression"  # values; metric R^2


class TensorSignature(Strict, frozen=True, kw_only=True):
    """One input or output tensor of a model: numpy dtype name (e.g. float32), and its shape
    with None for a dynamic dimension."""

    name: str
    dtype: str
    shape: list[int | None]


class LatencyStats(Strict, frozen=True, kw_only=True):
    p50_ms: Annotated[float, Meta(ge=0)]
    p95_ms: Annotated[float, Meta(ge=0)]
    runs: Annotated[int, Meta(ge=1)]


class Fidelity(Strict, frozen=True, kw_only=True):
    """How closely a variant reproduces the fp32 reference on held-out inputs.

    ``agreement``: share of samples with the same decision (class / alarm); ``correlation``:
    Pearson r of raw outputs; ``metric``: the task metric (roc_auc, accuracy, r2), with the
    variant's value and the fp32 reference's on the same data.
    """

    samples: Annotated[int, Meta(ge=0)]
    agreement: float | None = None
    correlation: float | None = None
    max_abs_error: float | None = None
    metric: str | None = None
    metric_value: float | None = None
    reference_metric_value: float | None = None


# The name each format's latency is reported under in Profile.latency.
LATENCY_KEYS: dict[ModelFormat, str] = {
    ModelFormat.ONNX: "onnxruntime",
    ModelFormat.TFLITE: "litert",
}


class Profile(Strict, frozen=True, kw_only=True):
    """What was measured of one variant on the controller's host: size, weights (elements in
    weight tensors), estimated multiply-accumulates per inference, peak RSS above baseline,
    latency per runtime name (onnxruntime, litert), fidelity, and where (arch, cores)."""

    size_bytes: Annotated[int, Meta(ge=0)]
    parameters: Annotated[int, Meta(ge=0)]
    nonzero_parameters: Annotated[int, Meta(ge=0)] | None = None
    macs: Annotated[int, Meta(ge=0)]
    peak_memory_mb: float | None = None
    latency: dict[str, LatencyStats] = field(default_factory=dict)
    fidelity: Fidelity | None = None
    host: str = ""


class GoldenCase(Strict, frozen=True, kw_only=True):
    """An input with the output the variant produced for it when it was built."""

    inputs: dict[str, list[float]]
    outputs: dict[str, list[float]]


class Manifest(Strict, frozen=True, kw_only=True):
    """What the controller says about one deployable artifact; signed, verified by agents.

    ``model`` is name:version, the variant in the version's build part; ``precision`` is fp32,
    fp16, int8 or mixed; ``technique`` how it was made (reference, fp16, quantize-static, ...);
    ``golden`` the cases of the smoke test; ``rules`` the rule baseline of the last fallback
    tier; ``device_classes`` the hardware classes it is meant for (empty: any).
    """

    model: ModelRef
    artifact: Artifact
    task: Task
    precision: str
    technique: str
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    golden: list[GoldenCase] = field(default_factory=list)
    rtol: Annotated[float, Meta(ge=0)] = 1e-3
    atol: Annotated[float, Meta(ge=0)] = 1e-4
    profile: Profile | None = None
    rules: dict[str, Any] | None = None
    device_classes: list[str] = field(default_factory=list)
    created: datetime
    expires: datetime | None = None


class RollbackGrant(Strict, frozen=True, kw_only=True):
    """The controller's signed permission for one device to go back to one older artifact.

    A rollback lets an agent accept a version older than the one it runs; without this grant
    a replayed old Deploy with ``rollback: true`` would be a downgrade attack. It names the
    device and the artifact and expires soon after it is issued.
    """

    device: DeviceId
    sha256: Sha256
    issued: datetime
    expires: datetime


class SignedManifest(Strict, frozen=True, kw_only=True):
    """A manifest (or a RollbackGrant) as JSON text (serialized once: verify these bytes), a
    base64 Ed25519 signature of its UTF-8 bytes, and the signing key's id (the first 16 hex
    digits of sha256(public key bytes))."""

    payload: str
    signature: str
    key_id: str


Command = Deploy | Ping | InjectFault
Message = (
    Birth
    | Death
    | Deploy
    | Ping
    | InjectFault
    | ControllerState
    | Stored
    | Reply
    | Event
    | TelemetryBatch
    | Result
    | BlobRequest
    | SensorReading
)


def _kind(cls: type[Envelope]) -> str:
    default = next(f.default for f in msgspec.structs.fields(cls) if f.name == "kind")
    assert isinstance(default, str)
    return default


# kind -> message class: the one dispatch table of the union (``kind`` discriminates).
MESSAGE_KINDS: dict[str, type[Envelope]] = {
    _kind(cls): cls
    for cls in (
        Birth,
        Death,
        Deploy,
        Ping,
        InjectFault,
        ControllerState,
        Stored,
        Reply,
        Event,
        TelemetryBatch,
        Result,
        BlobRequest,
        SensorReading,
    )
}
COMMAND_KINDS = ("deploy", "ping", "inject_fault")
_COMMANDS = {kind: MESSAGE_KINDS[kind] for kind in COMMAND_KINDS}

T = TypeVar("T", bound=Strict)
_json_decode = msgspec.json.decode
_encode = msgspec.json.Encoder().encode


_NAMED_FIELD = re.compile(r"^Object (contains unknown|missing required) field `(.*)`$")


def reason_of(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int` >= 0 - at `$.records[0].seq`" as "records[0].seq: expected
    `int` >= 0", the form every greenfleet error takes (where, then what); a field that is
    unknown or missing is named in the where: "broker.hots: unknown field"."""
    text = str(exc)
    what, sep, where = text.rpartition(" - at `")
    if not sep:
        what, where = text, ""
    where = where.rstrip("`").removeprefix("$").removeprefix(".")
    named = _NAMED_FIELD.match(what)
    if named:
        where = f"{where}.{named[2]}" if where else named[2]
        what = "unknown field" if named[1] == "contains unknown" else "required field missing"
    elif not sep:
        return what[:1].lower() + what[1:]
    return f"{where or 'message'}: {what[:1].lower()}{what[1:]}"


def _raw(payload: bytes | str, what: str) -> dict[str, Any]:
    try:
        raw = _json_decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:  # also huge integers, absurd nesting
        raise ProtocolError(f"{what} is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(raw).__name__}")
    if raw.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what} has protocol version {raw.get('v')!r}; this side speaks {PROTOCOL_VERSION}"
        )
    return raw


def _decode(kinds: dict[str, type[Envelope]], payload: bytes | str, what: str) -> Any:
    raw = _raw(payload, what)
    kind = raw.get("kind")
    cls = kinds.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"{what} has unknown kind {kind!r}")
    try:
        return msgspec.convert(raw, cls)
    except (msgspec.ValidationError, ValueError) as exc:
        reason = reason_of(exc) if isinstance(exc, msgspec.ValidationError) else str(exc)
        raise ProtocolError(f"malformed {kind}: {reason}") from exc


def decode(payload: bytes | str) -> Message:
    """Parse any greenfleet JSON message; raise ProtocolError with a readable reason."""
    result: Message = _decode(MESSAGE_KINDS, payload, "message")
    return result


def decode_command(payload: bytes | str) -> Command:
    """Parse a message on a cmd topic; anything but a command is a ProtocolError."""
    result: Command = _decode(_COMMANDS, payload, "command")
    return result


def command_id(payload: bytes | str) -> str:
    """Best-effort id of a command that failed to parse, so the error reply can echo it."""
    try:
        raw = _json_decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return ""
    value = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(value, str) or len(value) > 64:
        return ""
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate could not be echoed in a reply
        return ""
    return value


def encode(message: Strict) -> bytes:
    """Serialize a message (or any wire model) to compact JSON bytes."""
    return _encode(message)


def load(cls: type[T], payload: bytes | str) -> T:
    """Parse JSON text as one wire model (a Manifest, a Profile, ...); ProtocolError says why
    not. The envelope checks of :func:`decode` are for messages; this is for their parts and
    for the files an agent keeps."""
    try:
        return msgspec.json.decode(payload, type=cls)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        reason = reason_of(exc) if isinstance(exc, msgspec.ValidationError) else str(exc)
        raise ProtocolError(f"malformed {cls.__name__}: {reason[:300]}") from exc


def convert(obj: Any, cls: type[T]) -> T:
    """Build a wire model from plain values (dicts, lists, ISO strings), checked as a decode
    would check them; ProtocolError says what is wrong."""
    try:
        return msgspec.convert(obj, cls)
    except (msgspec.ValidationError, ValueError) as exc:
        reason = reason_of(exc) if isinstance(exc, msgspec.ValidationError) else str(exc)
        raise ProtocolError(reason) from exc


def to_builtins(message: Strict) -> dict[str, Any]:
    """The JSON form of a wire model as Python values (what ``json.loads(encode(m))`` gives)."""
    result: dict[str, Any] = msgspec.to_builtins(message)
    return result


def replace(message: T, **changes: Any) -> T:
    """A copy of a (frozen) wire model with some fields changed, unchecked like a build."""
    return msgspec.structs.replace(message, **changes)
