"""The TFLite backend on the old ``tflite-runtime`` package, with numpy 1.x and no onnxruntime.

Run with ``bash tests/runtime_env/run.sh``; the main suite does not collect this file.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest

from agent.protocol import ModelFormat
from agent.runtime import InferenceError, ModelLoadError, available_formats, load_model

pytestmark = pytest.mark.tflite_runtime

DATA = Path(__file__).parents[1] / "data"


def test_this_is_the_old_runtime_environment() -> None:
    assert importlib.util.find_spec("ai_edge_litert") is None
    assert importlib.util.find_spec("tflite_runtime") is not None
    assert int(np.__version__.split(".")[0]) < 2


def test_onnx_is_left_out_and_asks_for_its_extra(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    with caplog.at_level(logging.WARNING, logger="agent.runtime"):
        assert available_formats() == [ModelFormat.TFLITE]

    model_file = tmp_path / "m.onnx"
    model_file.write_bytes(b"\x08\x08")
    with pytest.raises(ModelLoadError, match=r"pip install 'greenfleet\[agent\]'"):
        load_model(model_file, ModelFormat.ONNX)


def test_tiny_add_runs_on_tflite_runtime() -> None:
    model = load_model(DATA / "tiny_add.tflite", ModelFormat.TFLITE)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4)).astype(np.float32)
    y = rng.standard_normal((1, 4)).astype(np.float32)

    out = model.run({"x": x, "y": y})

    assert getattr(model, "provider", None) == "tflite-runtime"
    np.testing.assert_array_equal(out["sum"], x + y)


def test_signature_names_and_resizing_work_on_tflite_runtime() -> None:
    model = load_model(DATA / "tiny_add_signature.tflite", ModelFormat.TFLITE, threads=2)
    x = np.arange(20, dtype=np.float32).reshape(5, 4)

    out = model.run({"x": x, "y": -x})

    assert [s.name for s in model.inputs] == ["x", "y"]
    np.testing.assert_array_equal(out["sum"], np.zeros((5, 4), np.float32))
    with pytest.raises(InferenceError, match="FLOAT64"):
        model.run({"x": x.astype(np.float64), "y": x.astype(np.float64)})


def test_corrupt_file_raises_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes((DATA / "tiny_add.tflite").read_bytes()[:200])

    with pytest.raises(ModelLoadError, match="is not a valid TFLite model"):
        load_model(bad, ModelFormat.TFLITE)
