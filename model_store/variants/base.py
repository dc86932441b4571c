"""What every variant builder gets and returns.

A builder turns the fp32 reference of one model version into one or more variants (a smaller
precision, a pruned or distilled copy, a TFLite conversion, a rule baseline). Builders are
independent: one that fails raises :class:`VariantError` naming itself and the reason, and the
pipeline goes on with the others. Builders write only inside ``ctx.workdir``; the pipeline moves
finished files into the content-addressed store, so nothing half-written ever lands there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.protocol import ModelFormat, Task
from model_store.errors import ModelStoreError

HELDOUT_SHARE = 0.3  # the last 30% of a calibration file is kept for fidelity, never for building


class VariantError(ModelStoreError):
    """A variant could not be built; the message names the variant and says why."""

    def __init__(self, variant: str, reason: str) -> None:
        super().__init__(f"variant {variant} was not built: {reason}")
        self.variant = variant
        self.reason = reason


@dataclass(frozen=True)
class Calibration:
    """Representative inputs (and labels, when known) for one model.

    ``inputs`` has shape ``[N, *sample]`` where the model's input is ``[1, *sample]``; labels
    are ints (class index, or 1 = anomalous). Stored as ``.npz`` with arrays ``inputs`` and
    optionally ``labels``, already shuffled: the first part builds, the last part judges.
    """

    inputs: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            with np.load(path) as data:
                inputs = np.asarray(data["inputs"], dtype=np.float32)
                labels = np.asarray(data["labels"]) if "labels" in data.files else None
        except (OSError, ValueError, KeyError) as exc:
            raise ModelStoreError(
                f"cannot read calibration data {path}: {exc}; expected an .npz file with an "
                "'inputs' array [N, ...] and optionally 'labels' [N]"
            ) from exc
        if labels is not None and len(labels) != len(inputs):
            raise ModelStoreError(
                f"calibration data {path}: {len(labels)} labels for {len(inputs)} inputs"
            )
        return cls(inputs, labels)

    def save(self, path: Path) -> None:
        if self.labels is None:
            np.savez_compressed(path, inputs=self.inputs)
        else:
            np.savez_compressed(path, inputs=self.inputs, labels=self.labels)

    @property
    def split(self) -> int:
        return len(self.inputs) - max(1, int(len(self.inputs) * HELDOUT_SHARE))

    def building(self) -> Calibration:
        """The part used to build variants (quantization ranges, students, rules)."""
        labels = None if self.labels is None else self.labels[: self.split]
        return Calibration(self.inputs[: self.split], labels)

    def heldout(self) -> Calibration:
        """The part used only to measure fidelity."""
        labels = None if self.labels is None else self.labels[self.split :]
        return Calibration(self.inputs[self.split :], labels)

    def check_shape(self, sample_shape: tuple[int, ...]) -> None:
        """ModelStoreError unless each input is one model input without its batch dimension."""
        if tuple(self.inputs.shape[1:]) != tuple(sample_shape):
            raise ModelStoreError(
                f"calibration inputs have shape {list(self.inputs.shape)}; the model takes "
                f"[1, {', '.join(map(str, sample_shape))}], so expected [N, "
                f"{', '.join(map(str, sample_shape))}]"
            )


@dataclass(frozen=True)
class ModelInfo:
    """What builders need to know about the model version."""

    name: str
    version: str
    task: Task
    input_name: str
    sample_shape: tuple[int, ...]  # the input shape without the leading batch dimension of 1
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class BuildContext:
    reference: Path  # the fp32 reference ONNX (graph-optimized); every builder starts here
    info: ModelInfo
    calibration: Calibration | None  # the building part only; None when none was given
    workdir: Path  # a private scratch directory for this builder


@dataclass(frozen=True)
class BuiltVariant:
    """One finished variant, still in the builder's workdir."""

    variant: str  # short, unique within the version: "fp16", "int8-static-qdq", "student", ...
    path: Path | None  # None for the rule baseline, which is data, not a model file
    format: ModelFormat | None
    precision: str  # "fp32", "fp16", "int8", "mixed" or "rules"
    technique: str  # "reference", "fp16", "quantize-dynamic", "quantize-static", "prune", ...
    notes: tuple[str, ...] = ()  # honest remarks for people: "sparsity reached 49.8%", ...
    details: dict[str, Any] = field(default_factory=dict)  # machine-readable extras
    rules: dict[str, Any] | None = None  # the rule baseline's definition


class Builder(Protocol):
    """A variant builder; modules in model_store/variants/ each provide one."""

    name: str
    needs_calibration: bool

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        """Build the variants; raise VariantError (never anything else on purpose)."""
        ...
