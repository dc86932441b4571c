"""Regenerate the sample model ``surface-cnn`` from simulated metal-surface images.

    python -m model_store.samples.build_surface [--out DIR] [--tflite]

A small convolutional classifier for 32x32 grayscale patches from
:mod:`model_store.samples.surface` (ok, scratch, pit, stain): three 3x3 convolutions with ReLU,
each followed by max pooling (2x2, 2x2, then over the whole remaining 8x8 map), and one dense
layer to four logits. The last pooling is global because a defect may sit anywhere in the
patch; flattening the 8x8 map into the dense layer instead ties each defect to a position and
reached only about 70% accuracy on held-out images.

Training is plain numpy (im2col convolutions, softmax cross-entropy, Adam with a cosine
schedule) with fixed seeds, and needs neither TensorFlow nor PyTorch. BLAS runs on one thread
while training and evaluating, because a multi-threaded matrix product may sum in another order
and 1250 Adam steps amplify the last bit; with that, a rebuild with the same numpy on the same
kind of CPU writes a byte-identical ONNX file, whatever the number of cores.
The committed files come from one ``--tflite`` run, which writes the ONNX model, the TFLite
model (the same weights rebuilt in TensorFlow, imported only then) and the metadata JSON.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model_store.samples.recipe import command_line, file_entry
from model_store.samples.surface import CLASSES, SurfaceGenerator

NAME = "surface-cnn"
VERSION = "1.0.0"
SIZE = 32
CHANNELS = (16, 32, 32)
OPSET = 17
# Opset 17 arrived with IR version 8; pinning it keeps the file loadable by older runtimes.
IR_VERSION = 8
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
REGENERATE = "python -m model_store.samples.build_surface --tflite"

# Disjoint generator seeds: the reported accuracy comes from images the network never saw.
TRAIN_SEED = 0
TEST_SEED = 1
INIT_SEED = 2  # weight initialization and minibatch order
TRAIN_IMAGES = 8000
TEST_IMAGES = 2000
EPOCHS = 10
BATCH = 64
LEARNING_RATE = 4e-3
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# What a variant of this model must still reach on held-out images to be worth shipping.
ACCURACY_FLOOR = 0.9

DEFAULT_OUT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Cnn:
    """The trained weights, float32; convolutions in HWIO layout ``(3, 3, in, out)``."""

    convs: list[tuple[np.ndarray, np.ndarray]]
    dense: tuple[np.ndarray, np.ndarray]  # weights (features, classes), bias (classes,)

    def parameters(self) -> list[np.ndarray]:
        """Every array, in a fixed order (the optimizer's view)."""
        out = [a for pair in self.convs for a in pair]
        return [*out, *self.dense]

    def count(self) -> int:
        return sum(int(p.size) for p in self.parameters())


def log(message: str) -> None:
    """Progress line on stdout."""
    print(f"[{NAME}] {message}", flush=True)


def _columns(x: np.ndarray) -> np.ndarray:
    """im2col for a 3x3 'same' convolution: (n, h, w, c) -> (n, h, w, 9c), taps row-major."""
    _, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
    return np.concatenate(taps, axis=-1)


def _pool_size(layer: int) -> int:
    """2x2 pooling after every convolution but the last, which pools its whole map."""
    return 2 if layer < len(CHANNELS) - 1 else SIZE // 2 ** (len(CHANNELS) - 1)


def _pool(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k x k max pooling with stride k (NHWC); also the mask of maxima for the backward pass."""
    n, h, w, c = x.shape
    blocks = x.reshape(n, h // k, k, w // k, k, c)
    out = blocks.max(axis=(2, 4))
    return out, blocks == out[:, :, None, :, None, :]


@dataclass
class _Trace:
    """What the backward pass needs from one convolution block."""

    columns: np.ndarray
    active: np.ndarray
    maxima: np.ndarray


def _forward(cnn: Cnn, images: np.ndarray) -> tuple[np.ndarray, list[_Trace], np.ndarray]:
    """Logits for NCHW images, plus the traces and pooled features for backpropagation."""
    h = np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=np.float32)
    traces = []
    for layer, (w, b) in enumerate(cnn.convs):
        columns = _columns(h)
        n, height, width, taps = columns.shape
        z = (columns.reshape(-1, taps) @ w.reshape(taps, -1) + b).reshape(n, height, width, -1)
        active = z > 0
        h, maxima = _pool(z * active, _pool_size(layer))
        traces.append(_Trace(columns, active, maxima))
    features = h.reshape(len(h), -1)
    logits = features @ cnn.dense[0] + cnn.dense[1]
    return logits, traces, features


def logits(cnn: Cnn, images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """The graph's output for images ``(n, 1, SIZE, SIZE)``, computed in numpy: (n, classes)."""
    parts = [_forward(cnn, images[i : i + chunk])[0] for i in range(0, len(images), chunk)]
    return np.concatenate(parts).astype(np.float32)


def _gradients(cnn: Cnn, images: np.ndarray, labels: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """Mean softmax cross-entropy of a minibatch and its gradient for every parameter."""
    out, traces, features = _forward(cnn, images)
    shifted = out - out.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(-np.log(probs[rows, labels] + 1e-12).mean())
    d = probs
    d[rows, labels] -= 1
    d /= len(labels)
    grads = [features.T @ d, d.sum(axis=0)]
    dh = d @ cnn.dense[0].T
    for layer in reversed(range(len(cnn.convs))):
        trace, (w, _) = traces[layer], cnn.convs[layer]
        k = _pool_size(layer)
        n, ph, _, pw, _, c = trace.maxima.shape  # pooled height and width, k x k blocks
        dz = (trace.maxima * dh.reshape(n, ph, 1, pw, 1, c)).reshape(n, ph * k, pw * k, c)
        dz *= trace.active
        taps = trace.columns.shape[-1]
        dz2 = dz.reshape(-1, c)
        grads = [
            (trace.columns.reshape(-1, taps).T @ dz2).reshape(w.shape),
            dz2.sum(axis=0),
            *grads,
        ]
        if layer == 0:
            break
        dcols = (dz2 @ w.reshape(taps, c).T).reshape(n, ph * k, pw * k, 9, -1)
        height, width = ph * k, pw * k
        dpad = np.zeros((n, height + 2, width + 2, dcols.shape[-1]), dtype=np.float32)
        for tap in range(9):
            i, j = divmod(tap, 3)
            dpad[:, i : i + height, j : j + width, :] += dcols[:, :, :, tap, :]
        dh = dpad[:, 1:-1, 1:-1, :]
    return loss, grads


def train(images: np.ndarray, labels: np.ndarray) -> Cnn:
    """Fit the network with Adam on a cosine schedule; deterministic for given data."""
    rng = np.random.default_rng(INIT_SEED)
    convs = []
    fan_in = 1
    for width in CHANNELS:
        scale = np.sqrt(2.0 / (9 * fan_in))
        w = (rng.standard_normal((3, 3, fan_in, width)) * scale).astype(np.float32)
        convs.append((w, np.zeros(width, dtype=np.float32)))
        fan_in = width
    dense_w = (rng.standard_normal((fan_in, len(CLASSES))) * np.sqrt(1.0 / fan_in)).astype(
        np.float32
    )
    cnn = Cnn(convs, (dense_w, np.zeros(len(CLASSES), dtype=np.float32)))
    params = cnn.parameters()
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    b1, b2 = ADAM_BETAS
    steps_per_epoch = len(images) // BATCH
    total = EPOCHS * steps_per_epoch
    step = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(len(images))
        losses = []
        for s in range(steps_per_epoch):
            batch = order[s * BATCH : (s + 1) * BATCH]
            loss, grads = _gradients(cnn, images[batch], labels[batch])
            losses.append(loss)
            step += 1
            rate = LEARNING_RATE * 0.5 * (1 + np.cos(np.pi * step / total))
            for p, g, m, v in zip(params, grads, first, second, strict=True):
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                m_hat = m / np.float32(1 - b1**step)
                v_hat = v / np.float32(1 - b2**step)
                p -= np.float32(rate) * m_hat / (np.sqrt(v_hat) + np.float32(ADAM_EPS))
        log(f"epoch {epoch + 1}/{EPOCHS}: loss {np.mean(losses):.4f}")
    return cnn


def _onnx_conv_weight(w: np.ndarray) -> np.ndarray:
    """HWIO (numpy, TensorFlow) -> OIHW (ONNX)."""
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def onnx_model(cnn: Cnn) -> Any:
    """The network as an ONNX graph: NCHW image in, class logits out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node
    inits = []
    nodes = []
    h = INPUT_NAME
    for layer, (w, b) in enumerate(cnn.convs):
        k = _pool_size(layer)
        inits += [
            numpy_helper.from_array(_onnx_conv_weight(w), f"conv{layer}.weight"),
            numpy_helper.from_array(b, f"conv{layer}.bias"),
        ]
        nodes += [
            node(
                "Conv",
                [h, f"conv{layer}.weight", f"conv{layer}.bias"],
                [f"conv{layer}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[1, 1],
            ),
            node("Relu", [f"conv{layer}"], [f"relu{layer}"]),
            node(
                "MaxPool", [f"relu{layer}"], [f"pool{layer}"], kernel_shape=[k, k], strides=[k, k]
            ),
        ]
        h = f"pool{layer}"
    inits += [
        numpy_helper.from_array(cnn.dense[0], "dense.weight"),
        numpy_helper.from_array(cnn.dense[1], "dense.bias"),
    ]
    nodes += [
        node("Flatten", [h], ["features"], axis=1),
        node("Gemm", ["features", "dense.weight", "dense.bias"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 1, SIZE, SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, len(CLASSES)])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="greenfleet.model_store.samples.build_surface",
        producer_version=VERSION,
        doc_string=(
            f"Surface defect class logits ({', '.join(CLASSES)}) for one grayscale "
            f"{SIZE}x{SIZE} patch, NCHW, values in [0, 1]."
        ),
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_logits(model: Any, images: np.ndarray) -> np.ndarray:
    """Run the ONNX model image by image with onnxruntime (build-time check)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x[None]})[0] for x in images])


def tflite_model(cnn: Cnn) -> bytes:
    """The same network built with TensorFlow and converted to fp32 TFLite.

    TensorFlow convolves NHWC, so the graph transposes its NCHW input first: the TFLite model
    takes exactly what the ONNX model takes.
    """
    import tensorflow as tf

    convs = [(tf.constant(w), tf.constant(b)) for w, b in cnn.convs]
    dense_w, dense_b = tf.constant(cnn.dense[0]), tf.constant(cnn.dense[1])

    def compute(image: Any) -> Any:
        h = tf.transpose(image, [0, 2, 3, 1])
        for layer, (w, b) in enumerate(convs):
            h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, w, strides=1, padding="SAME"), b))
            k = _pool_size(layer)
            h = tf.nn.max_pool2d(h, ksize=k, strides=k, padding="VALID")
        features = tf.reshape(h, [1, -1])
        return {OUTPUT_NAME: tf.matmul(features, dense_w) + dense_b}

    classify = tf.function(
        compute,
        input_signature=[tf.TensorSpec([1, 1, SIZE, SIZE], tf.float32, name=INPUT_NAME)],
    )
    module = tf.Module()
    module.classify = classify
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [classify.get_concrete_function()], module
    )
    return bytes(converter.convert())


def tflite_logits(model: bytes, images: np.ndarray) -> np.ndarray:
    """Run a TFLite model image by image with TensorFlow's interpreter (build-time check)."""
    import tensorflow as tf

    with warnings.catch_warnings():
        # tf.lite.Interpreter warns that it is moving to ai-edge-litert; fine for a build check.
        warnings.simplefilter("ignore", UserWarning)
        interp = tf.lite.Interpreter(model_content=model)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    result = np.empty((len(images), len(CLASSES)), dtype=np.float32)
    for i, x in enumerate(images):
        interp.set_tensor(inp, x[None])
        interp.invoke()
        result[i] = interp.get_tensor(out)[0]
    return result


def _max_relative_difference(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference, relative to the largest logit magnitude of the same image."""
    scale = np.maximum(np.abs(want).max(axis=1, keepdims=True), 1e-6)
    return float((np.abs(got - want) / scale).max())


def build(out: Path, with_tflite: bool) -> dict[str, Any]:
    """Generate data, train, evaluate, and write the model files and metadata into ``out``."""
    from threadpoolctl import threadpool_limits

    out.mkdir(parents=True, exist_ok=True)
    log(f"generating {TRAIN_IMAGES} training and {TEST_IMAGES} held-out images")
    train_images, train_labels = SurfaceGenerator(seed=TRAIN_SEED, size=SIZE).batch(TRAIN_IMAGES)
    test_images, test_labels = SurfaceGenerator(seed=TEST_SEED, size=SIZE).batch(TEST_IMAGES)

    started = time.perf_counter()
    with threadpool_limits(limits=1, user_api="blas"):
        cnn = train(train_images, train_labels)
        log(f"trained {cnn.count()} parameters in {time.perf_counter() - started:.1f} s")
        predicted = logits(cnn, test_images).argmax(axis=1)
        probe = test_images[:64]
        reference = logits(cnn, probe)
    accuracy = float((predicted == test_labels).mean())
    by_class = {
        name: round(float((predicted[test_labels == c] == c).mean()), 4)
        for c, name in enumerate(CLASSES)
    }
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)
    np.add.at(confusion, (test_labels, predicted), 1)

    model = onnx_model(cnn)
    diff = _max_relative_difference(onnx_logits(model, probe), reference)
    log(f"onnxruntime vs numpy: max relative difference {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit(f"ONNX model disagrees with the reference computation ({diff:.2e})")
    onnx_path = out / f"{NAME}.onnx"
    onnx_path.write_bytes(model.SerializeToString())
    files = {"onnx": file_entry(onnx_path)}
    log(f"wrote {onnx_path} ({files['onnx']['bytes']} bytes)")

    if with_tflite:
        tflite_path = out / f"{NAME}.tflite"
        flat = tflite_model(cnn)
        diff = _max_relative_difference(tflite_logits(flat, probe), reference)
        log(f"TFLite vs numpy: max relative difference {diff:.2e}")
        if diff > 1e-4:
            raise SystemExit(f"TFLite model disagrees with the reference computation ({diff:.2e})")
        tflite_path.write_bytes(flat)
        files["tflite"] = file_entry(tflite_path)
        log(f"wrote {tflite_path} ({len(flat)} bytes)")
    elif (out / f"{NAME}.tflite").exists():
        log(f"note: {NAME}.tflite was not rebuilt and may not match; rerun with --tflite")

    layers: list[str] = []
    for layer, width in enumerate(CHANNELS):
        k = _pool_size(layer)
        layers += [f"conv3x3x{width}", "relu", f"maxpool{k}x{k}"]
    layers += ["flatten", f"dense{len(CLASSES)}"]
    metadata: dict[str, Any] = {
        "name": NAME,
        "version": VERSION,
        "task": "classification",
        "description": (
            "Surface defect class of one grayscale 32x32 patch of machined metal (brushed "
            "texture, uneven lighting): ok, scratch, pit or stain. Outputs are logits; the "
            "class is their argmax."
        ),
        "classes": list(CLASSES),
        "inputs": [
            {
                "name": INPUT_NAME,
                "dtype": "float32",
                "shape": [1, 1, SIZE, SIZE],
                "layout": "NCHW",
                "range": [0.0, 1.0],
            }
        ],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [1, len(CLASSES)]}],
        "accuracy": round(accuracy, 4),
        "accuracy_by_class": by_class,
        "confusion_matrix": {
            "rows": "true class",
            "columns": "predicted class",
            "counts": confusion.tolist(),
        },
        "accuracy_floor": ACCURACY_FLOOR,
        "accuracy_floor_rule": "least accuracy on held-out images a variant must keep",
        "architecture": {"layers": layers, "parameters": cnn.count()},
        "training": {
            "framework": "numpy",
            "optimizer": "adam",
            "learning_rate": LEARNING_RATE,
            "schedule": "cosine",
            "epochs": EPOCHS,
            "batch_size": BATCH,
            "loss": "softmax cross-entropy",
        },
        "data": {
            "generator": "model_store.samples.surface.SurfaceGenerator",
            "image_size": SIZE,
            "train_seed": TRAIN_SEED,
            "test_seed": TEST_SEED,
            "init_seed": INIT_SEED,
            "images": {"train": TRAIN_IMAGES, "test": TEST_IMAGES},
        },
        "onnx": {"opset": OPSET, "ir_version": IR_VERSION},
        "files": files,
        "built_with": {"python": platform.python_version(), "numpy": np.__version__},
        "regenerate": REGENERATE,
        "regenerate_needs": "tensorflow-cpu (for --tflite), onnx, onnxruntime, threadpoolctl",
    }
    if with_tflite:
        import tensorflow as tf

        metadata["built_with"]["tensorflow"] = tf.__version__
    json_path = out / f"{NAME}.json"
    json_path.write_text(json.dumps(metadata, indent=2) + "\n")
    log(f"wrote {json_path}")
    log(f"held-out accuracy {accuracy:.4f}; by class {by_class}")
    return metadata


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    return command_line(
        "python -m model_store.samples.build_surface", __doc__ or "", DEFAULT_OUT, build, argv
    )


if __name__ == "__main__":
    sys.exit(main())
