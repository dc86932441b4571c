"""The ResNet-50-sized benchmark model (benchmarks/large_compress.py) and how the benchmark
splits a compress run into steps."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.large_compress import images, parameters, peak_in, resnet, windows


def test_the_default_model_is_resnet50_sized() -> None:
    model = resnet()
    ops = Counter(node.op_type for node in model.graph.node)
    # 49 convolutions in 16 bottleneck blocks plus the stem, 4 projection shortcuts
    assert ops["Conv"] == 53 and ops["Add"] == 16 and ops["Gemm"] == 1
    assert ops.keys() <= {"Conv", "Relu", "Add", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm"}
    assert parameters(model) == 25_530_472  # torchvision's 25,557,032 less the folded BN
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [
        1,
        3,
        224,
        224,
    ]


def test_same_seed_same_bytes_and_the_class_follows_the_image() -> None:
    small = {"stages": (1, 1), "width": 8, "size": 32, "classes": 10}
    model = resnet(**small)
    assert model.SerializeToString() == resnet(**small).SerializeToString()
    assert model.SerializeToString() != resnet(seed=7, **small).SerializeToString()
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = images(20, size=32).inputs
    classes = {int(np.argmax(sess.run(None, {"input": x[i : i + 1]})[0])) for i in range(20)}
    assert len(classes) >= 4


def test_images_need_a_size_the_blobs_divide() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        images(2, size=30)


def test_progress_marks_split_the_run_into_steps() -> None:
    progress = [
        [2.0, "build", 0, 3, "fp32 reference"],
        [3.0, "build", 1, 3, "fp16"],
        [9.0, "build", 2, 3, "prune"],
        [12.0, "build", 3, 3, "done"],
        [14.0, "profile", 0, 2, "fp32"],
        [20.0, "profile", 1, 2, "fp16"],
        [25.0, "profile", 2, 2, "done"],
    ]
    assert windows(26.0, progress) == [
        ("start-up", 0.0, 2.0),
        ("fp32", 2.0, 3.0),
        ("fp16", 3.0, 9.0),
        ("prune", 9.0, 12.0),
        ("profile fp32 outputs", 12.0, 14.0),
        ("profile fp32", 14.0, 20.0),
        ("profile fp16", 20.0, 25.0),
        ("finish", 25.0, 26.0),
    ]
    samples = [(t / 10, 1024 * t) for t in range(0, 260, 1)]
    assert peak_in(samples, 3.0, 9.0) == pytest.approx(91.0)  # one sample past the end
    assert peak_in([], 0.0, 1.0) == 0.0
