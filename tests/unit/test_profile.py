"""Profiling a variant: weights, MACs, memory, latency and fidelity numbers a user would trust."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent import protocol as p
from agent.hardware import read_hardware
from agent.protocol import Fidelity, ModelFormat, Profile, Task
from device_configs.kernels import parse_host
from model_store.errors import ModelStoreError
from model_store.profile import (
    count_parameters,
    estimate_macs,
    fidelity,
    measure_latency,
    measure_peak_memory,
    profile_variant,
    roc_auc,
    run_outputs,
)
from model_store.variants.base import Calibration, ModelInfo

SAMPLES = Path(__file__).parents[2] / "model_store" / "samples"
VIBRATION_ONNX = SAMPLES / "vibration-ae.onnx"
VIBRATION_TFLITE = SAMPLES / "vibration-ae.tflite"
VIBRATION = ModelInfo(
    name="vibration-ae",
    version="1.0.0",
    task=Task.ANOMALY,
    input_name="window",
    sample_shape=(512,),
    output_names=("score",),
)
# DFT cos + sin, band matrix, log eps, feature mean and 1/std, then the 32-16-8-16-32 AE.
AE_WEIGHTS = 32 * 16 + 16 + 16 * 8 + 8 + 8 * 16 + 16 + 16 * 32 + 32
VIBRATION_PARAMETERS = 512 * 160 * 2 + 160 * 32 + 1 + 32 + 32 + AE_WEIGHTS
VIBRATION_MACS = 512 * 160 * 2 + 160 * 32 + 32 * 16 + 16 * 8 + 8 * 16 + 16 * 32


def save(path: Path, graph: onnx.GraphProto, *, check: bool = True, **opsets: int) -> Path:
    imports = [helper.make_opsetid("", 17)]
    imports += [helper.make_opsetid(domain, v) for domain, v in opsets.items()]
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def float_init(name: str, values: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def matmul_model(path: Path) -> Path:
    """``y = x[1, 4] @ w[4, 3]``, with two of the twelve weights zero."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    w[3, 2] = 0.0  # arange already has one zero at [0, 0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [float_init("w", w)],
    )
    return save(path, graph)


@pytest.fixture(scope="module")
def heldout() -> Calibration:
    rng = np.random.default_rng(3)
    inputs = (rng.standard_normal((40, 512)) * 0.5).astype(np.float32)
    return Calibration(inputs, rng.integers(0, 2, 40))


# ---------------------------------------------------------------------- parameters and MACs


def test_matmul_counts_its_weights_and_m_k_n_macs(tmp_path: Path) -> None:
    path = matmul_model(tmp_path / "matmul.onnx")
    assert count_parameters(path, ModelFormat.ONNX) == (12, 10)
    assert estimate_macs(path, ModelFormat.ONNX) == 1 * 4 * 3


def test_conv_macs_are_output_elements_times_kernel_volume(tmp_path: Path) -> None:
    # 3 -> 5 channels, 3x3 'same' conv on 8x8, then a depthwise (group=5) 3x3 conv.
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["h", "dw"], ["y"], pads=[1, 1, 1, 1], group=5),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 8, 8])],
        [
            float_init("w", np.ones((5, 3, 3, 3))),
            float_init("b", np.zeros(5)),
            float_init("dw", np.ones((5, 1, 3, 3))),
        ],
    )
    path = save(tmp_path / "conv.onnx", graph)
    assert estimate_macs(path, ModelFormat.ONNX) == 5 * 8 * 8 * 3 * 9 + 5 * 8 * 8 * 9
    assert count_parameters(path, ModelFormat.ONNX) == (135 + 5 + 45, 135 + 45)


def test_gemm_honours_transpose_and_shape_tensors_are_not_weights(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "c"], ["g"], transB=1),
            helper.make_node("Constant", [], ["scale"], value_float=2.0),
            helper.make_node("Mul", ["g", "scale"], ["y"]),
        ],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor("shape", TensorProto.INT64, [2], [2, 4]),
            float_init("w", np.ones((3, 4))),
            float_init("c", np.ones(3)),
            float_init("unused", np.ones(100)),
        ],
    )
    path = save(tmp_path / "gemm.onnx", graph)
    assert estimate_macs(path, ModelFormat.ONNX) == 2 * 4 * 3
    assert count_parameters(path, ModelFormat.ONNX) == (12 + 3 + 1, 16)


def test_quantized_weights_count_once_and_zero_means_the_zero_point(tmp_path: Path) -> None:
    q = np.array([[2, 2, 5], [0, 2, 1], [2, 7, 2], [3, 2, 2]], dtype=np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [
            numpy_helper.from_array(q, "wq"),
            float_init("scale", np.array(0.1)),
            numpy_helper.from_array(np.array(2, dtype=np.int8), "zp"),
        ],
    )
    path = save(tmp_path / "qdq.onnx", graph)
    assert count_parameters(path, ModelFormat.ONNX) == (12, int(np.sum(q != 2)))
    assert estimate_macs(path, ModelFormat.ONNX) == 12


def test_macs_behind_an_op_shape_inference_does_not_know_are_still_counted(
    tmp_path: Path,
) -> None:
    # com.microsoft FusedMatMul hides y's shape from ONNX shape inference; the MatMul after it
    # is counted from one onnxruntime run instead.
    graph = helper.make_graph(
        [
            helper.make_node("FusedMatMul", ["x", "w1"], ["h"], domain="com.microsoft"),
            helper.make_node("MatMul", ["h", "w2"], ["y"]),
        ],
        "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [float_init("w1", np.ones((4, 3))), float_init("w2", np.ones((3, 2)))],
    )
    path = save(tmp_path / "contrib.onnx", graph, check=False, **{"com.microsoft": 1})
    assert estimate_macs(path, ModelFormat.ONNX) == 4 * 3 + 3 * 2


def test_vibration_onnx_parameters_are_its_initializers() -> None:
    model = onnx.load(str(VIBRATION_ONNX))
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    assert count_parameters(VIBRATION_ONNX, ModelFormat.ONNX) == (
        VIBRATION_PARAMETERS,
        sum(int(np.count_nonzero(a)) for a in arrays),
    )
    assert sum(a.size for a in arrays) == VIBRATION_PARAMETERS
    assert estimate_macs(VIBRATION_ONNX, ModelFormat.ONNX) == VIBRATION_MACS


def test_vibration_tflite_matches_the_onnx_counts() -> None:
    parameters, nonzero = count_parameters(VIBRATION_TFLITE, ModelFormat.TFLITE)
    # The converter folds log_eps into a 32-wide bias, so a few dozen more elements.
    assert parameters == pytest.approx(VIBRATION_PARAMETERS, rel=1e-3)
    onnx_nonzero = count_parameters(VIBRATION_ONNX, ModelFormat.ONNX)[1]
    assert nonzero == pytest.approx(onnx_nonzero, rel=1e-3)
    assert nonzero < parameters  # the band matrix is mostly zeros
    assert estimate_macs(VIBRATION_TFLITE, ModelFormat.TFLITE) == VIBRATION_MACS


def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelStoreError, match=r"bad\.onnx"):
        count_parameters(bad, ModelFormat.ONNX)
    bad_tflite = tmp_path / "bad.tflite"
    bad_tflite.write_bytes(b"not a model at all, nope")
    with pytest.raises(ModelStoreError, match=r"bad\.tflite"):
        estimate_macs(bad_tflite, ModelFormat.TFLITE)


# ------------------------------------------------------------------- latency, memory, outputs


def test_latency_has_one_entry_per_runtime(heldout: Calibration) -> None:
    onnx_latency = measure_latency(
        VIBRATION_ONNX, ModelFormat.ONNX, heldout.inputs, "window", runs=30, warmup=3
    )
    tflite_latency = measure_latency(
        VIBRATION_TFLITE, ModelFormat.TFLITE, heldout.inputs, "window", runs=30, warmup=3
    )
    assert list(onnx_latency) == ["onnxruntime"]
    assert list(tflite_latency) == ["litert"]
    for stats in [*onnx_latency.values(), *tflite_latency.values()]:
        assert stats.runs == 30
        assert 0 < stats.p50_ms <= stats.p95_ms


def test_latency_on_a_wrong_input_name_says_which_inputs_exist(heldout: Calibration) -> None:
    with pytest.raises(ModelStoreError, match="window"):
        measure_latency(VIBRATION_ONNX, ModelFormat.ONNX, heldout.inputs, "signal", runs=2)


def test_run_outputs_stacks_one_row_per_sample(heldout: Calibration) -> None:
    scores = run_outputs(VIBRATION_ONNX, ModelFormat.ONNX, heldout.inputs, "window")
    tflite_scores = run_outputs(VIBRATION_TFLITE, ModelFormat.TFLITE, heldout.inputs, "window")
    assert scores.shape == tflite_scores.shape == (len(heldout.inputs), 1)
    np.testing.assert_allclose(tflite_scores, scores, rtol=1e-3, atol=1e-4)


def test_peak_memory_is_a_positive_number_of_mib(heldout: Calibration) -> None:
    peak = measure_peak_memory(VIBRATION_ONNX, ModelFormat.ONNX, "window", heldout.inputs[:1])
    assert isinstance(peak, float)
    assert 0 < peak < 500


def test_peak_memory_of_a_model_that_fails_is_none_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with caplog.at_level(logging.WARNING, logger="model_store.profile"):
        assert measure_peak_memory(bad, ModelFormat.ONNX, "window", np.zeros((1, 512))) is None
    assert "bad.onnx" in caplog.text


# ---------------------------------------------------------------------------------- fidelity


def test_identical_outputs_have_perfect_fidelity() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((50, 1))
    labels = rng.integers(0, 2, 50)
    result = fidelity(Task.ANOMALY, scores, scores.copy(), labels)
    assert result.samples == 50
    assert result.correlation == 1.0
    assert result.agreement == 1.0
    assert result.max_abs_error == 0.0
    assert result.metric == "roc_auc"
    assert result.metric_value == result.reference_metric_value


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn_with_ties(seed: int) -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.standard_normal(300) + labels, 1)  # rounding makes many ties
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_needs_both_classes() -> None:
    assert roc_auc(np.zeros(5), np.arange(5.0)) is None
    only_healthy = fidelity(Task.ANOMALY, np.arange(5.0), np.arange(5.0), np.zeros(5))
    assert only_healthy.metric is None


def test_anomaly_agreement_uses_the_references_healthy_995th_percentile() -> None:
    healthy = np.linspace(0.0, 1.0, 201)  # 99.5th percentile: 0.995
    faulty = np.array([2.0, 3.0, 4.0, 5.0])
    reference = np.concatenate([healthy, faulty])
    labels = np.array([0] * 201 + [1] * 4)
    variant = reference.copy()
    variant[:2] = 1.5  # two healthy windows now raise an alarm
    variant[-1] = 0.5  # and one fault is missed
    result = fidelity(Task.ANOMALY, variant[:, None], reference[:, None], labels)
    assert result.agreement == pytest.approx(1 - 3 / 205)
    assert result.reference_metric_value == 1.0
    assert result.metric_value is not None and result.metric_value < 1.0
    # An explicit threshold overrides it: at 4.5 only the missed 5.0 flips.
    explicit = fidelity(Task.ANOMALY, variant, reference, labels, threshold=4.5)
    assert explicit.agreement == pytest.approx(1 - 1 / 205)


def test_classification_agreement_and_accuracy_by_hand() -> None:
    reference = np.array([[5, 1, 0], [0, 3, 1], [0, 1, 4], [1, 2, 0]], dtype=np.float32)
    variant = np.array([[4, 1, 0], [0, 3, 2], [0, 3, 2], [1, 2, 0]], dtype=np.float32)
    labels = np.array([0, 1, 2, 2])
    result = fidelity(Task.CLASSIFICATION, variant, reference, labels)
    assert result.agreement == 0.75
    assert result.metric == "accuracy"
    assert result.metric_value == 0.5
    assert result.reference_metric_value == 0.75
    assert result.max_abs_error == 2.0


def test_regression_r2_by_hand() -> None:
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    result = fidelity(Task.REGRESSION, np.array([1.0, 2.0, 3.0, 5.0]), labels, labels)
    assert result.metric == "r2"
    assert result.metric_value == pytest.approx(1 - 1 / 5)
    assert result.reference_metric_value == 1.0
    assert result.agreement is None


def test_broken_outputs_give_no_correlation_rather_than_nan() -> None:
    reference = np.arange(6.0).reshape(6, 1)
    variant = reference.copy()
    variant[2] = np.nan
    result = fidelity(Task.REGRESSION, variant, reference, None)
    assert result.correlation is None and result.max_abs_error is None
    assert p.load(Fidelity, p.encode(result)) == result


def test_outputs_of_another_shape_are_refused() -> None:
    with pytest.raises(ModelStoreError, match="shape"):
        fidelity(Task.CLASSIFICATION, np.zeros((4, 3)), np.zeros((4, 2)), None)


# ----------------------------------------------------------------------------------- profile


def test_profile_of_the_sample_variants_round_trips(heldout: Calibration) -> None:
    reference = run_outputs(VIBRATION_ONNX, ModelFormat.ONNX, heldout.inputs, "window")
    for path, fmt, runtime in [
        (VIBRATION_ONNX, ModelFormat.ONNX, "onnxruntime"),
        (VIBRATION_TFLITE, ModelFormat.TFLITE, "litert"),
    ]:
        profile = profile_variant(
            path, fmt, VIBRATION, heldout, reference, runs=20, memory=fmt is ModelFormat.ONNX
        )
        assert p.load(Profile, p.encode(profile)) == profile
        assert profile.size_bytes == path.stat().st_size
        assert profile.macs == VIBRATION_MACS
        assert list(profile.latency) == [runtime]
        assert profile.fidelity is not None
        assert profile.fidelity.samples == len(heldout.inputs)
        assert profile.fidelity.correlation is not None and profile.fidelity.correlation > 0.999
        assert profile.fidelity.agreement == 1.0
        arch, flags = parse_host(profile.host)  # the plan carries latency over with these
        assert arch == platform.machine() and flags == set(read_hardware().cpu_flags)
    assert profile.peak_memory_mb is None  # memory=False for the TFLite one


def test_profile_without_heldout_data_has_no_fidelity(tmp_path: Path) -> None:
    info = ModelInfo("tiny", "1", Task.REGRESSION, "x", (4,), ("y",))
    path = matmul_model(tmp_path / "matmul.onnx")
    profile = profile_variant(path, ModelFormat.ONNX, info, None, None, runs=5, memory=False)
    assert profile.fidelity is None
    assert (profile.parameters, profile.nonzero_parameters, profile.macs) == (12, 10, 12)
    assert profile.latency["onnxruntime"].runs == 5


@pytest.mark.parametrize("content", [None, b"", b"garbage bytes, not a model"])
def test_profile_of_a_file_that_cannot_load_names_it(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelStoreError, match=r"broken\.onnx"):
        profile_variant(path, ModelFormat.ONNX, VIBRATION, None, None, runs=2, memory=False)


SURFACE_ONNX = SAMPLES / "surface-cnn.onnx"


@pytest.mark.skipif(not SURFACE_ONNX.exists(), reason="sample model surface-cnn not built yet")
def test_profile_of_the_surface_classifier() -> None:
    info = ModelInfo("surface-cnn", "1.0.0", Task.CLASSIFICATION, "image", (1, 32, 32), ("logits",))
    rng = np.random.default_rng(5)
    heldout = Calibration(rng.random((12, 1, 32, 32), dtype=np.float32), rng.integers(0, 4, 12))
    profile = profile_variant(SURFACE_ONNX, ModelFormat.ONNX, info, heldout, None, runs=20)
    model = onnx.load(str(SURFACE_ONNX))
    weights = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
    ]
    assert profile.parameters == sum(w.size for w in weights)
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    # Every conv weight is applied at least once per output position.
    assert profile.macs > sum(
        int(np.prod(t.dims)) for t in model.graph.initializer if t.name in conv_weights
    )
    assert profile.fidelity is not None
    assert profile.fidelity.agreement == 1.0
    assert profile.fidelity.metric == "accuracy"
    assert profile.peak_memory_mb is not None and profile.peak_memory_mb > 0
    assert p.load(Profile, p.encode(profile)) == profile


SURFACE_TFLITE = SAMPLES / "surface-cnn.tflite"


@pytest.mark.skipif(
    not (SURFACE_ONNX.exists() and SURFACE_TFLITE.exists()), reason="surface-cnn not built yet"
)
def test_surface_classifier_counts_agree_across_formats() -> None:
    assert count_parameters(SURFACE_TFLITE, ModelFormat.TFLITE) == count_parameters(
        SURFACE_ONNX, ModelFormat.ONNX
    )
    assert estimate_macs(SURFACE_TFLITE, ModelFormat.TFLITE) == estimate_macs(
        SURFACE_ONNX, ModelFormat.ONNX
    )
