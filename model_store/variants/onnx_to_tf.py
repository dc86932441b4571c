"""Rebuild an ONNX graph as a TensorFlow function, so the TFLite converter can take it.

A small interpreter, not a general converter: it walks the graph once while TensorFlow traces
it and maps each node to TensorFlow ops, for the operators model-store samples and students use
(dense layers, spectral front ends, small CNNs). Any other operator is refused up front with a
VariantError naming it, before TensorFlow traces anything.

Every tensor keeps its ONNX meaning (NCHW images, the same shapes) at the graph's edges, so the
TFLite model is fed exactly like the ONNX one. Inside, TensorFlow wants NHWC for convolution and
pooling: those ops read and write NHWC, and a tensor is transposed back to NCHW only when an op
that cares about the layout needs it, so a Conv-Relu-MaxPool chain costs one transpose in and
one out, not one per op. Shapes must be static (TFLite works on fixed shapes anyway).

Each node is traced inside a TensorFlow name scope ``n<index>_<name>``, so the tensors of the
TFLite file say which ONNX node they came from (:func:`node_indices`); the TFLite builder uses
that to keep chosen nodes in float32 when it quantizes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from model_store.variants.base import VariantError

VARIANT = "tflite"
_TF_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_./-]*$")
TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
ELEMENTWISE_UNARY = {"Relu", "Log", "Exp", "Sqrt", "Neg", "Abs", "Sigmoid", "Tanh", "Identity"}
ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}
SUPPORTED = sorted(
    ELEMENTWISE_UNARY
    | ELEMENTWISE_BINARY
    | {
        "MatMul",
        "Gemm",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "Reshape",
        "Flatten",
        "Conv",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Transpose",
        "Softmax",
        "Dropout",
        "Constant",
        "Concat",
        "Squeeze",
        "Unsqueeze",
        "Clip",
    }
)


@dataclass(frozen=True)
class TfModel:
    """The traced function and the interface it keeps from the ONNX model."""

    function: Any  # a tf.function with a fixed input signature, returning {output name: tensor}
    input_name: str
    input_shape: tuple[int, ...]
    output_names: tuple[str, ...]


class _Value:
    """A tensor known in NCHW (its ONNX meaning), in NHWC, or both; or a numpy constant."""

    def __init__(self, tf: Any, nchw: Any = None, nhwc: Any = None) -> None:
        self._tf = tf
        self._nchw = nchw
        self._nhwc = nhwc

    @property
    def is_constant(self) -> bool:
        return isinstance(self._nchw, np.ndarray)

    @property
    def nchw(self) -> Any:
        if self._nchw is None:
            self._nchw = self._tf.transpose(self._nhwc, TO_NCHW)
        return self._nchw

    @property
    def nhwc(self) -> Any:
        if self._nhwc is None:
            self._nhwc = self._tf.transpose(self._nchw, TO_NHWC)
        return self._nhwc

    @property
    def prefers_nhwc(self) -> bool:
        return self._nchw is None


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node '{node.name}'" if node.name else f"{node.op_type} node"


def _fail(node: onnx.NodeProto, why: str) -> VariantError:
    return VariantError(VARIANT, f"cannot convert {_label(node)}: {why}")


def check_supported(model: onnx.ModelProto) -> None:
    """VariantError naming every operator the converter lacks, before any tracing."""
    missing = sorted(
        {
            node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            for node in model.graph.node
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED
        }
    )
    if missing:
        raise VariantError(
            VARIANT,
            f"the ONNX-to-TensorFlow converter does not support operator(s) {', '.join(missing)}; "
            f"it handles {', '.join(SUPPORTED)}. Convert the model to TFLite elsewhere and add "
            "it with `greenfleet models add`",
        )


def _static_shape(value_info: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = value_info.type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    if any(d <= 0 for d in shape):
        raise VariantError(
            VARIANT,
            f"input {value_info.name} has a dynamic shape {list(shape)}; TFLite conversion "
            "needs fixed dimensions",
        )
    return shape


def scope(index: int, node: onnx.NodeProto) -> str:
    """The TensorFlow name scope of node ``index``; TFLite tensor names start with it."""
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", node.name or node.output[0])
    return f"n{index}_{label}"


def node_indices(tensor_name: str) -> set[int]:
    """ONNX node indices a TFLite tensor name comes from (fused ops join names with ';')."""
    return {int(m.group(1)) for m in re.finditer(r"(?:^|;)n(\d+)_", tensor_name)}


def convert(model: onnx.ModelProto) -> TfModel:
    """A tf.function computing ``model``; VariantError for what it cannot express."""
    import tensorflow as tf

    check_supported(model)
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        raise VariantError(VARIANT, f"expected one graph input, found {len(inputs)}")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise VariantError(VARIANT, f"input {inputs[0].name} is not float32")
    input_name, input_shape = inputs[0].name, _static_shape(inputs[0])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    output_names = tuple(o.name for o in graph.output)
    nodes = list(graph.node)

    def compute(x: Any) -> dict[str, Any]:
        env: dict[str, _Value] = {n: _Value(tf, nchw=v) for n, v in constants.items()}
        env[input_name] = _Value(tf, nchw=x)
        for index, node in enumerate(nodes):
            args = [env[i] if i else None for i in node.input]
            with tf.name_scope(scope(index, node)):
                outputs = _HANDLERS[node.op_type](tf, node, args, opset)
            for name, value in zip(node.output, outputs, strict=False):
                if name:
                    env[name] = value
        return {name: tf.identity(env[name].nchw) for name in output_names}

    if not _TF_NAME.match(input_name):
        raise VariantError(
            VARIANT,
            f"input name {input_name!r} cannot name a TFLite signature input (letters, digits "
            "and . _ - / only); rename the ONNX input first",
        )
    function = tf.function(
        compute, input_signature=[tf.TensorSpec(input_shape, tf.float32, name=input_name)]
    )
    try:
        function.get_concrete_function()  # trace now, so graph errors surface here
    except VariantError:
        raise
    except Exception as exc:  # TensorFlow raises ValueError, TypeError, InvalidArgumentError...
        raise VariantError(VARIANT, f"TensorFlow cannot trace the converted graph: {exc}") from exc
    return TfModel(function, input_name, input_shape, output_names)


# ------------------------------------------------------------------------------------ handlers

_Inputs = list[_Value | None]
_Handler = Callable[[Any, onnx.NodeProto, _Inputs, int], list[_Value]]
_HANDLERS: dict[str, _Handler] = {}


def _handler(*ops: str) -> Callable[[_Handler], _Handler]:
    def register(fn: _Handler) -> _Handler:
        for op in ops:
            _HANDLERS[op] = fn
        return fn

    return register


def _const(node: onnx.NodeProto, value: _Value | None, what: str) -> np.ndarray:
    if value is None or not value.is_constant:
        raise _fail(node, f"its {what} must be a constant (an initializer)")
    array: np.ndarray = value.nchw
    return array


def _axes(node: onnx.NodeProto, inputs: _Inputs, attrs: dict[str, Any]) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in _const(node, inputs[1], "axes")]
    axes = attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


@_handler(*ELEMENTWISE_UNARY, "Dropout")
def _unary(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    fn = {
        "Relu": tf.nn.relu,
        "Log": tf.math.log,
        "Exp": tf.math.exp,
        "Sqrt": tf.math.sqrt,
        "Neg": tf.math.negative,
        "Abs": tf.math.abs,
        "Sigmoid": tf.math.sigmoid,
        "Tanh": tf.math.tanh,
        "Identity": tf.identity,
        "Dropout": tf.identity,  # inference: dropout passes its input through
    }[node.op_type]
    x = inputs[0]
    assert x is not None
    if x.prefers_nhwc:  # elementwise: stay in whatever layout the producer left
        return [_Value(tf, nhwc=fn(x.nhwc))]
    return [_Value(tf, nchw=fn(x.nchw))]


@_handler(*ELEMENTWISE_BINARY)
def _binary(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    a, b = inputs[0], inputs[1]
    assert a is not None and b is not None
    if node.op_type == "Pow" and b.is_constant and b.nchw.size == 1:
        exponent = float(b.nchw.reshape(()))
        if exponent in (2.0, 0.5, 1.0):
            fn = {2.0: tf.math.square, 0.5: tf.math.sqrt, 1.0: tf.identity}[exponent]
            return _unary_layout(tf, a, fn)
    op = {
        "Add": tf.math.add,
        "Sub": tf.math.subtract,
        "Mul": tf.math.multiply,
        "Div": tf.math.divide,
        "Pow": tf.math.pow,
    }[node.op_type]
    # A 4-D NHWC activation with a constant operand (a per-channel scale or bias) stays NHWC.
    for act, other, first in ((a, b, True), (b, a, False)):
        if act.prefers_nhwc and other.is_constant and other.nchw.ndim <= 4:
            const = other.nchw.reshape((1,) * (4 - other.nchw.ndim) + other.nchw.shape)
            const = const.transpose(TO_NHWC)
            args = (act.nhwc, const) if first else (const, act.nhwc)
            return [_Value(tf, nhwc=op(*args))]
    return [_Value(tf, nchw=op(a.nchw, b.nchw))]


@_handler("Clip")
def _clip(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    """Clip with constant bounds (ReLU6 is Clip(0, 6), which TFLite fuses into the conv)."""
    x = inputs[0]
    assert x is not None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bounds = []
    for slot, key, default in ((1, "min", -np.inf), (2, "max", np.inf)):
        if len(inputs) > slot and inputs[slot] is not None:
            bounds.append(float(_const(node, inputs[slot], key).reshape(())))
        else:
            bounds.append(float(attrs.get(key, default)))
    low, high = bounds
    if low == 0.0 and high == 6.0:
        return _unary_layout(tf, x, tf.nn.relu6)
    return _unary_layout(tf, x, lambda t: tf.clip_by_value(t, low, high))


def _unary_layout(tf: Any, x: _Value, fn: Callable[[Any], Any]) -> list[_Value]:
    if x.prefers_nhwc:
        return [_Value(tf, nhwc=fn(x.nhwc))]
    return [_Value(tf, nchw=fn(x.nchw))]


@_handler("MatMul")
def _matmul(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    a, b = inputs[0], inputs[1]
    assert a is not None and b is not None
    left, right = a.nchw, b.nchw
    if len(right.shape) == 2 and len(left.shape) > 2:
        # [..., m] @ [m, k]: one 2-D product on the flattened leading dimensions.
        lead = [int(d) for d in left.shape[:-1]]
        flat = tf.reshape(left, [-1, int(left.shape[-1])])
        out = tf.reshape(tf.linalg.matmul(flat, right), [*lead, int(right.shape[-1])])
        return [_Value(tf, nchw=out)]
    return [_Value(tf, nchw=tf.linalg.matmul(left, right))]


@_handler("Gemm")
def _gemm(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    attrs = _attrs(node)
    a, b = inputs[0], inputs[1]
    assert a is not None and b is not None
    left, right = a.nchw, b.nchw
    if attrs.get("transA", 0):
        left = tf.transpose(left)
    if attrs.get("transB", 0):
        right = np.ascontiguousarray(right.T) if b.is_constant else tf.transpose(right)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if alpha != 1.0:
        right = right * np.float32(alpha)
    out = tf.linalg.matmul(left, right)
    c = inputs[2] if len(inputs) > 2 else None
    if c is not None:
        out = out + (c.nchw * np.float32(beta) if beta != 1.0 else c.nchw)
    return [_Value(tf, nchw=out)]


@_handler("ReduceMean", "ReduceSum", "ReduceMax")
def _reduce(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    attrs = _attrs(node)
    x = inputs[0]
    assert x is not None
    axes = _axes(node, inputs, attrs)
    if axes is None and attrs.get("noop_with_empty_axes", 0):
        return [x]
    fn = {
        "ReduceMean": tf.math.reduce_mean,
        "ReduceSum": tf.math.reduce_sum,
        "ReduceMax": tf.math.reduce_max,
    }[node.op_type]
    keep = bool(attrs.get("keepdims", 1))
    return [_Value(tf, nchw=fn(x.nchw, axis=axes, keepdims=keep))]


@_handler("Reshape")
def _reshape(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    x = inputs[0]
    assert x is not None
    target = [int(d) for d in _const(node, inputs[1], "shape")]
    if not _attrs(node).get("allowzero", 0):
        source = [int(d) for d in x.nchw.shape]
        target = [source[i] if d == 0 else d for i, d in enumerate(target)]
    return [_Value(tf, nchw=tf.reshape(x.nchw, target))]


@_handler("Flatten")
def _flatten(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    x = inputs[0]
    assert x is not None
    shape = [int(d) for d in x.nchw.shape]
    axis = int(_attrs(node).get("axis", 1)) % max(len(shape), 1)
    target = [math.prod(shape[:axis]), math.prod(shape[axis:])]
    return [_Value(tf, nchw=tf.reshape(x.nchw, target))]


@_handler("Transpose")
def _transpose(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    x = inputs[0]
    assert x is not None
    rank = len(x.nchw.shape)
    perm = _attrs(node).get("perm", list(reversed(range(rank))))
    return [_Value(tf, nchw=tf.transpose(x.nchw, [int(p) for p in perm]))]


@_handler("Softmax")
def _softmax(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    x = inputs[0]
    assert x is not None
    rank = len(x.nchw.shape)
    axis = int(_attrs(node).get("axis", -1 if opset >= 13 else 1)) % rank
    if opset < 13 and axis != rank - 1:
        raise _fail(node, "Softmax before opset 13 over a non-last axis flattens; not supported")
    return [_Value(tf, nchw=tf.nn.softmax(x.nchw, axis=axis))]


@_handler("Constant")
def _constant(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    attrs = _attrs(node)
    if "value" in attrs:
        return [_Value(tf, nchw=numpy_helper.to_array(attrs["value"]))]
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return [_Value(tf, nchw=np.array(attrs[key], dtype=dtype))]
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return [_Value(tf, nchw=np.array(list(attrs[key]), dtype=dtype))]
    raise _fail(node, f"unsupported constant attribute(s) {sorted(attrs)}")


@_handler("Concat")
def _concat(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    parts = [v.nchw for v in inputs if v is not None]
    return [_Value(tf, nchw=tf.concat(parts, axis=int(_attrs(node)["axis"])))]


@_handler("Squeeze", "Unsqueeze")
def _squeeze(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    x = inputs[0]
    assert x is not None
    axes = _axes(node, inputs, _attrs(node))
    shape = [int(d) for d in x.nchw.shape]
    if node.op_type == "Squeeze":
        drop = (
            {a % len(shape) for a in axes} if axes else {i for i, d in enumerate(shape) if d == 1}
        )
        target = [d for i, d in enumerate(shape) if i not in drop]
    else:
        if not axes:
            raise _fail(node, "Unsqueeze needs axes")
        rank = len(shape) + len(axes)
        insert = {a % rank for a in axes}
        rest = iter(shape)
        target = [1 if i in insert else next(rest) for i in range(rank)]
    return [_Value(tf, nchw=tf.reshape(x.nchw, target))]


# -------------------------------------------------------------------------- convolution, pooling


def _spatial(node: onnx.NodeProto, x: _Value) -> tuple[int, int]:
    shape = x.nchw.shape if not x.prefers_nhwc else None
    if shape is not None:
        if len(shape) != 4:
            raise _fail(node, f"only 2-D images [N, C, H, W] are supported, got rank {len(shape)}")
        return int(shape[2]), int(shape[3])
    nhwc = x.nhwc.shape
    return int(nhwc[1]), int(nhwc[2])


def _padding(
    node: onnx.NodeProto,
    attrs: dict[str, Any],
    size: tuple[int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    dilations: tuple[int, int],
) -> str | list[tuple[int, int]]:
    """'VALID', 'SAME', or explicit (before, after) pads per spatial axis."""
    auto = attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER",):
        return "SAME"
    if auto == "VALID":
        return "VALID"
    if auto == "SAME_LOWER":
        raise _fail(node, "auto_pad SAME_LOWER is not supported")
    pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
    explicit = [(pads[0], pads[2]), (pads[1], pads[3])]
    if all(p == (0, 0) for p in explicit):
        return "VALID"
    same = []
    for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        same.append((total // 2, total - total // 2))
    return "SAME" if same == explicit else explicit


def _window(
    node: onnx.NodeProto, attrs: dict[str, Any], kernel: Sequence[int] | None = None
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Kernel, strides and dilations of a 2-D window; the kernel from attributes if present."""
    kernel = [int(k) for k in attrs.get("kernel_shape", kernel or [])]
    strides = [int(s) for s in attrs.get("strides", [1, 1])]
    dilations = [int(d) for d in attrs.get("dilations", [1, 1])]
    if len(kernel) != 2 or len(strides) != 2 or len(dilations) != 2:
        raise _fail(node, "only 2-D windows are supported")
    return (kernel[0], kernel[1]), (strides[0], strides[1]), (dilations[0], dilations[1])


@_handler("Conv")
def _conv(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    attrs = _attrs(node)
    x = inputs[0]
    assert x is not None
    weight = _const(node, inputs[1], "weight").astype(np.float32)
    if weight.ndim != 4:
        raise _fail(node, f"only 2-D convolutions are supported (weight rank {weight.ndim})")
    out_channels, per_group, kh, kw = weight.shape
    kernel, strides, dilations = _window(node, attrs, (kh, kw))
    size = _spatial(node, x)
    padding = _padding(node, attrs, size, kernel, strides, dilations)
    group = int(attrs.get("group", 1))
    data = x.nhwc
    if isinstance(padding, list):
        data = tf.pad(data, [(0, 0), *padding, (0, 0)])
        padding = "VALID"
    if group == 1:
        kernel_hwio = weight.transpose(2, 3, 1, 0)
        out = tf.nn.conv2d(data, kernel_hwio, [1, *strides, 1], padding, dilations=list(dilations))
    elif per_group == 1 and out_channels % group == 0 and group == int(data.shape[-1]):
        multiplier = out_channels // group
        kernel_hwcm = weight.reshape(group, multiplier, kh, kw).transpose(2, 3, 0, 1)
        out = tf.nn.depthwise_conv2d(
            data, kernel_hwcm, [1, *strides, 1], padding, dilations=list(dilations)
        )
    else:
        raise _fail(node, f"grouped convolution with group={group} is not supported")
    bias = inputs[2] if len(inputs) > 2 else None
    if bias is not None:
        out = tf.nn.bias_add(out, _const(node, bias, "bias").astype(np.float32))
    return [_Value(tf, nhwc=out)]


@_handler("MaxPool", "AveragePool")
def _pool(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    attrs = _attrs(node)
    x = inputs[0]
    assert x is not None
    if attrs.get("ceil_mode", 0):
        raise _fail(node, "ceil_mode=1 is not supported")
    kernel, strides, dilations = _window(node, attrs)
    if dilations != (1, 1):
        raise _fail(node, "dilated pooling is not supported")
    padding = _padding(node, attrs, _spatial(node, x), kernel, strides, dilations)
    data = x.nhwc
    if node.op_type == "MaxPool":
        if isinstance(padding, list):
            lowest = float(np.finfo(np.float32).min)
            data = tf.pad(data, [(0, 0), *padding, (0, 0)], constant_values=lowest)
            padding = "VALID"
        out = tf.nn.max_pool2d(data, list(kernel), [1, *strides, 1], padding)
    else:
        if isinstance(padding, list) or (padding == "SAME" and attrs.get("count_include_pad", 0)):
            raise _fail(node, "AveragePool with this padding is not supported")
        out = tf.nn.avg_pool2d(data, list(kernel), [1, *strides, 1], padding)
    return [_Value(tf, nhwc=out)]


@_handler("GlobalAveragePool")
def _global_average(tf: Any, node: onnx.NodeProto, inputs: _Inputs, opset: int) -> list[_Value]:
    x = inputs[0]
    assert x is not None
    return [_Value(tf, nhwc=tf.math.reduce_mean(x.nhwc, axis=[1, 2], keepdims=True))]
