"""Write a trained Keras convolutional network as an ONNX graph, without a converter.

For the sample builders only (TensorFlow side): the layers they use, and nothing else. Images
stay NCHW at the graph's edge; a 1-D network over a signal ``[1, N]`` becomes a 2-D one of
height 1 (``Reshape`` to ``[1, 1, 1, N]``), which every runtime and the repo's ONNX-to-TF
converter run. Batch normalization is folded into the convolution before it, ReLU6 is
Clip(0, 6), a ZeroPadding2D becomes the next convolution's pads and TensorFlow's 'same'
padding is written out explicitly (the extra pixel after, as TensorFlow does).

Any other layer stops the export with its name: an ONNX file that silently differs from the
trained network is worse than none. The builders also compare onnxruntime's outputs with
Keras's on held-out inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Interface:
    """How the ONNX graph meets the world: names, the input's shape, the output's width."""

    input_name: str
    input_shape: tuple[int, ...]  # [1, C, H, W] for images, [1, N] for signals
    output_name: str
    outputs: int
    graph_name: str
    producer: str
    opset: int = 13
    ir_version: int = 7


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'same' padding along one axis: (before, after); the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@dataclass
class _Conv:
    """A convolution held back until its batch normalization: ONNX attributes and weights."""

    attrs: dict[str, Any]
    source: str
    weight: np.ndarray  # ONNX layout (out, in / group, kh, kw)
    bias: np.ndarray


def _parents(layer: Any) -> list[str]:
    return [str(t._keras_history[0].name) for t in layer._inbound_nodes[0].input_tensors]


def export(model: Any, interface: Interface) -> Any:
    """The ONNX model of ``model``'s inference graph; raises SystemExit on a layer it lacks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[Any] = []
    weights: list[Any] = []
    names: dict[str, str] = {}  # Keras layer -> ONNX tensor holding its output
    pads: dict[str, tuple[int, int, int, int]] = {}  # ZeroPadding2D layer -> (t, l, b, r)
    held: dict[str, _Conv] = {}
    spatial: dict[str, tuple[int, int]] = {}  # ONNX tensor -> (height, width)

    def constant(name: str, value: np.ndarray, dtype: Any = np.float32) -> str:
        weights.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype), name))
        return name

    signal = len(interface.input_shape) == 2
    first = model.layers[0].name
    if signal:
        shape = constant("signal_shape", np.array([1, 1, 1, interface.input_shape[1]]), np.int64)
        nodes.append(
            helper.make_node("Reshape", [interface.input_name, shape], ["signal"], name="signal")
        )
        names[first] = "signal"
        spatial["signal"] = (1, interface.input_shape[1])
    else:
        names[first] = interface.input_name
        spatial[interface.input_name] = (interface.input_shape[2], interface.input_shape[3])
    relu6_bounds: list[str] = []  # written on first use: an unused initializer is a warning

    def relu6() -> list[str]:
        if not relu6_bounds:
            relu6_bounds.extend(
                [constant("relu6_min", np.array(0.0)), constant("relu6_max", np.array(6.0))]
            )
        return relu6_bounds

    for layer in model.layers[1:]:
        kind = type(layer).__name__
        parents = _parents(layer)
        src = names[parents[0]]
        out = layer.name
        if kind == "Reshape" and signal:
            names[out] = src  # the Keras (N, 1) view of the signal is the graph's [1, 1, 1, N]
            continue
        if kind == "ZeroPadding2D":
            (top, bottom), (left, right) = layer.padding
            pads[out] = (top, left, bottom, right)
            names[out] = src
            continue
        if kind in ("Conv1D", "Conv2D", "DepthwiseConv2D"):
            held[out] = _conv(layer, kind, src, spatial[src], pads.get(parents[0]))
            height, width = spatial[src]
            a = held[out].attrs
            (kh, kw), (sh, sw), (pt, pl, pb, pr) = a["kernel_shape"], a["strides"], a["pads"]
            spatial[out] = ((height + pt + pb - kh) // sh + 1, (width + pl + pr - kw) // sw + 1)
            names[out] = out  # written by the batch normalization that follows
            continue
        if kind == "BatchNormalization":
            conv = held.pop(parents[0])
            gamma, beta, mean, variance = (np.asarray(v.numpy()) for v in layer.weights)
            scale = gamma / np.sqrt(variance + layer.epsilon)
            w = constant(f"{parents[0]}.weight", conv.weight * scale[:, None, None, None])
            b = constant(f"{parents[0]}.bias", (conv.bias - mean) * scale + beta)
            nodes.append(
                helper.make_node("Conv", [conv.source, w, b], [out], name=parents[0], **conv.attrs)
            )
            spatial[out] = spatial[parents[0]]
        elif kind == "ReLU":
            if layer.max_value is None:
                nodes.append(helper.make_node("Relu", [src], [out], name=out))
            elif float(layer.max_value) == 6.0 and float(layer.negative_slope) == 0.0:
                nodes.append(helper.make_node("Clip", [src, *relu6()], [out], name=out))
            else:
                raise SystemExit(f"{out}: only ReLU and ReLU6 are exported")
            spatial[out] = spatial[src]
        elif kind == "Add":
            nodes.append(helper.make_node("Add", [names[p] for p in parents], [out], name=out))
            spatial[out] = spatial[src]
        elif kind in ("GlobalAveragePooling1D", "GlobalAveragePooling2D"):
            pooled = f"{out}.nchw"
            nodes.append(helper.make_node("GlobalAveragePool", [src], [pooled], name=pooled))
            nodes.append(helper.make_node("Flatten", [pooled], [out], name=out, axis=1))
        elif kind == "Dense":
            if layer.activation.__name__ != "linear":
                raise SystemExit(f"{out}: only a linear Dense layer is exported")
            kernel, bias = (np.asarray(v.numpy()) for v in layer.weights)
            w, b = constant(f"{out}.weight", kernel), constant(f"{out}.bias", bias)
            nodes.append(helper.make_node("Gemm", [src, w, b], [out], name=out))
        elif kind == "Dropout":
            names[out] = src
            continue
        else:
            raise SystemExit(f"{out}: Keras layer {kind} is not exported")
        names[out] = out
    if held:
        raise SystemExit(f"convolutions without a batch normalization after them: {sorted(held)}")

    last = names[model.layers[-1].name]
    if last != interface.output_name:
        nodes.append(helper.make_node("Identity", [last], [interface.output_name], name="output"))
    graph = helper.make_graph(
        nodes,
        interface.graph_name,
        [
            helper.make_tensor_value_info(
                interface.input_name, TensorProto.FLOAT, list(interface.input_shape)
            )
        ],
        [
            helper.make_tensor_value_info(
                interface.output_name, TensorProto.FLOAT, [1, interface.outputs]
            )
        ],
        weights,
    )
    result = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", interface.opset)],
        producer_name=interface.producer,
        ir_version=interface.ir_version,
    )
    onnx.checker.check_model(result, full_check=True)
    return result


def _conv(
    layer: Any,
    kind: str,
    source: str,
    size: tuple[int, int],
    zero_pads: tuple[int, int, int, int] | None,
) -> _Conv:
    """One Keras convolution in ONNX terms (weights reordered, padding made explicit)."""
    kernel = np.asarray(layer.kernel.numpy())
    if kind == "Conv1D":
        kernel = kernel[None]  # (k, in, out) -> (1, k, in, out): a 2-D kernel of height 1
        strides = (1, int(layer.strides[0]))
    else:
        strides = (int(layer.strides[0]), int(layer.strides[1]))
    kh, kw = kernel.shape[:2]
    if zero_pads is not None:
        if layer.padding != "valid":
            raise SystemExit(f"{layer.name}: zero padding before a 'same' convolution")
        explicit = zero_pads
    elif layer.padding == "same":
        top, bottom = same_pads(size[0], kh, strides[0])
        left, right = same_pads(size[1], kw, strides[1])
        explicit = (top, left, bottom, right)
    elif layer.padding == "valid":
        explicit = (0, 0, 0, 0)
    else:
        raise SystemExit(f"{layer.name}: padding {layer.padding!r} is not exported")
    if tuple(layer.dilation_rate) not in ((1,), (1, 1)):
        raise SystemExit(f"{layer.name}: dilated convolutions are not exported")
    if kind == "DepthwiseConv2D":
        channels, multiplier = kernel.shape[2:]
        weight = kernel.transpose(2, 3, 0, 1).reshape(channels * multiplier, 1, kh, kw)
        group = channels
    else:
        weight = kernel.transpose(3, 2, 0, 1)
        group = 1
    bias = (
        np.asarray(layer.bias.numpy())
        if layer.use_bias
        else np.zeros(weight.shape[0], dtype=np.float32)
    )
    attrs = {
        "kernel_shape": [kh, kw],
        "strides": list(strides),
        "pads": list(explicit),
        "group": group,
    }
    return _Conv(attrs, source, weight, bias)
