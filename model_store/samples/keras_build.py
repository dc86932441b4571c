"""What the two Keras-trained sample builders share: train or reload, check, export, describe.

A builder names its model in a :class:`KerasSample`; :func:`build` trains it (or loads weights
kept by an earlier run with ``--weights``), measures held-out accuracy per class, writes the
ONNX file (:mod:`model_store.samples.keras_onnx`) and, with ``--tflite``, the TFLite file, each
checked against Keras's own logits on held-out inputs, and writes the metadata JSON that
``models add`` reads (task, classes, interface, accuracy floor, provenance).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_store.samples.keras_onnx import Interface, export
from model_store.samples.recipe import file_entry

AGREEMENT_TOLERANCE = 1e-3  # largest logit difference, relative to the image's largest logit


@dataclass(frozen=True)
class KerasSample:
    """One sample model: how to make, train and test it, and what its JSON says about it."""

    name: str
    version: str
    description: str
    classes: tuple[str, ...]
    interface: Interface
    layout: str  # of the ONNX input: "NCHW" or "signal"
    input_range: list[float] | None
    accuracy_floor: float
    keras_model: Callable[[], Any]
    train: Callable[[], Any]
    test_data: Callable[[], tuple[np.ndarray, np.ndarray]]  # ONNX-layout inputs, labels
    to_keras: Callable[[np.ndarray], np.ndarray]  # ONNX layout -> what the Keras model takes
    architecture: dict[str, Any]
    training: dict[str, Any]
    data: dict[str, Any]
    regenerate: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Run on the trained (or reloaded) network before it is evaluated, saved and exported.
    finish: Callable[[Any], None] | None = None


def log(sample: KerasSample, message: str) -> None:
    """Progress line on stdout."""
    print(f"[{sample.name}] {message}", flush=True)


def command_line(
    prog: str, doc: str, default_out: Path, sample: KerasSample, argv: list[str] | None
) -> int:
    """``python -m PROG [--out DIR] [--tflite] [--weights FILE]``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out, help="output directory")
    parser.add_argument("--tflite", action="store_true", help="also write the TFLite model")
    parser.add_argument(
        "--weights",
        type=Path,
        help="Keras weights (*.weights.h5): loaded if the file exists, else written after training",
    )
    args = parser.parse_args(argv)
    build(sample, args.out, args.tflite, args.weights)
    return 0


def _relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    scale = np.maximum(np.abs(want).max(axis=1, keepdims=True), 1e-6)
    return float((np.abs(got - want) / scale).max())


def onnx_logits(model: Any, inputs: np.ndarray, input_name: str) -> np.ndarray:
    """Run the ONNX model input by input with onnxruntime (as a device would: batch 1)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: x[None]})[0] for x in inputs])


def tflite_model(sample: KerasSample, model: Any) -> bytes:
    """Keras's network behind the ONNX file's input layout, converted to fp32 TFLite."""
    import tensorflow as tf

    shape = list(sample.interface.input_shape)

    def compute(x: Any) -> Any:
        if sample.layout == "NCHW":
            x = tf.transpose(x, [0, 2, 3, 1])
        return {sample.interface.output_name: model(x, training=False)}

    function = tf.function(
        compute,
        input_signature=[tf.TensorSpec(shape, tf.float32, name=sample.interface.input_name)],
    )
    module = tf.Module()
    module.compute = function
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], module
    )
    return bytes(converter.convert())


def tflite_logits(flat: bytes, inputs: np.ndarray) -> np.ndarray:
    """Run a TFLite model input by input with TensorFlow's interpreter (build-time check)."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interp = tf.lite.Interpreter(model_content=flat)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    rows = []
    for x in inputs:
        interp.set_tensor(inp, x[None])
        interp.invoke()
        rows.append(interp.get_tensor(out)[0].copy())
    return np.stack(rows)


def build(
    sample: KerasSample, out: Path, with_tflite: bool, weights: Path | None = None
) -> dict[str, Any]:
    """Train (or reload), evaluate, export and describe ``sample`` in ``out``."""
    import keras
    import onnxruntime
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if weights is not None and weights.exists():
        model = sample.keras_model()
        model.load_weights(weights)
        log(sample, f"loaded trained weights from {weights}")
        train_s = None
    else:
        model = sample.train()
        train_s = round(time.perf_counter() - started)
        log(sample, f"trained in {train_s} s")
    if sample.finish is not None:
        sample.finish(model)
    if weights is not None and train_s is not None:
        model.save_weights(weights)
        log(sample, f"kept the trained weights in {weights}")

    x, y = sample.test_data()
    want = np.asarray(
        model.predict(sample.to_keras(x), batch_size=100, verbose=0), dtype=np.float32
    )
    predicted = want.argmax(axis=1)
    accuracy = float((predicted == y).mean())
    by_class = {
        name: round(float((predicted[y == c] == c).mean()), 4)
        for c, name in enumerate(sample.classes)
    }
    confusion = np.zeros((len(sample.classes),) * 2, dtype=int)
    np.add.at(confusion, (y, predicted), 1)
    log(sample, f"held-out accuracy {accuracy:.4f}; by class {by_class}")
    if accuracy < sample.accuracy_floor:
        raise SystemExit(
            f"{sample.name}: held-out accuracy {accuracy:.4f} is below its floor "
            f"{sample.accuracy_floor}; not writing a model that fails its own task"
        )

    probe = slice(0, 200)
    onnx_file = export(model, sample.interface)
    diff = _relative_difference(
        onnx_logits(onnx_file, x[probe], sample.interface.input_name), want[probe]
    )
    log(sample, f"onnxruntime vs Keras on 200 held-out inputs: max relative difference {diff:.1e}")
    if diff > AGREEMENT_TOLERANCE:
        raise SystemExit(f"{sample.name}: the ONNX file disagrees with Keras ({diff:.1e})")
    onnx_path = out / f"{sample.name}.onnx"
    onnx_path.write_bytes(onnx_file.SerializeToString())
    files = {"onnx": file_entry(onnx_path)}
    log(sample, f"wrote {onnx_path} ({files['onnx']['bytes']} bytes)")
    if with_tflite:
        flat = tflite_model(sample, model)
        diff = _relative_difference(tflite_logits(flat, x[probe]), want[probe])
        log(sample, f"TFLite vs Keras: max relative difference {diff:.1e}")
        if diff > AGREEMENT_TOLERANCE:
            raise SystemExit(f"{sample.name}: the TFLite file disagrees with Keras ({diff:.1e})")
        tflite_path = out / f"{sample.name}.tflite"
        tflite_path.write_bytes(flat)
        files["tflite"] = file_entry(tflite_path)
        log(sample, f"wrote {tflite_path} ({len(flat)} bytes)")

    metadata: dict[str, Any] = {
        "name": sample.name,
        "version": sample.version,
        "task": "classification",
        "description": sample.description,
        "classes": list(sample.classes),
        "inputs": [
            {
                "name": sample.interface.input_name,
                "dtype": "float32",
                "shape": list(sample.interface.input_shape),
                "layout": sample.layout,
                **({"range": sample.input_range} if sample.input_range else {}),
            }
        ],
        "outputs": [
            {
                "name": sample.interface.output_name,
                "dtype": "float32",
                "shape": [1, len(sample.classes)],
            }
        ],
        "accuracy": round(accuracy, 4),
        "accuracy_by_class": by_class,
        "confusion_matrix": {
            "rows": "true class",
            "columns": "predicted class",
            "counts": confusion.tolist(),
        },
        "accuracy_floor": sample.accuracy_floor,
        "accuracy_floor_rule": "least accuracy on held-out inputs a variant must keep",
        "architecture": {**sample.architecture, "parameters": int(model.count_params())},
        "training": {**sample.training, "framework": f"keras {keras.__version__}"}
        | ({"seconds": train_s} if train_s is not None else {}),
        "data": sample.data,
        "onnx": {"opset": sample.interface.opset, "ir_version": sample.interface.ir_version},
        "files": files,
        "built_with": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "tensorflow": tf.__version__,
            "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(),
        },
        "regenerate": sample.regenerate,
        "regenerate_needs": "tensorflow-cpu, onnx, onnxruntime (tflite-build extra, or .venv-tf)",
        **sample.extra,
    }
    json_path = out / f"{sample.name}.json"
    json_path.write_text(json.dumps(metadata, indent=2) + "\n")
    log(sample, f"wrote {json_path}")
    return metadata
