"""Width students trained with TensorFlow: they learn the teacher, and a rebuild is identical."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import onnx
from keras import layers

from agent.protocol import Task
from model_store.samples.keras_onnx import Interface, export
from model_store.variants.base import BuildContext, Calibration, ModelInfo
from model_store.variants.reference import run_outputs
from model_store.variants.width import WidthStudentBuilder, plan_channels, train

WINDOW = 256


def _signals(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy tones from four frequency bands, and the band: what the teacher learns to tell."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / WINDOW
    labels = rng.integers(4, size=n)
    freqs = np.array([5, 13, 29, 61])[labels] * rng.uniform(0.9, 1.1, size=n)
    phases = rng.uniform(0, 2 * np.pi, size=n)
    inputs = np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])
    inputs += 0.5 * rng.standard_normal((n, WINDOW))
    return inputs.astype(np.float32), labels


def _teacher(tmp_path: Path) -> Path:
    keras.utils.set_random_seed(7)
    signal = keras.Input((WINDOW,))
    x = layers.Reshape((WINDOW, 1))(signal)
    for filters, kernel, stride in ((32, 16, 4), (64, 5, 2), (64, 5, 2)):
        x = layers.Conv1D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling1D()(x)
    model = keras.Model(signal, layers.Dense(4, name="logits")(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*_signals(512, 1), epochs=8, batch_size=32, verbose=0)
    path = tmp_path / "teacher.onnx"
    onnx.save(export(model, Interface("window", (1, WINDOW), "logits", 4, "t", "tests")), path)
    return path


def _context(tmp_path: Path, reference: Path) -> BuildContext:
    inputs, _ = _signals(240, 3)
    info = ModelInfo("t", "1", Task.CLASSIFICATION, "window", (WINDOW,), ("logits",))
    return BuildContext(reference, info, Calibration(inputs), tmp_path)


def test_a_student_learns_its_teacher_and_is_smaller(tmp_path: Path) -> None:
    ctx = _context(tmp_path, _teacher(tmp_path))
    built = WidthStudentBuilder().build(ctx)
    assert [b.variant for b in built] == [
        "student-w50",
        "student-w50-int8",
        "student-w35",
        "student-w35-int8",
    ]
    inputs = ctx.calibration.inputs if ctx.calibration is not None else None
    assert inputs is not None
    teacher = run_outputs(ctx.reference, ctx, inputs, "t")[0]
    for variant in built:
        assert variant.path is not None
        assert variant.path.stat().st_size < 0.5 * ctx.reference.stat().st_size
        if variant.precision == "fp32":
            losses = variant.details["loss_by_epoch"]
            assert losses[-1] < 0.5 * losses[0], losses
        else:
            assert variant.technique == "distill-width+quantize-static"
            assert variant.path.stat().st_size < 0.6 * built[0].path.stat().st_size  # type: ignore[union-attr]
        student = run_outputs(variant.path, ctx, inputs, "t")[0]
        agreement = float(np.mean(student.argmax(axis=1) == teacher.argmax(axis=1)))
        assert agreement >= 0.8, f"{variant.variant}: {agreement:.2f}"


def test_the_same_inputs_give_a_byte_identical_student(tmp_path: Path) -> None:
    ctx = _context(tmp_path, _teacher(tmp_path))
    reference = onnx.load(ctx.reference)
    inputs = ctx.calibration.inputs if ctx.calibration is not None else None
    assert inputs is not None
    first, _ = train(ctx, reference, plan_channels(reference, 0.5), inputs, epochs=2)
    second, _ = train(ctx, reference, plan_channels(reference, 0.5), inputs, epochs=2)
    assert first.SerializeToString() == second.SerializeToString()
