"""The greenfleet wire contract: MQTT topics and the JSON messages sent on them.

This is the only place where topics are built or parsed and where message shapes are
defined; controller, agent, simulator and tests all go through it. It imports nothing but
the standard library and pydantic, so that any process (and any test) can speak the
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

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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
    Field(
        pattern=_DEVICE_ID.pattern,
        description="Device identifier: letters, digits, '_', '.', '-'; at most 64 characters.",
    ),
]
Sha256 = Annotated[str, Field(pattern=_SHA256.pattern, description="Lower-case hex SHA-256.")]


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


@dataclass(frozen=True, slots=True)
class ParsedTopic:
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


class Strict(BaseModel):
    """Base of every wire model: unknown fields are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


MessageId = Annotated[str, Field(min_length=1, max_length=64)]

# Bounds on what a device may report (issue 15): every byte from a device is hostile input, and
# a value that passes the schema must never break the code that stores or sums it (a window of
# 1e300 s overflowed a timestamp and took its whole ingest batch with it).
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
MAX_WINDOW_S = 24 * 3600.0  # a telemetry window is seconds to hours
MAX_COUNT = 10**9  # inferences or errors in one window
MAX_SEQ = 2**53  # exact in JSON numbers and in SQLite
MAX_TEXT = 4096  # a free-text field (an event's message, a reply's error)
Name = Annotated[str, Field(max_length=64)]


def _sane_time(value: datetime) -> datetime:
    """A timestamp between 2000 and 2100 (naive ones are read as UTC): wide enough for any
    clock, narrow enough that adding a window of hours can never overflow."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if not EARLIEST <= aware <= LATEST:
        raise ValueError(f"timestamp {value.isoformat()} is outside 2000..2100")
    return value


Timestamp = Annotated[datetime, AfterValidator(_sane_time)]
MAX_ACKED = 1000  # ids one Stored message may name: twice the controller's ingest batch


class Envelope(Strict):
    """Fields every JSON message carries."""

    v: Literal[1] = Field(default=1, description="Protocol version.")
    id: str = Field(default_factory=new_id, min_length=1, max_length=64, description="Message id.")
    ts: Timestamp = Field(default_factory=utcnow, description="When the sender created it (UTC).")


class ModelFormat(StrEnum):
    """File formats an agent can run."""

    ONNX = "onnx"
    TFLITE = "tflite"


class ModelRef(Strict):
    """A model version as the fleet names it: ``name:version``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="Model name.")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$", description="Version.")

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """Parse ``name:version``; raise ProtocolError naming the expected form."""
        name, sep, version = text.partition(":")
        if not sep:
            raise ProtocolError(f"model reference {text!r} must look like NAME:VERSION")
        try:
            return cls(name=name, version=version)
        except ValidationError as exc:
            raise ProtocolError(f"invalid model reference {text!r}: {_first_error(exc)}") from exc


class Artifact(Strict):
    """One model file, addressed by content."""

    sha256: Sha256
    size: int = Field(gt=0, le=MAX_ARTIFACT_BYTES, description="Size in bytes (at most 1 TiB).")
    format: ModelFormat
    chunk_size: int = Field(
        default=DEFAULT_CHUNK_SIZE, gt=0, le=MAX_CHUNK_SIZE, description="Bytes per chunk."
    )

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


class ActiveModel(Strict):
    """What an agent is running."""

    model: ModelRef
    sha256: Sha256
    format: ModelFormat


class HardwareFacts(Strict):
    """What the agent read from its host at start."""

    arch: Name = Field(description="Machine architecture, e.g. x86_64 or aarch64.")
    cpu_model: str = Field(default="", max_length=256, description="CPU model name, if readable.")
    cpu_flags: list[Name] = Field(
        default_factory=list, max_length=256, description="Notable CPU features."
    )
    cores: int = Field(ge=1, le=4096)
    memory_mb: int = Field(ge=0, le=2**40, description="Physical memory in MiB.")
    os: str = Field(max_length=256, description="Kernel and OS, e.g. 'Linux 6.1.0'.")
    python: Name


class Birth(Envelope):
    """Retained on the state topic when an agent connects: who it is and what it runs."""

    kind: Literal["birth"] = "birth"
    session: str = Field(min_length=1, max_length=64, description="New at every agent start.")
    agent_version: Name
    device_class: Name = Field(description="Hardware class, a device_configs/ name.")
    labels: dict[Name, Name] = Field(default_factory=dict, max_length=32)
    runtimes: list[ModelFormat] = Field(description="Formats the agent can load.")
    hardware: HardwareFacts
    active: ActiveModel | None = None
    last_good: ActiveModel | None = Field(
        default=None, description="The previous model, kept on disk for an instant rollback."
    )
    fallback: ActiveModel | None = Field(
        default=None, description="The small variant staged in advance as a fallback tier."
    )
    tier: Tier = Field(default=Tier.ACTIVE, description="The fallback tier serving now.")
    preloaded: ActiveModel | None = Field(
        default=None, description="Fetched and staged, waiting for an activation window."
    )
    outbox_dropped: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEQ,
        description="Messages the agent's outbox dropped (full, too old, disk), over its life.",
    )


class Death(Envelope):
    """The last will, retained on the state topic: the broker publishes it when the agent vanishes.

    An agent that stops cleanly publishes it itself.
    """

    kind: Literal["death"] = "death"
    session: str = Field(min_length=1, max_length=64)
    reason: str = "connection lost"


class Deploy(Envelope):
    """Controller -> agent: fetch this artifact, verify it, and make it the active model."""

    kind: Literal["deploy"] = "deploy"
    model: ModelRef
    artifact: Artifact
    window: int = Field(default=16, ge=1, le=MAX_WINDOW, description="Chunks in flight at once.")
    rollback: bool = Field(
        default=False, description="An explicit rollback: an older version is allowed."
    )
    rollback_grant: SignedManifest | None = Field(
        default=None,
        description="A signed RollbackGrant; enrolled agents allow an older version only with it.",
    )
    manifest: SignedManifest | None = Field(
        default=None, description="The controller-signed manifest; enrolled agents require it."
    )
    slot: Slot = Field(
        default=Slot.ACTIVE,
        description="active: run it now; fallback: keep it ready as a tier; preload: keep it "
        "on disk until an active deploy of it.",
    )


class Ping(Envelope):
    """Controller -> agent: answer with a Reply; used for liveness and round-trip time."""

    kind: Literal["ping"] = "ping"


class FaultKind(StrEnum):
    """Bearing faults the simulated vibration sensor can inject."""

    NONE = "none"
    OUTER_RACE = "outer_race"
    INNER_RACE = "inner_race"
    BALL = "ball"


class InjectFault(Envelope):
    """Controller -> agent: set the simulated sensor's bearing fault (demos and tests only).

    An agent whose input is not the simulated sensor refuses it with an error reply.
    """

    kind: Literal["inject_fault"] = "inject_fault"
    fault: FaultKind
    severity: float = Field(default=1.0, ge=0.0, le=10.0)


class ControllerState(Envelope):
    """Controller -> agents, retained on CONTROLLER_TOPIC: is the controller subscribed?

    A broker restarted without persistence forgets the controller's subscriptions; telemetry an
    agent replays before the controller is back would be acknowledged by the broker and handed
    to nobody. So an agent that has seen this message holds its outbox until the controller is
    online again, and resends what the broker acknowledged meanwhile unless ``since`` shows the
    controller's connection never lapsed (the pattern of Sparkplug's primary host state).
    """

    kind: Literal["controller_state"] = "controller_state"
    online: bool
    session: str = Field(min_length=1, max_length=64)
    since: datetime = Field(description="When this connection of the controller began.")


class Reply(Envelope):
    """Agent -> controller: the outcome of one command, echoing its id in ``ref``."""

    kind: Literal["reply"] = "reply"
    ref: str = Field(
        max_length=64, description="The id of the command this answers, or '' if it had none."
    )
    ok: bool
    error: str | None = Field(
        default=None, max_length=MAX_TEXT, description="What went wrong and what to do."
    )
    detail: dict[str, Any] = Field(default_factory=dict)


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


class Stored(Envelope):
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
    ids: list[MessageId] = Field(default_factory=list, max_length=MAX_ACKED)
    rejected: list[MessageId] = Field(default_factory=list, max_length=MAX_ACKED)


class Event(Envelope):
    """Agent -> controller: something happened; ``message`` is for people, ``detail`` for code."""

    kind: Literal["event"] = "event"
    event: EventKind
    session: str = Field(min_length=1, max_length=64)
    message: str = Field(default="", max_length=MAX_TEXT)
    detail: dict[str, Any] = Field(default_factory=dict)


class PowerMethod(StrEnum):
    """How a power figure was obtained; an estimate is never passed off as a measurement."""

    ESTIMATE = "estimate"
    RAPL = "rapl"
    HWMON = "hwmon"
    PMIC = "pmic"
    NVML = "nvml"


class TelemetryRecord(Strict):
    """One telemetry window of one agent session; (session, seq) is unique. Every number is
    finite and bounded (see MAX_WINDOW_S and friends): the controller sums and stores them."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    seq: int = Field(ge=0, le=MAX_SEQ, description="Per-session sequence number, from 0, no gaps.")
    start: Timestamp = Field(description="Start of the window (UTC).")
    window_s: float = Field(gt=0, le=MAX_WINDOW_S, description="Length of the window in seconds.")
    model: ModelRef | None = Field(description="The model that served the window, if any.")
    tier: Tier = Field(default=Tier.ACTIVE, description="The fallback tier at the window's end.")
    inferences: int = Field(ge=0, le=MAX_COUNT)
    errors: int = Field(ge=0, le=MAX_COUNT)
    latency_p50_ms: float | None = Field(default=None, ge=0, le=MAX_WINDOW_S * 1000)
    latency_p95_ms: float | None = Field(default=None, ge=0, le=MAX_WINDOW_S * 1000)
    latency_p99_ms: float | None = Field(default=None, ge=0, le=MAX_WINDOW_S * 1000)
    cpu_s: float = Field(ge=0, le=1e6, description="Process CPU time spent in the window.")
    power_w: float | None = Field(
        default=None, ge=0, le=1e5, description="Mean power in the window."
    )
    energy_per_inference_j: float | None = Field(default=None, ge=0, le=1e6)
    power_method: PowerMethod = PowerMethod.ESTIMATE
    outbox_dropped: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEQ,
        description="Messages the agent's outbox dropped (full, too old, disk), over its life.",
    )


class TelemetryBatch(Envelope):
    """Agent -> controller: one or more telemetry records, oldest first."""

    kind: Literal["telemetry"] = "telemetry"
    session: str = Field(min_length=1, max_length=64)
    records: list[TelemetryRecord] = Field(min_length=1, max_length=1000)


class Result(Envelope):
    """Agent -> local consumers: the output of one inference, naming the model and tier."""

    kind: Literal["result"] = "result"
    seq: int = Field(ge=0, description="Per-session inference counter.")
    model: ModelRef | None
    tier: Tier = Tier.ACTIVE
    latency_ms: float = Field(ge=0)
    outputs: dict[str, list[float]] = Field(description="Output name -> flattened values.")
    input_ts: datetime | None = Field(default=None, description="When the input was captured.")


class BlobRequest(Envelope):
    """Agent -> controller: send chunks ``first`` .. ``first + count - 1`` of an artifact."""

    kind: Literal["blob_request"] = "blob_request"
    sha256: Sha256
    first: int = Field(ge=0)
    count: int = Field(ge=1, le=MAX_WINDOW)
    chunk_size: int = Field(gt=0, le=MAX_CHUNK_SIZE)


class SensorReading(Envelope):
    """A window of samples on a local input topic, for agents whose input source is MQTT.

    This is the one message on the wire that a third party (a PLC bridge, a sensor gateway)
    produces; the agent also accepts a bare JSON array of numbers on that topic.
    """

    kind: Literal["reading"] = "reading"
    values: list[float] = Field(min_length=1)
    sample_rate_hz: float | None = Field(default=None, gt=0)


# ------------------------------------------------------------------------------------ manifests


class Task(StrEnum):
    """What a model computes; decides which fidelity metric applies."""

    ANOMALY = "anomaly"  # a score, higher is more anomalous; metric ROC AUC
    CLASSIFICATION = "classification"  # logits or probabilities per class; metric accuracy
    REGRESSION = "regression"  # values; metric R^2


class TensorSignature(Strict):
    """One input or output tensor of a model."""

    name: str
    dtype: str = Field(description="numpy dtype name, e.g. float32.")
    shape: list[int | None] = Field(description="None for a dynamic dimension.")


class LatencyStats(Strict):
    p50_ms: float = Field(ge=0)
    p95_ms: float = Field(ge=0)
    runs: int = Field(ge=1)


class Fidelity(Strict):
    """How closely a variant reproduces the fp32 reference on held-out inputs."""

    samples: int = Field(ge=0)
    agreement: float | None = Field(
        default=None, description="Share of samples with the same decision (class / alarm)."
    )
    correlation: float | None = Field(default=None, description="Pearson r of raw outputs.")
    max_abs_error: float | None = None
    metric: str | None = Field(default=None, description="Task metric: roc_auc, accuracy, r2.")
    metric_value: float | None = Field(default=None, description="The variant's task metric.")
    reference_metric_value: float | None = Field(
        default=None, description="The fp32 reference's task metric on the same data."
    )


# The name each format's latency is reported under in Profile.latency.
LATENCY_KEYS: dict[ModelFormat, str] = {
    ModelFormat.ONNX: "onnxruntime",
    ModelFormat.TFLITE: "litert",
}


class Profile(Strict):
    """What was measured of one variant on the controller's host."""

    size_bytes: int = Field(ge=0)
    parameters: int = Field(ge=0, description="Elements in weight tensors.")
    nonzero_parameters: int | None = Field(default=None, ge=0)
    macs: int = Field(ge=0, description="Estimated multiply-accumulates per inference.")
    peak_memory_mb: float | None = Field(default=None, description="Peak RSS above baseline.")
    latency: dict[str, LatencyStats] = Field(
        default_factory=dict, description="Runtime name (onnxruntime, litert) -> latency."
    )
    fidelity: Fidelity | None = None
    host: str = Field(default="", description="Where it was measured (arch, cores).")


class GoldenCase(Strict):
    """An input with the output the variant produced for it when it was built."""

    inputs: dict[str, list[float]]
    outputs: dict[str, list[float]]


class Manifest(Strict):
    """What the controller says about one deployable artifact; signed, verified by agents."""

    model: ModelRef = Field(description="name:version, the variant in the version's build part.")
    artifact: Artifact
    task: Task
    precision: str = Field(description="fp32, fp16, int8 or mixed.")
    technique: str = Field(description="How it was made: reference, fp16, quantize-static, ...")
    inputs: list[TensorSignature]
    outputs: list[TensorSignature]
    golden: list[GoldenCase] = Field(default_factory=list, description="For the smoke test.")
    rtol: float = Field(default=1e-3, ge=0)
    atol: float = Field(default=1e-4, ge=0)
    profile: Profile | None = None
    rules: dict[str, Any] | None = Field(
        default=None, description="The rule baseline for the last fallback tier."
    )
    device_classes: list[str] = Field(
        default_factory=list, description="Hardware classes it is meant for; empty means any."
    )
    created: datetime
    expires: datetime | None = None


class RollbackGrant(Strict):
    """The controller's signed permission for one device to go back to one older artifact.

    A rollback lets an agent accept a version older than the one it runs; without this grant
    a replayed old Deploy with ``rollback: true`` would be a downgrade attack. It names the
    device and the artifact and expires soon after it is issued.
    """

    device: DeviceId
    sha256: Sha256
    issued: datetime
    expires: datetime


class SignedManifest(Strict):
    """A manifest (or a RollbackGrant) as JSON text and an Ed25519 signature over exactly
    those bytes."""

    payload: str = Field(description="The Manifest, serialized once; verify these bytes.")
    signature: str = Field(description="Base64 Ed25519 signature of payload's UTF-8 bytes.")
    key_id: str = Field(description="First 16 hex digits of sha256(public key bytes).")


Deploy.model_rebuild()  # it refers to SignedManifest, defined further down

Command = Annotated[Deploy | Ping | InjectFault, Field(discriminator="kind")]
Message = Annotated[
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
    | SensorReading,
    Field(discriminator="kind"),
]
MESSAGE: TypeAdapter[Message] = TypeAdapter(Message)
COMMAND: TypeAdapter[Command] = TypeAdapter(Command)
COMMAND_KINDS = ("deploy", "ping", "inject_fault")


def _first_error(exc: ValidationError, skip_tag: str | None = None) -> str:
    err = exc.errors()[0]
    loc = list(err["loc"])
    if skip_tag is not None and loc[:1] == [skip_tag]:
        loc = loc[1:]
    where = ".".join(str(p) for p in loc) or "message"
    return f"{where}: {err['msg']}"


def _decode(adapter: TypeAdapter[Any], payload: bytes | str, what: str) -> Any:
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # also huge integers and absurd nesting
        raise ProtocolError(f"{what} is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(raw).__name__}")
    if raw.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what} has protocol version {raw.get('v')!r}; this side speaks {PROTOCOL_VERSION}"
        )
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        kind = raw.get("kind")
        if exc.errors()[0]["type"] in ("union_tag_invalid", "union_tag_not_found"):
            raise ProtocolError(f"{what} has unknown kind {kind!r}") from exc
        raise ProtocolError(f"malformed {kind or what}: {_first_error(exc, kind)}") from exc


def decode(payload: bytes | str) -> Message:
    """Parse any greenfleet JSON message; raise ProtocolError with a readable reason."""
    result: Message = _decode(MESSAGE, payload, "message")
    return result


def decode_command(payload: bytes | str) -> Command:
    """Parse a message on a cmd topic; anything but a command is a ProtocolError."""
    result: Command = _decode(COMMAND, payload, "command")
    return result


def command_id(payload: bytes | str) -> str:
    """Best-effort id of a command that failed to parse, so the error reply can echo it."""
    try:
        raw = json.loads(payload)
    except (ValueError, RecursionError):
        return ""
    value = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(value, str) or len(value) > 64:
        return ""
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate could not be echoed in a reply
        return ""
    return value


def encode(message: BaseModel) -> bytes:
    """Serialize a message to compact JSON bytes."""
    return message.model_dump_json().encode()
