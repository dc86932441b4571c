"""fp16 and int8 variant builders on the vibration sample, small CNNs and broken inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.protocol import ModelFormat, Task
from model_store.samples import build
from model_store.variants.base import (
    BuildContext,
    BuiltVariant,
    Calibration,
    ModelInfo,
    VariantError,
)
from model_store.variants.fp16 import Fp16Builder, activation_peaks
from model_store.variants.quantize import (
    QUANT_TOLERANCE,
    DynamicInt8Builder,
    Search,
    StaticInt8Builder,
    candidates,
    prepare,
)
from model_store.variants.reference import probe_inputs, run_outputs

SAMPLES = Path(build.__file__).parent
VIBRATION = SAMPLES / "vibration-ae.onnx"
SURFACE = SAMPLES / "surface-cnn.onnx"
MakeContext = Callable[[Path], BuildContext]


# ------------------------------------------------------------------------------- model factories


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def graph_model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    input_shape: list[int],
    output_shape: list[int],
    input_name: str = "x",
    output_name: str = "y",
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cnn_model(path: Path, size: int = 16, channels: tuple[int, int] = (16, 32)) -> Path:
    """Conv-Relu-MaxPool twice, Flatten, Gemm to 4 logits: the shape of surface-cnn, smaller."""
    rng = np.random.default_rng(0)
    c1, c2 = channels
    flat = c2 * (size // 4) ** 2

    def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    inits = [
        init("c1w", c1, 1, 3, 3),
        init("c1b", c1, scale=0.1),
        init("c2w", c2, c1, 3, 3, scale=0.1),
        init("c2b", c2, scale=0.1),
        init("fw", 4, flat, scale=0.05),
        init("fb", 4, scale=0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2w", "c2b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    model = graph_model(nodes, inits, [1, 1, size, size], [1, 4], "image", "logits")
    return save(model, path)


def context(
    reference: Path,
    tmp_path: Path,
    input_name: str,
    sample_shape: tuple[int, ...],
    output_name: str,
    calibration: Calibration | None,
    task: Task = Task.CLASSIFICATION,
) -> BuildContext:
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    info = ModelInfo("test", "1.0.0", task, input_name, sample_shape, (output_name,))
    return BuildContext(reference, info, calibration, workdir)


def vibration_windows(count: int) -> np.ndarray:
    fleet = build.machines(range(5000, 5000 + count // 4), build.RPM_RANGE)
    return build.generate(fleet, 4)


def vibration_context(tmp_path: Path, calibrated: bool = True) -> BuildContext:
    calibration = Calibration(vibration_windows(48)) if calibrated else None
    return context(VIBRATION, tmp_path, "window", (512,), "score", calibration, task=Task.ANOMALY)


def cnn_context(tmp_path: Path, calibrated: bool = True) -> BuildContext:
    reference = cnn_model(tmp_path / "cnn.onnx")
    images = np.random.default_rng(1).random((48, 1, 16, 16)).astype(np.float32)
    return context(
        reference,
        tmp_path,
        "image",
        (1, 16, 16),
        "logits",
        Calibration(images) if calibrated else None,
    )


def surface_context(tmp_path: Path) -> BuildContext:
    if not SURFACE.exists():
        pytest.skip("model_store/samples/surface-cnn.onnx is not built yet")
    from model_store.samples.surface import SurfaceGenerator

    gen = SurfaceGenerator(seed=3)
    images = np.stack([gen.sample(i % 4) for i in range(48)]).astype(np.float32)
    return context(SURFACE, tmp_path, "image", (1, 32, 32), "logits", Calibration(images))


# --------------------------------------------------------------------------------------- checks


def outputs(path: Path, ctx: BuildContext, inputs: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    (out,) = sess.get_outputs()
    assert (inp.name, inp.type) == (ctx.info.input_name, "tensor(float)")
    assert inp.shape == [1, *ctx.info.sample_shape]
    assert (out.name, out.type) == (ctx.info.output_names[0], "tensor(float)")
    return np.concatenate(
        [sess.run(None, {inp.name: inputs[i : i + 1]})[0] for i in range(len(inputs))]
    )


def relative_error(variant: BuiltVariant, ctx: BuildContext) -> float:
    """Checks the file behaves like the reference for the agent; returns its output error."""
    assert variant.path is not None and variant.path.parent == ctx.workdir
    assert variant.format is ModelFormat.ONNX
    inputs, _ = probe_inputs(ctx)
    ref, got = outputs(ctx.reference, ctx, inputs), outputs(variant.path, ctx, inputs)
    assert ref.shape == got.shape
    return float(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref**2)))


def size_ratio(variant: BuiltVariant, ctx: BuildContext) -> float:
    assert variant.path is not None
    return variant.path.stat().st_size / ctx.reference.stat().st_size


# ------------------------------------------------------------------------------------------ fp16


@pytest.mark.parametrize("make", [vibration_context, cnn_context, surface_context])
def test_fp16_halves_the_file_and_keeps_float32_io(make: MakeContext, tmp_path: Path) -> None:
    ctx = make(tmp_path)
    (variant,) = Fp16Builder().build(ctx)
    assert variant.variant == "fp16" and variant.precision == "fp16"
    assert relative_error(variant, ctx) < 0.01
    assert size_ratio(variant, ctx) < 0.6
    assert variant.details["output_error"] < 0.01


def test_fp16_keeps_overflowing_nodes_in_float32(tmp_path: Path) -> None:
    # Raw sensor units: x * 2000 then a 64-wide sum reaches ~1e5, beyond float16's 65504.
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array([2000.0], np.float32), "gain"),
        numpy_helper.from_array(rng.uniform(0.5, 1.0, (64, 8)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1e-4], np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["big"]),
        helper.make_node("MatMul", ["big", "w"], ["sum"]),
        helper.make_node("Mul", ["sum", "scale"], ["y"]),
    ]
    reference = save(graph_model(nodes, inits, [1, 64], [1, 8]), tmp_path / "big.onnx")
    calibration = Calibration(rng.uniform(0.5, 1.0, (16, 64)).astype(np.float32))
    ctx = context(reference, tmp_path, "x", (64,), "y", calibration)
    (variant,) = Fp16Builder().build(ctx)
    assert variant.precision == "mixed"
    assert len(variant.details["fp32_nodes"]) >= 2
    assert relative_error(variant, ctx) < 0.01


def test_finding_activation_peaks_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    # The tensors are exposed as outputs on the model itself (a copy would hold the weights
    # twice: 100 MB more for a ResNet-50), so they must come off again.
    ctx = cnn_context(tmp_path)
    model = onnx.load(str(ctx.reference))
    before = model.SerializeToString()
    assert ctx.calibration is not None
    peaks = activation_peaks(model, ctx, ctx.calibration.inputs[:4])
    assert model.SerializeToString() == before
    assert len(peaks) > len(model.graph.initializer) + 1  # weights, input and activations


def test_fp16_of_a_corrupt_reference_is_a_variant_error(tmp_path: Path) -> None:
    reference = tmp_path / "broken.onnx"
    reference.write_bytes(VIBRATION.read_bytes()[:5000])
    ctx = context(reference, tmp_path, "window", (512,), "score", None)
    with pytest.raises(VariantError, match="not a valid ONNX model") as info:
        Fp16Builder().build(ctx)
    assert info.value.variant == "fp16"


# --------------------------------------------------------------------------------- int8 dynamic


def test_dynamic_int8_on_vibration_leaves_the_band_matmul_in_float32(tmp_path: Path) -> None:
    ctx = vibration_context(tmp_path)
    (variant,) = DynamicInt8Builder().build(ctx)
    assert variant.variant == "int8-dynamic" and variant.technique == "quantize-dynamic"
    # int8 noise in small band powers explodes after the log: that MatMul must stay float32.
    assert variant.precision == "mixed"
    assert any("MatMul" in why for why in variant.details["float32_nodes"].values())
    assert variant.details["quantized_ops"]["MatMulInteger"] >= 2
    assert relative_error(variant, ctx) <= QUANT_TOLERANCE
    assert size_ratio(variant, ctx) < 0.4


def test_dynamic_int8_covers_conv_and_gemm(tmp_path: Path) -> None:
    ctx = cnn_context(tmp_path, calibrated=False)
    (variant,) = DynamicInt8Builder().build(ctx)
    assert variant.precision == "int8"
    assert variant.details["quantized_ops"] == {"ConvInteger": 2, "MatMulInteger": 1}
    assert relative_error(variant, ctx) <= QUANT_TOLERANCE
    assert size_ratio(variant, ctx) < 0.4
    assert "random" in variant.details["probe"]


def test_dynamic_int8_of_a_corrupt_reference_is_a_variant_error(tmp_path: Path) -> None:
    reference = tmp_path / "broken.onnx"
    reference.write_bytes(b"not a model")
    ctx = context(reference, tmp_path, "window", (512,), "score", None)
    with pytest.raises(VariantError, match="not a valid ONNX model"):
        DynamicInt8Builder().build(ctx)


def test_a_node_the_quantizer_refuses_is_left_out_and_named(tmp_path: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    ctx = cnn_context(tmp_path)
    prepared, nodes = prepare(ctx, "int8-dynamic", optimize=False)
    refused = next(n.name for n in nodes if n.op_type == "Gemm")

    def quantize(out: Path, only: list[str] | None, exclude: list[str], pc: bool) -> None:
        if refused not in exclude and (only is None or refused in only):
            raise NotImplementedError("Gemm with this layout is not supported")
        quantize_dynamic(str(prepared), str(out), nodes_to_quantize=only, nodes_to_exclude=exclude)

    probes, _ = probe_inputs(ctx)
    reference_out = run_outputs(ctx.reference, ctx, probes, "int8-dynamic")
    pool = candidates(nodes, ["Conv", "Gemm"])
    outcome = Search(ctx, "int8-dynamic", quantize, pool, probes, reference_out).run()
    assert "refused" in outcome.left_out[refused]
    assert "not supported" in outcome.left_out[refused]
    assert outcome.full_error is None and outcome.attempt.error <= QUANT_TOLERANCE


def test_matmul_weight_from_a_constant_node_is_quantized_or_refused_cleanly(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["w"], value=weight),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    reference = save(graph_model(nodes, [], [1, 32], [1, 8]), tmp_path / "const.onnx")
    ctx = context(reference, tmp_path, "x", (32,), "y", None)
    try:
        (variant,) = DynamicInt8Builder().build(ctx)
    except VariantError as exc:
        assert exc.variant == "int8-dynamic" and exc.reason
    else:
        assert relative_error(variant, ctx) <= QUANT_TOLERANCE


@pytest.mark.parametrize("builder", [DynamicInt8Builder(), StaticInt8Builder()])
def test_int8_weights_are_7_bit_so_avx2_without_vnni_cannot_saturate(
    builder: DynamicInt8Builder | StaticInt8Builder, tmp_path: Path
) -> None:
    # uint8 x int8 pairs summed into int16 (VPMADDUBSW) fit only if |weight| <= 64: 2*255*64.
    ctx = cnn_context(tmp_path)
    for variant in builder.build(ctx):
        assert variant.path is not None and variant.details["reduce_range"] is True
        weights = [
            numpy_helper.to_array(init)
            for init in onnx.load(str(variant.path)).graph.initializer
            if init.data_type == TensorProto.INT8 and not init.name.endswith("zero_point")
        ]
        assert weights and all(np.abs(w.astype(np.int16)).max() <= 64 for w in weights)


# ---------------------------------------------------------------------------------- int8 static


@pytest.mark.parametrize("make", [cnn_context, surface_context])
def test_static_int8_builds_qdq_and_qoperator(make: MakeContext, tmp_path: Path) -> None:
    ctx = make(tmp_path)
    variants = StaticInt8Builder().build(ctx)
    assert [v.variant for v in variants] == ["int8-static-qdq", "int8-static-qop"]
    assert {v.details["format"] for v in variants} == {"QDQ", "QOperator"}
    for variant in variants:
        assert variant.technique == "quantize-static"
        assert variant.precision in ("int8", "mixed")
        assert relative_error(variant, ctx) <= QUANT_TOLERANCE
        assert size_ratio(variant, ctx) < 0.45
    qop = variants[1].details["quantized_ops"]
    assert qop.get("QLinearConv", 0) >= 1


def test_static_int8_on_vibration_keeps_the_feature_extractor_in_float32(
    tmp_path: Path,
) -> None:
    ctx = vibration_context(tmp_path)
    variants = StaticInt8Builder().build(ctx)
    assert len(variants) == 2
    for variant in variants:
        assert variant.precision == "mixed"
        assert variant.details["output_error_all_nodes"] > QUANT_TOLERANCE
        assert relative_error(variant, ctx) <= QUANT_TOLERANCE
        assert variant.details["quantized_nodes"] >= 4  # the autoencoder's dense layers
    assert not list(ctx.workdir.glob("*-trial.onnx"))


def test_static_int8_without_calibration_says_how_to_give_it(tmp_path: Path) -> None:
    ctx = vibration_context(tmp_path, calibrated=False)
    with pytest.raises(VariantError, match="--calibration") as info:
        StaticInt8Builder().build(ctx)
    assert info.value.variant == "int8-static"


def test_static_int8_with_wrong_shaped_calibration_names_both_shapes(tmp_path: Path) -> None:
    ctx = context(VIBRATION, tmp_path, "window", (512,), "score", Calibration(np.zeros((8, 256))))
    with pytest.raises(VariantError) as info:
        StaticInt8Builder().build(ctx)
    assert "[8, 256]" in info.value.reason and "[N, 512]" in info.value.reason


def test_static_int8_of_a_corrupt_reference_is_a_variant_error(tmp_path: Path) -> None:
    reference = tmp_path / "broken.onnx"
    reference.write_bytes(b"\x08\x07garbage")
    ctx = context(reference, tmp_path, "x", (4,), "y", Calibration(np.zeros((4, 4), np.float32)))
    with pytest.raises(VariantError, match="not a valid ONNX model"):
        StaticInt8Builder().build(ctx)


@pytest.mark.parametrize("builder", [Fp16Builder(), DynamicInt8Builder()])
def test_wrong_shaped_calibration_is_named_by_every_builder(
    builder: Fp16Builder | DynamicInt8Builder, tmp_path: Path
) -> None:
    calibration = Calibration(np.zeros((6, 1, 512), np.float32))
    ctx = context(VIBRATION, tmp_path, "window", (512,), "score", calibration)
    with pytest.raises(VariantError) as info:
        builder.build(ctx)
    assert info.value.variant == builder.name
    assert "[6, 1, 512]" in info.value.reason and "[N, 512]" in info.value.reason
