"""The model catalog: content-addressed storage and immutable versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from controller.db import open_db
from model_store.catalog import Catalog
from model_store.errors import InvalidModel, VersionConflict

SAMPLES = Path(__file__).parents[2] / "model_store" / "samples"


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(open_db(tmp_path / "g.db"), tmp_path / "store")


def test_same_bytes_are_stored_once(catalog: Catalog, tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    shutil.copy(SAMPLES / "vibration-ae.onnx", copy)
    a = catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0.0")
    b = catalog.add(copy, "vib", "1.0.1")
    again = catalog.add(copy, "vib", "1.0.0")
    assert a.sha256 == b.sha256 == again.sha256
    assert [p.name for p in (tmp_path / "store").iterdir()] == [a.sha256]
    assert [m.id for m in catalog.all()] == ["vib:1.0.0", "vib:1.0.1"]
    assert catalog.by_sha256(a.sha256) is not None


def test_a_version_cannot_change_its_bytes(catalog: Catalog) -> None:
    catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0.0")
    with pytest.raises(VersionConflict, match="new version"):
        catalog.add(SAMPLES / "vibration-ae.tflite", "vib", "1.0.0")


@pytest.mark.parametrize(
    "content, suffix, needle",
    [
        (b"not a model at all", ".onnx", "ONNX"),
        (b"", ".onnx", "empty"),
        (b"abc", ".pt", "unknown model format"),
    ],
)
def test_invalid_files_are_refused(
    catalog: Catalog, tmp_path: Path, content: bytes, suffix: str, needle: str
) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(InvalidModel, match=needle):
        catalog.add(path, "bad", "1.0.0")
    assert catalog.all() == []


def test_truncated_model_is_refused(catalog: Catalog, tmp_path: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes((SAMPLES / "vibration-ae.onnx").read_bytes()[:5000])
    with pytest.raises(InvalidModel):
        catalog.add(path, "cut", "1.0.0")
