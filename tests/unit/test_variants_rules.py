"""The rule baseline: schema, healthy vs faulty windows, the classifier fallback, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.protocol import FaultKind, Task
from agent.sources.vibration import VibrationSimulator
from model_store.samples import build
from model_store.samples.calibration import calibration_set
from model_store.variants.base import (
    BuildContext,
    BuiltVariant,
    Calibration,
    ModelInfo,
    VariantError,
)
from model_store.variants.rules import RulesBuilder, evaluate_rules

SAMPLES = Path(build.__file__).parent
VIBRATION = SAMPLES / "vibration-ae.onnx"
SURFACE = SAMPLES / "surface-cnn.onnx"
VIBRATION_INFO = ModelInfo("vibration-ae", "1.0.0", Task.ANOMALY, "window", (512,), ("score",))
SURFACE_INFO = ModelInfo(
    "surface-cnn", "1.0.0", Task.CLASSIFICATION, "image", (1, 32, 32), ("logits",)
)
# Measured about 96% for the vibration thresholds and about 60% for the surface centroids
# (chance is 25%): a last-resort tier, so the bars are modest.
MIN_ALARM_AGREEMENT = 0.9
MIN_CLASS_AGREEMENT = 0.45


def rules_for(
    reference: Path, info: ModelInfo, calibration: Calibration | None, workdir: Path
) -> BuiltVariant:
    [variant] = RulesBuilder().build(BuildContext(reference, info, calibration, workdir))
    return variant


@pytest.fixture(scope="module")
def vibration_rules(tmp_path_factory: pytest.TempPathFactory) -> BuiltVariant:
    calibration = calibration_set("vibration-ae", 300, seed=21).building()
    return rules_for(VIBRATION, VIBRATION_INFO, calibration, tmp_path_factory.mktemp("rules"))


@pytest.fixture(scope="module")
def surface_rules(tmp_path_factory: pytest.TempPathFactory) -> BuiltVariant:
    calibration = calibration_set("surface-cnn", 300, seed=21).building()
    return rules_for(SURFACE, SURFACE_INFO, calibration, tmp_path_factory.mktemp("rules"))


def windows(fault: FaultKind, severity: float = 1.0, per: int = 8) -> list[np.ndarray]:
    """Windows from machines none of the calibration sets use."""
    out = []
    for rpm, seed in ((1600.0, 71), (2200.0, 72), (2900.0, 73)):
        sim = VibrationSimulator(rpm=rpm, seed=seed, fault=fault, severity=severity)
        out += [sim.read() for _ in range(per)]
    return out


def test_threshold_rules_follow_the_documented_schema(vibration_rules: BuiltVariant) -> None:
    v = vibration_rules
    assert (v.variant, v.path, v.format, v.precision, v.technique) == (
        "rules",
        None,
        None,
        "rules",
        "rules",
    )
    rules: dict[str, Any] = json.loads(json.dumps(v.rules))  # plain JSON, nothing else
    assert rules["kind"] == "thresholds" and rules["version"] == 1
    assert (rules["input"], rules["output"], rules["output_shape"]) == ("window", "score", [1, 1])
    assert [f["name"] for f in rules["features"]] == ["rms", "peak", "crest", "kurtosis"]
    assert all(f["max"] > 0 for f in rules["features"])
    assert rules["combine"] == "max_ratio"
    assert v.details["normal_by"] == "labels"
    assert v.details["agreement"] >= MIN_ALARM_AGREEMENT


def test_faulty_windows_score_higher_than_healthy_ones(vibration_rules: BuiltVariant) -> None:
    assert vibration_rules.rules is not None
    rules = vibration_rules.rules
    healthy = np.array([evaluate_rules(rules, w) for w in windows(FaultKind.NONE)])
    assert healthy.shape == (24, 1, 1) and healthy.dtype == np.float32
    for fault in (FaultKind.OUTER_RACE, FaultKind.INNER_RACE, FaultKind.BALL):
        faulty = np.array([evaluate_rules(rules, w[None]) for w in windows(fault)])
        assert faulty.mean() > 1.5 * healthy.mean()
        assert np.mean(faulty > 1.0) >= 0.8, fault
    assert np.mean(healthy > 1.0) <= 0.1


def test_rules_without_labels_take_normal_from_the_reference(tmp_path: Path) -> None:
    calibration = calibration_set("vibration-ae", 200, seed=5).building()
    unlabelled = Calibration(calibration.inputs)
    variant = rules_for(VIBRATION, VIBRATION_INFO, unlabelled, tmp_path)
    assert variant.details["normal_by"].startswith("reference score")
    assert "label_accuracy" not in variant.details
    assert variant.rules is not None
    healthy = [evaluate_rules(variant.rules, w)[0, 0] for w in windows(FaultKind.NONE, per=4)]
    faulty = [evaluate_rules(variant.rules, w)[0, 0] for w in windows(FaultKind.OUTER_RACE, per=4)]
    assert min(faulty) > max(healthy)


def test_classifier_fallback_is_a_nearest_centroid(surface_rules: BuiltVariant) -> None:
    assert surface_rules.rules is not None
    rules: dict[str, Any] = json.loads(json.dumps(surface_rules.rules))
    assert rules["kind"] == "centroids" and rules["output_shape"] == [1, 4]
    assert len(rules["centroids"]) == 4 and all(c is not None for c in rules["centroids"])
    assert surface_rules.details["agreement"] >= MIN_CLASS_AGREEMENT
    unseen = calibration_set("surface-cnn", 200, seed=22)
    logits = np.array([evaluate_rules(rules, x) for x in unseen.inputs])
    assert logits.shape == (200, 1, 4) and logits.dtype == np.float32
    assert unseen.labels is not None
    accuracy = float(np.mean(logits[:, 0].argmax(axis=1) == unseen.labels))
    assert accuracy >= MIN_CLASS_AGREEMENT  # far above chance (25%)


def test_a_class_the_reference_never_predicts_gets_no_centroid() -> None:
    rules = {
        "kind": "centroids",
        "version": 1,
        "output_shape": [1, 3],
        "features": [{"name": "mean"}, {"name": "max"}],
        "center": [0.5, 0.9],
        "scale": [0.1, 0.1],
        "centroids": [[-1.0, 0.0], None, [1.0, 0.0]],
        "combine": "neg_sq_distance",
    }
    logits = evaluate_rules(rules, np.full((1, 1, 4, 4), 0.6, dtype=np.float32))
    assert logits.shape == (1, 3) and logits.argmax() == 2
    assert logits[0, 1] == pytest.approx(-1e9)


def test_unreadable_rules_raise_value_error() -> None:
    sample = np.zeros(512, dtype=np.float32)
    with pytest.raises(ValueError, match="version"):
        evaluate_rules({"version": 2, "kind": "thresholds"}, sample)
    with pytest.raises(ValueError, match="unknown rules kind"):
        evaluate_rules({"version": 1, "kind": "tree", "output_shape": [1], "features": []}, sample)


def test_evaluating_rules_loads_no_inference_runtime() -> None:
    code = (
        "import sys, numpy as np\n"
        "from model_store.variants.rules import evaluate_rules\n"
        "r = {'kind': 'thresholds', 'version': 1, 'output_shape': [1, 1],\n"
        "     'features': [{'name': 'rms', 'max': 1.0}], 'combine': 'max_ratio'}\n"
        "print(evaluate_rules(r, np.ones(8))[0, 0])\n"
        "assert not {'onnx', 'onnxruntime', 'sklearn'} & set(sys.modules), sys.modules.keys()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == 0.0  # a constant window has no vibration


def test_no_calibration_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VariantError, match=r"--calibration FILE") as info:
        RulesBuilder().build(BuildContext(VIBRATION, VIBRATION_INFO, None, tmp_path))
    assert info.value.variant == "rules"


def test_wrong_shaped_calibration_is_refused(tmp_path: Path) -> None:
    wrong = Calibration(np.zeros((30, 1, 16, 16), dtype=np.float32))
    with pytest.raises(VariantError, match=r"expected \[N, 1, 32, 32\]"):
        RulesBuilder().build(BuildContext(SURFACE, SURFACE_INFO, wrong, tmp_path))


def test_a_task_without_a_rule_kind_is_refused(tmp_path: Path) -> None:
    info = ModelInfo("vibration-ae", "1.0.0", Task.REGRESSION, "window", (512,), ("score",))
    data = calibration_set("vibration-ae", 20, seed=2)
    with pytest.raises(VariantError, match="no rule baseline for a regression model"):
        RulesBuilder().build(BuildContext(VIBRATION, info, data, tmp_path))
