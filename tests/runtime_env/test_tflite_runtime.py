"""The TFLite backend on the old ``tflite-runtime`` package, with numpy 1.x and no onnxruntime.

Run with ``bash tests/runtime_env/run.sh``; the main suite does not collect this file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from agent.protocol import FaultKind, ModelFormat
from agent.runtime import InferenceError, ModelLoadError, available_formats, load_model
from agent.sources.vibration import VibrationSimulator

pytestmark = pytest.mark.tflite_runtime

DATA = Path(__file__).parents[1] / "data"
SAMPLE = Path(__file__).parents[2] / "model_store" / "samples" / "vibration-ae"


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


@pytest.mark.skipif(not SAMPLE.with_suffix(".tflite").exists(), reason="sample not built")
def test_sample_model_tells_a_faulty_bearing_from_a_healthy_one() -> None:
    threshold = json.loads(SAMPLE.with_suffix(".json").read_text())["threshold"]
    model = load_model(SAMPLE.with_suffix(".tflite"), ModelFormat.TFLITE)

    def mean_score(fault: FaultKind, severity: float) -> float:
        sensor = VibrationSimulator(rpm=2200.0, fault=fault, severity=severity, seed=3001)
        scores = [model.run({"window": sensor.read()[None]})["score"] for _ in range(20)]
        return float(np.mean(scores))

    assert [s.name for s in model.inputs] == ["window"]
    assert 0 < mean_score(FaultKind.NONE, 0.0) < threshold
    assert mean_score(FaultKind.OUTER_RACE, 1.0) > 3 * threshold


def test_truncated_file_raises_model_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes((DATA / "tiny_add.tflite").read_bytes()[:200])

    with pytest.raises(ModelLoadError, match="is not a valid TFLite model"):
        load_model(bad, ModelFormat.TFLITE)


def test_file_that_would_crash_tflite_runtime_is_refused(tmp_path: Path) -> None:
    # tflite-runtime does not verify flatbuffers: a root offset past the end of the file
    # makes Interpreter() read wild memory and die with SIGSEGV. The agent must survive it.
    data = bytearray((DATA / "tiny_add.tflite").read_bytes())
    data[0:4] = struct.pack("<I", 0x7FFF0000)
    bad = tmp_path / "wild.tflite"
    bad.write_bytes(bytes(data))

    with pytest.raises(ModelLoadError, match=r"is not a valid TFLite model: opening it crashed"):
        load_model(bad, ModelFormat.TFLITE)
