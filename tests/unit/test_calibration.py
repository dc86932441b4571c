"""Calibration sets for the sample models: shapes, balance, determinism, meaningful labels."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from model_store.samples import build, build_surface, calibration
from model_store.samples.calibration import calibration_set
from model_store.samples.surface import SurfaceGenerator
from model_store.variants.base import Calibration

SAMPLES = Path(build.__file__).parent


@pytest.fixture(scope="module")
def vibration() -> Calibration:
    return calibration_set("vibration-ae")


@pytest.fixture(scope="module")
def surface() -> Calibration:
    return calibration_set("surface-cnn", n=400)


def test_vibration_set_is_windows_with_binary_labels(vibration: Calibration) -> None:
    assert vibration.inputs.shape == (600, build.WINDOW)
    assert vibration.inputs.dtype == np.float32
    assert vibration.labels is not None and vibration.labels.shape == (600,)
    assert set(np.unique(vibration.labels).tolist()) == {0, 1}
    assert (vibration.labels == 0).mean() == pytest.approx(0.7, abs=0.01)
    vibration.check_shape((build.WINDOW,))


def test_surface_set_is_images_with_balanced_classes(surface: Calibration) -> None:
    assert surface.inputs.shape == (400, 1, 32, 32)
    assert surface.inputs.dtype == np.float32
    assert surface.labels is not None
    assert np.bincount(surface.labels).tolist() == [100, 100, 100, 100]
    surface.check_shape((1, 32, 32))


@pytest.mark.parametrize("model", ["vibration-ae", "surface-cnn"])
def test_both_parts_hold_every_label(model: str) -> None:
    cal = calibration_set(model)
    building, heldout = cal.building(), cal.heldout()
    assert cal.labels is not None and building.labels is not None and heldout.labels is not None
    assert set(building.labels.tolist()) == set(heldout.labels.tolist()) == set(cal.labels.tolist())


@pytest.mark.parametrize("model", ["vibration-ae", "surface-cnn"])
def test_the_same_seed_gives_the_same_set_and_another_seed_does_not(model: str) -> None:
    a, b = calibration_set(model, n=80, seed=7), calibration_set(model, n=80, seed=7)
    c = calibration_set(model, n=80, seed=8)
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.allclose(a.inputs, c.inputs)


def test_derived_seeds_stay_clear_of_the_build_seeds() -> None:
    # The sample builders train and evaluate on seeds below 10000 (machines 1000-3023,
    # surface generator 0 and 1); a calibration set for any user seed never reuses one.
    for seed in (0, 1, 2, 1234, 3000):
        assert min(calibration._seeds(seed, 1, 200)) >= 10_000
        assert min(calibration._seeds(seed, 2, 1)) >= 10_000


def test_surface_images_are_not_training_images(surface: Calibration) -> None:
    train, _ = SurfaceGenerator(seed=build_surface.TRAIN_SEED).batch(400)
    seen = {image.tobytes() for image in train}
    assert not any(image.tobytes() in seen for image in surface.inputs)


def test_vibration_labels_match_what_the_model_sees(vibration: Calibration) -> None:
    session = ort.InferenceSession(
        str(SAMPLES / "vibration-ae.onnx"), providers=["CPUExecutionProvider"]
    )
    scores = np.array(
        [session.run(["score"], {"window": w[None]})[0][0, 0] for w in vibration.inputs]
    )
    assert vibration.labels is not None
    healthy, faulty = scores[vibration.labels == 0], scores[vibration.labels == 1]
    assert faulty.mean() > 3 * healthy.mean()
    assert np.median(faulty) > np.percentile(healthy, 95)


def test_surface_labels_match_what_the_model_sees(surface: Calibration) -> None:
    session = ort.InferenceSession(
        str(SAMPLES / "surface-cnn.onnx"), providers=["CPUExecutionProvider"]
    )
    predicted = np.array(
        [session.run(["logits"], {"image": x[None]})[0][0].argmax() for x in surface.inputs]
    )
    assert (predicted == surface.labels).mean() >= 0.9


def test_600_vibration_windows_take_well_under_three_seconds() -> None:
    started = time.perf_counter()
    calibration_set("vibration-ae", n=600, seed=99)
    assert time.perf_counter() - started < 3.0


def test_an_unknown_model_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown sample model"):
        calibration_set("resnet-50")


def test_cli_writes_a_file_calibration_can_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "vib.npz"
    assert calibration.main(["vibration-ae", str(out), "--n", "50", "--seed", "3"]) == 0
    loaded = Calibration.load(out)
    expected = calibration_set("vibration-ae", n=50, seed=3)
    np.testing.assert_array_equal(loaded.inputs, expected.inputs)
    np.testing.assert_array_equal(loaded.labels, expected.labels)
    assert "[50, 512]" in capsys.readouterr().out
