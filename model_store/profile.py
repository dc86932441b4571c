"""Profile one model variant on the controller's host: size, weights, work, memory, speed, fidelity.

Every number is measured or counted from the file itself, never taken from a builder's claims:

* parameters: elements of the weight tensors stored in the file (ONNX initializers and Constant
  nodes, TFLite constant tensors), and how many of them are non-zero (after zero points);
* MACs: an *estimate* of multiply-accumulates per inference, counted for matrix products and
  convolutions only (elementwise ops, activations and reductions are left out, so formats that
  fuse a bias add differently still agree);
* peak memory: how much a fresh process's peak RSS grows by loading the model and running it;
* latency: p50/p95 of single-sample runs on the agent's own runtimes, one thread;
* fidelity: how closely the variant reproduces the fp32 reference on held-out inputs.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.protocol import LATENCY_KEYS, Fidelity, LatencyStats, ModelFormat, Profile, Task
from agent.runtime import ModelRuntimeError, available_formats, load_model
from model_store.errors import InvalidModel, ModelStoreError

if TYPE_CHECKING:
    import onnx

    from agent.runtime import LoadedModel
    from model_store.variants.base import Calibration, ModelInfo

logger = logging.getLogger(__name__)

RUNTIMES = LATENCY_KEYS  # the name each format's latency is reported under

LATENCY_SAMPLES = 64  # held-out inputs cycled through when timing; more adds nothing but setup
MEMORY_RUNS = 5
MEMORY_TIMEOUT_S = 60.0
ANOMALY_HEALTHY_PERCENTILE = 99.5  # default alarm threshold on the reference's healthy scores
ANOMALY_OVERALL_PERCENTILE = 95.0  # ... and on all its scores when there are no labels

# ------------------------------------------------------------------------------- parameters

# ONNX element types whose tensors count as weights; int32 counts only in a bias slot (below)
# and int64 never does: in ONNX it only carries shapes, axes, indices and pads.
_ONNX_WEIGHT_TYPES = {
    "FLOAT",
    "FLOAT16",
    "BFLOAT16",
    "DOUBLE",
    "INT8",
    "UINT8",
    "INT16",
    "UINT16",
    "INT4",
    "UINT4",
    "FLOAT8E4M3FN",
    "FLOAT8E4M3FNUZ",
    "FLOAT8E5M2",
    "FLOAT8E5M2FNUZ",
}
# Input slots that hold an int32 bias, the one int32 tensor that is a weight.
_ONNX_INT32_WEIGHT_SLOTS = {("QLinearConv", 8), ("QGemm", 6), ("DequantizeLinear", 0)}
# Input slots that hold quantization scales and zero points: not weights.
_ONNX_QUANT_PARAM_SLOTS: dict[str, frozenset[int]] = {
    "QuantizeLinear": frozenset({1, 2}),
    "DequantizeLinear": frozenset({1, 2}),
    "QLinearMatMul": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearConv": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearAdd": frozenset({1, 2, 4, 5, 6, 7}),
    "QLinearMul": frozenset({1, 2, 4, 5, 6, 7}),
    "QGemm": frozenset({1, 2, 4, 5, 7, 8}),
    "MatMulInteger": frozenset({2, 3}),
    "ConvInteger": frozenset({2, 3}),
    "MatMulIntegerToFloat": frozenset({2, 3, 4, 5}),
    "DynamicQuantizeMatMul": frozenset({2, 3}),
}

_TFLITE_BIAS_SLOTS = {
    ("FULLY_CONNECTED", 2),
    ("CONV_2D", 2),
    ("DEPTHWISE_CONV_2D", 2),
    ("CONV_3D", 2),
    ("TRANSPOSE_CONV", 3),
}


def count_parameters(path: Path, fmt: ModelFormat) -> tuple[int, int]:
    """``(parameters, nonzero)``: elements of the weight tensors stored in the model file.

    Weights are float and small-integer tensors held in the file (plus int32 biases of quantized
    convolutions); shape, axis and index tensors and quantization scales and zero points are
    not. A quantized weight counts as zero where it equals its zero point.
    """
    if fmt is ModelFormat.ONNX:
        return _onnx_parameters(_load_onnx(path))
    return _tflite_parameters(path)


def _load_onnx(path: Path) -> onnx.ModelProto:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # DecodeError, OSError, a missing external-data file
        raise InvalidModel(f"cannot read {path} as an ONNX model: {exc}") from exc


def _onnx_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes (If, Loop, Scan bodies)."""
    import onnx

    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _onnx_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _onnx_graphs(sub)


def _onnx_consumers(graphs: list[onnx.GraphProto]) -> dict[str, list[tuple[str, int]]]:
    consumers: dict[str, list[tuple[str, int]]] = {}
    for graph in graphs:
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name:
                    consumers.setdefault(name, []).append((node.op_type, slot))
    return consumers


def _onnx_parameters(model: onnx.ModelProto) -> tuple[int, int]:
    import onnx
    from onnx import numpy_helper

    graphs = list(_onnx_graphs(model.graph))
    consumers = _onnx_consumers(graphs)
    outputs = {o.name for g in graphs for o in g.output}
    zero_points = _onnx_zero_points(graphs)

    def counted(name: str, data_type: int) -> bool:
        uses = consumers.get(name, [])
        if not uses and name not in outputs:
            return False  # an unused initializer is dead bytes, not a parameter
        if uses and all(slot in _ONNX_QUANT_PARAM_SLOTS.get(op, ()) for op, slot in uses):
            return False
        type_name = onnx.TensorProto.DataType.Name(data_type)
        if type_name == "INT32":
            return any(use in _ONNX_INT32_WEIGHT_SLOTS for use in uses)
        return type_name in _ONNX_WEIGHT_TYPES

    total = nonzero = 0

    def add_dense(name: str, tensor: onnx.TensorProto) -> None:
        nonlocal total, nonzero
        if not counted(name, tensor.data_type):
            return
        values = numpy_helper.to_array(tensor)
        total += int(values.size)
        nonzero += _nonzero(values, *zero_points.get(name, (None, 0)))

    for graph in graphs:
        for tensor in graph.initializer:
            add_dense(tensor.name, tensor)
        for sparse in graph.sparse_initializer:
            if counted(sparse.values.name, sparse.values.data_type):
                total += math.prod(sparse.dims)
                nonzero += int(np.count_nonzero(numpy_helper.to_array(sparse.values)))
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                if attr.name == "value":
                    add_dense(node.output[0], attr.t)
                elif attr.name == "value_float" and counted(node.output[0], onnx.TensorProto.FLOAT):
                    total += 1
                    nonzero += int(attr.f != 0)
                elif attr.name == "value_floats" and counted(
                    node.output[0], onnx.TensorProto.FLOAT
                ):
                    total += len(attr.floats)
                    nonzero += sum(1 for f in attr.floats if f != 0)
                elif attr.name == "sparse_value" and counted(
                    node.output[0], attr.sparse_tensor.values.data_type
                ):
                    total += math.prod(attr.sparse_tensor.dims)
                    nonzero += int(
                        np.count_nonzero(numpy_helper.to_array(attr.sparse_tensor.values))
                    )
    return total, nonzero


def _onnx_zero_points(
    graphs: list[onnx.GraphProto],
) -> dict[str, tuple[np.ndarray | None, int]]:
    """Quantized weight name -> (its zero point, the axis a per-channel zero point runs on)."""
    from onnx import numpy_helper

    constants = {t.name: t for g in graphs for t in g.initializer}
    found: dict[str, tuple[np.ndarray | None, int]] = {}
    for graph in graphs:
        for node in graph.node:
            if node.op_type != "DequantizeLinear" or node.input[0] not in constants:
                continue
            if len(node.input) < 3 or node.input[2] not in constants:
                continue
            axis = next((int(a.i) for a in node.attribute if a.name == "axis"), 1)
            found[node.input[0]] = (numpy_helper.to_array(constants[node.input[2]]), axis)
    return found


def _nonzero(values: np.ndarray, zero_point: np.ndarray | None, axis: int) -> int:
    """Elements that are not zero, or, for quantized values, not equal to their zero point."""
    if zero_point is None or zero_point.size == 0 or not np.any(zero_point):
        return int(np.count_nonzero(values))
    if zero_point.size == 1:
        return int(np.count_nonzero(values != zero_point.reshape(())))
    if values.ndim == 0 or zero_point.size != values.shape[axis]:
        return int(np.count_nonzero(values))  # blocked quantization: not worth decoding here
    shape = [1] * values.ndim
    shape[axis] = zero_point.size
    return int(np.count_nonzero(values != zero_point.reshape(shape)))


def _tflite_interpreter(path: Path) -> Any:
    """A LiteRT interpreter on ``path`` without XNNPACK, so its op list is the file's own."""
    try:
        # The interpreter class the agent's backend picked (LiteRT, else tflite-runtime).
        interpreter_class = importlib.import_module("agent.runtime.tflite").Interpreter
    except ImportError as exc:
        raise ModelStoreError(
            f"cannot inspect {path}: no TFLite runtime is installed ({exc}); "
            "install it with pip install 'greenfleet[tflite]'"
        ) from exc
    resolver = getattr(
        importlib.import_module(interpreter_class.__module__), "OpResolverType", None
    )
    kwargs: dict[str, Any] = {}
    if resolver is not None:
        kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        return interpreter_class(model_path=str(path), **kwargs)
    except Exception as exc:
        raise InvalidModel(f"cannot read {path} as a TFLite model: {exc}") from exc


def _tflite_ops(interpreter: Any) -> list[dict[str, Any]]:
    ops = getattr(interpreter, "_get_ops_details", None)
    if ops is None:
        return []
    return list(ops())


def _tflite_parameters(path: Path) -> tuple[int, int]:
    interpreter = _tflite_interpreter(path)
    ops = _tflite_ops(interpreter)
    uses: dict[int, list[tuple[str, int]]] = {}
    for op in ops:
        for slot, index in enumerate(op["inputs"]):
            if index >= 0:
                uses.setdefault(int(index), []).append((op["op_name"], slot))
    total = nonzero = 0
    for detail in interpreter.get_tensor_details():
        index = detail["index"]
        if ops and index not in uses:
            continue  # a buffer no op reads
        dtype = np.dtype(detail["dtype"])
        if dtype.kind not in "fiu" or (
            dtype.itemsize >= 4
            and dtype.kind in "iu"
            and not any(use in _TFLITE_BIAS_SLOTS for use in uses.get(index, ()))
        ):
            continue  # int32/int64 outside a bias slot: shapes, axes, indices
        try:
            # Before allocate_tensors only tensors backed by a buffer in the file have data.
            values = interpreter.get_tensor(index)
        except (ValueError, RuntimeError):
            continue
        quant = detail.get("quantization_parameters") or {}
        zero_points = quant.get("zero_points")
        total += int(values.size)
        nonzero += _nonzero(
            values,
            None if zero_points is None else np.asarray(zero_points),
            int(quant.get("quantized_dimension", 0)),
        )
    return total, nonzero


# ------------------------------------------------------------------------------------- MACs


def estimate_macs(path: Path, fmt: ModelFormat) -> int:
    """Estimated multiply-accumulates of one inference (batch 1): matrix products and convolutions.

    ONNX: MatMul, Gemm, Conv, ConvTranspose and their quantized and fused forms, from shapes
    found by ONNX shape inference; a dynamic dimension counts as 1, and nodes whose shapes stay
    unknown (or that sit in If/Loop bodies) count 0. TFLite: FULLY_CONNECTED, CONV_2D,
    DEPTHWISE_CONV_2D, TRANSPOSE_CONV and BATCH_MATMUL, from the interpreter's tensor shapes.
    """
    if fmt is ModelFormat.ONNX:
        return _onnx_macs(_load_onnx(path))
    return _tflite_macs(path)


Shape = tuple[int, ...]


def _onnx_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    from model_store.shapes import infer_shapes

    lifted: set[str] = set()  # weights the inference saw as inputs: their dims are their own
    try:
        inferred, lifted = infer_shapes(model)
    except Exception as exc:  # an op the inference does not know, or a bad graph
        logger.warning("ONNX shape inference failed (%s); MACs are counted from known shapes", exc)
        inferred = model
    graph = inferred.graph
    shapes: dict[str, Shape] = {
        t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer
    }
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.name in lifted:
            continue
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            # A symbolic or unknown dimension (the batch, usually) is taken as 1.
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                for d in tensor_type.shape.dim
            )
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(int(d) for d in attr.t.dims)
    return shapes


def _matmul_macs(a: Shape, b: Shape, trans_a: bool = False, trans_b: bool = False) -> int:
    """MACs of ``a @ b`` with numpy broadcasting of the leading (batch) dimensions."""
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    if len(a2) < 2 or len(b2) < 2:
        return 0
    m, k = (a2[-1], a2[-2]) if trans_a else (a2[-2], a2[-1])
    n = b2[-2] if trans_b else b2[-1]
    batch_a, batch_b = a2[:-2], b2[:-2]
    rank = max(len(batch_a), len(batch_b))
    batch_a = (1,) * (rank - len(batch_a)) + batch_a
    batch_b = (1,) * (rank - len(batch_b)) + batch_b
    batch = math.prod(max(x, y) for x, y in zip(batch_a, batch_b, strict=True))
    return batch * m * k * n


# op type -> (A slot, B slot) of matrix products; Gemm-likes are 2-D with transA/transB.
_ONNX_MATMULS = {
    "MatMul": (0, 1),
    "MatMulInteger": (0, 1),
    "FusedMatMul": (0, 1),
    "MatMulIntegerToFloat": (0, 1),
    "DynamicQuantizeMatMul": (0, 1),
    "QLinearMatMul": (0, 3),
    "Gemm": (0, 1),
    "FusedGemm": (0, 1),
    "QGemm": (0, 3),
}
# op type -> weight slot of convolutions: MACs = output elements * prod(W.shape[1:])
_ONNX_CONVS = {"Conv": 1, "FusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}


def _mac_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors whose shapes decide a node's MACs; empty for nodes that are not counted."""
    inputs = list(node.input)
    if node.op_type in _ONNX_MATMULS:
        slots = _ONNX_MATMULS[node.op_type]
        return [inputs[slots[0]], inputs[slots[1]]] if len(inputs) > max(slots) else []
    if node.op_type in _ONNX_CONVS:
        slot = _ONNX_CONVS[node.op_type]
        return [inputs[slot], node.output[0]] if len(inputs) > slot else []
    if node.op_type == "ConvTranspose":
        return inputs[:2] if len(inputs) >= 2 else []
    return []


def _node_macs(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
    """MACs of one node, or None when a shape it needs is unknown."""
    needed = _mac_inputs(node)
    if not needed:
        return 0
    known = [shapes.get(name) for name in needed]
    if any(shape is None for shape in known):
        return None
    first, second = (shape or () for shape in known)
    if node.op_type in _ONNX_MATMULS:
        attrs = {a.name: a.i for a in node.attribute}
        return _matmul_macs(first, second, bool(attrs.get("transA")), bool(attrs.get("transB")))
    if node.op_type in _ONNX_CONVS:  # weight [Cout, Cin/group, k...]; output [N, Cout, ...]
        return math.prod(second) * math.prod(first[1:])
    return math.prod(first) * math.prod(second[1:])  # ConvTranspose: weight [Cin, Cout/g, k...]


def _onnx_macs(model: onnx.ModelProto) -> int:
    shapes = _onnx_shapes(model)
    missing = {
        name for node in model.graph.node for name in _mac_inputs(node) if name not in shapes
    }
    if missing:  # ops ONNX shape inference does not know (com.microsoft) hide what follows
        shapes.update(_probe_shapes(model, missing))
    total = 0
    for node in model.graph.node:
        macs = _node_macs(node, shapes)
        if macs is None:
            logger.warning(
                "MACs of %s node %r not counted: shapes unknown", node.op_type, node.name
            )
        else:
            total += macs
    return total


def _probe_shapes(model: onnx.ModelProto, names: set[str]) -> dict[str, Shape]:
    """Actual shapes of ``names`` from one onnxruntime run on zeros (dynamic dimensions = 1)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    # An output without a type is accepted by onnxruntime, which then reports what it computed.
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in sorted(names - outputs))
    initializers = {t.name for t in probe.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for info in probe.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[info.name] = np.zeros(dims, dtype=dtype)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    wanted = sorted(names)
    try:
        session = ort.InferenceSession(
            probe.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        values = session.run(wanted, feeds)
    except Exception as exc:
        logger.warning("cannot run the model to find the shapes of %s: %s", wanted, exc)
        return {}
    return {name: tuple(np.shape(v)) for name, v in zip(wanted, values, strict=True)}


def _tflite_macs(path: Path) -> int:
    interpreter = _tflite_interpreter(path)
    try:
        interpreter.allocate_tensors()  # resolves every tensor's shape for batch 1
    except Exception as exc:
        raise InvalidModel(f"cannot allocate the tensors of TFLite model {path}: {exc}") from exc
    ops = _tflite_ops(interpreter)
    if not ops:
        logger.warning("this TFLite runtime does not list ops; MACs of %s counted as 0", path)
    shapes = {
        d["index"]: tuple(int(x) for x in d["shape"]) for d in interpreter.get_tensor_details()
    }
    total = 0
    for op in ops:
        name, ins, outs = op["op_name"], list(op["inputs"]), list(op["outputs"])
        try:
            x, w, out = shapes[ins[0]], shapes[ins[1]], shapes[outs[0]]
        except (IndexError, KeyError):
            continue
        if name == "FULLY_CONNECTED":  # weights [N, K]
            total += math.prod(out) * w[-1]
        elif name == "CONV_2D" or name == "CONV_3D":  # filter [Cout, kH, kW, Cin]
            total += math.prod(out) * math.prod(w[1:])
        elif name == "DEPTHWISE_CONV_2D":  # filter [1, kH, kW, Cout]
            total += math.prod(out) * math.prod(w[1:-1])
        elif name == "TRANSPOSE_CONV":  # inputs: output shape, filter [Cout, kH, kW, Cin], x
            if len(ins) > 2 and ins[2] in shapes:
                total += math.prod(shapes[ins[2]]) * math.prod(w[:-1])
        elif name == "BATCH_MATMUL" and len(x) >= 2 and len(out) >= 2:
            # adj_x is not exposed; the contracted dimension is the one of x not in the output.
            k = x[-1] if x[-2] == out[-2] else x[-2]
            total += math.prod(out) * k
    return total


# ---------------------------------------------------------------------------------- running


def _load(path: Path, fmt: ModelFormat) -> LoadedModel:
    try:
        return load_model(path, fmt, threads=1)
    except ModelRuntimeError as exc:
        raise InvalidModel(f"cannot profile {path}: {exc}") from exc


def _feeds(model: LoadedModel, inputs: np.ndarray, input_name: str) -> list[dict[str, np.ndarray]]:
    """One single-sample feed per row of ``inputs``, in the dtype the model takes."""
    dtypes = {spec.name: spec.dtype for spec in model.inputs}
    if input_name not in dtypes:
        raise ModelStoreError(
            f"{model.path} has no input named {input_name!r}; its inputs are {sorted(dtypes)}"
        )
    if len(inputs) == 0:
        raise ModelStoreError(f"no inputs to run {model.path} on")
    dtype = np.dtype(dtypes[input_name])
    return [
        {input_name: np.ascontiguousarray(inputs[i : i + 1], dtype=dtype)}
        for i in range(len(inputs))
    ]


def _run(model: LoadedModel, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    try:
        return model.run(feed)
    except ModelRuntimeError as exc:
        raise ModelStoreError(f"cannot profile {model.path}: {exc}") from exc


def measure_latency(
    path: Path,
    fmt: ModelFormat,
    inputs: np.ndarray,
    input_name: str,
    *,
    runs: int = 200,
    warmup: int = 20,
) -> dict[str, LatencyStats]:
    """Runtime name -> p50/p95 of single-sample runs on one thread, cycling through ``inputs``.

    A runtime not installed on this host is left out (logged); a model that does not load
    raises :class:`InvalidModel`.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if fmt not in available_formats():
        logger.warning("no %s runtime on this host: latency of %s not measured", fmt.value, path)
        return {}
    model = _load(path, fmt)
    try:
        feeds = _feeds(model, inputs, input_name)
        for i in range(warmup):
            _run(model, feeds[i % len(feeds)])
        times = np.empty(runs, dtype=np.int64)
        try:
            for i in range(runs):
                feed = feeds[i % len(feeds)]
                start = time.perf_counter_ns()
                model.run(feed)
                times[i] = time.perf_counter_ns() - start
        except ModelRuntimeError as exc:
            raise ModelStoreError(f"cannot profile {path}: {exc}") from exc
    finally:
        model.close()
    p50, p95 = np.percentile(times, [50, 95]) / 1e6
    return {RUNTIMES[fmt]: LatencyStats(p50_ms=float(p50), p95_ms=float(p95), runs=runs)}


def run_outputs(
    path: Path,
    fmt: ModelFormat,
    inputs: np.ndarray,
    input_name: str,
    *,
    output_name: str | None = None,
) -> np.ndarray:
    """The model's first output (or ``output_name``) for every sample, stacked ``[N, ...]``."""
    model = _load(path, fmt)
    try:
        names = [spec.name for spec in model.outputs]
        name = output_name if output_name in names else names[0]
        rows = []
        for feed in _feeds(model, inputs, input_name):
            value = np.asarray(_run(model, feed)[name])
            rows.append(value[0] if value.ndim >= 1 and value.shape[0] == 1 else value)
    finally:
        model.close()
    return np.stack(rows)


# Runs in a fresh interpreter: import the runtime, note RSS, load and run, report peak RSS.
_MEMORY_SCRIPT = """
import importlib, json, sys
from pathlib import Path
import numpy as np
from agent.protocol import ModelFormat
from agent.runtime import BACKENDS, load_model

path, fmt, name, sample_path, runs = sys.argv[1:6]
fmt = ModelFormat(fmt)
importlib.import_module(BACKENDS[fmt].partition(":")[0])
sample = np.load(sample_path)

def status():
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0])
    return fields

try:  # "5" resets the peak (VmHWM) to the current RSS, so import-time peaks do not count
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
before = status()
model = load_model(Path(path), fmt, threads=1)
dtypes = {spec.name: spec.dtype for spec in model.inputs}
feed = {name: np.ascontiguousarray(sample, dtype=dtypes.get(name, sample.dtype))}
for _ in range(int(runs)):
    model.run(feed)
after = status()
print(json.dumps({"before_kib": before["VmRSS" if reset else "VmHWM"], "peak_kib": after["VmHWM"]}))
"""


def measure_peak_memory(
    path: Path, fmt: ModelFormat, input_name: str, sample: np.ndarray
) -> float | None:
    """MiB the peak RSS of a fresh process grows by loading the model and running it a few times.

    The baseline is the same process with numpy and the runtime already imported. ``sample`` is
    one model input, ``[1, *sample_shape]``. None (and a warning) where it cannot be measured:
    not Linux, or the child process fails.
    """
    if not Path("/proc/self/status").exists():
        logger.warning("peak memory of %s not measured: needs Linux /proc", path)
        return None
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="gf-profile-") as tmp:
        sample_path = Path(tmp) / "sample.npy"
        np.save(sample_path, np.asarray(sample))
        command = [
            sys.executable,
            "-c",
            _MEMORY_SCRIPT,
            str(Path(path).resolve()),
            fmt.value,
            input_name,
            str(sample_path),
            str(MEMORY_RUNS),
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=MEMORY_TIMEOUT_S, env=env
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            logger.warning("peak memory of %s not measured: %s", path, exc)
            return None
    if result.returncode != 0:
        tail = " ".join(result.stderr.strip().splitlines()[-1:]) or f"exit {result.returncode}"
        logger.warning("peak memory of %s not measured: the child failed (%s)", path, tail)
        return None
    try:
        report = json.loads(result.stdout.strip().splitlines()[-1])
        gained_kib = int(report["peak_kib"]) - int(report["before_kib"])
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        logger.warning("peak memory of %s not measured: unreadable report (%s)", path, exc)
        return None
    return max(gained_kib, 0) / 1024.0


# --------------------------------------------------------------------------------- fidelity


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``labels != 0``; ties share their average rank.

    None when only one class is present or a score is not finite.
    """
    positive = np.asarray(labels).reshape(-1) != 0
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0 or not np.all(np.isfinite(scores)):
        return None
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based, ties averaged
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _finite(value: float | np.floating[Any] | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson r of two equally long vectors; 1 when identical, None when one is constant."""
    if np.array_equal(a, b) and np.all(np.isfinite(a)):
        return 1.0
    da, db = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    if denominator == 0.0 or not math.isfinite(denominator):
        return None
    return _finite(float(np.dot(da, db)) / denominator)


def _r2(labels: np.ndarray, predictions: np.ndarray) -> float | None:
    residual = float(np.sum((labels - predictions) ** 2))
    total = float(np.sum((labels - labels.mean()) ** 2))
    return None if total == 0.0 else _finite(1.0 - residual / total)


def _anomaly_threshold(reference: np.ndarray, labels: np.ndarray | None) -> float:
    healthy = reference if labels is None else reference[np.asarray(labels).reshape(-1) == 0]
    if labels is not None and healthy.size > 0:
        return float(np.percentile(healthy, ANOMALY_HEALTHY_PERCENTILE))
    return float(np.percentile(reference, ANOMALY_OVERALL_PERCENTILE))


def fidelity(
    task: Task,
    outputs: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray | None,
    threshold: float | None = None,
) -> Fidelity:
    """How closely ``outputs`` reproduce ``reference`` (both ``[N, ...]``), and the task metric.

    ANOMALY: one score per sample (several values per sample are averaged). Agreement is the
    share of samples where ``score > threshold`` matches the reference's decision; with no
    ``threshold`` it is the reference's 99.5th percentile on label-0 samples, or its 95th
    percentile on all samples when there are no labels. Metric: ROC AUC against ``labels != 0``.
    CLASSIFICATION: ``[N, C]`` logits or probabilities; agreement is the share of equal argmax
    (a single column is P(class 1) thresholded at ``threshold`` or 0.5); metric: accuracy.
    REGRESSION: no agreement; metric: R^2 against ``labels``.
    """
    out = np.asarray(outputs, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if out.shape != ref.shape:
        raise ModelStoreError(
            f"variant outputs have shape {list(out.shape)} but the reference's have "
            f"{list(ref.shape)}; they must match to compare them"
        )
    n = len(out)
    if labels is not None and len(labels) != n:
        raise ModelStoreError(f"{len(labels)} labels for {n} outputs")
    if n == 0:
        return Fidelity(samples=0)
    out2, ref2 = out.reshape(n, -1), ref.reshape(n, -1)
    error = np.abs(out2 - ref2)
    result: dict[str, Any] = {
        "samples": n,
        "correlation": _correlation(out2.reshape(-1), ref2.reshape(-1)),
        "max_abs_error": _finite(error.max()) if np.all(np.isfinite(error)) else None,
    }
    if task is Task.ANOMALY:
        scores, ref_scores = out2.mean(axis=1), ref2.mean(axis=1)
        cut = _anomaly_threshold(ref_scores, labels) if threshold is None else threshold
        result["agreement"] = float(np.mean((scores > cut) == (ref_scores > cut)))
        if labels is not None:
            auc, ref_auc = roc_auc(labels, scores), roc_auc(labels, ref_scores)
            if ref_auc is not None or auc is not None:
                result |= {"metric": "roc_auc", "metric_value": auc}
                result["reference_metric_value"] = ref_auc
    elif task is Task.CLASSIFICATION:
        if out2.shape[1] == 1:
            cut = 0.5 if threshold is None else threshold
            classes, ref_classes = (out2[:, 0] > cut).astype(int), (ref2[:, 0] > cut).astype(int)
        else:
            classes, ref_classes = out2.argmax(axis=1), ref2.argmax(axis=1)
        result["agreement"] = float(np.mean(classes == ref_classes))
        if labels is not None:
            truth = np.asarray(labels).reshape(-1)
            result |= {
                "metric": "accuracy",
                "metric_value": float(np.mean(classes == truth)),
                "reference_metric_value": float(np.mean(ref_classes == truth)),
            }
    elif labels is not None:  # regression
        truth = np.asarray(labels, dtype=np.float64)
        if truth.size == out2.size:
            truth = truth.reshape(out2.shape)
            result |= {
                "metric": "r2",
                "metric_value": _r2(truth, out2),
                "reference_metric_value": _r2(truth, ref2),
            }
    return Fidelity(**result)


# ---------------------------------------------------------------------------------- profile


def host_description() -> str:
    """Architecture, cores and the CPU flags that decide int8 and fp16 speed (the plan
    carries the measured latency to other CPUs with them: device_configs.kernels)."""
    from agent.hardware import read_hardware
    from device_configs.kernels import host_text

    facts = read_hardware()
    return host_text(platform.machine(), os.cpu_count() or 1, facts.cpu_flags)


def _timing_inputs(info: ModelInfo, heldout: Calibration | None) -> np.ndarray:
    if heldout is not None and len(heldout.inputs) > 0:
        return heldout.inputs[:LATENCY_SAMPLES]
    # Random rather than zeros, so no runtime takes a shortcut on all-zero data.
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, *info.sample_shape)).astype(np.float32)


def profile_variant(
    path: Path,
    fmt: ModelFormat,
    info: ModelInfo,
    heldout: Calibration | None,
    reference_outputs: np.ndarray | None,
    *,
    runs: int = 200,
    memory: bool = True,
    threshold: float | None = None,
) -> Profile:
    """Measure one variant file; :class:`ModelStoreError` naming the file if it cannot be run.

    Fidelity is computed on ``heldout`` against ``reference_outputs`` (the fp32 reference's
    outputs on the same inputs, from :func:`run_outputs`); without them the variant is compared
    with itself, which still gives its task metric. None when there is no held-out data.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelStoreError(f"cannot profile {path}: no such file")
    _load(path, fmt).close()  # a file that does not load fails here, with the runtime's reason
    try:
        parameters, nonzero = count_parameters(path, fmt)
        macs = estimate_macs(path, fmt)
    except ModelStoreError:
        raise
    except Exception as exc:  # a model the counters do not understand
        raise InvalidModel(f"cannot inspect {path}: {type(exc).__name__}: {exc}") from exc
    timing = _timing_inputs(info, heldout)
    peak = measure_peak_memory(path, fmt, info.input_name, timing[:1]) if memory else None
    latency = measure_latency(path, fmt, timing, info.input_name, runs=runs)
    measured: Fidelity | None = None
    if heldout is not None and len(heldout.inputs) > 0:
        output_name = info.output_names[0] if info.output_names else None
        outputs = run_outputs(path, fmt, heldout.inputs, info.input_name, output_name=output_name)
        reference = outputs if reference_outputs is None else reference_outputs
        if len(reference) != len(outputs):
            raise ModelStoreError(
                f"{len(reference)} reference outputs for {len(outputs)} held-out inputs "
                f"while profiling {path}"
            )
        measured = fidelity(info.task, outputs, reference, heldout.labels, threshold)
    return Profile(
        size_bytes=path.stat().st_size,
        parameters=parameters,
        nonzero_parameters=nonzero,
        macs=macs,
        peak_memory_mb=peak,
        latency=latency,
        fidelity=measured,
        host=host_description(),
    )
