"""Which variants may be deployed (``model_store.eligibility``): a table.

Issue 16 found every variant eligible when a version declared no accuracy floor, a pruned model
at chance and an int8 model that outputs zeros among them. Without a floor, fidelity to fp32 on
held-out inputs decides."""

from __future__ import annotations

import pytest

from agent.protocol import Fidelity
from model_store.eligibility import eligibility, payoff_note


def fid(
    agreement: float | None = None,
    correlation: float | None = None,
    metric_value: float | None = None,
    samples: int = 100,
) -> Fidelity:
    metric = "accuracy" if metric_value is not None else None
    return Fidelity(
        samples=samples,
        agreement=agreement,
        correlation=correlation,
        metric=metric,
        metric_value=metric_value,
    )


@pytest.mark.parametrize(
    ("fidelity", "floor", "technique", "threshold", "eligible", "reason"),
    [
        pytest.param(None, None, "reference", None, True, None, id="the-reference"),
        pytest.param(None, 0.9, "source", None, True, None, id="the-source"),
        pytest.param(None, None, "quantize", None, False, "--calibration", id="not-measured"),
        pytest.param(fid(samples=0), 0.9, "prune", None, False, "not measured", id="no-samples"),
        # no declared floor: fidelity to fp32 decides
        pytest.param(fid(0.99), None, "quantize", None, True, None, id="default-agrees"),
        pytest.param(fid(0.95), None, "quantize", None, True, None, id="default-at-floor"),
        pytest.param(
            fid(0.233), None, "prune", None, False, "agreement with fp32 0.233", id="at-chance"
        ),
        pytest.param(
            fid(0.8, metric_value=0.99),
            None,
            "distill",
            None,
            False,
            "default floor 0.95",
            id="default-ignores-a-good-metric-that-disagrees",
        ),
        pytest.param(
            fid(correlation=0.97), None, "fp16", None, True, None, id="regression-correlates"
        ),
        pytest.param(
            fid(correlation=0.2),
            None,
            "fp16",
            None,
            False,
            "correlation with fp32 0.200",
            id="regression-does-not",
        ),
        pytest.param(fid(), None, "fp16", None, False, "no fidelity figure", id="nothing-to-judge"),
        # a declared floor: the task metric where labels exist, else agreement
        pytest.param(fid(0.5, metric_value=0.96), 0.95, "prune", None, True, None, id="metric"),
        pytest.param(
            fid(0.99, metric_value=0.80),
            0.95,
            "prune",
            None,
            False,
            "accuracy 0.800",
            id="metric-below",
        ),
        pytest.param(fid(0.97), 0.95, "quantize", None, True, None, id="floor-on-agreement"),
        pytest.param(
            fid(0.90),
            0.95,
            "quantize",
            None,
            False,
            "agreement with fp32 0.900",
            id="floor-on-agreement-below",
        ),
        pytest.param(
            fid(0.90, metric_value=0.99),
            0.95,
            "quantize",
            0.8,
            False,
            "alarm agreement",
            id="anomaly-alarms-disagree",
        ),
        pytest.param(fid(0.97, metric_value=0.99), 0.95, "quantize", 0.8, True, None, id="alarms"),
    ],
)
def test_eligibility(
    fidelity: Fidelity | None,
    floor: float | None,
    technique: str,
    threshold: float | None,
    eligible: bool,
    reason: str | None,
) -> None:
    got, why = eligibility(fidelity, floor, technique, threshold)
    assert got is eligible
    if reason is None:
        assert why is None
    else:
        assert why is not None and reason in why, why


AVX2 = frozenset({"avx2", "fma", "f16c"})
VNNI = AVX2 | {"avx512f", "avx512_vnni"}
ORT_FP32 = {"onnxruntime": 2.19, "litert": 2.20}


@pytest.mark.parametrize(
    ("variant", "precision", "technique", "latency", "features", "expected"),
    [
        # measured on this AVX2 host: visual-inspection's int8 ran at 1.12x fp32
        ("int8-static-qop", "int8", "quantize-static", {"onnxruntime": 2.44}, AVX2, "int8 dot"),
        # the same file on a VNNI host that is still slow: no instruction to blame
        ("int8-static-qop", "int8", "quantize-static", {"onnxruntime": 2.44}, VNNI, "does not"),
        ("int8-static-qop", "int8", "quantize-static", {"onnxruntime": 1.10}, AVX2, None),
        ("fp16", "fp16", "fp16", {"onnxruntime": 2.30}, AVX2, "widened"),
        ("pruned-50", "fp32", "prune", {"onnxruntime": 2.19}, AVX2, "zeros"),
        ("student-w50", "fp32", "distill-width", {"onnxruntime": 0.71}, AVX2, None),
        # 4% faster is within noise: it does not pay in time
        ("pruned-structured", "fp32", "prune", {"onnxruntime": 2.10}, AVX2, "zeros"),
        ("tflite-int8", "int8", "tflite", {"litert": 2.15}, AVX2, "on litert"),
        ("tflite-int8", "int8", "tflite", {"litert": 2.06}, AVX2, None),  # 6% faster: pays
        # the baselines themselves, and runtimes without a baseline, get no note
        ("fp32", "fp32", "reference", {"onnxruntime": 2.19}, AVX2, None),
        ("tflite-fp32", "fp32", "tflite", {"litert": 2.5}, AVX2, None),
        ("x", "int8", "imported", {"tensorrt": 9.0}, AVX2, None),
    ],
)
def test_a_variant_that_is_not_faster_than_fp32_here_says_so_and_why(
    variant: str,
    precision: str,
    technique: str,
    latency: dict[str, float],
    features: frozenset[str],
    expected: str | None,
) -> None:
    note = payoff_note(variant, precision, technique, latency, ORT_FP32, features)
    if expected is None:
        assert note is None
    else:
        assert note is not None and note.startswith("not faster than fp32 on this host")
        assert expected in note, note
