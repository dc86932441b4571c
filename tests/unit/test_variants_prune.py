"""The prune builder: honest sparsity, fixed constants left alone, structured where safe."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from model_store.samples.build import spectral_constants
from model_store.variants.base import BuildContext, BuiltVariant, VariantError
from model_store.variants.prune import PruneBuilder, compressed_size, looks_engineered
from tests.unit.test_variants_quant import (
    VIBRATION,
    MakeContext,
    cnn_context,
    context,
    graph_model,
    relative_error,
    save,
    surface_context,
    vibration_context,
)


def by_name(variants: list[BuiltVariant]) -> dict[str, BuiltVariant]:
    return {v.variant: v for v in variants}


def weights(variant: BuiltVariant) -> dict[str, np.ndarray]:
    assert variant.path is not None
    model = onnx.load(str(variant.path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def test_vibration_prunes_the_autoencoder_and_leaves_the_spectral_constants(
    tmp_path: Path,
) -> None:
    ctx = vibration_context(tmp_path)
    variants = by_name(PruneBuilder().build(ctx))
    assert set(variants) == {"pruned-50", "pruned-75", "pruned-structured"}
    reference = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(str(VIBRATION)).graph.initializer
    }
    learned = ["w0", "w1", "w2", "w3"]
    prunable = sum(reference[n].size for n in learned)
    for name, target in (("pruned-50", 0.5), ("pruned-75", 0.75)):
        variant = variants[name]
        assert variant.technique == "prune" and variant.precision == "fp32"
        got = weights(variant)
        zeros = sum(int(np.count_nonzero(got[n] == 0)) for n in learned)
        assert variant.details["prunable_weights"] == prunable
        assert variant.details["sparsity"] == pytest.approx(zeros / prunable)
        assert variant.details["sparsity"] == pytest.approx(target, abs=0.01)
        for fixed in ("dft_cos", "dft_sin", "bands"):
            np.testing.assert_array_equal(got[fixed], reference[fixed])
            assert fixed in variant.details["left_dense"]
        # Dense storage: the file does not shrink, and the notes say so.
        assert variant.details["size_change_bytes"] == 0
        assert any("no size or speed gain" in note for note in variant.notes)
        relative_error(variant, ctx)  # loads, float32 interface, same output shape
    structured = variants["pruned-structured"]
    got = weights(structured)
    assert got["w0"].shape == (32, 12) and got["w1"].shape == (12, 6)
    assert got["w2"].shape == (6, 12) and got["w3"].shape == (12, 32)
    assert got["b1"].shape == (6,)
    assert structured.details["size_change_bytes"] < 0
    relative_error(structured, ctx)


@pytest.mark.parametrize("make", [cnn_context, surface_context])
def test_cnn_structured_pruning_follows_conv_pool_flatten_gemm(
    make: MakeContext, tmp_path: Path
) -> None:
    ctx = make(tmp_path)
    variants = by_name(PruneBuilder().build(ctx))
    structured = variants["pruned-structured"]
    assert structured.details["layers"]
    # Convolutions keep a multiple of 8 channels: the CPU kernels work in blocks of 8 or 16.
    assert all(int(layer.split()[-2]) % 8 == 0 for layer in structured.details["layers"])
    assert structured.details["size_change_bytes"] < 0
    assert np.isfinite(relative_error(structured, ctx))
    for name in ("pruned-50", "pruned-75"):
        assert variants[name].details["sparsity"] == pytest.approx(
            variants[name].details["target_sparsity"], abs=0.01
        )


def test_structured_pruning_that_is_impossible_is_explained(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(32, 8)).astype("f4"), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    reference = save(graph_model(nodes, [w], [1, 32], [1, 8]), tmp_path / "one.onnx")
    ctx = context(reference, tmp_path, "x", (32,), "y", None)
    variants = by_name(PruneBuilder().build(ctx))
    assert set(variants) == {"pruned-50", "pruned-75"}
    assert any("structured pruning was not possible" in n for n in variants["pruned-50"].notes)


def test_weight_from_a_constant_node_is_pruned(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(32, 8)).astype("f4"), "w")
    nodes = [
        helper.make_node("Constant", [], ["w"], value=w),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    reference = save(graph_model(nodes, [], [1, 32], [1, 8]), tmp_path / "const.onnx")
    ctx = context(reference, tmp_path, "x", (32,), "y", None)
    variant = by_name(PruneBuilder().build(ctx))["pruned-75"]
    assert variant.details["sparsity"] == pytest.approx(0.75)
    assert variant.path is not None
    constant = onnx.load(str(variant.path)).graph.node[0]
    assert np.mean(numpy_helper.to_array(constant.attribute[0].t) == 0) == pytest.approx(0.75)


def test_weight_computed_by_an_operator_is_a_clear_variant_error(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 32)).astype("f4"), "w")
    nodes = [
        helper.make_node("Transpose", ["w"], ["wt"]),
        helper.make_node("MatMul", ["x", "wt"], ["y"]),
    ]
    reference = save(graph_model(nodes, [w], [1, 32], [1, 8]), tmp_path / "computed.onnx")
    ctx = context(reference, tmp_path, "x", (32,), "y", None)
    with pytest.raises(VariantError, match="weights come from operators") as info:
        PruneBuilder().build(ctx)
    assert "Transpose" in info.value.reason and info.value.variant == "prune"


def test_a_model_of_fixed_constants_only_is_not_pruned(tmp_path: Path) -> None:
    dft = numpy_helper.from_array(spectral_constants().dft_cos, "dft")
    nodes = [helper.make_node("MatMul", ["x", "dft"], ["y"])]
    reference = save(graph_model(nodes, [dft], [1, 512], [1, 160]), tmp_path / "dft.onnx")
    ctx = context(reference, tmp_path, "x", (512,), "y", None)
    with pytest.raises(VariantError, match="fixed constant"):
        PruneBuilder().build(ctx)


def test_fixed_constants_are_told_from_learned_weights() -> None:
    constants = spectral_constants()
    assert looks_engineered(constants.dft_sin) is not None
    assert "distinct values" in str(looks_engineered(constants.bands))
    rng = np.random.default_rng(0)
    for shape in [(512, 160), (32, 16), (32, 16, 3, 3)]:
        assert looks_engineered(rng.normal(size=shape).astype(np.float32)) is None


def test_corrupt_reference_is_a_variant_error(tmp_path: Path) -> None:
    reference = tmp_path / "broken.onnx"
    reference.write_bytes(VIBRATION.read_bytes()[:1000])
    ctx: BuildContext = context(reference, tmp_path, "window", (512,), "score", None)
    with pytest.raises(VariantError, match="not a valid ONNX model"):
        PruneBuilder().build(ctx)


def test_structured_pruning_removes_dead_units_without_changing_outputs(tmp_path: Path) -> None:
    # Dead units (zero weights in and out) score lowest and are the ones removed, so the pruned
    # model must compute exactly what the reference does: a check of every slice it makes.
    rng = np.random.default_rng(0)

    def tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(values.astype(np.float32), name)

    c1w, c2w = rng.normal(size=(4, 1, 3, 3)), rng.normal(size=(4, 4, 3, 3))
    c1w[1] = 0
    c2w[2] = 0
    scale, bn_bias = rng.uniform(0.5, 1.5, 4), rng.normal(size=4) * 0.1
    bn_bias[1] = 0
    fw = rng.normal(size=(4 * 4 * 4, 16))
    fw_dead = [0, 3, 9, 12]
    fw[:, fw_dead] = 0
    mw = rng.normal(size=(16, 3))
    inits = [
        tensor("c1w", c1w),
        tensor("c1b", np.zeros(4)),
        tensor("scale", scale),
        tensor("bn_b", bn_bias),
        tensor("mean", np.zeros(4)),
        tensor("var", np.ones(4)),
        tensor("c2w", c2w),
        tensor("fw", fw),
        tensor("fb", np.where(np.isin(np.arange(16), fw_dead), 0.0, 0.1)),
        tensor("gain", rng.uniform(0.5, 1.5, (1, 16))),
        tensor("mw", mw),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "bn_b", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2w"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Reshape", ["c2", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "fw"], ["h"]),
        helper.make_node("Add", ["h", "fb"], ["hb"]),
        helper.make_node("Mul", ["hb", "gain"], ["hg"]),
        helper.make_node("Tanh", ["hg"], ["t"]),
        helper.make_node("MatMul", ["t", "mw"], ["y"]),
    ]
    reference = save(graph_model(nodes, inits, [1, 1, 8, 8], [1, 3]), tmp_path / "dead.onnx")
    ctx = context(reference, tmp_path, "x", (1, 8, 8), "y", None)
    structured = by_name(PruneBuilder().build(ctx))["pruned-structured"]
    got = weights(structured)
    assert got["c1w"].shape == (3, 1, 3, 3) and got["scale"].shape == (3,)
    assert got["c2w"].shape == (3, 3, 3, 3)
    assert got["fw"].shape == (3 * 16, 12) and got["gain"].shape == (1, 12)
    assert got["mw"].shape == (12, 3)
    assert relative_error(structured, ctx) < 1e-5


def test_the_compressed_size_is_the_whole_file_deflated_though_read_in_pieces(
    tmp_path: Path,
) -> None:
    # Over 1 MiB, so it is read in more than one piece; half zeros, so it compresses.
    data = np.random.default_rng(0).integers(0, 256, 3 * 2**19, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data + bytes(len(data)))
    assert compressed_size(path) == len(zlib.compress(path.read_bytes(), 6))
