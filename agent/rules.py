"""The rule baseline: the agent's last fallback tier, a few numbers instead of a model file.

When every model variant fails on a device, the agent still answers with rules that
model_store.variants.rules fitted on the calibration inputs, labelled by the reference model.
:func:`evaluate_rules` is pure numpy (no onnx, no onnxruntime) so the agent can run it
anywhere; it returns an array shaped like the model's output. Two kinds, both
JSON-serialisable dicts with ``version`` 1:

Thresholds (anomaly models on a signal ``[1, N]``)::

    {"kind": "thresholds", "version": 1, "input": "window", "output": "score",
     "output_shape": [1, 1],
     "features": [{"name": "rms", "max": 0.12}, {"name": "peak", "max": 0.30},
                  {"name": "crest", "max": 3.5}, {"name": "kurtosis", "max": 3.4}],
     "combine": "max_ratio"}

    score = max over features of value / max; above 1 means anomalous. The statistics are taken
    on the window with its mean removed: rms, peak = max |x|, crest = peak / rms and kurtosis =
    mean(x^4) / rms^4 (3 for Gaussian noise; bearing impacts raise peak, crest and kurtosis).
    Each ``max`` is the NORMAL_PERCENTILE of that statistic over the normal calibration inputs:
    those labelled 0 when the calibration file has labels, else those the reference scores at or
    below its NORMAL_SHARE percentile, or below median + ROBUST_SIGMAS robust sigmas (1.4826 x
    median absolute deviation) if that is lower, as it is when faults are common in the file.

Centroids (classifiers, on images ``[1, C, H, W]`` or signals)::

    {"kind": "centroids", "version": 1, "input": "image", "output": "logits",
     "output_shape": [1, 4],
     "features": [{"name": "mean"}, {"name": "std"}, {"name": "min"}, {"name": "max"},
                  {"name": "dark_fraction", "below": 0.29}, {"name": "laplacian_min"},
                  {"name": "laplacian_max"}, {"name": "laplacian_mean_square"},
                  {"name": "block_min", "block": 4}, {"name": "block_max"}],
     "center": [...], "scale": [...], "centroids": [[...], null, ...],
     "combine": "neg_sq_distance"}

    logits[k] = -|z - centroids[k]|^2 with z = (features - center) / scale, so the argmax is the
    nearest centroid; a class the reference never predicted on the calibration inputs has
    ``null`` and gets ABSENT_LOGIT. Image statistics are taken on the channel mean:
    ``dark_fraction`` is the share of pixels below ``below`` (the DARK_PERCENTILE of all
    calibration pixels); the 4-neighbour Laplacian's min, max and mean square respond to small
    spots and thin lines; ``block_min``/``block_max`` are the extreme means of ``block`` x
    ``block`` tiles minus the image mean (larger blotches). Signal classifiers use the signal
    statistics. Centroids are the mean features of the inputs the reference assigns to each
    class. Without the Laplacian and tile features the nearest centroid agreed with
    surface-cnn on under half of the images; with them, on about 60%: a last resort, not a
    classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol import Manifest
from agent.runtime.base import InferenceError, ModelLoadError, TensorSpec

VERSION = 1
ABSENT_LOGIT = -1e9  # finite, so it survives JSON; softmax makes it 0
SIGNAL_FEATURES = ("rms", "peak", "crest", "kurtosis")
IMAGE_FEATURES = (
    "mean",
    "std",
    "min",
    "max",
    "dark_fraction",
    "laplacian_min",
    "laplacian_max",
    "laplacian_mean_square",
    "block_min",
    "block_max",
)
BLOCKS_ACROSS = 8  # block_min/max average blocks of 1/8 of the image side


def signal_statistics(sample: np.ndarray) -> dict[str, float]:
    """rms, peak, crest and kurtosis of one window, with its mean removed."""
    x = np.asarray(sample, dtype=np.float64).ravel()
    x = x - x.mean()
    rms = float(np.sqrt(np.mean(x * x)))
    peak = float(np.max(np.abs(x), initial=0.0))
    tiny = 1e-12
    return {
        "rms": rms,
        "peak": peak,
        "crest": peak / max(rms, tiny),
        "kurtosis": float(np.mean(x**4)) / max(rms, tiny) ** 4,
    }


def image_statistics(sample: np.ndarray, dark_below: float, block: int) -> dict[str, float]:
    """Pixel statistics of one image ``[C, H, W]`` (channels averaged); see the module doc."""
    x = np.asarray(sample, dtype=np.float64)
    image = x.reshape(-1, x.shape[-2], x.shape[-1]).mean(axis=0)
    values = image.ravel()
    mean = float(values.mean())
    laplacian = (
        4 * image[1:-1, 1:-1]
        - image[:-2, 1:-1]
        - image[2:, 1:-1]
        - image[1:-1, :-2]
        - image[1:-1, 2:]
    ).ravel()
    if laplacian.size == 0:
        laplacian = np.zeros(1)
    h, w = (max(1, d // block) * block for d in image.shape)
    blocks = image[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))
    return {
        "mean": mean,
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "dark_fraction": float(np.mean(values < dark_below)),
        "laplacian_min": float(laplacian.min()),
        "laplacian_max": float(laplacian.max()),
        "laplacian_mean_square": float(np.mean(laplacian**2)),
        "block_min": float(blocks.min()) - mean,
        "block_max": float(blocks.max()) - mean,
    }


def statistics(features: list[dict[str, Any]], sample: np.ndarray) -> np.ndarray:
    names = [f["name"] for f in features]
    params = {key: f[key] for f in features for key in ("below", "block") if key in f}
    if set(names) <= set(SIGNAL_FEATURES):
        values = signal_statistics(sample)
    elif set(names) <= set(IMAGE_FEATURES):
        values = image_statistics(
            sample, float(params.get("below", 0.0)), int(params.get("block", 1))
        )
    else:
        raise ValueError(f"rules use unknown features {names}")
    return np.array([values[name] for name in names], dtype=np.float64)


def evaluate_rules(rules: dict[str, Any], sample: np.ndarray) -> np.ndarray:
    """Apply a rule baseline to one input (with or without its batch dimension).

    Returns float32 shaped ``rules["output_shape"]``: ``[[score]]`` for thresholds (above 1
    is anomalous), one logit per class for centroids. ValueError for rules it cannot read.
    """
    if rules.get("version") != VERSION:
        raise ValueError(f"rules version {rules.get('version')!r} is not {VERSION}")
    shape = tuple(rules["output_shape"])
    features = list(rules["features"])
    values = statistics(features, sample)
    if rules.get("kind") == "thresholds":
        limits = np.array([f["max"] for f in features], dtype=np.float64)
        score = float(np.max(values / np.maximum(limits, 1e-12)))
        return np.full(shape, score, dtype=np.float32)
    if rules.get("kind") == "centroids":
        z = (values - np.asarray(rules["center"])) / np.asarray(rules["scale"])
        logits = [
            ABSENT_LOGIT if c is None else -float(np.sum((z - np.asarray(c)) ** 2))
            for c in rules["centroids"]
        ]
        return np.asarray(logits, dtype=np.float32).reshape(shape)
    raise ValueError(f"unknown rules kind {rules.get('kind')!r}; expected thresholds or centroids")


class RulesModel:
    """The rule baseline behind the same interface as a loaded model file, so the inference loop
    treats the last tier like any other. ``format`` and ``path`` name the model the rules came
    with (its manifest), for messages."""

    def __init__(self, manifest: Manifest, path: Path) -> None:
        if manifest.rules is None:
            raise ModelLoadError(f"the manifest of {manifest.model} has no rule baseline")
        if not manifest.inputs or not manifest.outputs:
            raise ModelLoadError(f"the manifest of {manifest.model} names no inputs or outputs")
        self.rules = manifest.rules
        self.format = manifest.artifact.format
        self.path = path
        self.inputs = tuple(TensorSpec(s.name, tuple(s.shape), s.dtype) for s in manifest.inputs)
        self.outputs = tuple(TensorSpec(s.name, tuple(s.shape), s.dtype) for s in manifest.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.inputs[0]
        try:
            sample = np.asarray(feeds[spec.name], dtype=np.float64)
            # the statistics accept any shape: check it here, as a model file's runtime would
            if len(sample.shape) != len(spec.shape) or any(
                d is not None and d > 0 and d != n
                for d, n in zip(spec.shape, sample.shape, strict=True)
            ):
                raise ValueError(f"input {spec.name!r} has shape {sample.shape}, not {spec.shape}")
            return {self.outputs[0].name: evaluate_rules(self.rules, sample)}
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise InferenceError(f"rule baseline from {self.path.name}: {exc}") from exc

    def close(self) -> None:
        """Nothing to release: the rules are a few numbers."""
