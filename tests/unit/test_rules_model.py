"""The rule baseline behind the loaded-model interface: names and shapes from the manifest."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import protocol as p
from agent.rules import RulesModel, evaluate_rules
from agent.runtime.base import InferenceError, ModelLoadError, TensorSpec

SHA = "cd" * 32
WINDOW = 512

# The thresholds format from agent/rules.py's docstring, with round numbers.
THRESHOLDS: dict[str, Any] = {
    "kind": "thresholds",
    "version": 1,
    "input": "window",
    "output": "score",
    "output_shape": [1, 1],
    "features": [
        {"name": "rms", "max": 0.25},
        {"name": "peak", "max": 1.0},
        {"name": "crest", "max": 4.0},
        {"name": "kurtosis", "max": 4.0},
    ],
    "combine": "max_ratio",
}

# A three-class signal classifier; class 1 was never predicted on calibration.
CENTROIDS: dict[str, Any] = {
    "kind": "centroids",
    "version": 1,
    "input": "window",
    "output": "logits",
    "output_shape": [1, 3],
    "features": [{"name": "rms"}, {"name": "peak"}],
    "center": [0.0, 0.0],
    "scale": [1.0, 1.0],
    "centroids": [[0.5, 0.5], None, [2.0, 4.0]],
    "combine": "neg_sq_distance",
}


def manifest(
    rules: dict[str, Any] | None = THRESHOLDS,
    input_shape: list[int | None] | None = None,
    output: str = "anomaly_score",
    output_shape: list[int | None] | None = None,
    task: p.Task = p.Task.ANOMALY,
) -> p.Manifest:
    return p.Manifest(
        model=p.ModelRef(name="vib", version="1.0.0+int8"),
        artifact=p.Artifact(sha256=SHA, size=100, format=p.ModelFormat.ONNX),
        task=task,
        precision="int8",
        technique="quantize-static",
        inputs=[
            p.TensorSignature(name="window", dtype="float32", shape=input_shape or [1, WINDOW])
        ],
        outputs=[p.TensorSignature(name=output, dtype="float32", shape=output_shape or [1, 1])],
        rules=rules,
        created=datetime(2026, 11, 26, tzinfo=UTC),
    )


def square_wave(amplitude: float = 0.5, offset: float = 0.0) -> np.ndarray:
    """rms = peak = amplitude, crest = kurtosis = 1 (with its mean removed)."""
    signs = np.where(np.arange(WINDOW) % 2 == 0, 1.0, -1.0)
    return (offset + amplitude * signs).astype(np.float32).reshape(1, WINDOW)


@pytest.fixture
def model(tmp_path: Path) -> RulesModel:
    return RulesModel(manifest(), tmp_path / f"{SHA}.manifest.json")


def test_the_model_describes_itself_from_the_manifest(model: RulesModel, tmp_path: Path) -> None:
    assert model.format is p.ModelFormat.ONNX
    assert model.path == tmp_path / f"{SHA}.manifest.json"
    assert model.inputs == (TensorSpec("window", (1, WINDOW), "float32"),)
    assert model.outputs == (TensorSpec("anomaly_score", (1, 1), "float32"),)
    assert model.rules == THRESHOLDS
    model.close()  # nothing to release
    model.close()


@pytest.mark.parametrize(
    ("amplitude", "offset", "score"),
    [
        (0.5, 0.0, 2.0),  # rms 0.5 / 0.25
        (0.5, 3.0, 2.0),  # the mean is removed first
        (0.125, 0.0, 0.5),
        (0.0, 0.0, 0.0),  # the agent's smoke test feeds zeros: finite
    ],
)
def test_run_answers_with_the_manifest_output_name_and_the_rules_shape(
    model: RulesModel, amplitude: float, offset: float, score: float
) -> None:
    out = model.run({"window": square_wave(amplitude, offset)})
    assert list(out) == ["anomaly_score"]  # the manifest's name, not the rules' "score"
    value = out["anomaly_score"]
    assert value.shape == (1, 1) and value.dtype == np.float32
    assert value[0, 0] == pytest.approx(score, rel=1e-5)
    assert np.isfinite(value).all()


def test_run_scores_faults_above_healthy(model: RulesModel) -> None:
    rng = np.random.default_rng(3)
    healthy = (0.05 * rng.standard_normal((1, WINDOW))).astype(np.float32)
    impacts = healthy.copy()
    impacts[0, ::64] += 1.5  # bearing impacts: peak, crest and kurtosis rise
    low = model.run({"window": healthy})["anomaly_score"][0, 0]
    high = model.run({"window": impacts})["anomaly_score"][0, 0]
    assert low < 1.0 < high


def test_run_with_a_dynamic_batch_dimension(tmp_path: Path) -> None:
    model = RulesModel(manifest(input_shape=[None, WINDOW]), tmp_path / "m.json")
    assert model.inputs[0].shape == (None, WINDOW)
    out = model.run({"window": square_wave()})
    assert out["anomaly_score"].shape == (1, 1)


def test_run_with_centroid_rules_gives_one_logit_per_class(tmp_path: Path) -> None:
    model = RulesModel(
        manifest(CENTROIDS, output="logits", output_shape=[1, 3], task=p.Task.CLASSIFICATION),
        tmp_path / "m.json",
    )
    out = model.run({"window": square_wave(0.5)})  # features (0.5, 0.5): class 0 exactly
    logits = out["logits"]
    assert logits.shape == (1, 3) and logits.dtype == np.float32
    assert logits[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert logits[0, 1] == pytest.approx(-1e9)  # the absent class
    assert logits[0, 2] == pytest.approx(-(1.5**2 + 3.5**2), rel=1e-5)
    assert int(np.argmax(logits)) == 0


def test_run_agrees_with_evaluate_rules(model: RulesModel) -> None:
    x = np.random.default_rng(9).standard_normal((1, WINDOW)).astype(np.float32)
    np.testing.assert_array_equal(
        model.run({"window": x})["anomaly_score"], evaluate_rules(THRESHOLDS, x)
    )


@pytest.mark.parametrize(
    "feeds",
    [
        pytest.param({}, id="no feeds"),
        pytest.param({"input": square_wave()}, id="wrong name"),
        pytest.param({"Window": square_wave()}, id="wrong case"),
        pytest.param({"window": np.zeros((1, WINDOW // 2), np.float32)}, id="too short"),
        pytest.param({"window": np.zeros((1, WINDOW * 2), np.float32)}, id="too long"),
        pytest.param({"window": np.zeros((2, WINDOW), np.float32)}, id="batch of two"),
        pytest.param({"window": np.zeros((WINDOW,), np.float32)}, id="no batch dimension"),
        pytest.param({"window": np.zeros((1, 1, WINDOW), np.float32)}, id="extra dimension"),
        pytest.param({"window": np.zeros((1, 0), np.float32)}, id="empty"),
        pytest.param({"window": "not an array"}, id="a string"),
        pytest.param({"window": None}, id="None"),
    ],
)
def test_run_rejects_wrong_feeds_with_an_inference_error(
    model: RulesModel, feeds: dict[str, Any]
) -> None:
    with pytest.raises(InferenceError, match=re.escape(f"rule baseline from {SHA}.manifest.json")):
        model.run(feeds)


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param({**THRESHOLDS, "version": 2}, id="version"),
        pytest.param({**THRESHOLDS, "kind": "forest"}, id="kind"),
        pytest.param({**THRESHOLDS, "features": [{"name": "entropy", "max": 1}]}, id="feature"),
        pytest.param({k: v for k, v in THRESHOLDS.items() if k != "features"}, id="no features"),
        pytest.param({**THRESHOLDS, "output_shape": [1, 2, -3]}, id="output shape"),
    ],
)
def test_rules_it_cannot_read_fail_at_run_with_an_inference_error(
    tmp_path: Path, rules: dict[str, Any]
) -> None:
    model = RulesModel(manifest(rules), tmp_path / "m.json")
    with pytest.raises(InferenceError):
        model.run({"window": square_wave()})


def test_a_manifest_without_rules_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape("vib:1.0.0+int8 has no rule baseline")):
        RulesModel(manifest(rules=None), tmp_path / "m.json")


def test_a_manifest_without_inputs_or_outputs_is_a_load_error(tmp_path: Path) -> None:
    for field in ("inputs", "outputs"):
        broken = p.replace(manifest(), **{field: []})
        with pytest.raises(ModelLoadError, match="names no inputs or outputs"):
            RulesModel(broken, tmp_path / "m.json")
