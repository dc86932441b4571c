"""Regenerate the sample model ``bearing-diagnosis`` from simulated machine vibration.

    python -m model_store.samples.build_diagnosis [--out DIR] [--tflite] [--weights FILE]

A 1-D convolutional network that names the bearing condition of a machine from one raw
accelerometer window of 4096 samples at 12.8 kHz (0.32 s): healthy, outer-race, inner-race or
ball fault, from :class:`agent.sources.vibration.VibrationSimulator` at speeds of 900 to 3000
rpm and fault severities of 0.05 to 1.0 (from a barely started
spall to a worn bearing). A wide first convolution (64 taps, stride 4) learns its
own filter bank, four stride-2 convolutions of 9 taps with batch norm and ReLU follow, then a
global average (a fault may strike anywhere in the window) and four logits: about 18 M
multiply-accumulates per window. ``vibration-ae`` (512-sample windows, an autoencoder that only
says "not healthy") stays the sensor-class sample.

Machines, not windows, are split: the held-out accuracy comes from machines the network never
heard, each with its own resonance, gear mesh and noise. Every epoch draws new machines. Training
needs TensorFlow (controller side only) and takes a few minutes on two cores; seeds are fixed and
op determinism is on. The ONNX graph is written from the trained weights by
:mod:`model_store.samples.keras_onnx` and must reproduce Keras's logits.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.protocol import FaultKind
from agent.sources.vibration import VibrationSimulator
from model_store.samples.keras_build import KerasSample, command_line
from model_store.samples.keras_onnx import Interface

NAME = "bearing-diagnosis"
VERSION = "1.0.0"
SAMPLE_RATE_HZ = 12800.0
WINDOW = 4096
CLASSES = ("healthy", "outer_race", "inner_race", "ball")
FAULTS = (FaultKind.NONE, FaultKind.OUTER_RACE, FaultKind.INNER_RACE, FaultKind.BALL)
RPM_RANGE = (900.0, 3000.0)
SEVERITY_RANGE = (0.05, 1.0)
FILTERS = (16, 32, 64, 64, 128)
OPSET = 13
IR_VERSION = 7
INPUT_NAME = "window"
OUTPUT_NAME = "logits"
REGENERATE = "python -m model_store.samples.build_diagnosis --tflite"

TRAIN_SEED = 5000  # epoch e draws its machines from seed TRAIN_SEED + e
TEST_SEED = 6000
INIT_SEED = 2
MACHINES_PER_EPOCH = 480
WINDOWS_PER_MACHINE = 8
TEST_MACHINES = 200
EPOCHS = 8
BATCH = 64
LEARNING_RATE = 3e-3
ACCURACY_FLOOR = 0.95

DEFAULT_OUT = Path(__file__).resolve().parent
INTERFACE = Interface(
    input_name=INPUT_NAME,
    input_shape=(1, WINDOW),
    output_name=OUTPUT_NAME,
    outputs=len(CLASSES),
    graph_name=NAME,
    producer="greenfleet.model_store.samples.build_diagnosis",
    opset=OPSET,
    ir_version=IR_VERSION,
)


def log(message: str) -> None:
    """Progress line on stdout."""
    print(f"[{NAME}] {message}", flush=True)


def windows(seed: int, machines: int, per_machine: int) -> tuple[np.ndarray, np.ndarray]:
    """``machines`` machines (classes in turn), ``per_machine`` consecutive windows each,
    shuffled: windows (n, WINDOW) float32 and class indices (n,)."""
    rng = np.random.default_rng(seed)
    out = np.empty((machines * per_machine, WINDOW), dtype=np.float32)
    labels = np.empty(machines * per_machine, dtype=np.int64)
    for m in range(machines):
        label = m % len(CLASSES)
        sim = VibrationSimulator(
            sample_rate_hz=SAMPLE_RATE_HZ,
            window=WINDOW,
            rpm=float(rng.uniform(*RPM_RANGE)),
            fault=FAULTS[label],
            severity=float(rng.uniform(*SEVERITY_RANGE)),
            seed=int(rng.integers(2**31)),
        )
        for k in range(per_machine):
            out[m * per_machine + k] = sim.read()
            labels[m * per_machine + k] = label
    order = rng.permutation(len(out))
    return out[order], labels[order]


def keras_model() -> Any:
    """The untrained network, input ``(WINDOW,)``."""
    import keras
    from keras import layers

    signal = keras.Input((WINDOW,), name=INPUT_NAME)
    x = layers.Reshape((WINDOW, 1))(signal)
    for i, filters in enumerate(FILTERS):
        kernel, stride = (64, 4) if i == 0 else (9, 2)
        x = layers.Conv1D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling1D()(x)
    logits = layers.Dense(len(CLASSES), name=OUTPUT_NAME)(x)
    return keras.Model(signal, logits, name=NAME)


def train() -> Any:
    """Fit on new machines every epoch; deterministic for given versions and CPU."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(INIT_SEED)
    tf.config.experimental.enable_op_determinism()
    model = keras_model()
    steps = EPOCHS * (MACHINES_PER_EPOCH * WINDOWS_PER_MACHINE // BATCH)
    schedule = keras.optimizers.schedules.CosineDecay(LEARNING_RATE, decay_steps=steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    for epoch in range(EPOCHS):
        started = time.perf_counter()
        x, y = windows(TRAIN_SEED + epoch, MACHINES_PER_EPOCH, WINDOWS_PER_MACHINE)
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        log(
            f"epoch {epoch + 1}/{EPOCHS}: loss {history.history['loss'][-1]:.4f}, "
            f"accuracy {history.history['accuracy'][-1]:.4f} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    return model


def test_data() -> tuple[np.ndarray, np.ndarray]:
    """Held-out windows from machines training never heard, with their labels."""
    return windows(TEST_SEED, TEST_MACHINES, 10)


SAMPLE = KerasSample(
    name=NAME,
    version=VERSION,
    description=(
        "Bearing condition of a machine from one raw accelerometer window (4096 samples at "
        "12.8 kHz, in g, 900-3000 rpm): healthy, outer-race, inner-race or ball fault. 1-D CNN. "
        "Outputs are logits; the class is their argmax."
    ),
    classes=CLASSES,
    interface=INTERFACE,
    layout="signal",
    input_range=None,
    accuracy_floor=ACCURACY_FLOOR,
    keras_model=keras_model,
    train=train,
    test_data=test_data,
    to_keras=lambda x: x,
    architecture={
        "family": "1-D CNN: conv64/4, then 9-tap stride-2 convolutions, batch norm, ReLU, "
        "global average pooling, dense",
        "filters": list(FILTERS),
        "input": [WINDOW],
    },
    training={
        "optimizer": "adam",
        "learning_rate": LEARNING_RATE,
        "schedule": "cosine",
        "epochs": EPOCHS,
        "batch_size": BATCH,
        "loss": "softmax cross-entropy",
        "op_determinism": True,
    },
    data={
        "generator": "agent.sources.vibration.VibrationSimulator",
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "window": WINDOW,
        "rpm_range": list(RPM_RANGE),
        "severity_range": list(SEVERITY_RANGE),
        "train_seeds": [TRAIN_SEED + e for e in range(EPOCHS)],
        "test_seed": TEST_SEED,
        "init_seed": INIT_SEED,
        "machines": {
            "train_per_epoch": MACHINES_PER_EPOCH,
            "windows_per_train_machine": WINDOWS_PER_MACHINE,
            "test": TEST_MACHINES,
            "windows_per_test_machine": 10,
        },
    },
    regenerate=REGENERATE,
)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    return command_line(
        "python -m model_store.samples.build_diagnosis", __doc__ or "", DEFAULT_OUT, SAMPLE, argv
    )


if __name__ == "__main__":
    sys.exit(main())
