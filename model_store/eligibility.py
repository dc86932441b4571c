"""Which variants of a model version may be deployed: pure decisions on measured fidelity.

Used by ``models compress`` when it judges what it built, and by ``models add`` when a version's
declared floor changes and the stored profiles are judged again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.protocol import Fidelity, Profile, Task

if TYPE_CHECKING:
    from model_store.catalog import ModelVersion

# Without a declared accuracy floor, a variant must still reproduce fp32 on held-out inputs:
# the same decision (class, alarm) on 95% of them, or for a regression outputs that correlate
# at r >= 0.95. Otherwise any variant, a pruned model at chance or one that outputs zeros, was
# eligible (issue 16).
DEFAULT_AGREEMENT_FLOOR = 0.95
DEFAULT_CORRELATION_FLOOR = 0.95


def eligibility(
    fidelity: Fidelity | None,
    floor: float | None,
    technique: str,
    threshold: float | None = None,
) -> tuple[bool, str | None]:
    """Whether a variant may be deployed, and if not, why.

    The fp32 reference and the source are the baseline: always eligible. Every other variant
    needs fidelity measured against the reference on held-out inputs. With a declared accuracy
    floor, the task metric (ROC AUC, accuracy, R^2) must reach it where labels exist, else the
    agreement with fp32; an anomaly model with a fixed alarm ``threshold`` must also agree with
    fp32's alarms (a variant can rank windows well and still raise false alarms at the
    threshold the agent uses). Without one, the default floor applies: agreement with fp32
    >= DEFAULT_AGREEMENT_FLOOR, or for outputs without decisions a correlation with fp32 >=
    DEFAULT_CORRELATION_FLOOR.
    """
    if technique in ("reference", "source"):
        return True, None
    if fidelity is None or fidelity.samples == 0:
        return False, "fidelity not measured: compress again with --calibration FILE"
    if floor is None:
        return _default_floor(fidelity)
    value, metric = fidelity.metric_value, fidelity.metric
    if value is None:
        value, metric = fidelity.agreement, "agreement with fp32"
    if value is None:
        return False, "no fidelity figure to compare with the accuracy floor"
    if value < floor:
        return False, f"{metric} {value:.3f} is below the accuracy floor {floor:g}"
    if threshold is not None and fidelity.agreement is not None and fidelity.agreement < floor:
        return False, (
            f"alarm agreement with fp32 {fidelity.agreement:.3f} is below the accuracy floor "
            f"{floor:g}: its scores are on another scale than the threshold {threshold:g}"
        )
    return True, None


def _default_floor(fidelity: Fidelity) -> tuple[bool, str | None]:
    """The judgement of a version that declares no accuracy floor: fidelity to fp32."""
    if fidelity.agreement is not None:
        value, metric, floor = fidelity.agreement, "agreement", DEFAULT_AGREEMENT_FLOOR
    elif fidelity.correlation is not None:
        value, metric, floor = fidelity.correlation, "correlation", DEFAULT_CORRELATION_FLOOR
    else:
        return False, "no fidelity figure to judge it by: declare --accuracy-floor and labels"
    if value < floor:
        return False, (
            f"{metric} with fp32 {value:.3f} is below the default floor {floor:g} "
            "(no accuracy floor declared; set one with --accuracy-floor)"
        )
    return True, None


def judge(
    version: ModelVersion, profile: Profile | None, technique: str
) -> tuple[bool, str | None]:
    """:func:`eligibility` of a variant of ``version`` with its stored ``profile``."""
    threshold = version.threshold if version.task is Task.ANOMALY else None
    fidelity = profile.fidelity if profile else None
    return eligibility(fidelity, version.accuracy_floor, technique, threshold)


# ------------------------------------------------------------------------ does it pay here?

# Instructions that multiply int8 in one step (VPDPBUSD, SDOT/UDOT, AMX tiles). Without one,
# onnxruntime's x86 int8 kernels pair products into int16 (VPMADDUBSW): on the AVX2-only build
# host visual-inspection's static int8 ran at 0.61-0.73x fp32's time (1 thread, alternating
# blocks), not the 0.25-0.5x int8 arithmetic promises, and a small graph's may not gain at all.
INT8_DOT_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})
FP16_ARITHMETIC_FEATURES = frozenset({"asimdhp", "avx512_fp16"})
PAYS_RATIO = 0.95  # faster than fp32 by at least 5%, or it does not pay in time
BASELINES = {"onnxruntime": "fp32", "litert": "tflite-fp32"}


def payoff_note(
    variant: str,
    precision: str,
    technique: str,
    latency_ms: dict[str, float],
    baseline_ms: dict[str, float],
    host_features: frozenset[str],
) -> str | None:
    """Why a compressed variant does not run faster than fp32 in the same runtime on this host,
    or None when it does (or nothing compares). ``latency_ms``: p50 per runtime of the variant;
    ``baseline_ms``: p50 per runtime of that runtime's fp32 variant.

    A variant may still be worth shipping for its size, and may be faster on a device class
    with the instruction this host lacks; the note says which, so a plan that passes it over
    here is explained, and a reader does not take "int8" to mean "faster".
    """
    if variant in BASELINES.values() or technique in ("reference", "source", "rules"):
        return None
    for runtime, ms in sorted(latency_ms.items()):
        base = baseline_ms.get(runtime)
        if base is None or base <= 0 or ms < PAYS_RATIO * base:
            continue
        measured = (
            f"not faster than fp32 on this host: {ms:.3f} ms vs {base:.3f} ms p50 on {runtime} "
            f"({ms / base:.2f}x)"
        )
        if precision in ("int8", "mixed") and not host_features & INT8_DOT_FEATURES:
            why = (
                "this host has no int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI, Arm "
                "dotprod), so int8 kernels run at about fp32's speed here; a device class with "
                "one can gain, and the plan prices it with that class's factors"
            )
        elif precision == "fp16" and not host_features & FP16_ARITHMETIC_FEATURES:
            why = "fp16 weights are widened to fp32 here (no fp16 arithmetic): it saves size only"
        elif technique == "prune":
            why = "dense kernels multiply zeros as fast as weights: it saves compressed size only"
        else:
            why = "its arithmetic does not shrink enough to beat fp32's kernels here"
        return f"{measured}: {why}"
    return None
