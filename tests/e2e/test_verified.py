"""An enrolled agent runs only what the controller signed: real processes, real Mosquitto."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import onnx
import pytest

from agent import protocol as p
from controller.broker import Mosquitto
from model_store.signing import Signer
from tests.conftest import Probe, Processes, agent_config, unique
from tests.e2e.fake_controller import MODEL, FakeController

pytestmark = pytest.mark.e2e


def manifest_for(data: bytes, version: str, **changes: object) -> p.Manifest:
    fields: dict[str, object] = {
        "model": p.ModelRef(name="vibration-ae", version=version),
        "artifact": p.Artifact(
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            format=p.ModelFormat.ONNX,
            chunk_size=64 * 1024,
        ),
        "task": p.Task.ANOMALY,
        "precision": "fp32",
        "technique": "reference",
        "inputs": [p.TensorSignature(name="window", dtype="float32", shape=[1, 512])],
        "outputs": [p.TensorSignature(name="score", dtype="float32", shape=[1, 1])],
        "created": p.utcnow(),
        "expires": p.utcnow() + timedelta(days=1),
    }
    fields.update(changes)
    return p.convert(fields, p.Manifest)


def signed_deploy(signer: Signer, data: bytes, version: str, **changes: object) -> p.Deploy:
    manifest = manifest_for(data, version, **changes)
    return p.Deploy(
        model=manifest.model, artifact=manifest.artifact, manifest=signer.sign(manifest)
    )


@pytest.fixture
def enrolled(
    mosquitto: Mosquitto, processes: Processes, probe_factory: Callable[..., Probe], tmp_path: Path
) -> tuple[FakeController, Signer]:
    signer = Signer.load_or_create(tmp_path / "keys")
    device = unique("signed")
    probe = probe_factory(f"gf/v1/{device}/#")
    config = agent_config(
        tmp_path / f"{device}.yaml",
        device,
        mosquitto.port,
        extra={"controller_keys": [signer.public_raw.hex()]},
    )
    processes.agent(config)
    probe.wait_for(lambda t, m: t.endswith("/state") and b'"birth"' in m, 20, "birth")
    ctl = FakeController(probe, device)
    ctl.blobs[hashlib.sha256(MODEL).hexdigest()] = MODEL
    first = signed_deploy(signer, MODEL, "2.0.0")
    assert ctl.reply_to(ctl.command(first)).ok
    ctl.serving("vibration-ae:2.0.0")
    return ctl, signer


@pytest.mark.parametrize(
    "make, reason",
    [
        (
            lambda s, d: p.Deploy(
                model=p.ModelRef(name="vibration-ae", version="3.0.0"),
                artifact=manifest_for(d, "3.0.0").artifact,
            ),
            "unsigned",
        ),
        (
            lambda s, d: signed_deploy(
                Signer.load_or_create(Path("/tmp") / unique("rogue")), d, "3.0.0"
            ),
            "unknown_key",
        ),
        (lambda s, d: signed_deploy(s, d, "1.0.0"), "older_version"),
        (
            lambda s, d: signed_deploy(s, d, "3.0.0", expires=p.utcnow() - timedelta(hours=1)),
            "expired",
        ),
        (
            lambda s, d: signed_deploy(s, d, "3.0.0", device_classes=["coral-dev-board"]),
            "wrong_device_class",
        ),
    ],
    ids=["unsigned", "wrong-key", "replayed-older", "expired", "other-class"],
)
def test_refused_manifests_leave_the_active_model_serving(
    enrolled: tuple[FakeController, Signer], make: Callable[[Signer, bytes], p.Deploy], reason: str
) -> None:
    ctl, signer = enrolled
    since = ctl.probe.mark()
    reply = ctl.reply_to(ctl.command(make(signer, MODEL)))
    assert not reply.ok and reply.detail.get("reason") == reason, reply
    event = ctl.event(p.EventKind.DEPLOY_FAILED, since)
    assert event.detail["reason"] == reason
    requested = [t for t, _ in ctl.probe.history[since:] if t.endswith("/blob/req")]
    assert requested == [], "nothing is downloaded before the manifest checks pass"
    ctl.serving("vibration-ae:2.0.0")


def test_golden_cases_that_do_not_match_reject_the_model(
    enrolled: tuple[FakeController, Signer],
) -> None:
    ctl, signer = enrolled
    wrong = p.GoldenCase(inputs={"window": [0.0] * 512}, outputs={"score": [123.0]})
    graph = onnx.load_from_string(MODEL)
    graph.doc_string = "golden test"
    data = graph.SerializeToString()
    ctl.blobs[hashlib.sha256(data).hexdigest()] = data
    reply = ctl.reply_to(ctl.command(signed_deploy(signer, data, "3.0.0", golden=[wrong])))
    assert not reply.ok and "golden" in (reply.error or "")
    ctl.serving("vibration-ae:2.0.0")
    older = signed_deploy(signer, MODEL, "1.0.0")
    replayed = p.replace(older, rollback=True)  # no grant: anyone could send it
    reply = ctl.reply_to(ctl.command(replayed))
    assert not reply.ok and reply.detail.get("reason") == "bad_rollback", reply
    other = grant(signer, "another-device", older.artifact.sha256)
    reply = ctl.reply_to(ctl.command(p.replace(replayed, rollback_grant=other, id=p.new_id())))
    assert not reply.ok and "not this deploy" in (reply.error or ""), reply
    ctl.serving("vibration-ae:2.0.0")
    granted = p.replace(
        replayed, rollback_grant=grant(signer, ctl.device, older.artifact.sha256), id=p.new_id()
    )
    assert ctl.reply_to(ctl.command(granted)).ok, "a signed rollback may go back a version"
    ctl.serving("vibration-ae:1.0.0")


def grant(signer: Signer, device: str, sha256: str) -> p.SignedManifest:
    now = p.utcnow()
    return signer.sign(
        p.RollbackGrant(device=device, sha256=sha256, issued=now, expires=now + timedelta(hours=1))
    )
