"""TFLite variants and the ONNX-to-TensorFlow converter, without TensorFlow.

The main environment has no TensorFlow: there the builder must refuse with the install hint,
and the TensorFlow-free parts (operator check, prefix search, tensor-name mapping) are tested.
The conversion itself is tested in ``tests/tf_env`` (``bash tests/tf_env/run.sh``), which
imports this module's helpers; keep its imports to what that environment installs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from agent.protocol import Task
from model_store.samples import build
from model_store.variants.base import BuildContext, ModelInfo, VariantError
from model_store.variants.onnx_to_tf import check_supported, node_indices
from model_store.variants.tflite import NO_TENSORFLOW, TfliteBuilder, sensitive_prefix

SAMPLES = Path(build.__file__).parent
VIBRATION = SAMPLES / "vibration-ae.onnx"
SURFACE = SAMPLES / "surface-cnn.onnx"
VIBRATION_INFO = ModelInfo("vibration-ae", "1.0.0", Task.ANOMALY, "window", (512,), ("score",))
SURFACE_INFO = ModelInfo(
    "surface-cnn", "1.0.0", Task.CLASSIFICATION, "image", (1, 32, 32), ("logits",)
)


def model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    input_shape: list[int],
    output_shape: list[int],
    path: Path,
) -> Path:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return path


def test_without_tensorflow_the_builder_says_how_to_get_it(tmp_path: Path) -> None:
    # The main environment must not have TensorFlow; tests/tf_env is where it is installed.
    assert importlib.util.find_spec("tensorflow") is None
    ctx = BuildContext(VIBRATION, VIBRATION_INFO, None, tmp_path)
    with pytest.raises(VariantError) as info:
        TfliteBuilder().build(ctx)
    assert info.value.variant == "tflite"
    assert info.value.reason == NO_TENSORFLOW
    assert "pip install 'greenfleet[tflite-build]'" in str(info.value)
    assert "greenfleet models add" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_unsupported_operators_are_named_before_any_tracing(tmp_path: Path) -> None:
    path = model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("HardSwish", ["r"], ["h"]),
            helper.make_node("Erf", ["h"], ["y"]),
        ],
        [],
        [1, 8],
        [1, 8],
        tmp_path / "odd.onnx",
    )
    with pytest.raises(VariantError, match=r"operator\(s\) Erf, HardSwish;") as info:
        check_supported(onnx.load(str(path)))
    assert "greenfleet models add" in str(info.value)


def test_samples_use_only_supported_operators() -> None:
    for path in (VIBRATION, SURFACE):
        check_supported(onnx.load(str(path)))


def test_the_int8_fallback_keeps_the_spectral_prefix_in_float() -> None:
    vibration = onnx.load(str(VIBRATION))
    prefix = sensitive_prefix(vibration)
    ops = [vibration.graph.node[i].op_type for i in sorted(prefix)]
    assert ops == ["MatMul", "MatMul", "Mul", "Mul", "Add", "MatMul", "Add", "Log"]
    assert sensitive_prefix(onnx.load(str(SURFACE))) == set()


def test_tflite_tensor_names_map_back_to_onnx_nodes() -> None:
    assert node_indices("n10_mm0/MatMul;n12_r0/Relu;n11_a0/Add") == {10, 11, 12}
    assert node_indices("serving_default_window:0") == set()
