"""The agent's checks on a signed manifest and on the model it describes, before activation.

Nothing is loaded that the enrolled controller key did not sign. Every refusal is a
:class:`ManifestRejected` with a short ``reason`` code and a message a person can act on; the
agent turns it into an event (``detail`` is ready to be the event's detail).

    verify_manifest   signature, expiry, device class, no silent downgrade
    check_artifact    the Deploy command names the artifact the manifest signed
    check_received    no more bytes than the manifest declared
    check_golden      the staged model reproduces the manifest's golden outputs

cryptography is imported only when a signature is checked, so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import msgspec
import numpy as np

from agent import protocol as p
from agent.errors import AgentError
from agent.protocol import (
    LATENCY_KEYS,
    Artifact,
    Manifest,
    ModelFormat,
    ModelRef,
    RollbackGrant,
    SignedManifest,
)

PUBLIC_KEY_BYTES = 32
INSTALL_HINT = "pip install 'greenfleet[agent]'"

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_IDENTIFIER = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
_SEMVER = re.compile(
    rf"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:-({_IDENTIFIER}(?:\.{_IDENTIFIER})*))?"
)


class RejectReason(StrEnum):
    """Why the agent refused a manifest or a staged model; the ``reason`` of the event."""

    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    EXPIRED = "expired"
    WRONG_DEVICE_CLASS = "wrong_device_class"
    OLDER_VERSION = "older_version"
    UNORDERED_VERSION = "unordered_version"
    ARTIFACT_MISMATCH = "artifact_mismatch"
    OVERSIZED = "oversized"
    NAN_OUTPUT = "nan_output"
    GOLDEN_MISMATCH = "golden_mismatch"
    TOO_SLOW = "too_slow"
    BAD_ROLLBACK = "bad_rollback"


class ManifestRejected(AgentError):
    """The agent refuses a manifest or the model it describes; nothing was activated."""

    def __init__(self, reason: RejectReason, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail: dict[str, Any] = {"reason": reason.value, **detail}


# ------------------------------------------------------------------------------------ keys


def key_id(public_raw: bytes) -> str:
    """First 16 hex digits of sha256 of the raw public key, as the controller labels signatures."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def load_public_key(text: str) -> bytes:
    """The raw controller public key from the hex text of the controller's ``keys/signing.pub``."""
    if "PRIVATE KEY" in text:
        raise ValueError(
            "this is the controller's private signing key: never copy it to a device; "
            "use the 64 hex digits in keys/signing.pub instead"
        )
    compact = "".join(text.split())
    if not _HEX_KEY.fullmatch(compact):
        got = f"{len(compact)} characters" if len(compact) != 64 else "non-hex characters"
        raise ValueError(
            "a controller public key must be 64 hex digits (the contents of keys/signing.pub "
            f"on the controller); got {got}"
        )
    return bytes.fromhex(compact)


def require_cryptography() -> None:
    """Fail now, with the install command, if signatures cannot be checked on this host."""
    _ed25519_public_key_class()


def _ed25519_public_key_class() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError as exc:
        raise AgentError(
            "cannot verify signed manifests: the 'cryptography' package is not installed; "
            f"run {INSTALL_HINT}"
        ) from exc
    return Ed25519PublicKey


def _signature_valid(public_raw: bytes, signature: bytes, data: bytes) -> bool:
    public_key_class = _ed25519_public_key_class()
    from cryptography.exceptions import InvalidSignature

    try:
        public_key_class.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------- versions


class SemVer(msgspec.Struct, frozen=True, order=True):
    """A semver 2.0 version without build metadata, ordered by precedence (semver §11)."""

    major: int
    minor: int
    patch: int
    _pre_key: tuple[Any, ...]  # orders the prerelease; equal keys, equal prereleases
    prerelease: tuple[str, ...] = ()

    def __str__(self) -> str:
        pre = "-" + ".".join(self.prerelease) if self.prerelease else ""
        return f"{self.major}.{self.minor}.{self.patch}{pre}"


def parse_semver(version: str) -> SemVer:
    """Parse ``MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]``; the build part is ignored for ordering."""
    base = version.partition("+")[0]
    match = _SEMVER.fullmatch(base)
    if match is None:
        raise ValueError(f"{version!r} is not a semver version MAJOR.MINOR.PATCH[-PRE][+VARIANT]")
    major, minor, patch, pre = match.groups()
    identifiers = tuple(pre.split(".")) if pre else ()
    return SemVer(int(major), int(minor), int(patch), _precedence(identifiers), identifiers)


def _precedence(prerelease: tuple[str, ...]) -> tuple[Any, ...]:
    # A release sorts after all of its prereleases; within a prerelease, numeric identifiers
    # compare numerically and sort before alphanumeric ones, and a longer list wins a tie.
    if not prerelease:
        return (1,)
    return (0, tuple((0, int(i), "") if i.isdigit() else (1, 0, i) for i in prerelease))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` is older than, as old as, or newer than ``b`` (variants ignored)."""
    left, right = parse_semver(a), parse_semver(b)
    return (left > right) - (left < right)


# -------------------------------------------------------------------------------- manifests


def verify_manifest(
    signed: SignedManifest | None,
    public_keys: Sequence[bytes],
    *,
    now: datetime,
    device_class: str,
    active: ModelRef | None,
    allow_older: bool = False,
) -> Manifest:
    """The manifest, if it is signed by an enrolled key and fits this device now.

    ``active`` is the model this device runs; ``allow_older`` is set only for an explicit
    rollback. Raises ManifestRejected with the reason otherwise.
    """
    if now.tzinfo is None:
        raise ValueError("verify_manifest needs a timezone-aware 'now' (use agent.protocol.utcnow)")
    for raw in public_keys:
        if len(raw) != PUBLIC_KEY_BYTES:
            raise ValueError(
                f"an enrolled controller key has {len(raw)} bytes; Ed25519 keys have "
                f"{PUBLIC_KEY_BYTES} (read it with load_public_key)"
            )
    if signed is None or not signed.signature:
        raise ManifestRejected(
            RejectReason.UNSIGNED,
            "the deploy carries no signed manifest; the agent only activates models signed by "
            "its controller (check that the controller has a signing key and is up to date)",
        )
    manifest_bytes = _signed_bytes(signed, public_keys)
    manifest = _parse(manifest_bytes)
    check_expiry(manifest, now)
    _check_device_class(manifest, device_class)
    if not allow_older:
        _check_not_older(manifest.model, active)
    return manifest


def _signed_bytes(signed: SignedManifest, public_keys: Sequence[bytes]) -> bytes:
    candidates = [raw for raw in public_keys if key_id(raw) == signed.key_id]
    if not candidates:
        enrolled = ", ".join(key_id(raw) for raw in public_keys) or "none"
        raise ManifestRejected(
            RejectReason.UNKNOWN_KEY,
            f"the manifest is signed with key {signed.key_id!r}, which this agent is not "
            f"enrolled with (enrolled: {enrolled}); re-enroll the device with the controller's "
            "current keys/signing.pub",
            key_id=signed.key_id,
            enrolled=[key_id(raw) for raw in public_keys],
        )
    bad = ManifestRejected(
        RejectReason.BAD_SIGNATURE,
        f"the manifest's signature does not verify with key {signed.key_id}: it was altered "
        "in transit or signed by someone else; it was not activated",
        key_id=signed.key_id,
    )
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        data = signed.payload.encode("utf-8")
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise bad from exc
    if not any(_signature_valid(raw, signature, data) for raw in candidates):
        raise bad
    return data


CLOCK_SKEW = timedelta(minutes=5)  # a grant issued slightly "in the future" by a fast clock


def verify_rollback(
    grant: SignedManifest | None,
    public_keys: Sequence[bytes],
    *,
    device: str,
    sha256: str,
    now: datetime,
) -> None:
    """Accept an explicit rollback only with a grant signed by an enrolled key, for this device
    and this artifact, not expired; ManifestRejected(BAD_ROLLBACK) says what is wrong."""

    def refuse(why: str) -> ManifestRejected:
        return ManifestRejected(
            RejectReason.BAD_ROLLBACK,
            f"refused a rollback: {why}; a rollback must come from the controller "
            "(`greenfleet rollback`), which signs a grant for this device and artifact",
        )

    if grant is None or not grant.signature:
        raise refuse("the deploy carries no signed rollback grant")
    try:
        data = _signed_bytes(grant, public_keys)
    except ManifestRejected as exc:
        raise refuse(f"its grant does not verify ({exc.message})") from exc
    try:
        granted = p.load(RollbackGrant, data)
    except p.ProtocolError as exc:
        raise refuse(f"its grant is malformed ({exc})") from exc
    if granted.device != device or granted.sha256 != sha256:
        raise refuse(f"its grant is for {granted.device} / {granted.sha256[:12]}, not this deploy")
    if not granted.issued - CLOCK_SKEW <= now <= granted.expires:
        raise refuse(f"its grant is valid from {granted.issued} to {granted.expires}, not now")


def read_unsigned(signed: SignedManifest) -> Manifest:
    """The manifest of an agent that is not enrolled: parsed, not verified (it trusts the
    controller for everything anyway); it still gives staging its golden cases and the
    fallback chain its rules. ManifestRejected if it cannot be read."""
    return _parse(signed.payload.encode("utf-8"))


def _parse(payload: bytes) -> Manifest:
    try:
        return msgspec.json.decode(payload, type=Manifest)
    except (msgspec.DecodeError, ValueError) as exc:
        reason = p.reason_of(exc) if isinstance(exc, msgspec.ValidationError) else str(exc)
        where = reason.partition(":")[0] if ": " in reason else "manifest"
        raise ManifestRejected(
            RejectReason.MALFORMED,
            f"the signed manifest is not one this agent understands ({reason}); "
            "if the controller is newer than this agent, upgrade the agent",
            field=where,
        ) from exc


def check_expiry(manifest: Manifest, now: datetime) -> None:
    if manifest.expires is None:
        return
    expires = manifest.expires
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)  # the controller writes UTC
    if now >= expires:
        raise ManifestRejected(
            RejectReason.EXPIRED,
            f"the manifest for {manifest.model} expired at {expires.isoformat()} (device time "
            f"{now.isoformat()}); re-sign it on the controller, or fix this device's clock",
            expires=expires.isoformat(),
            now=now.isoformat(),
        )


def _check_device_class(manifest: Manifest, device_class: str) -> None:
    if manifest.device_classes and device_class not in manifest.device_classes:
        raise ManifestRejected(
            RejectReason.WRONG_DEVICE_CLASS,
            f"{manifest.model} is built for device classes "
            f"{', '.join(manifest.device_classes)}, not {device_class!r}; deploy a variant "
            "made for this class",
            device_class=device_class,
            device_classes=list(manifest.device_classes),
        )


def _check_not_older(model: ModelRef, active: ModelRef | None) -> None:
    if active is None or active.name != model.name:
        return
    try:
        order = compare_versions(model.version, active.version)
    except ValueError as exc:
        raise ManifestRejected(
            RejectReason.UNORDERED_VERSION,
            f"cannot tell whether {model} is older than the active {active} ({exc}); "
            "deploy it as an explicit rollback if it is meant to replace it",
            version=model.version,
            active=active.version,
        ) from exc
    if order < 0:
        raise ManifestRejected(
            RejectReason.OLDER_VERSION,
            f"{model} is older than the active {active}; an older version is only accepted "
            "as an explicit rollback",
            version=model.version,
            active=active.version,
        )


# -------------------------------------------------------------------------------- artifacts


def check_artifact(
    manifest: Manifest, deploy_artifact: Artifact, *, model: ModelRef | None = None
) -> None:
    """The Deploy command must name the artifact (and, if given, the model) the manifest signed."""
    expected = manifest.artifact
    for name in ("sha256", "size", "format"):
        want, got = getattr(expected, name), getattr(deploy_artifact, name)
        if want != got:
            raise ManifestRejected(
                RejectReason.ARTIFACT_MISMATCH,
                f"the deploy command's artifact {name} is {got}, but the signed manifest for "
                f"{manifest.model} says {want}; the controller's records and manifest disagree",
                field=name,
                manifest=str(want),
                deploy=str(got),
            )
    if model is not None and model != manifest.model:
        raise ManifestRejected(
            RejectReason.ARTIFACT_MISMATCH,
            f"the deploy command names model {model}, but the signed manifest is for "
            f"{manifest.model}",
            field="model",
            manifest=str(manifest.model),
            deploy=str(model),
        )


def check_received(manifest: Manifest, received_bytes: int) -> None:
    """Stop a transfer as soon as more bytes arrive than the manifest declared."""
    declared = manifest.artifact.size
    if received_bytes > declared:
        raise ManifestRejected(
            RejectReason.OVERSIZED,
            f"received {received_bytes} bytes for {manifest.model}, but its manifest declares "
            f"{declared}; the transfer was stopped and the partial file should be discarded",
            received=received_bytes,
            declared=declared,
        )


# ----------------------------------------------------------------------------------- golden


def check_golden(
    manifest: Manifest,
    run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
    input_shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Run each golden case through the staged model; its outputs must match within tolerance.

    Exceptions raised by ``run`` (the runtime's own errors) pass through unchanged.
    """
    for number, case in enumerate(manifest.golden):
        feeds = _golden_inputs(manifest, number, case.inputs, input_shapes)
        produced = run(feeds)
        for name, expected_values in case.outputs.items():
            _compare_output(manifest, number, name, produced.get(name), expected_values)


STAGING_LATENCY_FLOOR_MS = 5.0  # below this a model is never "far too slow", whatever the ratio


def check_latency(
    manifest: Manifest | None,
    fmt: ModelFormat,
    measured_ms: float,
    *,
    factor: float,
    budget_ms: float | None,
    budget_from: str = "fallback.latency_budget_ms",
) -> None:
    """Reject a staged model whose median latency here is over the device's latency budget, or
    far beyond (``factor`` times) what the manifest's profile measured on the controller's host.

    The factor is generous because the profile host is usually faster than the device; it
    catches a model that is the wrong one for this hardware, not a slow CPU.
    """
    if budget_ms is not None and measured_ms > budget_ms:
        raise ManifestRejected(
            RejectReason.TOO_SLOW,
            f"staging: median latency {measured_ms:.1f} ms is over this device's latency budget "
            f"of {budget_ms:g} ms ({budget_from}); deploy a smaller variant",
            measured_ms=round(measured_ms, 3),
            budget_ms=budget_ms,
        )
    profile = manifest.profile if manifest is not None else None
    profiled = profile.latency.get(LATENCY_KEYS[fmt]) if profile is not None else None
    if profile is None or profiled is None:
        return
    limit = max(factor * profiled.p50_ms, STAGING_LATENCY_FLOOR_MS)
    if measured_ms > limit:
        raise ManifestRejected(
            RejectReason.TOO_SLOW,
            f"staging: median latency {measured_ms:.1f} ms is over {factor:g}x the "
            f"{profiled.p50_ms:.2f} ms profiled on {profile.host or 'the controller'} "
            f"(limit {limit:.1f} ms); this variant does not suit this device",
            measured_ms=round(measured_ms, 3),
            profiled_ms=profiled.p50_ms,
        )


def _golden_inputs(
    manifest: Manifest,
    number: int,
    inputs: dict[str, list[float]],
    input_shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for name, values in inputs.items():
        if name not in input_shapes:
            raise ManifestRejected(
                RejectReason.MALFORMED,
                f"golden case {number} of {manifest.model} feeds input {name!r}, which the "
                f"model does not have (inputs: {', '.join(input_shapes) or 'none'})",
                case=number,
                input=name,
            )
        try:
            feeds[name] = np.asarray(values, dtype=np.float32).reshape(input_shapes[name])
        except ValueError as exc:
            raise ManifestRejected(
                RejectReason.MALFORMED,
                f"golden case {number} of {manifest.model} has {len(values)} values for input "
                f"{name!r}, which does not fit its shape {tuple(input_shapes[name])}",
                case=number,
                input=name,
            ) from exc
    return feeds


def _compare_output(
    manifest: Manifest,
    number: int,
    name: str,
    produced: np.ndarray | None,
    expected_values: list[float],
) -> None:
    where = f"golden case {number} of {manifest.model}, output {name!r}"
    if produced is None:
        raise ManifestRejected(
            RejectReason.GOLDEN_MISMATCH,
            f"{where}: the model produced no such output",
            case=number,
            output=name,
        )
    actual = np.asarray(produced, dtype=np.float64).ravel()
    expected = np.asarray(expected_values, dtype=np.float64)
    if not np.all(np.isfinite(actual)):
        raise ManifestRejected(
            RejectReason.NAN_OUTPUT,
            f"{where}: the model produced NaN or infinite values; it was not activated",
            case=number,
            output=name,
        )
    if actual.shape != expected.shape:
        raise ManifestRejected(
            RejectReason.GOLDEN_MISMATCH,
            f"{where}: the model produced {actual.size} values, the manifest expects "
            f"{expected.size}",
            case=number,
            output=name,
        )
    if not np.allclose(actual, expected, rtol=manifest.rtol, atol=manifest.atol):
        error = float(np.max(np.abs(actual - expected)))
        raise ManifestRejected(
            RejectReason.GOLDEN_MISMATCH,
            f"{where}: max abs error {error:.3g} exceeds the tolerance "
            f"(rtol={manifest.rtol:g}, atol={manifest.atol:g}); the staged model does not "
            "reproduce what was built and was not activated",
            case=number,
            output=name,
            max_abs_error=error,
            rtol=manifest.rtol,
            atol=manifest.atol,
        )
