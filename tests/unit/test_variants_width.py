"""Width students: which channels a narrower copy of the reference keeps, and that it runs.

The planning and narrowing are pure numpy/onnx and run in the main suite; the training needs
TensorFlow and is tested in tests/tf_env.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_store.variants.base import VariantError
from model_store.variants.width import check_graph, narrow, plan_channels, scaled


def _residual_net(seed: int = 0, channels: int = 32, expand: int = 64) -> onnx.ModelProto:
    """stem conv -> [expand 1x1, depthwise 3x3, project 1x1] + skip -> GAP -> Gemm(3)."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    inits = [
        w("stem.w", channels, 3, 3, 3),
        w("stem.b", channels),
        w("exp.w", expand, channels, 1, 1),
        w("exp.b", expand),
        w("dw.w", expand, 1, 3, 3),
        w("dw.b", expand),
        w("proj.w", channels, expand, 1, 1),
        w("proj.b", channels),
        w("head.w", channels, 3),
        w("head.b", 3),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["x", "stem.w", "stem.b"], ["s"], pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Clip", ["s", "lo", "hi"], ["s6"]),
        helper.make_node("Conv", ["s6", "exp.w", "exp.b"], ["e"]),
        helper.make_node("Relu", ["e"], ["er"]),
        helper.make_node("Conv", ["er", "dw.w", "dw.b"], ["d"], pads=[1, 1, 1, 1], group=expand),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("Conv", ["dr", "proj.w", "proj.b"], ["p"]),
        helper.make_node("Add", ["s6", "p"], ["sum"]),
        helper.make_node("GlobalAveragePool", ["sum"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "head.w", "head.b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": xi[None]})[0] for xi in x])


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize(
    ("channels", "width", "expected"),
    [(64, 0.5, 32), (64, 0.35, 24), (32, 0.35, 8), (16, 0.35, 8), (8, 0.5, 8), (1280, 0.35, 448)],
)
def test_channel_counts_are_rounded_to_the_kernel_block(
    channels: int, width: float, expected: int
) -> None:
    assert scaled(channels, width) == expected


def test_the_residual_sides_keep_the_same_channels_and_the_head_keeps_its_classes() -> None:
    model = _residual_net()
    plan = plan_channels(model, 0.5)
    student = narrow(model, plan)
    w = _weights(student)
    assert w["stem.w"].shape == (16, 3, 3, 3)  # input channels of the image stay 3
    assert w["exp.w"].shape == (32, 16, 1, 1)
    assert w["dw.w"].shape == (32, 1, 3, 3)
    assert w["proj.w"].shape == (16, 32, 1, 1)  # writes the same channels the stem kept
    assert w["head.w"].shape == (16, 3)  # three classes, as the reference
    (dw,) = [n for n in student.graph.node if n.op_type == "Conv" and n.input[1] == "dw.w"]
    assert {a.name: a.i for a in dw.attribute}["group"] == 32
    # The reference itself is untouched.
    assert _weights(model)["exp.w"].shape == (64, 32, 1, 1)
    onnx.checker.check_model(student, full_check=True)
    x = np.random.default_rng(1).random((4, 3, 16, 16), dtype=np.float32)
    assert _run(student, x).shape == (4, 3)


def test_the_kept_channels_are_the_heaviest_ones() -> None:
    model = _residual_net(channels=8, expand=32)
    weights = _weights(model)
    norms = np.abs(weights["exp.w"]).reshape(32, -1).sum(axis=1) + np.abs(weights["dw.w"]).reshape(
        32, -1
    ).sum(axis=1)
    plan = plan_channels(model, 0.5)
    (kept,) = [k for k in plan.keep.values() if len(k) == 16]
    assert set(kept) == set(np.argsort(-norms)[:16])


def test_at_full_width_the_narrowed_graph_is_the_reference() -> None:
    model = _residual_net()
    student = narrow(model, plan_channels(model, 1.0))
    x = np.random.default_rng(2).random((3, 3, 16, 16), dtype=np.float32)
    assert np.array_equal(_run(student, x), _run(model, x))


def test_an_operator_it_cannot_scale_is_refused_by_name() -> None:
    model = _residual_net()
    model.graph.node[3].op_type = "LeakyRelu"
    model.graph.node[3].name = "odd_activation"
    with pytest.raises(VariantError, match="LeakyRelu \\(odd_activation\\)"):
        check_graph(model)
