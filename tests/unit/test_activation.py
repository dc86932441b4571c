"""The on-disk record of the active, last-good and in-progress models."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from agent import protocol as p
from agent.activation import Activation

SHA = ["a" * 64, "b" * 64, "c" * 64, "d" * 64]


def active(i: int) -> p.ActiveModel:
    return p.ActiveModel(
        model=p.ModelRef(name="m", version=f"1.0.{i}"), sha256=SHA[i], format=p.ModelFormat.ONNX
    )


def test_activation_keeps_last_good_and_the_pending_download(tmp_path: Path) -> None:
    store = Activation(tmp_path)
    store.prepare()
    for i in range(4):
        (store.models_dir / f"{SHA[i]}.onnx").write_bytes(b"x")
    pending = p.Deploy(
        model=p.ModelRef(name="m", version="1.0.3"),
        artifact=p.Artifact(sha256=SHA[3], size=1, format=p.ModelFormat.ONNX),
    )
    store.save_pending(pending, "staging")
    store.activate(active(0))
    (store.models_dir / f"{SHA[1]}.onnx").write_bytes(b"x")  # 1.0.1 arrives later
    pointer = store.activate(active(1))
    assert (pointer.active, pointer.last_good) == (active(1), active(0))
    kept = sorted(path.name for path in store.models_dir.iterdir())
    assert kept == sorted(f"{SHA[i]}.onnx" for i in (0, 1, 3)), "2 pruned, pending 3 kept"
    assert store.load_pending() == (pending, "staging")
    store.clear_pending()
    assert store.load_pending() is None
    assert Activation(tmp_path).read().active == active(1), "survives a restart"


def test_an_unreadable_pending_record_is_dropped_not_fatal(tmp_path: Path) -> None:
    store = Activation(tmp_path)
    store.prepare()
    store.pending_path.write_text("{not json")
    assert store.load_pending() is None
    assert not store.pending_path.exists()


def test_a_preloaded_model_is_kept_until_it_is_activated(tmp_path: Path) -> None:
    store = Activation(tmp_path)
    store.prepare()
    (store.models_dir / f"{SHA[0]}.onnx").write_bytes(b"x")
    store.activate(active(0))
    for i in (1, 2):
        (store.models_dir / f"{SHA[i]}.onnx").write_bytes(b"x")
        store.save_manifest(SHA[i], manifest(i))
    pointer = store.set_preloaded(active(1))
    assert (pointer.active, pointer.preloaded) == (active(0), active(1))
    kept = sorted(path.name for path in store.models_dir.iterdir())
    assert kept == sorted([f"{SHA[0]}.onnx", f"{SHA[1]}.onnx", f"{SHA[1]}.manifest.json"]), (
        "the preloaded file and its manifest stay, 2 is pruned"
    )
    assert store.activate(active(3)).preloaded == active(1), "another model: still preloaded"
    assert Activation(tmp_path).read().preloaded == active(1), "survives a restart"
    pointer = store.activate(active(1))
    assert (pointer.active, pointer.last_good, pointer.preloaded) == (active(1), active(3), None)
    assert (store.models_dir / f"{SHA[1]}.manifest.json").exists()


def manifest(i: int) -> p.Manifest:
    return p.Manifest(
        model=active(i).model,
        artifact=p.Artifact(sha256=SHA[i], size=1, format=p.ModelFormat.ONNX),
        task=p.Task.ANOMALY,
        precision="fp32",
        technique="reference",
        inputs=[],
        outputs=[],
        created=datetime(2026, 11, 26, tzinfo=UTC),
    )
