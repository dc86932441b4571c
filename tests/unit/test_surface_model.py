"""The surface image generator and the committed sample model surface-cnn."""

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

from model_store.samples import build_surface
from model_store.samples.surface import CLASSES, SurfaceGenerator

SAMPLES = Path(build_surface.__file__).parent
# Neither the training (0) nor the reported test (1) seed of the build.
FRESH_SEED = 4242


def defect(label: int, seed: int) -> np.ndarray:
    """The defect alone: a class ``label`` image minus the ok image of the same surface."""
    with_defect = SurfaceGenerator(seed=seed).sample(label)[0].astype(np.float64)
    surface = SurfaceGenerator(seed=seed).sample(0)[0].astype(np.float64)
    difference: np.ndarray = with_defect - surface
    return difference


def elongation(mask: np.ndarray) -> float:
    """Ratio of the principal variances of a pixel set's coordinates (1 for a round blob)."""
    coords = np.argwhere(mask).astype(np.float64)
    low, high = np.linalg.eigvalsh(np.cov(coords.T))
    return float(high / max(low, 1e-9))


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return dict(json.loads((SAMPLES / "surface-cnn.json").read_text()))


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(
        str(SAMPLES / "surface-cnn.onnx"), providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module")
def tflite() -> Interpreter:
    interpreter = Interpreter(model_path=str(SAMPLES / "surface-cnn.tflite"))
    interpreter.allocate_tensors()
    return interpreter


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, np.ndarray]:
    return SurfaceGenerator(seed=FRESH_SEED).batch(400)


def onnx_logits(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(["logits"], {"image": x[None]})[0] for x in images])


def tflite_logits(interpreter: Interpreter, images: np.ndarray) -> np.ndarray:
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    result = []
    for x in images:
        interpreter.set_tensor(inp, x[None])
        interpreter.invoke()
        result.append(interpreter.get_tensor(out)[0].copy())
    return np.array(result)


def test_images_are_float32_patches_in_the_unit_range() -> None:
    images, labels = SurfaceGenerator(seed=3).batch(40)
    assert images.shape == (40, 1, 32, 32) and images.dtype == np.float32
    assert labels.shape == (40,) and labels.dtype.kind == "i"
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert SurfaceGenerator(seed=3).sample(2).shape == (1, 32, 32)
    assert SurfaceGenerator(seed=3, size=48).sample(1).shape == (1, 48, 48)
    assert SurfaceGenerator.CLASSES == CLASSES == ("ok", "scratch", "pit", "stain")


def test_batches_are_balanced_and_shuffled() -> None:
    _, labels = SurfaceGenerator(seed=3).batch(400)
    assert np.bincount(labels).tolist() == [100, 100, 100, 100]
    assert not np.array_equal(labels[:8], np.arange(8) % 4)


def test_the_same_seed_gives_the_same_images_and_another_seed_does_not() -> None:
    a_images, a_labels = SurfaceGenerator(seed=11).batch(16)
    b_images, b_labels = SurfaceGenerator(seed=11).batch(16)
    c_images, _ = SurfaceGenerator(seed=12).batch(16)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.allclose(a_images, c_images)


def test_a_label_outside_the_classes_is_refused() -> None:
    with pytest.raises(ValueError, match="label"):
        SurfaceGenerator(seed=0).sample(4)


def test_ok_surfaces_differ_from_each_other() -> None:
    images, _ = SurfaceGenerator(seed=5).batch(8)
    assert np.std(images.reshape(8, -1).mean(axis=1)) > 0.01  # lighting and level vary
    assert all(np.std(image) > 0.01 for image in images)  # texture and noise, never flat


@pytest.mark.parametrize("seed", range(20))
def test_each_defect_looks_like_its_name(seed: int) -> None:
    np.testing.assert_array_equal(defect(0, seed), 0)

    scratch = defect(1, seed)
    line = np.abs(scratch) > 0.05
    assert 5 <= line.sum() <= 120
    assert elongation(line) > 4  # thin and straight

    pits = defect(2, seed)
    assert pits.min() < -0.08  # dark
    assert (pits < -0.05).sum() <= 120  # small

    stain = defect(3, seed)
    patch = stain < -0.03
    assert patch.sum() >= 30  # large
    assert stain.min() > -0.25 and stain.max() <= 1e-6  # low contrast, darker only


def test_pit_images_have_darker_spots_than_ok_images() -> None:
    gen = SurfaceGenerator(seed=8)
    depth: dict[int, list[float]] = {0: [], 2: []}
    for _ in range(100):
        for c in depth:
            image = gen.sample(c)[0]
            depth[c].append(float(np.median(image) - image.min()))
    assert np.mean(depth[2]) > np.mean(depth[0]) + 0.1


def test_metadata_describes_the_onnx_graph(meta: dict[str, Any]) -> None:
    model = onnx.load(str(SAMPLES / "surface-cnn.onnx"))
    onnx.checker.check_model(model)
    graph = model.graph

    def shape(value: Any) -> list[int]:
        return [d.dim_value for d in value.type.tensor_type.shape.dim]

    assert meta["name"] == "surface-cnn" and meta["version"] == "1.0.0"
    assert meta["task"] == "classification"
    assert meta["classes"] == list(CLASSES)
    assert [i.name for i in graph.input] == [i["name"] for i in meta["inputs"]] == ["image"]
    assert [o.name for o in graph.output] == [o["name"] for o in meta["outputs"]] == ["logits"]
    assert shape(graph.input[0]) == meta["inputs"][0]["shape"] == [1, 1, 32, 32]
    assert shape(graph.output[0]) == meta["outputs"][0]["shape"] == [1, len(CLASSES)]
    assert model.opset_import[0].version == meta["onnx"]["opset"] == 17
    assert model.ir_version == meta["onnx"]["ir_version"]
    assert {n.op_type for n in graph.node} <= {"Conv", "Relu", "MaxPool", "Flatten", "Gemm"}
    assert set(meta["accuracy_by_class"]) == set(CLASSES)
    assert meta["accuracy"] >= meta["accuracy_floor"] >= 0.9


def test_both_model_files_come_from_the_run_the_metadata_describes(meta: dict[str, Any]) -> None:
    for kind in ("onnx", "tflite"):
        entry = meta["files"][kind]
        data = (SAMPLES / entry["file"]).read_bytes()
        assert len(data) == entry["bytes"] < 200_000
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]


def test_tflite_takes_the_same_nchw_input(tflite: Interpreter) -> None:
    assert list(tflite.get_input_details()[0]["shape"]) == [1, 1, 32, 32]
    assert tflite.get_input_details()[0]["dtype"] == np.float32
    assert list(tflite.get_output_details()[0]["shape"]) == [1, len(CLASSES)]


def test_onnx_and_tflite_give_the_same_logits(
    session: ort.InferenceSession, tflite: Interpreter, fresh: tuple[np.ndarray, np.ndarray]
) -> None:
    images = fresh[0][:64]
    np.testing.assert_allclose(
        tflite_logits(tflite, images), onnx_logits(session, images), rtol=1e-4, atol=1e-5
    )


def test_fresh_images_are_classified_above_the_floor(
    meta: dict[str, Any], session: ort.InferenceSession, fresh: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = fresh
    predicted = onnx_logits(session, images).argmax(axis=1)
    assert (predicted == labels).mean() >= meta["accuracy_floor"]
    for c in range(len(CLASSES)):
        assert (predicted[labels == c] == c).mean() >= 0.8, CLASSES[c]


def test_the_numpy_forward_pass_is_the_graph(
    session: ort.InferenceSession, fresh: tuple[np.ndarray, np.ndarray]
) -> None:
    """The build's numpy network, loaded with the committed weights, computes the same logits."""
    model = onnx.load(str(SAMPLES / "surface-cnn.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [
        (weights[f"conv{i}.weight"].transpose(2, 3, 1, 0), weights[f"conv{i}.bias"])
        for i in range(len(build_surface.CHANNELS))
    ]
    cnn = build_surface.Cnn(convs, (weights["dense.weight"], weights["dense.bias"]))
    images = fresh[0][:32]
    np.testing.assert_allclose(
        build_surface.logits(cnn, images), onnx_logits(session, images), rtol=1e-4, atol=1e-5
    )
