"""The model catalog: model versions and their variants in SQLite, bytes stored once by sha256.

A *model version* (``vibration-ae:1.0.0``) has a task, an input/output signature and an
accuracy floor. Its *variants* are the deployable files: the file it was added with (variant
``""``), and what ``models compress`` builds from it, named with semver build metadata
(``vibration-ae:1.0.0+int8-static-qdq``). Artifacts live at ``<home>/store/<sha256>``: the same
bytes are stored once, and an id can never be re-pointed at different bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from agent import protocol as p
from agent.protocol import (
    Artifact,
    ModelFormat,
    ModelRef,
    Profile,
    ProtocolError,
    SignedManifest,
    Task,
    TensorSignature,
)
from agent.runtime.base import LoadedModel, TensorSpec
from model_store.eligibility import judge
from model_store.errors import InvalidModel, ModelStoreError, VersionConflict

SUFFIX_FORMATS = {".onnx": ModelFormat.ONNX, ".tflite": ModelFormat.TFLITE}
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Variant:
    """One deployable file of a model version."""

    ref: ModelRef
    base: str
    variant: str
    format: ModelFormat
    sha256: str
    size: int
    path: Path
    created: str
    precision: str | None = None
    technique: str | None = None
    eligible: bool = True
    reason: str | None = None
    notes: tuple[str, ...] = ()
    details: dict[str, Any] | None = None
    profile: Profile | None = None
    manifest: SignedManifest | None = None

    @property
    def id(self) -> str:
        return str(self.ref)

    def artifact(self) -> Artifact:
        return Artifact(sha256=self.sha256, size=self.size, format=self.format)

    @classmethod
    def from_row(cls, row: dict[str, Any], store: Path) -> Variant:
        version = row["version"]
        return cls(
            ref=ModelRef(name=row["name"], version=version),
            base=row.get("base") or f"{row['name']}:{version.partition('+')[0]}",
            variant=row.get("variant") or "",
            format=ModelFormat(row["format"]),
            sha256=row["sha256"],
            size=row["size"],
            path=store / row["path"],
            created=row["created"],
            precision=row.get("precision"),
            technique=row.get("technique"),
            eligible=row.get("eligible") != 0,
            reason=row.get("reason"),
            notes=tuple(json.loads(row["notes"])) if row.get("notes") else (),
            details=json.loads(row["details"]) if row.get("details") else None,
            profile=p.load(Profile, row["profile"]) if row.get("profile") else None,
            manifest=p.load(SignedManifest, row["manifest"]) if row.get("manifest") else None,
        )


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """A model version: what it computes and how good a variant must be to be used."""

    id: str
    name: str
    version: str
    task: Task | None
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    accuracy_floor: float | None
    threshold: float | None
    rules: dict[str, Any] | None
    created: str
    compressed: str | None
    build_cost: dict[str, Any] | None = None  # the last compress: {"total": ..., "steps": ...}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModelVersion:
        def sigs(text: str | None) -> tuple[TensorSignature, ...]:
            return tuple(p.convert(s, TensorSignature) for s in json.loads(text or "[]"))

        return cls(
            id=row["id"],
            name=row["name"],
            version=row["version"],
            task=Task(row["task"]) if row.get("task") else None,
            inputs=sigs(row.get("inputs")),
            outputs=sigs(row.get("outputs")),
            accuracy_floor=row.get("accuracy_floor"),
            threshold=row.get("threshold"),
            rules=json.loads(row["rules"]) if row.get("rules") else None,
            created=row["created"],
            compressed=row.get("compressed"),
            build_cost=json.loads(row["build_cost"]) if row.get("build_cost") else None,
        )


@dataclass(frozen=True, slots=True)
class Declared:
    """What the person adding a model says about it (flags or a metadata JSON file)."""

    task: Task | None = None
    accuracy_floor: float | None = None
    threshold: float | None = None
    inputs: tuple[TensorSignature, ...] | None = None
    outputs: tuple[TensorSignature, ...] | None = None

    @classmethod
    def from_json(cls, path: Path) -> Declared:
        """Read a metadata file like model_store/samples/vibration-ae.json."""
        try:
            meta = json.loads(path.read_text())
            return cls(
                task=_task(meta.get("task")),
                accuracy_floor=meta.get("accuracy_floor"),
                threshold=meta.get("threshold"),
                inputs=tuple(_signature(s) for s in meta["inputs"]) if "inputs" in meta else None,
                outputs=tuple(_signature(s) for s in meta["outputs"])
                if "outputs" in meta
                else None,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidModel(f"cannot read model metadata {path}: {exc}") from exc


def _task(value: str | None) -> Task | None:
    aliases = {"anomaly-detection": Task.ANOMALY, "anomaly_score": Task.ANOMALY}
    if value is None:
        return None
    if value in aliases:
        return aliases[value]
    try:
        return Task(value)
    except ValueError:
        raise InvalidModel(
            f"unknown task {value!r}; use one of {', '.join(t.value for t in Task)}"
        ) from None


def _signature(spec: dict[str, Any]) -> TensorSignature:
    """A tensor signature from a metadata file, which may say more of a tensor (its unit):
    checked (ProtocolError, a ValueError)."""
    fields = {"name": spec["name"], "dtype": spec.get("dtype", "float32"), "shape": spec["shape"]}
    return p.convert(fields, TensorSignature)


def file_sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def read_signature(
    path: Path, fmt: ModelFormat
) -> tuple[tuple[TensorSignature, ...], tuple[TensorSignature, ...]]:
    """Load the model with the agent's own runtime and return its input/output signature."""
    from agent.runtime import load_model
    from agent.runtime.base import ModelLoadError

    try:
        model = load_model(path, fmt)
    except ModelLoadError as exc:
        raise InvalidModel(str(exc)) from exc
    try:
        return signature_of(model)
    finally:
        model.close()


def signature_of(
    model: LoadedModel,
) -> tuple[tuple[TensorSignature, ...], tuple[TensorSignature, ...]]:
    """The input/output signature of a loaded model, as the wire contract writes it."""

    def sigs(specs: Sequence[TensorSpec]) -> tuple[TensorSignature, ...]:
        return tuple(
            TensorSignature(name=s.name, dtype=s.dtype, shape=list(s.shape)) for s in specs
        )

    return sigs(model.inputs), sigs(model.outputs)


def check_feedable(path: Path, inputs: Sequence[TensorSignature]) -> None:
    """InvalidModel unless every input takes float32: an agent feeds its model float32 windows
    of sensor samples, and a model that wants integers (token ids, say) would fail on every
    device. Refused before anything is stored, so no half-added version is left behind."""
    for sig in inputs:
        if sig.dtype != "float32":
            raise InvalidModel(
                f"{path.name}: input {sig.name!r} takes {sig.dtype}, but agents feed float32 "
                "sensor windows; export it with float32 inputs (a Cast or Quantize op inside)"
            )


def check_declared(
    what: str, declared: tuple[TensorSignature, ...] | None, actual: tuple[TensorSignature, ...]
) -> None:
    """InvalidModel unless the model's tensors are the declared ones (names, dtypes, shapes)."""
    if declared is None:
        return

    def show(sigs: tuple[TensorSignature, ...]) -> str:
        return ", ".join(f"{s.name} {s.dtype}{s.shape}" for s in sigs)

    def same(a: TensorSignature, b: TensorSignature) -> bool:
        shapes_match = len(a.shape) == len(b.shape) and all(
            x is None or y is None or x == y for x, y in zip(a.shape, b.shape, strict=True)
        )
        return a.name == b.name and a.dtype == b.dtype and shapes_match

    if len(declared) != len(actual) or not all(
        same(d, a) for d, a in zip(declared, actual, strict=True)
    ):
        raise InvalidModel(
            f"the model's {what} do not match the declared signature: declared "
            f"{show(declared)}; the file has {show(actual)}"
        )


class Catalog:
    """Model versions, their variants, and the stored bytes."""

    def __init__(self, db: sqlite_utils.Database, store: Path) -> None:
        self.db = db
        self.store = store

    # -- adding -------------------------------------------------------------------------------

    def store_file(self, path: Path) -> tuple[str, int]:
        """Copy ``path`` into the store under its sha256 (temp file, fsync, rename)."""
        sha256, size = file_sha256(path)
        self.store.mkdir(parents=True, exist_ok=True)
        target = self.store / sha256
        if not target.exists():
            tmp = self.store / f".{sha256}.tmp"
            try:
                shutil.copyfile(path, tmp)
                with tmp.open("rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise ModelStoreError(f"cannot store {path} in {self.store}: {exc}") from exc
        return sha256, size

    def add(
        self,
        path: Path,
        name: str,
        version: str,
        *,
        declared: Declared | None = None,
    ) -> Variant:
        """Add a model file as ``name:version``; idempotent for the same bytes.

        A version with a build part (``1.0.0+tflite``) imports a variant of an existing version,
        e.g. a .tflite file built elsewhere.
        """
        declared = declared or Declared()
        try:
            ref = p.convert({"name": name, "version": version}, ModelRef)
        except p.ProtocolError as exc:
            raise InvalidModel(
                f"invalid model name or version {name}:{version}: names are lower-case "
                "letters, digits, '_', '.', '-'; versions are semantic, like 1.2.0"
            ) from exc
        base_version, _, variant = version.partition("+")
        if not SEMVER.match(base_version):
            raise InvalidModel(f"version {version!r} is not a semantic version like 1.2.0")
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InvalidModel(f"{path}: unknown model format; expected a .onnx or .tflite file")
        if not path.is_file():
            raise InvalidModel(f"{path}: no such file")
        sha256, size = file_sha256(path)
        if size == 0:
            raise InvalidModel(f"{path} is empty")
        existing = self.variant_or_none(ref)
        if existing is not None:
            if existing.sha256 == sha256:
                return existing
            raise VersionConflict(
                f"{ref} already exists with different content (sha256 {existing.sha256[:12]}); "
                "publish the new file under a new version"
            )
        inputs, outputs = read_signature(path, fmt)
        check_feedable(path, inputs)
        check_declared("inputs", declared.inputs, inputs)
        check_declared("outputs", declared.outputs, outputs)
        base_id = f"{name}:{base_version}"
        version_row = self.version_or_none(base_id)
        if variant and version_row is None:
            raise InvalidModel(
                f"{ref} is a variant of {base_id}, which is not in the catalog; add {base_id} first"
            )
        if variant and version_row is not None and version_row.inputs:
            check_declared("inputs", version_row.inputs, inputs)
        self.store_file(path)
        with self.db.conn:
            if version_row is None:
                self.db.table("model_versions").insert(
                    {
                        "id": base_id,
                        "name": name,
                        "version": base_version,
                        "task": declared.task.value if declared.task else None,
                        "inputs": json.dumps([p.to_builtins(s) for s in inputs]),
                        "outputs": json.dumps([p.to_builtins(s) for s in outputs]),
                        "accuracy_floor": declared.accuracy_floor,
                        "threshold": declared.threshold,
                        "rules": None,
                        "created": now_iso(),
                        "compressed": None,
                    },
                    pk="id",
                )
            row = self._variant_row(
                ref,
                base_id,
                variant,
                fmt,
                sha256,
                size,
                precision=None if variant else "fp32",
                technique="imported" if variant else "source",
            )
            self.db.table("models").insert(row, pk="id")
        return Variant.from_row(row, self.store)

    def _variant_row(
        self,
        ref: ModelRef,
        base: str,
        variant: str,
        fmt: ModelFormat,
        sha256: str,
        size: int,
        **extra: Any,
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": str(ref),
            "name": ref.name,
            "version": ref.version,
            "format": fmt.value,
            "sha256": sha256,
            "size": size,
            "path": sha256,
            "created": now_iso(),
            "base": base,
            "variant": variant,
            "precision": None,
            "technique": None,
            "eligible": 1,
            "reason": None,
            "notes": None,
            "details": None,
            "profile": None,
            "manifest": None,
        }
        row.update(extra)
        return row

    def put_variant(
        self,
        version: ModelVersion,
        variant: str,
        path: Path,
        fmt: ModelFormat,
        *,
        precision: str,
        technique: str,
        eligible: bool,
        reason: str | None,
        notes: tuple[str, ...],
        details: dict[str, Any],
        profile: Profile | None,
    ) -> Variant:
        """Store a built variant (replacing an earlier build of the same variant name)."""
        ref = p.convert({"name": version.name, "version": f"{version.version}+{variant}"}, ModelRef)
        sha256, size = self.store_file(path)
        row = self._variant_row(
            ref,
            version.id,
            variant,
            fmt,
            sha256,
            size,
            precision=precision,
            technique=technique,
            eligible=int(eligible),
            reason=reason,
            notes=json.dumps(list(notes)),
            details=json.dumps(details, default=str),
            profile=p.encode(profile).decode() if profile else None,
        )
        with self.db.conn:
            self.db.table("models").upsert(row, pk="id")
        return Variant.from_row(row, self.store)

    def redeclare(self, version_id: str, declared: Declared) -> dict[str, tuple[Any, Any]]:
        """Apply what a repeated ``models add`` of the same file declares, and judge the stored
        variants again: ``{field: (was, now)}`` for what changed. A version added without
        ``--task`` could not be fixed before (the add said "added" and changed nothing).

        What cannot change under the same number raises VersionConflict: a task once set (its
        variants' fidelity was measured for it), and the alarm threshold once compressed (the
        profiles measured alarm agreement at the old one)."""
        version = self.version(version_id)
        changes = {
            name: (getattr(version, name), getattr(declared, name))
            for name in ("task", "accuracy_floor", "threshold")
            if getattr(declared, name) is not None
            and getattr(declared, name) != getattr(version, name)
        }
        if "task" in changes and version.task is not None:
            raise VersionConflict(
                f"{version.id} is a {version.task.value} model; a version's task does not "
                "change: add the file under a new version"
            )
        if "threshold" in changes and version.compressed is not None:
            raise VersionConflict(
                f"{version.id} was compressed with alarm threshold {version.threshold:g}; "
                "add the file under a new version to profile it at another one"
            )
        if not changes:
            return {}
        row = {k: v.value if isinstance(v, Task) else v for k, (_, v) in changes.items()}
        self.update_version(version.id, **row)
        version = self.version(version.id)
        for variant in self.variants(version.id):
            if variant.profile is None or variant.profile.fidelity is None:
                continue  # the floor judges fidelity; none measured yet (compress will)
            eligible, reason = judge(version, variant.profile, variant.technique or "")
            self.update_variant(variant.id, eligible=int(eligible), reason=reason)
        return changes

    def update_variant(self, variant_id: str, **fields: Any) -> None:
        with self.db.conn:
            self.db.table("models").update(variant_id, fields)

    def update_version(self, version_id: str, **fields: Any) -> None:
        with self.db.conn:
            self.db.table("model_versions").update(version_id, fields)

    # -- reading ------------------------------------------------------------------------------

    def variant_or_none(self, ref: ModelRef) -> Variant | None:
        rows = list(self.db.table("models").rows_where("id = ?", [str(ref)]))
        return Variant.from_row(rows[0], self.store) if rows else None

    def get(self, ref: ModelRef | str) -> Variant:
        """A deployable variant by ``name:version[+variant]``."""
        if isinstance(ref, str):
            try:
                ref = ModelRef.parse(ref)
            except ProtocolError as exc:
                raise InvalidModel(str(exc)) from exc
        found = self.variant_or_none(ref)
        if found is None:
            raise InvalidModel(f"no model {ref}; see `greenfleet models list`")
        return found

    def version_or_none(self, version_id: str) -> ModelVersion | None:
        rows = list(self.db.table("model_versions").rows_where("id = ?", [version_id]))
        return ModelVersion.from_row(rows[0]) if rows else None

    def version(self, version_id: str) -> ModelVersion:
        base = version_id.partition("+")[0]
        found = self.version_or_none(base)
        if found is None:
            raise InvalidModel(f"no model version {base}; see `greenfleet models list`")
        return found

    def versions(self) -> list[ModelVersion]:
        return [
            ModelVersion.from_row(r)
            for r in self.db.table("model_versions").rows_where(order_by="name, created")
        ]

    def variants(self, version_id: str) -> list[Variant]:
        return [
            Variant.from_row(r, self.store)
            for r in self.db.table("models").rows_where(
                "base = ?", [version_id], order_by="variant"
            )
        ]

    def by_sha256(self, sha256: str) -> Variant | None:
        rows = list(self.db.table("models").rows_where("sha256 = ?", [sha256], limit=1))
        return Variant.from_row(rows[0], self.store) if rows else None

    def all(self) -> list[Variant]:
        return [
            Variant.from_row(r, self.store)
            for r in self.db.table("models").rows_where(order_by="name, version")
        ]
