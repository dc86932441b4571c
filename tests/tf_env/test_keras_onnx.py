"""The sample builders' Keras-to-ONNX writer: onnxruntime must compute what Keras computes.

Small networks with every layer kind the writer knows, batch-norm statistics set far from their
start (so a wrong fold shows), checked on random inputs; and a layer it does not know stops
the export with the layer's name.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import onnxruntime as ort
import pytest
from keras import layers

from model_store.samples.keras_onnx import Interface, export, same_pads


def _scramble_batch_norm(model: Any, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights(
                [
                    gamma * rng.uniform(0.5, 1.5, gamma.shape),
                    rng.normal(0, 0.2, beta.shape),
                    rng.normal(0, 0.2, mean.shape),
                    var * rng.uniform(0.5, 2.0, var.shape),
                ]
            )


def _onnx(model: Any, interface: Interface, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        export(model, interface).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return np.concatenate([session.run(None, {interface.input_name: xi[None]})[0] for xi in x])


def _interface(shape: tuple[int, ...], outputs: int) -> Interface:
    return Interface("x", shape, "y", outputs, "test", "tests")


def test_an_inverted_residual_image_network_matches_keras() -> None:
    keras.utils.set_random_seed(1)
    image = keras.Input((15, 15, 3))  # odd size: 'same' and explicit pads differ in placement
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(image)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    y = layers.Conv2D(16, 1, use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU(6.0)(y)
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    y = layers.ReLU(6.0)(y)
    y = layers.Conv2D(8, 1, use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    x = layers.Add()([x, y])
    x = layers.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = layers.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.2)(x)
    logits = layers.Dense(4)(x)
    model = keras.Model(image, logits)
    _scramble_batch_norm(model)
    x_nchw = np.random.default_rng(2).random((6, 3, 15, 15), dtype=np.float32)
    want = model.predict(x_nchw.transpose(0, 2, 3, 1), verbose=0)
    got = _onnx(model, _interface((1, 3, 15, 15), 4), x_nchw)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_a_one_dimensional_signal_network_matches_keras() -> None:
    keras.utils.set_random_seed(3)
    signal = keras.Input((101,))
    x = layers.Reshape((101, 1))(signal)
    x = layers.Conv1D(4, 9, strides=4, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Conv1D(6, 5, strides=2, padding="same")(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling1D()(x)
    # The last layer named like the graph's output (as the samples name it) is the output.
    model = keras.Model(signal, layers.Dense(3, name="y")(x))
    _scramble_batch_norm(model, seed=4)
    windows = np.random.default_rng(5).standard_normal((5, 101)).astype(np.float32)
    want = model.predict(windows, verbose=0)
    got = _onnx(model, _interface((1, 101), 3), windows)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_a_layer_it_does_not_know_stops_the_export_with_its_name() -> None:
    image = keras.Input((8, 8, 1))
    x = layers.Conv2D(2, 3, use_bias=False)(image)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D(name="the_pool")(x)
    model = keras.Model(image, layers.Dense(2)(layers.Flatten()(x)))
    with pytest.raises(SystemExit, match=r"the_pool.*MaxPooling2D"):
        export(model, _interface((1, 1, 8, 8), 2))


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pads"),
    [(96, 3, 2, (0, 1)), (15, 3, 2, (1, 1)), (4096, 64, 4, (30, 30)), (8, 1, 1, (0, 0))],
)
def test_same_padding_puts_the_odd_pixel_after(
    size: int, kernel: int, stride: int, pads: tuple[int, int]
) -> None:
    assert same_pads(size, kernel, stride) == pads
