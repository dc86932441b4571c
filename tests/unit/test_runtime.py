"""The inference runtimes: loading, running, and the errors a user sees when either fails."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import agent.runtime
import agent.runtime.tflite
from agent.protocol import ModelFormat
from agent.runtime import (
    InferenceError,
    LoadedModel,
    ModelLoadError,
    TensorSpec,
    available_formats,
    format_for,
    load_model,
)

DATA = Path(__file__).parents[1] / "data"
TINY_ADD = DATA / "tiny_add.tflite"
TINY_ADD_SIGNATURE = DATA / "tiny_add_signature.tflite"
SAMPLE = Path(__file__).parents[2] / "model_store" / "samples" / "vibration-ae"
needs_sample = pytest.mark.skipif(
    not SAMPLE.with_suffix(".tflite").exists(), reason="sample model vibration-ae not built"
)
WEIGHTS = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)


def write_onnx_model(path: Path) -> Path:
    """``y = x * [1, 2, 3, 4]`` and ``total = sum(y, axis=1)`` on float32 ``[batch, 4]``."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "w"], ["y"]),
            helper.make_node("ReduceSum", ["y", "axes"], ["total"], keepdims=0),
        ],
        "scale_and_sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch"]),
        ],
        [
            helper.make_tensor("w", TensorProto.FLOAT, [4], WEIGHTS.tolist()),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def onnx_path(tmp_path: Path) -> Path:
    return write_onnx_model(tmp_path / "scale.onnx")


@pytest.fixture
def onnx_model(onnx_path: Path) -> Iterator[LoadedModel]:
    model = load_model(onnx_path, ModelFormat.ONNX)
    yield model
    model.close()


@pytest.fixture
def tflite_model() -> Iterator[LoadedModel]:
    model = load_model(TINY_ADD, ModelFormat.TFLITE)
    yield model
    model.close()


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """Forget which backends imported, before and after the test."""
    agent.runtime._probe.cache_clear()
    yield
    agent.runtime._probe.cache_clear()


def row(*values: float) -> np.ndarray:
    return np.array([values], dtype=np.float32)


# ------------------------------------------------------------------------------------ ONNX


def test_onnx_model_describes_its_tensors(onnx_model: LoadedModel, onnx_path: Path) -> None:
    assert onnx_model.format is ModelFormat.ONNX
    assert onnx_model.path == onnx_path
    assert onnx_model.inputs == (TensorSpec("x", (None, 4), "float32"),)
    assert onnx_model.outputs == (
        TensorSpec("y", (None, 4), "float32"),
        TensorSpec("total", (None,), "float32"),
    )


def test_onnx_model_runs(onnx_model: LoadedModel) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)

    out = onnx_model.run({"x": x})

    assert list(out) == ["y", "total"]
    np.testing.assert_allclose(out["y"], x * WEIGHTS)
    np.testing.assert_allclose(out["total"], (x * WEIGHTS).sum(axis=1))


def test_onnx_model_runs_on_several_threads(onnx_path: Path) -> None:
    model = load_model(onnx_path, ModelFormat.ONNX, threads=2)
    np.testing.assert_allclose(model.run({"x": row(1, 1, 1, 1)})["total"], [10.0])


@pytest.mark.parametrize(
    ("feeds", "expected"),
    [
        ({"x": np.ones((1, 5), np.float32)}, "Got: 5 Expected: 4"),
        ({"x": np.ones(4, np.float32)}, "Invalid rank"),
        ({"x": np.ones((1, 4), np.float64)}, "tensor(double)"),
        ({"z": np.ones((1, 4), np.float32)}, "Invalid input name: z"),
    ],
    ids=["width", "rank", "dtype", "name"],
)
def test_onnx_bad_feeds_raise_inference_error(
    onnx_model: LoadedModel, onnx_path: Path, feeds: dict[str, np.ndarray], expected: str
) -> None:
    with pytest.raises(InferenceError) as info:
        onnx_model.run(feeds)

    message = str(info.value)
    assert expected in message
    assert str(onnx_path) in message
    assert "x: (?, 4) float32" in message  # what the model takes


def test_onnx_model_refuses_to_run_once_closed(onnx_model: LoadedModel) -> None:
    onnx_model.close()

    with pytest.raises(InferenceError, match="is closed; load it again"):
        onnx_model.run({"x": row(1, 2, 3, 4)})


# ---------------------------------------------------------------------------------- TFLite


def test_tflite_model_runs_on_litert(tflite_model: LoadedModel) -> None:
    assert tflite_model.format is ModelFormat.TFLITE
    assert getattr(tflite_model, "provider", None) == "ai-edge-litert"
    assert tflite_model.inputs == (
        TensorSpec("x", (None, 4), "float32"),
        TensorSpec("y", (None, 4), "float32"),
    )
    assert tflite_model.outputs == (TensorSpec("sum", (None, 4), "float32"),)

    out = tflite_model.run({"x": row(1, 2, 3, 4), "y": row(0.5, 0.5, 0.5, 0.5)})

    np.testing.assert_array_equal(out["sum"], row(1.5, 2.5, 3.5, 4.5))


def test_tflite_outputs_are_copies(tflite_model: LoadedModel) -> None:
    first = tflite_model.run({"x": row(1, 1, 1, 1), "y": row(1, 1, 1, 1)})["sum"]
    tflite_model.run({"x": row(5, 5, 5, 5), "y": row(5, 5, 5, 5)})

    np.testing.assert_array_equal(first, row(2, 2, 2, 2))


def test_tflite_model_is_named_by_its_signature() -> None:
    # Converted models name tensors like "serving_default_x:0"; users know the signature names.
    model = load_model(TINY_ADD_SIGNATURE, ModelFormat.TFLITE)

    assert [spec.name for spec in model.inputs] == ["x", "y"]
    assert [spec.name for spec in model.outputs] == ["sum"]
    out = model.run({"x": row(1, 2, 3, 4), "y": row(1, 1, 1, 1)})
    np.testing.assert_array_equal(out["sum"], row(2, 3, 4, 5))


def test_tflite_model_resizes_for_a_new_batch_size(tflite_model: LoadedModel) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)

    batch = tflite_model.run({"x": x, "y": x})["sum"]
    single = tflite_model.run({"x": row(1, 1, 1, 1), "y": row(2, 2, 2, 2)})["sum"]

    np.testing.assert_array_equal(batch, 2 * x)
    np.testing.assert_array_equal(single, row(3, 3, 3, 3))


@pytest.mark.parametrize(
    ("feeds", "expected"),
    [
        ({"x": row(1, 2, 3, 4), "y": np.ones((1, 5), np.float32)}, "cannot run on these input"),
        ({"x": np.ones(4, np.float32), "y": np.ones(4, np.float32)}, "number of dimensions"),
        ({"x": np.ones((1, 4)), "y": np.ones((1, 4))}, "FLOAT64"),
        ({"x": row(1, 2, 3, 4)}, "needs exactly the inputs ['x', 'y']"),
        ({"x": row(1, 2, 3, 4), "z": row(1, 2, 3, 4)}, "needs exactly the inputs ['x', 'y']"),
    ],
    ids=["shape", "rank", "dtype", "missing", "unknown"],
)
def test_tflite_bad_feeds_raise_inference_error(
    tflite_model: LoadedModel, feeds: dict[str, np.ndarray], expected: str
) -> None:
    with pytest.raises(InferenceError) as info:
        tflite_model.run(feeds)

    assert expected in str(info.value)
    assert str(TINY_ADD) in str(info.value)
    # The failed call leaves the model usable.
    out = tflite_model.run({"x": row(1, 2, 3, 4), "y": row(1, 1, 1, 1)})
    np.testing.assert_array_equal(out["sum"], row(2, 3, 4, 5))


def test_tflite_model_refuses_to_run_once_closed(tflite_model: LoadedModel) -> None:
    tflite_model.close()

    with pytest.raises(InferenceError, match="is closed; load it again"):
        tflite_model.run({"x": row(1, 2, 3, 4), "y": row(1, 2, 3, 4)})


@needs_sample
def test_sample_model_scores_the_same_on_both_runtimes() -> None:
    # Both files come from the same weights; the TFLite one is named through its signature.
    onnx_model = load_model(SAMPLE.with_suffix(".onnx"), ModelFormat.ONNX)
    tflite_model = load_model(SAMPLE.with_suffix(".tflite"), ModelFormat.TFLITE)
    assert tflite_model.inputs == onnx_model.inputs == (TensorSpec("window", (1, 512), "float32"),)
    assert tflite_model.outputs == onnx_model.outputs == (TensorSpec("score", (1, 1), "float32"),)
    windows = np.random.default_rng(11).normal(0, 0.2, (20, 1, 512)).astype(np.float32)

    onnx_scores = [onnx_model.run({"window": w})["score"] for w in windows]
    tflite_scores = [tflite_model.run({"window": w})["score"] for w in windows]

    np.testing.assert_allclose(tflite_scores, onnx_scores, rtol=1e-4)


# --------------------------------------------------------------------------- loading errors


def _garbage(data: bytes) -> bytes:
    return bytes(np.random.default_rng(7).integers(0, 256, len(data), dtype=np.uint8))


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize("damage", [_garbage, _truncated, _empty], ids=["garbage", "half", "empty"])
@pytest.mark.parametrize(
    ("fmt", "kind"), [(ModelFormat.ONNX, "ONNX"), (ModelFormat.TFLITE, "TFLite")], ids=str
)
def test_damaged_file_raises_model_load_error(
    tmp_path: Path, fmt: ModelFormat, kind: str, damage: Callable[[bytes], bytes]
) -> None:
    good = write_onnx_model(tmp_path / "good.onnx") if fmt is ModelFormat.ONNX else TINY_ADD
    bad = tmp_path / f"bad.{fmt.value}"
    bad.write_bytes(damage(good.read_bytes()))

    with pytest.raises(ModelLoadError) as info:
        load_model(bad, fmt)

    message = str(info.value)
    assert f"{bad} is not a valid {kind} model" in message
    assert "fetch it again" in message


@pytest.mark.parametrize("fmt", list(ModelFormat), ids=str)
def test_missing_file_raises_model_load_error(tmp_path: Path, fmt: ModelFormat) -> None:
    missing = tmp_path / f"gone.{fmt.value}"

    with pytest.raises(ModelLoadError, match=f"{missing} does not exist"):
        load_model(missing, fmt)


def test_threads_must_be_positive(onnx_path: Path) -> None:
    with pytest.raises(ValueError, match="threads must be at least 1"):
        load_model(onnx_path, ModelFormat.ONNX, threads=0)


# -------------------------------------------------------------------------------- backends


def test_both_formats_are_available() -> None:
    assert available_formats() == [ModelFormat.ONNX, ModelFormat.TFLITE]


@pytest.mark.usefixtures("fresh_probe")
def test_backend_that_fails_to_import_is_left_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setitem(agent.runtime.BACKENDS, ModelFormat.TFLITE, "agent.runtime.nope:Nope")
    model_file = tmp_path / "m.tflite"
    shutil.copy(TINY_ADD, model_file)

    with caplog.at_level(logging.WARNING, logger="agent.runtime"):
        assert available_formats() == [ModelFormat.ONNX]
        assert available_formats() == [ModelFormat.ONNX]
        with pytest.raises(ModelLoadError) as info:
            load_model(model_file, ModelFormat.TFLITE)

    assert "pip install 'greenfleet[tflite]'" in str(info.value)
    assert str(model_file) in str(info.value)
    warnings = [r for r in caplog.records if r.name == "agent.runtime"]
    assert len(warnings) == 1, "a failing backend is logged once"
    assert "tflite models are disabled" in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("m.onnx", ModelFormat.ONNX),
        ("m.tflite", ModelFormat.TFLITE),
        ("M.TFLITE", ModelFormat.TFLITE),
    ],
)
def test_format_for_reads_the_suffix(name: str, fmt: ModelFormat) -> None:
    assert format_for(Path("/models") / name) == fmt


def test_format_for_rejects_unknown_suffixes() -> None:
    with pytest.raises(ModelLoadError, match=r"model\.pt: expected a file ending in .onnx or"):
        format_for(Path("model.pt"))


# tflite-runtime segfaults on some corrupt files, so with it a file is first opened in a child.
# The real crash is exercised in tests/runtime_env; here the child is made to crash on purpose.


def test_file_that_crashes_the_check_process_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.runtime.tflite, "CHECK_IN_CHILD", True)
    monkeypatch.setattr(
        agent.runtime.tflite,
        "_CHILD_CHECK",
        "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
    )

    with pytest.raises(ModelLoadError) as info:
        load_model(TINY_ADD, ModelFormat.TFLITE)

    assert f"{TINY_ADD} is not a valid TFLite model" in str(info.value)
    assert "SIGSEGV" in str(info.value)


def test_file_that_opens_in_the_check_process_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent.runtime.tflite, "CHECK_IN_CHILD", True)

    model = load_model(TINY_ADD, ModelFormat.TFLITE)

    assert model.run({"x": row(1, 1, 1, 1), "y": row(1, 1, 1, 1)})["sum"].tolist() == [[2] * 4]
