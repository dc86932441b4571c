"""Shape inference on a model's skeleton (model_store/shapes.py) gives what full inference gives."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from benchmarks.large_compress import resnet
from model_store.samples import build
from model_store.shapes import SMALL_BYTES, infer_shapes

SAMPLES = Path(build.__file__).parent


def typed_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...]]]:
    graph = model.graph
    return {
        v.name: (
            v.type.tensor_type.elem_type,
            tuple(d.dim_value for d in v.type.tensor_type.shape.dim),
        )
        for v in (*graph.value_info, *graph.output)
    }


def load(name: str) -> onnx.ModelProto:
    if name == "resnet-small":
        return resnet(stages=(1, 1), width=8, size=32, classes=10)
    return onnx.load(str(SAMPLES / f"{name}.onnx"))


@pytest.mark.parametrize("name", ["vibration-ae", "surface-cnn", "resnet-small"])
def test_the_skeleton_infers_every_tensor_as_the_whole_model_does(name: str) -> None:
    whole = load(name)
    before = whole.SerializeToString()
    skeleton, lifted = infer_shapes(whole)
    assert typed_shapes(skeleton) == typed_shapes(onnx.shape_inference.infer_shapes(whole))
    assert whole.SerializeToString() == before
    big = {t.name for t in whole.graph.initializer if len(t.raw_data) > SMALL_BYTES}
    assert lifted == big and big
    assert not any(t.name in lifted for t in skeleton.graph.initializer)
