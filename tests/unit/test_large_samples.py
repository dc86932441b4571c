"""The two real-size sample models: the camera-image generator, and the committed files.

``visual-inspection`` (MobileNetV2 on 96x96 RGB) and ``bearing-diagnosis`` (1-D CNN on 4096-
sample windows) are trained with Keras by their build scripts; here they are checked the way a
user would meet them: the files are the ones the metadata describes, onnxruntime and LiteRT
agree, the size is what the metadata claims, and fresh inputs from seeds training never used
are classified above the declared floor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter

from agent.protocol import ModelFormat
from model_store.profile import estimate_macs
from model_store.samples import build_diagnosis, build_inspection
from model_store.samples.inspection import CLASSES, SIZE, InspectionGenerator

SAMPLES = Path(build_inspection.__file__).parent
FRESH_SEED = 4343  # neither a training, a test nor a calibration seed


def defect(label: int, seed: int) -> np.ndarray:
    """The defect alone, summed over channels: a class ``label`` image minus the ok one."""
    with_defect = InspectionGenerator(seed=seed).sample(label).astype(np.float64)
    part = InspectionGenerator(seed=seed).sample(0).astype(np.float64)
    difference: np.ndarray = (with_defect - part).sum(axis=0)
    return difference


def test_images_are_rgb_float32_in_the_unit_range() -> None:
    images, labels = InspectionGenerator(seed=3).batch(20)
    assert images.shape == (20, 3, SIZE, SIZE) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert sorted(np.bincount(labels, minlength=len(CLASSES))) == [4] * len(CLASSES)
    # Colour, not grey copied three times: the channels of a part differ.
    assert np.abs(images[:, 0] - images[:, 2]).mean() > 0.01


def test_the_same_seed_gives_the_same_images_and_another_seed_does_not() -> None:
    a, _ = InspectionGenerator(seed=5).batch(10)
    b, _ = InspectionGenerator(seed=5).batch(10)
    c, _ = InspectionGenerator(seed=6).batch(10)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_label_outside_the_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="label must be"):
        InspectionGenerator(seed=1).sample(len(CLASSES))


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_each_defect_changes_what_its_name_says(seed: int) -> None:
    scratch, pits, stain, crack = (defect(label, seed) for label in (1, 2, 3, 4))
    # A stain covers an area; scratches, pits and cracks touch few pixels.
    area = {
        name: int((np.abs(d) > 0.05).sum())
        for name, d in {"scratch": scratch, "pit": pits, "stain": stain, "crack": crack}.items()
    }
    assert area["stain"] > 2 * max(area["scratch"], area["pit"], area["crack"])
    assert min(area.values()) > 0
    # Pits and cracks only darken; a crack is darker than a pit is wide.
    assert pits.min() < -0.3 and crack.min() < -0.3
    assert crack.max() <= 1e-9


@pytest.fixture(scope="module", params=["visual-inspection", "bearing-diagnosis"])
def meta(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(json.loads((SAMPLES / f"{request.param}.json").read_text()))


def test_both_files_are_the_ones_the_metadata_describes(meta: dict[str, Any]) -> None:
    for fmt in ("onnx", "tflite"):
        entry = meta["files"][fmt]
        data = (SAMPLES / entry["file"]).read_bytes()
        assert len(data) == entry["bytes"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]


def test_the_models_are_of_the_size_the_issue_asked_for(meta: dict[str, Any]) -> None:
    macs = estimate_macs(SAMPLES / meta["files"]["onnx"]["file"], ModelFormat.ONNX)
    least = 50e6 if meta["name"] == "visual-inspection" else 5e6
    assert macs >= least, f"{meta['name']}: {macs / 1e6:.1f} M MACs"
    assert meta["accuracy"] >= meta["accuracy_floor"] >= 0.95


def _fresh(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "visual-inspection":
        return InspectionGenerator(seed=FRESH_SEED).batch(n)
    return build_diagnosis.windows(FRESH_SEED, n // 4, 4)


def test_fresh_inputs_are_classified_above_the_floor_and_both_runtimes_agree(
    meta: dict[str, Any],
) -> None:
    name = meta["name"]
    x, y = _fresh(name, 120)
    session = ort.InferenceSession(
        str(SAMPLES / f"{name}.onnx"), providers=["CPUExecutionProvider"]
    )
    input_name = meta["inputs"][0]["name"]
    onnx_logits = np.concatenate([session.run(None, {input_name: xi[None]})[0] for xi in x])
    interpreter = Interpreter(model_path=str(SAMPLES / f"{name}.tflite"))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    assert list(inp["shape"]) == meta["inputs"][0]["shape"]
    out = interpreter.get_output_details()[0]["index"]
    tflite_logits = []
    for xi in x[:20]:
        interpreter.set_tensor(inp["index"], xi[None])
        interpreter.invoke()
        tflite_logits.append(interpreter.get_tensor(out)[0].copy())
    scale = np.abs(onnx_logits[:20]).max()
    assert np.abs(np.stack(tflite_logits) - onnx_logits[:20]).max() < 1e-3 * scale
    accuracy = float((onnx_logits.argmax(axis=1) == y).mean())
    assert accuracy >= meta["accuracy_floor"], f"{name}: {accuracy:.3f} on fresh inputs"
