"""The model catalog: model versions in SQLite, their bytes stored once by sha256.

Artifacts live at ``<home>/store/<sha256>``; adding the same bytes twice stores them once,
and a ``NAME:VERSION`` can never be re-pointed at different bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.protocol import Artifact, ModelFormat, ModelRef, ProtocolError
from model_store.errors import InvalidModel, VersionConflict

SUFFIX_FORMATS = {".onnx": ModelFormat.ONNX, ".tflite": ModelFormat.TFLITE}


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One row of the catalog."""

    ref: ModelRef
    format: ModelFormat
    sha256: str
    size: int
    path: Path
    created: str

    @property
    def id(self) -> str:
        return str(self.ref)

    def artifact(self) -> Artifact:
        return Artifact(sha256=self.sha256, size=self.size, format=self.format)

    @classmethod
    def from_row(cls, row: dict[str, Any], store: Path) -> ModelVersion:
        return cls(
            ref=ModelRef(name=row["name"], version=row["version"]),
            format=ModelFormat(row["format"]),
            sha256=row["sha256"],
            size=row["size"],
            path=store / row["path"],
            created=row["created"],
        )


def file_sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _check_loadable(path: Path, fmt: ModelFormat) -> None:
    from agent.runtime import load_model
    from agent.runtime.base import ModelLoadError

    try:
        load_model(path, fmt).close()
    except ModelLoadError as exc:
        raise InvalidModel(str(exc)) from exc


class Catalog:
    """Model versions and their stored bytes."""

    def __init__(self, db: sqlite_utils.Database, store: Path) -> None:
        self.db = db
        self.store = store

    def add(self, path: Path, name: str, version: str, *, verify: bool = True) -> ModelVersion:
        """Store ``path`` as ``name:version``; idempotent for the same bytes."""
        try:
            ref = ModelRef(name=name, version=version)
        except ValueError as exc:
            raise InvalidModel(
                f"invalid model name or version {name}:{version}: names are lower-case "
                "letters, digits, '_', '.', '-'; versions like 1.2.0"
            ) from exc
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InvalidModel(f"{path}: unknown model format; expected a .onnx or .tflite file")
        if not path.is_file():
            raise InvalidModel(f"{path}: no such file")
        sha256, size = file_sha256(path)
        if size == 0:
            raise InvalidModel(f"{path} is empty")
        existing = self.get_or_none(ref)
        if existing is not None:
            if existing.sha256 == sha256:
                return existing
            raise VersionConflict(
                f"{ref} already exists with different content (sha256 {existing.sha256[:12]}); "
                "publish the new file under a new version"
            )
        if verify:
            _check_loadable(path, fmt)
        self.store.mkdir(parents=True, exist_ok=True)
        target = self.store / sha256
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(path, tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        row = {
            "id": str(ref),
            "name": ref.name,
            "version": ref.version,
            "format": fmt.value,
            "sha256": sha256,
            "size": size,
            "path": sha256,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.db.table("models").insert(row, pk="id")
        return ModelVersion.from_row(row, self.store)

    def get_or_none(self, ref: ModelRef) -> ModelVersion | None:
        rows = list(self.db.table("models").rows_where("id = ?", [str(ref)]))
        return ModelVersion.from_row(rows[0], self.store) if rows else None

    def get(self, ref: ModelRef | str) -> ModelVersion:
        if isinstance(ref, str):
            try:
                ref = ModelRef.parse(ref)
            except ProtocolError as exc:
                raise InvalidModel(str(exc)) from exc
        found = self.get_or_none(ref)
        if found is None:
            raise InvalidModel(f"no model {ref}; see `greenfleet models list`")
        return found

    def by_sha256(self, sha256: str) -> ModelVersion | None:
        rows = list(self.db.table("models").rows_where("sha256 = ?", [sha256], limit=1))
        return ModelVersion.from_row(rows[0], self.store) if rows else None

    def all(self) -> list[ModelVersion]:
        return [
            ModelVersion.from_row(r, self.store)
            for r in self.db.table("models").rows_where(order_by="name, created")
        ]
