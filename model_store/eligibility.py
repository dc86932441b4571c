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
