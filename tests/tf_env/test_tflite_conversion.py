"""The ONNX-to-TensorFlow converter and the TFLite builder, with TensorFlow installed.

Run with ``bash tests/tf_env/run.sh``; the main suite does not collect this file. The
TensorFlow-free half (and the builder's refusal without TensorFlow) is
``tests/unit/test_variants_tflite.py``, whose helpers this file shares.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from agent.protocol import ModelFormat
from model_store.samples.calibration import calibration_set
from model_store.variants.base import BuildContext, Calibration, VariantError
from model_store.variants.tflite import TfliteBuilder
from tests.unit.test_variants_tflite import (
    SURFACE,
    SURFACE_INFO,
    VIBRATION,
    VIBRATION_INFO,
    model,
)

# TensorFlow's own imports warn about deprecated APIs; that is not this code's doing.
tf_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def test_this_is_the_tensorflow_environment() -> None:
    assert importlib.util.find_spec("tensorflow") is not None


def reference_outputs(path: Path, name: str, inputs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {name: x[None]})[0] for x in inputs])


def tf_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    from model_store.variants import onnx_to_tf

    converted = onnx_to_tf.convert(onnx.load(str(path)))
    (name,) = converted.output_names
    return np.concatenate([converted.function(x[None])[name].numpy() for x in inputs])


@tf_warnings
@pytest.mark.parametrize(
    ("path", "name", "shape"), [(VIBRATION, "window", (512,)), (SURFACE, "image", (1, 32, 32))]
)
def test_converted_samples_compute_what_onnxruntime_computes(
    path: Path, name: str, shape: tuple[int, ...]
) -> None:
    inputs = np.random.default_rng(0).uniform(0, 1, size=(6, *shape)).astype(np.float32)
    want = reference_outputs(path, name, inputs)
    np.testing.assert_allclose(tf_outputs(path, inputs), want, rtol=1e-4, atol=1e-5)


def _conv_zoo(tmp_path: Path) -> Path:
    """Layouts and paddings the samples do not use: asymmetric pads, depthwise, Gemm transB."""
    rng = np.random.default_rng(1)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) * 0.3, name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[0, 1, 2, 1], strides=[2, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Mul", ["r1", "scale"], ["m1"]),
        helper.make_node("Conv", ["m1", "w2"], ["c2"], group=4, pads=[1, 1, 1, 1]),
        helper.make_node(
            "MaxPool", ["c2"], ["p1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("AveragePool", ["p1"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Transpose", ["p2"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Flatten", ["t"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wd", "bd"], ["g"], transB=1, alpha=0.5),
        helper.make_node("Softmax", ["g"], ["y"], axis=-1),
    ]
    inits = [
        init("w1", 4, 2, 3, 3),
        init("b1", 4),
        init("scale", 4, 1, 1),
        init("w2", 4, 1, 3, 3),
        init("wd", 3, 16),
        init("bd", 3),
    ]
    return model(nodes, inits, [1, 2, 16, 8], [1, 3], tmp_path / "zoo.onnx")


@tf_warnings
def test_converter_handles_paddings_groups_and_layout(tmp_path: Path) -> None:
    path = _conv_zoo(tmp_path)
    inputs = np.random.default_rng(2).normal(size=(4, 2, 16, 8)).astype(np.float32)
    want = reference_outputs(path, "x", inputs)
    np.testing.assert_allclose(tf_outputs(path, inputs), want, rtol=1e-4, atol=1e-6)


@tf_warnings
def test_surface_cnn_gets_fp32_fp16_and_int8_files(tmp_path: Path) -> None:
    calibration = calibration_set("surface-cnn", 120, seed=31)
    ctx = BuildContext(SURFACE, SURFACE_INFO, calibration.building(), tmp_path)
    built = {v.variant: v for v in TfliteBuilder().build(ctx)}
    assert sorted(built) == ["tflite-fp16", "tflite-fp32", "tflite-int8"]
    sizes = {}
    for name, variant in built.items():
        assert variant.format is ModelFormat.TFLITE and variant.path is not None
        assert variant.path.parent == tmp_path
        assert variant.details["agreement"] >= 0.95
        sizes[name] = variant.path.stat().st_size
    assert built["tflite-int8"].precision == "int8"
    assert sizes["tflite-int8"] < sizes["tflite-fp16"] < sizes["tflite-fp32"]
    # The files run in a fresh interpreter with the ONNX names and agree on unseen images.
    unseen = calibration.heldout().inputs
    want = reference_outputs(SURFACE, "image", unseen).argmax(axis=1)
    for variant in built.values():
        assert variant.path is not None
        got = run_signature(variant.path.read_bytes(), "image", "logits", unseen)
        assert np.mean(got.argmax(axis=1) == want) >= 0.9


def run_signature(data: bytes, input_name: str, output_name: str, inputs: np.ndarray) -> Any:
    from model_store.variants.tflite import _interpreter

    runner = _interpreter(data).get_signature_runner()
    return np.concatenate([runner(**{input_name: x[None]})[output_name] for x in inputs])


@tf_warnings
def test_vibration_int8_keeps_the_spectrum_in_float(tmp_path: Path) -> None:
    calibration = calibration_set("vibration-ae", 120, seed=32)
    ctx = BuildContext(VIBRATION, VIBRATION_INFO, calibration.building(), tmp_path)
    built = {v.variant: v for v in TfliteBuilder().build(ctx)}
    assert built["tflite-fp32"].details["output_error"] < 1e-4
    assert built["tflite-fp16"].details["output_error"] < 0.01
    int8 = built["tflite-int8"]
    assert int8.precision == "mixed"
    assert any("full int8 was refused" in note for note in int8.notes)
    assert int8.details["correlation"] > 0.999


@tf_warnings
def test_without_calibration_int8_is_skipped_with_a_note(tmp_path: Path) -> None:
    ctx = BuildContext(SURFACE, SURFACE_INFO, None, tmp_path)
    built = TfliteBuilder().build(ctx)
    assert [v.variant for v in built] == ["tflite-fp32", "tflite-fp16"]
    assert "no calibration data" in built[0].details["skipped"]["tflite-int8"]


@tf_warnings
def test_wrong_shaped_calibration_is_refused(tmp_path: Path) -> None:
    wrong = Calibration(np.zeros((10, 32, 32), dtype=np.float32))
    with pytest.raises(VariantError, match=r"expected \[N, 1, 32, 32\]"):
        TfliteBuilder().build(BuildContext(SURFACE, SURFACE_INFO, wrong, tmp_path))
