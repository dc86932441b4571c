"""The model catalog: content-addressed storage and immutable versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.protocol import Task, TensorSignature
from controller.db import open_db
from model_store.catalog import Catalog, Declared
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


def test_metadata_gives_task_floor_and_signature(catalog: Catalog) -> None:
    declared = Declared.from_json(SAMPLES / "vibration-ae.json")
    catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0.0", declared=declared)
    version = catalog.version("vib:1.0.0")
    assert version.task is Task.ANOMALY
    assert version.threshold == pytest.approx(0.877, abs=0.01)
    assert [(s.name, s.shape) for s in version.inputs] == [("window", [1, 512])]
    assert [(s.name, s.shape) for s in version.outputs] == [("score", [1, 1])]


def test_declared_signature_must_match_the_file(catalog: Catalog) -> None:
    wrong = Declared(inputs=(TensorSignature(name="image", dtype="float32", shape=[1, 1, 32, 32]),))
    with pytest.raises(InvalidModel, match=r"do not match the declared signature.*window"):
        catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0.0", declared=wrong)
    assert catalog.versions() == [] and catalog.all() == []


def test_imported_variant_needs_its_base_version(catalog: Catalog) -> None:
    with pytest.raises(InvalidModel, match=r"add vib:1\.0\.0 first"):
        catalog.add(SAMPLES / "vibration-ae.tflite", "vib", "1.0.0+tflite")
    catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0.0")
    imported = catalog.add(SAMPLES / "vibration-ae.tflite", "vib", "1.0.0+tflite")
    assert (imported.base, imported.variant, imported.technique) == (
        "vib:1.0.0",
        "tflite",
        "imported",
    )
    assert [v.id for v in catalog.variants("vib:1.0.0")] == ["vib:1.0.0", "vib:1.0.0+tflite"]


def test_versions_are_semantic(catalog: Catalog) -> None:
    with pytest.raises(InvalidModel, match="semantic version"):
        catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0")


def test_migration_two_keeps_models_added_before_it(tmp_path: Path) -> None:
    import sqlite_utils

    from controller.db import MIGRATIONS, migrate

    db = sqlite_utils.Database(tmp_path / "old.db")
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied TEXT)")
    MIGRATIONS[0](db)
    db.execute("INSERT INTO schema_version VALUES (1, 'then')")
    for version in ("1.0.0", "1.0.0+tflite"):
        db.table("models").insert(
            {
                "id": f"vib:{version}",
                "name": "vib",
                "version": version,
                "format": "onnx",
                "sha256": "a" * 64,
                "size": 1,
                "path": "a" * 64,
                "created": "then",
            }
        )
    assert migrate(db) == len(MIGRATIONS)
    catalog = Catalog(db, tmp_path / "store")
    assert [v.id for v in catalog.versions()] == ["vib:1.0.0"]
    assert [(v.variant, v.eligible) for v in catalog.variants("vib:1.0.0")] == [
        ("", True),
        ("tflite", True),
    ]


def test_metadata_signatures_are_checked_and_may_say_more(tmp_path: Path) -> None:
    """A tensor in a metadata file may carry more than the catalog keeps (the sample's
    "unit"), but a shape that is not a list of sizes is refused, naming the file."""
    path = tmp_path / "meta.json"
    path.write_text('{"inputs": [{"name": "window", "shape": [1, 512], "unit": "g"}]}')
    declared = Declared.from_json(path)
    assert declared.inputs == (TensorSignature(name="window", dtype="float32", shape=[1, 512]),)
    path.write_text('{"inputs": [{"name": "window", "shape": "1x512"}]}')
    with pytest.raises(InvalidModel, match=r"meta\.json: shape: expected `array`"):
        Declared.from_json(path)


def test_a_model_agents_cannot_feed_is_refused_before_anything_is_stored(
    catalog: Catalog, tmp_path: Path
) -> None:
    """An int64 input (token ids) once gave a traceback in ``models add`` after the version was
    stored; agents feed float32 windows, so such a model is refused up front, with the fix."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)],
        "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "tokens.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(InvalidModel, match="input 'ids' takes int64, but agents feed float32"):
        catalog.add(path, "tok", "1.0.0")
    assert catalog.all() == []
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_adding_the_same_file_again_applies_what_it_now_declares(catalog: Catalog) -> None:
    """A version added without --task could not be fixed: re-adding it said "added" and
    changed nothing. The same file with more said now updates the version; what its variants
    were measured by (a task once set, a threshold once compressed) cannot change."""
    source = catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0.0")
    assert catalog.redeclare(source.base, Declared()) == {}
    changes = catalog.redeclare(
        source.base, Declared(task=Task.ANOMALY, accuracy_floor=0.9, threshold=0.8)
    )
    assert changes == {
        "task": (None, Task.ANOMALY),
        "accuracy_floor": (None, 0.9),
        "threshold": (None, 0.8),
    }
    version = catalog.version("vib:1.0.0")
    assert (version.task, version.accuracy_floor, version.threshold) == (Task.ANOMALY, 0.9, 0.8)
    assert catalog.redeclare(source.base, Declared(accuracy_floor=0.95)) == {
        "accuracy_floor": (0.9, 0.95)
    }
    with pytest.raises(VersionConflict, match="task does not change"):
        catalog.redeclare(source.base, Declared(task=Task.CLASSIFICATION))
    catalog.update_version("vib:1.0.0", compressed="2026-12-07T00:00:00Z")
    with pytest.raises(VersionConflict, match=r"compressed with alarm threshold 0\.8"):
        catalog.redeclare(source.base, Declared(threshold=0.5))
    assert catalog.version("vib:1.0.0").threshold == 0.8
