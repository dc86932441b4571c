"""The agent's manifest and artifact checks, against manifests signed by the real controller key."""

from __future__ import annotations

import base64
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol as p
from agent.errors import AgentError
from agent.verify import (
    ManifestRejected,
    RejectReason,
    check_artifact,
    check_golden,
    check_latency,
    check_received,
    compare_versions,
    load_public_key,
    parse_semver,
    require_cryptography,
    verify_manifest,
    verify_rollback,
)
from model_store.signing import Signer

REPO = Path(__file__).parents[2]
SHA = "ab" * 32
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
WEIGHTS = np.array([[0.5, -1.0], [2.0, 0.25], [1.0, 1.0]], dtype=np.float32)  # 3 in -> 2 out


def model(x: np.ndarray) -> np.ndarray:
    return (x.reshape(1, 3) @ WEIGHTS).astype(np.float32)


def golden_case(values: list[float]) -> p.GoldenCase:
    x = np.asarray(values, dtype=np.float32)
    return p.GoldenCase(inputs={"x": values}, outputs={"y": model(x).ravel().tolist()})


def manifest(**changes: Any) -> p.Manifest:
    fields: dict[str, Any] = {
        "model": p.ModelRef(name="vib", version="1.2.0+int8"),
        "artifact": p.Artifact(sha256=SHA, size=1000, format=p.ModelFormat.ONNX),
        "task": p.Task.ANOMALY,
        "precision": "int8",
        "technique": "quantize-static",
        "inputs": [p.TensorSignature(name="x", dtype="float32", shape=[1, 3])],
        "outputs": [p.TensorSignature(name="y", dtype="float32", shape=[1, 2])],
        "golden": [golden_case([1.0, 2.0, 3.0]), golden_case([-0.5, 0.0, 4.0])],
        "created": NOW - timedelta(days=1),
        "expires": NOW + timedelta(days=30),
        "device_classes": ["rpi5", "jetson-nano"],
    }
    fields.update(changes)
    return p.Manifest(**fields)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.load_or_create(tmp_path / "keys")


def enrolled(tmp_path: Path) -> bytes:
    """The key as an agent gets it: the text of the controller's keys/signing.pub."""
    return load_public_key((tmp_path / "keys" / "signing.pub").read_text())


def verify(signed: p.SignedManifest | None, keys: list[bytes], **kwargs: Any) -> p.Manifest:
    args: dict[str, Any] = {"now": NOW, "device_class": "rpi5", "active": None}
    args.update(kwargs)
    return verify_manifest(signed, keys, **args)


def assert_reason(info: pytest.ExceptionInfo[ManifestRejected], reason: str) -> None:
    assert info.value.reason == reason
    assert info.value.detail["reason"] == reason


# ------------------------------------------------------------------------------------- keys


def test_public_key_is_read_from_signing_pub_with_whitespace(signer: Signer) -> None:
    text = signer.public_raw.hex()
    assert load_public_key(f"  {text}\n") == signer.public_raw
    assert load_public_key(f"{text[:32]}\n{text[32:]}".upper()) == signer.public_raw


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "64 hex digits.*got 0 characters"),
        ("ab" * 31, "got 62 characters"),
        ("zz" * 32, "non-hex characters"),
        ("-----BEGIN PRIVATE KEY-----\nMC4CAQ...\n-----END PRIVATE KEY-----", "never copy"),
    ],
)
def test_anything_but_a_hex_public_key_is_refused_with_the_expected_form(
    text: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        load_public_key(text)


def test_an_enrolled_key_of_the_wrong_length_is_a_setup_error(signer: Signer) -> None:
    with pytest.raises(ValueError, match="32"):
        verify(signer.sign(manifest()), [b"\x01" * 31])


# ------------------------------------------------------------------------------ happy path


def test_a_signed_manifest_for_this_device_verifies(signer: Signer, tmp_path: Path) -> None:
    signed = signer.sign(manifest())
    assert verify(signed, [enrolled(tmp_path)]) == manifest()
    # Wire round trip: the signed manifest survives JSON encoding unchanged.
    again = p.load(p.SignedManifest, p.encode(signed))
    assert verify(again, [enrolled(tmp_path)]) == manifest()


def test_no_expiry_and_no_device_classes_mean_always_and_anywhere(signer: Signer) -> None:
    signed = signer.sign(manifest(expires=None, device_classes=[]))
    got = verify(signed, [signer.public_raw], now=NOW + timedelta(days=3650), device_class="x")
    assert got.model.version == "1.2.0+int8"


def test_importing_verify_does_not_load_cryptography() -> None:
    code = "import sys, agent.verify; sys.exit(1 if 'cryptography' in sys.modules else 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_cryptography_names_the_install_command(
    signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed = signer.sign(manifest())
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric.ed25519", None)
    with pytest.raises(AgentError, match=r"pip install 'greenfleet\[agent\]'") as info:
        verify(signed, [signer.public_raw])
    assert not isinstance(info.value, ManifestRejected)
    with pytest.raises(AgentError, match="greenfleet"):
        require_cryptography()


# -------------------------------------------------------------------------------- refusals


def test_no_manifest_is_unsigned(signer: Signer) -> None:
    with pytest.raises(ManifestRejected, match="no signed manifest") as info:
        verify(None, [signer.public_raw])
    assert_reason(info, "unsigned")


def test_an_empty_signature_is_unsigned(signer: Signer) -> None:
    signed = p.replace(signer.sign(manifest()), signature="")
    with pytest.raises(ManifestRejected) as info:
        verify(signed, [signer.public_raw])
    assert_reason(info, "unsigned")


def test_a_key_the_agent_is_not_enrolled_with_is_unknown_and_the_enrolled_ids_are_listed(
    signer: Signer, tmp_path: Path
) -> None:
    stranger = Signer.load_or_create(tmp_path / "stranger")
    with pytest.raises(ManifestRejected, match=signer.key_id) as info:
        verify(stranger.sign(manifest()), [signer.public_raw])
    assert_reason(info, "unknown_key")
    assert stranger.key_id in str(info.value)
    assert info.value.detail["enrolled"] == [signer.key_id]


def test_an_agent_with_no_enrolled_key_refuses_everything(signer: Signer) -> None:
    with pytest.raises(ManifestRejected, match=r"enrolled: none") as info:
        verify(signer.sign(manifest()), [])
    assert_reason(info, "unknown_key")


def test_a_tampered_payload_is_a_bad_signature(signer: Signer) -> None:
    signed = signer.sign(manifest())
    tampered = p.replace(signed, payload=signed.payload.replace("rpi5", "rpi4", 1))
    with pytest.raises(ManifestRejected, match="does not verify") as info:
        verify(tampered, [signer.public_raw], device_class="rpi4")
    assert_reason(info, "bad_signature")


def test_a_stranger_claiming_the_enrolled_key_id_is_a_bad_signature(
    signer: Signer, tmp_path: Path
) -> None:
    forged = Signer.load_or_create(tmp_path / "stranger").sign(manifest())
    forged = p.replace(forged, key_id=signer.key_id)
    with pytest.raises(ManifestRejected) as info:
        verify(forged, [signer.public_raw])
    assert_reason(info, "bad_signature")


@pytest.mark.parametrize(
    "signature",
    [
        "not base64!",
        base64.b64encode(b"\x00" * 64).decode(),
        base64.b64encode(b"\x00" * 10).decode(),
    ],
)
def test_garbage_signatures_are_bad_signatures(signer: Signer, signature: str) -> None:
    signed = p.replace(signer.sign(manifest()), signature=signature)
    with pytest.raises(ManifestRejected) as info:
        verify(signed, [signer.public_raw])
    assert_reason(info, "bad_signature")


def test_a_payload_that_cannot_be_utf8_is_a_bad_signature(signer: Signer) -> None:
    signed = signer.sign(manifest())
    broken = p.replace(signed, payload=signed.payload + "\ud800")
    with pytest.raises(ManifestRejected) as info:
        verify(broken, [signer.public_raw])
    assert_reason(info, "bad_signature")


def test_a_validly_signed_payload_that_is_not_a_manifest_is_malformed(signer: Signer) -> None:
    # What a newer controller's manifest looks like to an older agent: an unknown field.
    payload = p.encode(manifest()).decode()[:-1] + ', "future_field": 1}'
    signed = sign_payload(signer, payload)
    with pytest.raises(ManifestRejected, match=r"future_field.*upgrade the agent") as info:
        verify(signed, [signer.public_raw])
    assert_reason(info, "malformed")
    with pytest.raises(ManifestRejected) as info:
        verify(sign_payload(signer, "not json"), [signer.public_raw])
    assert_reason(info, "malformed")


def sign_payload(signer: Signer, payload: str) -> p.SignedManifest:
    """Sign arbitrary text with the controller's key (Signer only signs valid Manifests)."""
    signature = signer._private.sign(payload.encode())
    return p.SignedManifest(
        payload=payload, signature=base64.b64encode(signature).decode(), key_id=signer.key_id
    )


def test_a_manifest_past_its_expiry_is_refused(signer: Signer) -> None:
    signed = signer.sign(manifest(expires=NOW))
    with pytest.raises(ManifestRejected, match=r"expired.*clock") as info:
        verify(signed, [signer.public_raw])
    assert_reason(info, "expired")
    assert verify(signed, [signer.public_raw], now=NOW - timedelta(seconds=1))


def test_a_naive_expiry_is_read_as_utc(signer: Signer) -> None:
    payload = (
        p.encode(manifest(expires=None))
        .decode()
        .replace('"expires":null', '"expires":"2026-11-26T11:00:00"')
    )
    with pytest.raises(ManifestRejected) as info:
        verify(sign_payload(signer, payload), [signer.public_raw])
    assert_reason(info, "expired")


def test_a_naive_now_is_a_programming_error(signer: Signer) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify(signer.sign(manifest()), [signer.public_raw], now=NOW.replace(tzinfo=None))


def test_a_manifest_for_another_device_class_is_refused(signer: Signer) -> None:
    with pytest.raises(ManifestRejected, match="rpi5, jetson-nano, not 'x86-gateway'") as info:
        verify(signer.sign(manifest()), [signer.public_raw], device_class="x86-gateway")
    assert_reason(info, "wrong_device_class")
    assert info.value.detail["device_classes"] == ["rpi5", "jetson-nano"]


def ref(text: str) -> p.ModelRef:
    return p.ModelRef.parse(text)


@pytest.mark.parametrize(
    "active",
    ["vib:1.3.0", "vib:2.0.0+fp32", "vib:1.2.1-rc.1"],
)
def test_an_older_version_than_the_active_one_is_refused(signer: Signer, active: str) -> None:
    signed = signer.sign(manifest())
    with pytest.raises(ManifestRejected, match=r"older than the active.*rollback") as info:
        verify(signed, [signer.public_raw], active=ref(active))
    assert_reason(info, "older_version")


def test_an_explicit_rollback_accepts_an_older_version(signer: Signer) -> None:
    signed = signer.sign(manifest())
    got = verify(signed, [signer.public_raw], active=ref("vib:1.3.0"), allow_older=True)
    assert got.model == ref("vib:1.2.0+int8")


@pytest.mark.parametrize(
    "active",
    [
        "vib:1.2.0+fp32",  # same version, another variant: switching variants is allowed
        "vib:1.2.0+int8",  # the same again
        "vib:1.1.9",
        "vib:1.2.0-rc.2",
        "other:9.0.0",  # another model: nothing to compare
    ],
)
def test_same_or_newer_versions_and_other_models_are_accepted(signer: Signer, active: str) -> None:
    assert verify(signer.sign(manifest()), [signer.public_raw], active=ref(active))


def test_versions_that_cannot_be_ordered_are_refused_unless_rolled_back(signer: Signer) -> None:
    signed = signer.sign(manifest(model=ref("vib:2026-01")))
    with pytest.raises(ManifestRejected, match="semver") as info:
        verify(signed, [signer.public_raw], active=ref("vib:1.0.0"))
    assert_reason(info, "unordered_version")
    assert verify(signed, [signer.public_raw], active=ref("vib:1.0.0"), allow_older=True)
    assert verify(signed, [signer.public_raw], active=None)


def test_refusals_are_checked_signature_first(signer: Signer, tmp_path: Path) -> None:
    # Expired, for another class and older: but signed by a stranger, and that is what counts.
    bad = manifest(expires=NOW - timedelta(days=1), device_classes=["other"])
    stranger = Signer.load_or_create(tmp_path / "stranger")
    with pytest.raises(ManifestRejected) as info:
        verify(stranger.sign(bad), [signer.public_raw], active=ref("vib:9.0.0"))
    assert_reason(info, "unknown_key")


def test_key_rotation_either_enrolled_key_verifies(tmp_path: Path) -> None:
    old = Signer.load_or_create(tmp_path / "old")
    new = Signer.load_or_create(tmp_path / "new")
    keys = [old.public_raw, new.public_raw]
    assert verify(old.sign(manifest()), keys) == manifest()
    assert verify(new.sign(manifest()), keys) == manifest()
    third = Signer.load_or_create(tmp_path / "third")
    with pytest.raises(ManifestRejected, match=f"{old.key_id}, {new.key_id}") as info:
        verify(third.sign(manifest()), keys)
    assert_reason(info, "unknown_key")


# --------------------------------------------------------------------------------- semver

ORDERED = [
    "1.0.0-alpha",
    "1.0.0-alpha.1",
    "1.0.0-alpha.beta",
    "1.0.0-beta",
    "1.0.0-beta.2",
    "1.0.0-beta.11",
    "1.0.0-rc.1",
    "1.0.0",
    "1.0.1",
    "1.1.0",
    "1.10.0",
    "2.0.0",
]


def test_semver_precedence_follows_the_spec() -> None:
    for i, older in enumerate(ORDERED):
        for newer in ORDERED[i + 1 :]:
            assert compare_versions(older, newer) == -1, (older, newer)
            assert compare_versions(newer, older) == 1, (newer, older)
        assert compare_versions(older, older) == 0
    assert sorted(ORDERED[::-1], key=parse_semver) == ORDERED


def test_the_variant_build_part_does_not_count_for_ordering() -> None:
    assert compare_versions("1.0.0+a", "1.0.0+b") == 0
    assert compare_versions("1.0.0-rc.1+fp16", "1.0.0+int8") == -1
    assert str(parse_semver("1.0.0-rc.1+fp16")) == "1.0.0-rc.1"


@pytest.mark.parametrize(
    "version",
    ["1.0", "1.0.0.0", "01.0.0", "1.0.0-01", "1.0.0-", "v1.0.0", "1.0.0-a..b", "\u0661.0.0"],
)
def test_non_semver_versions_are_value_errors(version: str) -> None:
    with pytest.raises(ValueError, match="not a semver version"):
        parse_semver(version)


# ------------------------------------------------------------------------------- artifacts


def test_the_deploy_artifact_must_be_the_signed_one() -> None:
    signed = manifest()
    check_artifact(signed, signed.artifact)
    # The chunk size is the transfer's business, not the artifact's identity.
    check_artifact(signed, p.replace(signed.artifact, chunk_size=4096))
    check_artifact(signed, signed.artifact, model=signed.model)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"sha256": "cd" * 32}, "sha256"),
        ({"size": 999}, "size"),
        ({"format": p.ModelFormat.TFLITE}, "format"),
    ],
)
def test_a_deploy_artifact_that_differs_names_the_field(change: dict[str, Any], field: str) -> None:
    signed = manifest()
    with pytest.raises(ManifestRejected, match=f"artifact {field}") as info:
        check_artifact(signed, p.replace(signed.artifact, **change))
    assert_reason(info, "artifact_mismatch")
    assert info.value.detail["field"] == field


def test_a_deploy_naming_another_model_is_a_mismatch() -> None:
    signed = manifest()
    with pytest.raises(ManifestRejected, match=r"vib:1.3.0") as info:
        check_artifact(signed, signed.artifact, model=ref("vib:1.3.0"))
    assert_reason(info, "artifact_mismatch")
    assert info.value.detail["field"] == "model"


def test_more_bytes_than_declared_stop_the_transfer() -> None:
    signed = manifest()
    check_received(signed, 0)
    check_received(signed, 1000)
    with pytest.raises(ManifestRejected, match=r"1001 bytes.*declares 1000") as info:
        check_received(signed, 1001)
    assert_reason(info, "oversized")


# ---------------------------------------------------------------------------------- golden

SHAPES = {"x": (1, 3)}


def run_model(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = feeds["x"]
    assert x.dtype == np.float32 and x.shape == (1, 3)
    return {"y": model(x)}


def test_golden_cases_pass_on_the_model_that_made_them() -> None:
    check_golden(manifest(), run_model, SHAPES)
    check_golden(manifest(golden=[]), run_model, SHAPES)


def test_a_model_within_tolerance_passes() -> None:
    def close(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": run_model(feeds)["y"] + 5e-5}

    check_golden(manifest(), close, SHAPES)


def test_a_model_that_drifted_is_a_golden_mismatch_naming_output_error_and_tolerance() -> None:
    def drifted(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": run_model(feeds)["y"] + np.array([[0.0, 0.25]], dtype=np.float32)}

    with pytest.raises(ManifestRejected, match=r"output 'y': max abs error 0\.25") as info:
        check_golden(manifest(rtol=1e-3, atol=1e-4), drifted, SHAPES)
    assert_reason(info, "golden_mismatch")
    assert "rtol=0.001" in str(info.value) and "atol=0.0001" in str(info.value)
    assert info.value.detail["max_abs_error"] == pytest.approx(0.25)
    # The same drift passes a manifest that allows it.
    check_golden(manifest(atol=0.3), drifted, SHAPES)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_outputs_are_refused(bad: float) -> None:
    def broken(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        y = run_model(feeds)["y"].copy()
        y[0, 1] = bad
        return {"y": y}

    with pytest.raises(ManifestRejected, match="NaN or infinite") as info:
        check_golden(manifest(atol=1e9), broken, SHAPES)
    assert_reason(info, "nan_output")


def test_a_missing_or_misshapen_output_is_a_golden_mismatch() -> None:
    with pytest.raises(ManifestRejected, match="no such output") as info:
        check_golden(manifest(), lambda feeds: {"z": run_model(feeds)["y"]}, SHAPES)
    assert_reason(info, "golden_mismatch")
    with pytest.raises(ManifestRejected, match=r"produced 1 values.*expects 2") as info:
        check_golden(manifest(), lambda feeds: {"y": run_model(feeds)["y"][:, :1]}, SHAPES)
    assert_reason(info, "golden_mismatch")


def test_golden_inputs_that_do_not_fit_the_model_are_malformed() -> None:
    with pytest.raises(ManifestRejected, match="does not fit its shape") as info:
        check_golden(manifest(), run_model, {"x": (1, 4)})
    assert_reason(info, "malformed")
    with pytest.raises(ManifestRejected, match=r"feeds input 'x'.*inputs: w") as info:
        check_golden(manifest(), run_model, {"w": (1, 3)})
    assert_reason(info, "malformed")


def test_reason_codes_are_the_set_the_tests_cover() -> None:
    covered = {
        "unsigned",
        "unknown_key",
        "bad_signature",
        "malformed",
        "expired",
        "wrong_device_class",
        "older_version",
        "unordered_version",
        "artifact_mismatch",
        "oversized",
        "nan_output",
        "golden_mismatch",
        "too_slow",
        "bad_rollback",
    }
    assert {r.value for r in RejectReason} == covered


# ------------------------------------------------------------------------- staging latency


def profiled(p50_ms: float) -> p.Profile:
    stats = p.LatencyStats(p50_ms=p50_ms, p95_ms=p50_ms * 1.2, runs=50)
    return p.Profile(
        size_bytes=1000, parameters=6, macs=6, latency={"onnxruntime": stats}, host="x86_64 2c"
    )


@pytest.mark.parametrize(
    "p50, measured, budget, rejected",
    [
        (1.0, 19.0, None, False),  # 19x the profile: a slow device, not a wrong model
        (1.0, 21.0, None, True),  # over 20x
        (0.01, 4.9, None, False),  # under the 5 ms floor, whatever the ratio
        (0.01, 5.1, None, True),
        (None, 500.0, None, False),  # no profile: nothing to compare with
        (None, 12.0, 10.0, True),  # over the device's latency budget
        (1.0, 9.0, 10.0, False),
    ],
)
def test_staging_rejects_a_model_far_slower_than_its_profile_or_over_budget(
    p50: float | None, measured: float, budget: float | None, rejected: bool
) -> None:
    staged = manifest(profile=profiled(p50) if p50 is not None else None)
    if not rejected:
        check_latency(staged, p.ModelFormat.ONNX, measured, factor=20.0, budget_ms=budget)
        return
    with pytest.raises(ManifestRejected) as info:
        check_latency(staged, p.ModelFormat.ONNX, measured, factor=20.0, budget_ms=budget)
    assert_reason(info, "too_slow")
    assert f"{measured:.1f} ms" in str(info.value)
    assert ("latency budget" in str(info.value)) == (budget is not None)


def test_a_profile_for_another_runtime_is_not_compared() -> None:
    staged = manifest(profile=profiled(0.001))
    check_latency(staged, p.ModelFormat.TFLITE, 100.0, factor=20.0, budget_ms=None)


# ------------------------------------------------------------------------- rollback grants


def rollback_grant(signer: Signer, **changes: Any) -> p.SignedManifest:
    fields: dict[str, Any] = {
        "device": "press-1",
        "sha256": SHA,
        "issued": NOW - timedelta(minutes=1),
        "expires": NOW + timedelta(hours=1),
    }
    fields.update(changes)
    return signer.sign(p.RollbackGrant(**fields))


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({}, None),
        ({"device": "press-2"}, "not this deploy"),
        ({"sha256": "cd" * 32}, "not this deploy"),
        ({"expires": NOW - timedelta(seconds=1)}, "not now"),
        ({"issued": NOW + timedelta(hours=1)}, "not now"),
        ({"issued": NOW + timedelta(minutes=2)}, None),  # within the clock skew allowed
    ],
)
def test_a_rollback_needs_a_fresh_grant_for_this_device_and_artifact(
    signer: Signer, tmp_path: Path, changes: dict[str, Any], needle: str | None
) -> None:
    signed = rollback_grant(signer, **changes)
    args: dict[str, Any] = {"device": "press-1", "sha256": SHA, "now": NOW}
    if needle is None:
        verify_rollback(signed, [enrolled(tmp_path)], **args)
        return
    with pytest.raises(ManifestRejected, match=needle) as info:
        verify_rollback(signed, [enrolled(tmp_path)], **args)
    assert_reason(info, "bad_rollback")


def test_a_rollback_grant_from_another_key_or_none_at_all_is_refused(
    signer: Signer, tmp_path: Path
) -> None:
    rogue = Signer.load_or_create(tmp_path / "rogue")
    args: dict[str, Any] = {"device": "press-1", "sha256": SHA, "now": NOW}
    for grant in (None, rollback_grant(rogue)):
        with pytest.raises(ManifestRejected) as info:
            verify_rollback(grant, [enrolled(tmp_path)], **args)
        assert_reason(info, "bad_rollback")
