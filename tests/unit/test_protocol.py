"""The wire contract: golden JSON for every message, topics, parse errors, and import hygiene."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent import protocol as p

GOLDEN = Path(__file__).parents[1] / "golden"
REPO = Path(__file__).parents[2]
TS = datetime(2026, 11, 26, 8, 30, 0, tzinfo=UTC)
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
REF = p.ModelRef(name="vibration-ae", version="1.0.0")
HW = p.HardwareFacts(
    arch="aarch64",
    cpu_model="Cortex-A76",
    cpu_flags=["asimd", "asimddp"],
    cores=4,
    memory_mb=8064,
    os="Linux 6.6.31",
    python="3.11.7",
)
ACTIVE = p.ActiveModel(model=REF, sha256=SHA, format=p.ModelFormat.ONNX)

EXAMPLES: dict[str, p.Envelope] = {
    "birth": p.Birth(
        id="m1",
        ts=TS,
        session="s1",
        agent_version="0.1.0",
        device_class="rpi5",
        labels={"site": "plant-a", "line": "3"},
        runtimes=[p.ModelFormat.ONNX, p.ModelFormat.TFLITE],
        hardware=HW,
        active=ACTIVE,
        budgets=p.Budgets(
            latency_ms=50.0, latency_from="class rpi5", power_w=2.0, power_from="agent.yaml"
        ),
    ),
    "death": p.Death(id="m2", ts=TS, session="s1"),
    "deploy": p.Deploy(
        id="c1",
        ts=TS,
        model=REF,
        artifact=p.Artifact(sha256=SHA, size=682655, format=p.ModelFormat.ONNX),
        budgets=p.Budgets(
            latency_ms=50.0,
            latency_from="class rpi5",
            power_w=12.0,
            power_from="label power_budget_w",
        ),
    ),
    "ping": p.Ping(id="c2", ts=TS),
    "inject_fault": p.InjectFault(id="c3", ts=TS, fault=p.FaultKind.OUTER_RACE, severity=0.5),
    "reply": p.Reply(id="m3", ts=TS, ref="c1", ok=False, error="sha256 mismatch", detail={"x": 1}),
    "event": p.Event(
        id="m4",
        ts=TS,
        event=p.EventKind.ACTIVATED,
        session="s1",
        message="vibration-ae:1.0.0 active",
        detail={"previous": None},
    ),
    "telemetry": p.TelemetryBatch(
        id="m5",
        ts=TS,
        session="s1",
        records=[
            p.TelemetryRecord(
                seq=0,
                start=TS,
                window_s=5.0,
                model=REF,
                inferences=100,
                errors=1,
                latency_p50_ms=0.2,
                latency_p95_ms=0.4,
                latency_p99_ms=0.9,
                cpu_s=0.3,
                power_w=3.2,
                energy_per_inference_j=0.0004,
            )
        ],
    ),
    "result": p.Result(
        id="m6", ts=TS, seq=42, model=REF, latency_ms=0.21, outputs={"score": [0.41]}, input_ts=TS
    ),
    "blob_request": p.BlobRequest(id="m7", ts=TS, sha256=SHA, first=8, count=8, chunk_size=262144),
    "controller_state": p.ControllerState(id="m9", ts=TS, online=True, session="c1", since=TS),
    "stored": p.Stored(id="m10", ts=TS, ids=["m4", "m5"], rejected=["m11"]),
    "reading": p.SensorReading(id="m8", ts=TS, values=[0.1, -0.2, 0.3], sample_rate_hz=12800.0),
}


def test_every_message_kind_has_an_example() -> None:
    declared = {p._kind(cls) for cls in p.Envelope.__subclasses__()}
    assert declared == set(EXAMPLES)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_golden_json(kind: str) -> None:
    """The wire format is pinned: a change to a message is a visible diff in tests/golden/."""
    encoded = json.loads(p.encode(EXAMPLES[kind]))
    path = GOLDEN / f"{kind}.json"
    if os.environ.get("GF_UPDATE_GOLDEN"):
        path.write_text(json.dumps(encoded, indent=2, sort_keys=True) + "\n")
    assert encoded == json.loads(path.read_text()), f"wire format of {kind} changed"
    assert p.decode(path.read_bytes()) == EXAMPLES[kind]


def test_topics_round_trip() -> None:
    assert p.topic("press-1", p.Channel.CMD) == "gf/v1/press-1/cmd"
    assert p.parse_topic("gf/v1/press-1/telemetry") == p.ParsedTopic("press-1", p.Channel.TELEMETRY)
    assert p.parse_topic("gf/v1/press-1/blob/req").channel is p.Channel.BLOB_REQ
    parsed = p.parse_topic(p.blob_topic("press-1", SHA, 12))
    assert (parsed.channel, parsed.sha256, parsed.index) == (p.Channel.BLOB, SHA, 12)
    assert p.subscription(p.Channel.STATE) == "gf/v1/+/state"


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("gf/v2/a/cmd", "not a gf/v1 topic"),
        ("gf/v1/a/reboot", "unknown channel"),
        ("gf/v1/a b/cmd", "invalid device id"),
        ("gf/v1/a/blob/zz/1", "malformed blob topic"),
        (f"gf/v1/a/blob/{'0' * 64}/{2**40 + 1}", "malformed blob topic"),  # past any artifact
        (f"gf/blobs/v1/{'0' * 64}/{2**40 + 1}", "malformed blob topic"),
    ],
)
def test_bad_topics_are_named(bad: str, needle: str) -> None:
    with pytest.raises(p.ProtocolError, match=needle):
        p.parse_topic(bad)


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"kind": "reboot", "id": "x"}', "unknown kind 'reboot'"),
        (b'{"kind": "deploy", "id": "x"}', "malformed deploy: model: required field missing"),
        (b'{"v": 2, "kind": "ping"}', "protocol version 2"),
        (b'{"kind": "ping", "colour": "red"}', "colour"),
    ],
)
def test_malformed_commands_get_readable_errors(payload: bytes, needle: str) -> None:
    with pytest.raises(p.ProtocolError, match=needle):
        p.decode_command(payload)


def test_non_command_on_cmd_topic_is_rejected() -> None:
    with pytest.raises(p.ProtocolError, match="unknown kind 'birth'"):
        p.decode_command(p.encode(EXAMPLES["birth"]))


def test_command_id_is_recovered_for_error_replies() -> None:
    assert p.command_id(b'{"kind": "reboot", "id": "abc"}') == "abc"
    assert p.command_id(b"garbage") == ""


def test_model_ref_parse() -> None:
    assert p.ModelRef.parse("vibration-ae:1.0.0+tflite").version == "1.0.0+tflite"
    with pytest.raises(p.ProtocolError, match="NAME:VERSION"):
        p.ModelRef.parse("vibration-ae")


def test_artifact_chunk_count() -> None:
    art = p.Artifact(sha256=SHA, size=10, format=p.ModelFormat.ONNX, chunk_size=4)
    assert art.chunk_count == 3


def test_importing_protocol_loads_no_runtime_and_no_mqtt() -> None:
    code = (
        "import sys, agent.protocol; "
        "bad = [m for m in ('onnxruntime', 'paho', 'numpy', 'ai_edge_litert', 'sqlite_utils') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_agent_imports_nothing_from_controller_or_model_store() -> None:
    offenders = []
    for path in (REPO / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO)}: {n}"
                for n in names
                if n.split(".")[0] in ("controller", "model_store")
            ]
    assert offenders == []


@pytest.mark.parametrize(
    "budgets",
    [
        {"latency_ms": 1e12},
        {"power_w": -1.0},
        {"latency_from": "x" * 65},
        {"latency_ms": 50.0, "colour": "red"},
    ],
)
def test_budgets_a_device_reports_are_bounded(budgets: dict[str, object]) -> None:
    """A birth is what a device says of itself: its budgets are bounded like every field."""
    raw = json.loads(p.encode(EXAMPLES["birth"]))
    raw["budgets"] = budgets
    with pytest.raises(p.ProtocolError):
        p.decode(json.dumps(raw).encode())
