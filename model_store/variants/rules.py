"""The rule baseline builder: fits the agent's last fallback tier on the calibration inputs.

The rule formats and their numpy-only evaluation live in :mod:`agent.rules` (the agent runs
them without this package); this module fits them: each threshold ``max`` is the
NORMAL_PERCENTILE of that statistic over the normal calibration inputs (those labelled 0 when
the calibration file has labels, else those the reference scores at or below its NORMAL_SHARE
percentile, or below median + ROBUST_SIGMAS robust sigmas if that is lower, as it is when faults
are common in the file); ``dark_fraction``'s cut is the DARK_PERCENTILE of all calibration
pixels; centroids are the mean features of the inputs the reference assigns to each class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.protocol import Task
from agent.rules import (
    BLOCKS_ACROSS,
    IMAGE_FEATURES,
    SIGNAL_FEATURES,
    VERSION,
    evaluate_rules,
    signal_statistics,
    statistics,
)
from model_store.variants.base import BuildContext, BuiltVariant, VariantError

__all__ = ["RulesBuilder", "evaluate_rules", "reference_cutoff"]

VARIANT = "rules"
NORMAL_PERCENTILE = 99.5  # a threshold sits at this percentile of the statistic on normal inputs
NORMAL_SHARE = 95.0  # without labels, inputs the reference scores at or below this are normal
DARK_PERCENTILE = 10.0
ROBUST_SIGMAS = 5.0  # without labels, also at most this many robust sigmas above the median
MIN_NORMAL = 10


# --------------------------------------------------------------------------------- the builder


def _signal_matrix(inputs: np.ndarray) -> np.ndarray:
    return np.array([[s[name] for name in SIGNAL_FEATURES] for s in map(signal_statistics, inputs)])


def reference_cutoff(
    scores: np.ndarray, labels: np.ndarray | None
) -> tuple[float, np.ndarray, str]:
    """The reference score above which an input counts as an alarm, the normal mask, and how.

    With enough inputs labelled 0 those are normal and the cut-off is the NORMAL_PERCENTILE of
    their scores; otherwise it is the lower of the NORMAL_SHARE percentile of all scores and the
    median plus ROBUST_SIGMAS robust standard deviations.
    """
    if labels is not None and int(np.sum(labels == 0)) >= MIN_NORMAL:
        normal = np.asarray(labels == 0)
        return float(np.percentile(scores[normal], NORMAL_PERCENTILE)), normal, "labels"
    # When faults are common in the file, its 95th percentile is itself a fault score; a robust
    # spread above the median (normal inputs are the bulk) then gives the lower, truer cut-off.
    median = float(np.median(scores))
    robust = median + ROBUST_SIGMAS * 1.4826 * float(np.median(np.abs(scores - median)))
    share = float(np.percentile(scores, NORMAL_SHARE))
    if robust < share:
        how = f"reference score <= median + {ROBUST_SIGMAS:g} robust sigmas"
        return robust, scores <= robust, how
    return share, scores <= share, f"reference score <= its {NORMAL_SHARE:g}th percentile"


def _fit_thresholds(
    inputs: np.ndarray, scores: np.ndarray, labels: np.ndarray | None
) -> tuple[list[dict[str, Any]], float, np.ndarray, str]:
    """Thresholds on signal statistics of the normal inputs, with :func:`reference_cutoff`."""
    cutoff, normal, how = reference_cutoff(scores, labels)
    if int(normal.sum()) < MIN_NORMAL:
        raise VariantError(
            VARIANT,
            f"only {int(normal.sum())} normal calibration inputs; thresholds need at least "
            f"{MIN_NORMAL}: add healthy samples to the calibration file",
        )
    limits = np.percentile(_signal_matrix(inputs[normal]), NORMAL_PERCENTILE, axis=0)
    features = [
        {"name": name, "max": float(limit)}
        for name, limit in zip(SIGNAL_FEATURES, limits, strict=True)
    ]
    return features, cutoff, normal, how


def _fit_centroids(
    inputs: np.ndarray, predicted: np.ndarray, classes: int, image: bool
) -> dict[str, Any]:
    if image:
        dark = float(np.percentile(inputs, DARK_PERCENTILE))
        block = max(1, min(inputs.shape[-2:]) // BLOCKS_ACROSS)
        extra = {"dark_fraction": {"below": dark}, "block_min": {"block": block}}
        features: list[dict[str, Any]] = [
            {"name": name, **extra.get(name, {})} for name in IMAGE_FEATURES
        ]
    else:
        features = [{"name": name} for name in SIGNAL_FEATURES]
    matrix = np.stack([statistics(features, x) for x in inputs])
    center = matrix.mean(axis=0)
    scale = np.maximum(matrix.std(axis=0), 1e-6)
    z = (matrix - center) / scale
    centroids = [
        z[predicted == k].mean(axis=0).tolist() if np.any(predicted == k) else None
        for k in range(classes)
    ]
    return {
        "features": features,
        "center": center.tolist(),
        "scale": scale.tolist(),
        "centroids": centroids,
        "combine": "neg_sq_distance",
    }


class RulesBuilder:
    """Rule baseline fitted on calibration inputs labelled by the reference (see module doc)."""

    name = "rules"
    needs_calibration = True

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        # onnx and onnxruntime are imported here, so evaluate_rules stays numpy-only.
        from model_store.variants.reference import calibration_inputs, load_reference, run_outputs

        inputs = calibration_inputs(ctx, VARIANT, MIN_NORMAL)
        labels_given = ctx.calibration.labels if ctx.calibration is not None else None
        rank = len(ctx.info.sample_shape)
        task = ctx.info.task
        if not (task is Task.ANOMALY and rank == 1) and not (
            task is Task.CLASSIFICATION and rank in (1, 3)
        ):
            raise VariantError(
                VARIANT,
                f"no rule baseline for a {task.value} model on inputs shaped "
                f"[1, {', '.join(map(str, ctx.info.sample_shape))}]: rules cover anomaly "
                "scores of signals and classifiers of signals or images",
            )
        load_reference(ctx, VARIANT)
        reference = run_outputs(ctx.reference, ctx, inputs, VARIANT)[0]
        # Outputs of one input each are stacked on axis 0: one row is the model's output shape.
        output_shape = [int(d) for d in reference[:1].shape]
        flat = reference.reshape(len(inputs), -1).astype(np.float64)
        rules: dict[str, Any] = {
            "version": VERSION,
            "input": ctx.info.input_name,
            "output": ctx.info.output_names[0],
            "output_shape": output_shape,
        }
        details: dict[str, Any] = {"samples": len(inputs)}
        if task is Task.ANOMALY:
            features, cutoff, normal, how = _fit_thresholds(inputs, flat[:, 0], labels_given)
            rules |= {"kind": "thresholds", "features": features, "combine": "max_ratio"}
            rule_alarms = _evaluate_all(rules, inputs)[:, 0] > 1.0
            reference_alarms = flat[:, 0] > cutoff
            agreement = float(np.mean(rule_alarms == reference_alarms))
            details |= {
                "agreement": agreement,
                "normal_by": how,
                "normal_samples": int(normal.sum()),
                "reference_threshold": cutoff,
                "reference_alarm_rate": float(reference_alarms.mean()),
                "rule_alarm_rate": float(rule_alarms.mean()),
                "rule_false_alarm_rate": float(rule_alarms[normal].mean()),
            }
            summary = (
                f"thresholds on {', '.join(SIGNAL_FEATURES)} at the {NORMAL_PERCENTILE:g}th "
                f"percentile of {int(normal.sum())} normal inputs (normal by {how})"
            )
            decisions = (
                f"alarm decisions agree with the reference (score > {cutoff:.4g}) on "
                f"{agreement:.1%} of {len(inputs)} calibration inputs"
            )
        else:
            predicted = flat.argmax(axis=1)
            fitted = _fit_centroids(inputs, predicted, flat.shape[1], image=rank == 3)
            rules |= {"kind": "centroids", **fitted}
            agreement = float(np.mean(_evaluate_all(rules, inputs).argmax(axis=1) == predicted))
            missing = [k for k, c in enumerate(fitted["centroids"]) if c is None]
            details |= {"agreement": agreement, "classes_without_centroid": missing}
            names = ", ".join(f["name"] for f in fitted["features"])
            summary = f"nearest centroid on {names}, classes as the reference predicts them"
            decisions = (
                f"predicted class agrees with the reference on {agreement:.1%} of "
                f"{len(inputs)} calibration inputs"
            )
        if labels_given is not None:
            labels = np.asarray(labels_given)
            if task is Task.ANOMALY:
                rule_labels = (_evaluate_all(rules, inputs)[:, 0] > 1.0).astype(int)
            else:
                rule_labels = _evaluate_all(rules, inputs).argmax(axis=1)
            truth = (labels != 0).astype(int) if task is Task.ANOMALY else labels
            details["label_accuracy"] = float(np.mean(rule_labels == truth))
        return [
            BuiltVariant(
                variant=VARIANT,
                path=None,
                format=None,
                precision="rules",
                technique="rules",
                notes=(
                    summary,
                    decisions,
                    "fitted on the building calibration inputs themselves: expect a little "
                    "less agreement on new data",
                ),
                details=details,
                rules=rules,
            )
        ]


def _evaluate_all(rules: dict[str, Any], inputs: np.ndarray) -> np.ndarray:
    return np.stack([evaluate_rules(rules, x).reshape(-1) for x in inputs])
