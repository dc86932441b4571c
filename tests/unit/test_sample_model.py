"""The committed sample model vibration-ae: metadata, ONNX/TFLite agreement, and detection."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter
from onnx import numpy_helper

from agent.protocol import FaultKind
from agent.sources.vibration import VibrationSimulator
from model_store.samples import build

SAMPLES = Path(build.__file__).parent
# Unseen machines (the build trains on seeds 1000-1239) across the supported speed range.
MACHINES = [(1500.0, 9001), (1850.0, 9002), (2250.0, 9003), (2650.0, 9004), (3000.0, 9005)]


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return dict(json.loads((SAMPLES / "vibration-ae.json").read_text()))


@pytest.fixture(scope="module")
def onnx_session() -> ort.InferenceSession:
    return ort.InferenceSession(
        str(SAMPLES / "vibration-ae.onnx"), providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def tflite() -> Interpreter:
    interpreter = Interpreter(model_path=str(SAMPLES / "vibration-ae.tflite"))
    interpreter.allocate_tensors()
    return interpreter


def windows(fault: FaultKind = FaultKind.NONE, severity: float = 1.0, per: int = 10) -> np.ndarray:
    """``per`` windows from each test machine: 50 by default."""
    out = []
    for rpm, seed in MACHINES:
        sim = VibrationSimulator(rpm=rpm, seed=seed, fault=fault, severity=severity)
        out += [sim.read() for _ in range(per)]
    return np.stack(out)


def onnx_scores(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return np.array([session.run(["score"], {"window": w[None, :]})[0][0, 0] for w in batch])


def tflite_scores(interpreter: Interpreter, batch: np.ndarray) -> np.ndarray:
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    scores = []
    for w in batch:
        interpreter.set_tensor(inp, w[None, :])
        interpreter.invoke()
        scores.append(interpreter.get_tensor(out)[0, 0])
    return np.array(scores)


def test_metadata_describes_the_onnx_graph(meta: dict[str, Any]) -> None:
    model = onnx.load(str(SAMPLES / "vibration-ae.onnx"))
    onnx.checker.check_model(model)
    graph = model.graph

    def shape(value: Any) -> list[int]:
        return [d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [i.name for i in graph.input] == [i["name"] for i in meta["inputs"]] == ["window"]
    assert [o.name for o in graph.output] == [o["name"] for o in meta["outputs"]] == ["score"]
    assert shape(graph.input[0]) == meta["inputs"][0]["shape"] == [1, meta["window"]]
    assert shape(graph.output[0]) == meta["outputs"][0]["shape"] == [1, 1]
    assert meta["sample_rate_hz"] == build.SAMPLE_RATE_HZ
    assert model.opset_import[0].version == meta["onnx"]["opset"]
    assert meta["name"] == "vibration-ae"
    assert 0 < meta["healthy_score"]["mean"] < meta["threshold"]


def test_both_model_files_come_from_the_run_the_metadata_describes(meta: dict[str, Any]) -> None:
    for kind in ("onnx", "tflite"):
        entry = meta["files"][kind]
        data = (SAMPLES / entry["file"]).read_bytes()
        assert len(data) == entry["bytes"] < 1_000_000
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]


def test_graph_feature_extractor_matches_the_build_code() -> None:
    model = onnx.load(str(SAMPLES / "vibration-ae.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    constants = build.spectral_constants()
    np.testing.assert_array_equal(weights["dft_cos"], constants.dft_cos)
    np.testing.assert_array_equal(weights["dft_sin"], constants.dft_sin)
    np.testing.assert_array_equal(weights["bands"], constants.bands)


def test_tflite_input_and_output_shapes(tflite: Interpreter) -> None:
    assert list(tflite.get_input_details()[0]["shape"]) == [1, 512]
    assert tflite.get_input_details()[0]["dtype"] == np.float32
    assert list(tflite.get_output_details()[0]["shape"]) == [1, 1]


def test_onnx_and_tflite_give_the_same_scores(
    onnx_session: ort.InferenceSession, tflite: Interpreter
) -> None:
    batch = np.concatenate([windows(per=4), windows(FaultKind.INNER_RACE, per=4)])
    np.testing.assert_allclose(
        tflite_scores(tflite, batch), onnx_scores(onnx_session, batch), rtol=1e-4
    )


def test_healthy_windows_score_below_the_threshold(
    meta: dict[str, Any], onnx_session: ort.InferenceSession
) -> None:
    scores = onnx_scores(onnx_session, windows())
    assert (scores < meta["threshold"]).mean() >= 0.96


@pytest.mark.parametrize("fault", [FaultKind.OUTER_RACE, FaultKind.INNER_RACE, FaultKind.BALL])
def test_faulty_windows_score_above_the_threshold(
    fault: FaultKind, meta: dict[str, Any], onnx_session: ort.InferenceSession
) -> None:
    scores = onnx_scores(onnx_session, windows(fault, 1.0))
    assert (scores > meta["threshold"]).mean() >= (0.98 if fault is FaultKind.OUTER_RACE else 0.8)


def test_a_mild_fault_visibly_raises_the_score(
    meta: dict[str, Any], onnx_session: ort.InferenceSession
) -> None:
    healthy = onnx_scores(onnx_session, windows())
    mild = onnx_scores(onnx_session, windows(FaultKind.OUTER_RACE, 0.3))
    assert mild.mean() > 3 * healthy.mean()
    assert (mild > meta["threshold"]).mean() >= 0.9
    assert meta["roc_auc"] > 0.95
