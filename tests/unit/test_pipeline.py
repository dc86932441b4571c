"""``models compress`` on the real samples: variants, profiles, accuracy floors, manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.protocol import ModelFormat, Task
from agent.runtime import load_model
from controller.db import open_db
from model_store import pipeline
from model_store.catalog import Catalog, Declared
from model_store.errors import ModelStoreError
from model_store.samples.calibration import calibration_set
from model_store.signing import Signer, verify
from model_store.variants.base import Calibration, VariantError

SAMPLES = Path(__file__).parents[2] / "model_store" / "samples"


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(open_db(tmp_path / "g.db"), tmp_path / "store")


def add_sample(catalog: Catalog, name: str) -> None:
    catalog.add(
        SAMPLES / f"{name}.onnx",
        name,
        "1.0.0",
        declared=Declared.from_json(SAMPLES / f"{name}.json"),
    )


@pytest.mark.parametrize("name", ["vibration-ae", "surface-cnn"])
def test_compress_builds_profiles_judges_and_signs_every_variant(
    catalog: Catalog, tmp_path: Path, name: str
) -> None:
    add_sample(catalog, name)
    signer = Signer.load_or_create(tmp_path / "keys")
    stages: list[str] = []
    report = pipeline.compress(
        catalog,
        signer,
        f"{name}:1.0.0",
        calibration_set(name, n=300),
        tmp_path / "work",
        progress=lambda stage, done, total, label: stages.append(stage),
        latency_runs=20,
    )
    built = {v.variant: v for v in report.variants}
    assert {"fp32", "fp16", "int8-dynamic", "int8-static-qdq", "int8-static-qop", "student"} <= set(
        built
    )
    assert {"build", "profile"} <= set(stages)
    # The width students cannot narrow these graphs and say which operator stops them;
    # TensorFlow is not in this environment: the TFLite builder says so; the others still ran.
    failures = dict(report.failures)
    assert list(failures) == ["student-width", "tflite"]
    assert ("operator MatMul" if name == "vibration-ae" else "operator MaxPool") in failures[
        "student-width"
    ]
    assert "greenfleet[tflite-build]" in failures["tflite"]
    fp32 = built["fp32"]
    assert built["int8-static-qop"].size < 0.4 * fp32.size
    assert built["student"].size * 4 <= fp32.size
    for variant in report.variants:
        assert variant.profile is not None and variant.profile.fidelity is not None
        assert variant.profile.latency["onnxruntime"].p50_ms > 0
        assert variant.eligible or variant.reason, f"{variant.id} ineligible without a reason"
        manifest = verify(variant.manifest, signer.public_raw)  # type: ignore[arg-type]
        assert manifest.artifact.sha256 == variant.sha256 and manifest.golden
        model = load_model(variant.path, ModelFormat.ONNX)
        case = manifest.golden[0]
        feed = np.asarray(case.inputs[model.inputs[0].name], np.float32).reshape(
            (1, *fp32_shape(name))
        )
        out = model.run({model.inputs[0].name: feed})
        name0 = manifest.outputs[0].name
        np.testing.assert_allclose(
            out[name0].ravel(), case.outputs[name0], rtol=manifest.rtol, atol=manifest.atol
        )
    assert fp32.eligible and built["int8-static-qop"].eligible
    pruned = built["pruned-75"]
    assert not pruned.eligible and "below the accuracy floor" in (pruned.reason or "")
    assert catalog.version(f"{name}:1.0.0").rules is not None
    assert not list((tmp_path / "work").iterdir()), "scratch space is cleaned up"
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".")], (
        "no partial files"
    )


def fp32_shape(name: str) -> tuple[int, ...]:
    return (512,) if name == "vibration-ae" else (1, 32, 32)


def test_without_calibration_the_calibrated_builders_are_named_and_the_rest_built(
    catalog: Catalog, tmp_path: Path
) -> None:
    add_sample(catalog, "surface-cnn")
    report = pipeline.compress(
        catalog,
        Signer.load_or_create(tmp_path / "keys"),
        "surface-cnn:1.0.0",
        None,
        tmp_path / "work",
        only=["fp16", "int8-static", "distill"],
        latency_runs=10,
    )
    assert [v.variant for v in report.variants] == ["", "fp16", "fp32"]
    failed = dict(report.failures)
    assert "--calibration" in failed["int8-static"]
    assert "--calibration" in failed["student"]
    fp16 = next(v for v in report.variants if v.variant == "fp16")
    assert not fp16.eligible and "--calibration" in (fp16.reason or "")


def test_wrong_calibration_shape_stops_before_building(catalog: Catalog, tmp_path: Path) -> None:
    add_sample(catalog, "vibration-ae")
    wrong = Calibration(np.zeros((50, 256), np.float32))
    with pytest.raises(ModelStoreError, match=r"expected \[N, 512\]"):
        pipeline.compress(
            catalog,
            Signer.load_or_create(tmp_path / "k"),
            "vibration-ae:1.0.0",
            wrong,
            tmp_path / "w",
        )
    assert [v.variant for v in catalog.variants("vibration-ae:1.0.0")] == [""]


def test_a_crashing_builder_is_reported_and_the_others_still_run(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crashes:
        name, needs_calibration = "crashes", False

        def build(self, ctx: object) -> list[object]:
            raise ZeroDivisionError("boom")

    class Refuses:
        name, needs_calibration = "refuses", False

        def build(self, ctx: object) -> list[object]:
            raise VariantError("refuses", "this op is not supported")

    classes = {"crashes": Crashes, "refuses": Refuses}
    monkeypatch.setattr(
        pipeline,
        "BUILDERS",
        {
            "crashes": "x:Crashes",
            "refuses": "x:Refuses",
            "fp16": "model_store.variants.fp16:Fp16Builder",
        },
    )
    real = pipeline._builder
    monkeypatch.setattr(
        pipeline, "_builder", lambda name: classes[name]() if name in classes else real(name)
    )
    add_sample(catalog, "vibration-ae")
    report = pipeline.compress(
        catalog,
        Signer.load_or_create(tmp_path / "k"),
        "vibration-ae:1.0.0",
        calibration_set("vibration-ae", n=100),
        tmp_path / "w",
        latency_runs=10,
    )
    assert dict(report.failures) == {
        "crashes": "unexpected error: ZeroDivisionError: boom",
        "refuses": "this op is not supported",
    }
    assert "fp16" in {v.variant for v in report.variants}


def test_a_version_without_a_task_cannot_be_compressed(catalog: Catalog, tmp_path: Path) -> None:
    catalog.add(SAMPLES / "vibration-ae.onnx", "vib", "1.0.0")
    with pytest.raises(ModelStoreError, match="--task or --meta"):
        pipeline.compress(
            catalog, Signer.load_or_create(tmp_path / "k"), "vib:1.0.0", None, tmp_path / "w"
        )


def _old_layout_model(path: Path) -> Path:
    """A small CNN in the layout of exporters before IR 4: every weight is listed among the
    graph inputs too, IR version 3, opset 8 (built here: the classic model zoo files are)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.2).astype("f4"), "W"),
        numpy_helper.from_array(np.zeros(8, np.float32), "B"),
        numpy_helper.from_array((rng.standard_normal((8, 4)) * 0.3).astype("f4"), "G"),
        numpy_helper.from_array(np.array([1, 8], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["g"]),
            helper.make_node("Reshape", ["g", "shape"], ["f"]),
            helper.make_node("MatMul", ["f", "G"], ["y"]),
        ],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])]
        + [helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)) for w in weights],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.save(model, str(path))
    return path


def _compress_old_layout(
    catalog: Catalog, tmp_path: Path, only: list[str]
) -> pipeline.CompressReport:
    """Add the old-layout CNN as a classifier and compress it with 60 random inputs."""
    path = _old_layout_model(tmp_path / "old.onnx")
    catalog.add(path, "old", "1.0.0", declared=Declared(task=Task.CLASSIFICATION))
    inputs = np.random.default_rng(1).standard_normal((60, 3, 16, 16)).astype(np.float32)
    return pipeline.compress(
        catalog,
        Signer.load_or_create(tmp_path / "keys"),
        "old:1.0.0",
        Calibration(inputs),
        tmp_path / "work",
        only=only,
        latency_runs=5,
    )


def test_a_graph_in_the_old_layout_is_normalized_before_the_variants_are_built(
    catalog: Catalog, tmp_path: Path
) -> None:
    """Issue 16: weights listed among the graph inputs (IR 3) made the fp16 variant unloadable
    (a float32 input over a float16 initializer) and other exporters' references invalid. The
    reference is now normalized first and says what changed."""
    import onnx

    report = _compress_old_layout(catalog, tmp_path, ["fp16", "int8-static"])
    built = {v.variant: v for v in report.variants}
    assert report.failures == [], report.failures
    assert {"fp32", "fp16", "int8-static-qdq", "int8-static-qop"} <= set(built)
    reference = onnx.load(str(built["fp32"].path))
    onnx.checker.check_model(reference)
    assert [i.name for i in reference.graph.input] == ["x"]
    assert "4 weight(s) taken out of the graph inputs" in built["fp32"].notes
    assert "IR version 3 -> 4" in built["fp32"].notes
    assert built["fp16"].eligible, built["fp16"].reason


def test_compress_records_what_each_step_cost(catalog: Catalog, tmp_path: Path) -> None:
    """Issue 16: the energy of making a variant counts too. Every compress records CPU and wall
    seconds per step and in total, and energy labelled measured (RAPL) or estimated."""
    report = _compress_old_layout(catalog, tmp_path, ["int8-static"])
    assert set(report.costs) == {"fp32", "int8-static", "profile"}
    assert report.cost is not None and report.cost.cpu_s > 0 and report.cost.wall_s > 0
    assert report.cost.cpu_s == pytest.approx(sum(c.cpu_s for c in report.costs.values()), 1e-3)
    stored = catalog.version("old:1.0.0").build_cost
    assert stored is not None and set(stored["steps"]) == set(report.costs)
    assert stored["total"]["method"] in ("rapl", "estimate")
    assert (catalog.get("old:1.0.0+int8-static-qdq").details or {}).get("built_by") == "int8-static"
