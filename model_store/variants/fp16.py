"""The fp16 variant: float16 weights and activations, float32 inputs and outputs.

The agent feeds every variant like the reference, so Cast nodes at the graph's edges keep the
float32 interface. Nodes whose activations would overflow float16 on representative inputs stay
float32 (their weights are still stored as float16). onnxruntime's CPU provider runs most fp16
operators by casting to float32, so on x86 the gain is file size; the speed-up needs a device
with float16 arithmetic.

"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.protocol import ModelFormat
from model_store.shapes import infer_shapes
from model_store.variants.base import BuildContext, BuiltVariant, VariantError
from model_store.variants.reference import (
    file_size,
    load_reference,
    output_error,
    percent,
    probe_inputs,
    run_outputs,
    session,
)

FP16_MAX = 65504.0
# Activations beyond this stay float32: probe inputs do not show the true peak, so leave 8x room.
FP16_SAFE = FP16_MAX / 8
FP16_TOLERANCE = 0.01  # relative RMS output error above which the fp16 variant is refused
# Inputs that ONNX requires to be float32 whatever the rest of the graph uses.
FLOAT32_ONLY_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
# Operators whose output type comes from an attribute; they stay float32 rather than be rewritten.
DTYPE_ATTRIBUTE_OPS = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "EyeLike",
    "Multinomial",
    "Bernoulli",
}


class Fp16Builder:
    """Float16 weights and arithmetic behind a float32 interface."""

    name = "fp16"
    needs_calibration = False

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        model = load_reference(ctx, self.name)
        probes, probe_text = probe_inputs(ctx)
        reference_out = run_outputs(ctx.reference, ctx, probes, self.name)
        peaks = activation_peaks(model, ctx, probes)
        try:
            converted, report = to_float16(model, peaks)
        except VariantError:
            raise
        except Exception as exc:  # a malformed graph surfaces as onnx errors of many kinds
            raise VariantError(self.name, f"float16 conversion failed: {exc}") from exc
        out = ctx.workdir / "fp16.onnx"
        onnx.save(converted, str(out))
        error = output_error(reference_out, run_outputs(out, ctx, probes, self.name))
        if error > FP16_TOLERANCE:
            raise VariantError(
                self.name,
                f"outputs differ from the reference by {percent(error)} (relative RMS on "
                f"{probe_text}; at most {percent(FP16_TOLERANCE)} accepted): the model needs "
                "float32 precision somewhere",
            )
        before, after = file_size(ctx.reference), file_size(out)
        notes = [
            f"weights stored as float16, inputs and outputs stay float32; file {after} bytes "
            f"vs {before} ({after / before:.2f}x)",
            f"outputs within {percent(error)} of the reference (relative RMS on {probe_text})",
            "onnxruntime's CPU provider computes most float16 operators through float32 casts: "
            "expect no speed-up on x86 CPUs, only on hardware with float16 arithmetic",
        ]
        if report.kept_fp32:
            notes.append(
                f"{len(report.kept_fp32)} node(s) compute in float32: "
                + "; ".join(f"{node} ({why})" for node, why in report.kept_fp32.items())
            )
        if report.fp32_weights:
            notes.append(
                "weights beyond float16 range stay float32: " + ", ".join(report.fp32_weights)
            )
        if report.flushed:
            notes.append(f"{report.flushed} tiny weight value(s) became 0 in float16")
        return [
            BuiltVariant(
                variant="fp16",
                path=out,
                format=ModelFormat.ONNX,
                precision="mixed" if report.kept_fp32 else "fp16",
                technique="fp16",
                notes=tuple(notes),
                details={
                    "output_error": error,
                    "tolerance": FP16_TOLERANCE,
                    "probe": probe_text,
                    "size_bytes": after,
                    "reference_bytes": before,
                    "size_change_bytes": after - before,
                    "fp32_nodes": dict(report.kept_fp32),
                    "fp32_weights": list(report.fp32_weights),
                    "flushed_to_zero": report.flushed,
                },
            )
        ]


# ------------------------------------------------------------------------------- the conversion


class ConversionReport:
    """What the conversion left in float32 or had to change."""

    def __init__(self) -> None:
        self.kept_fp32: dict[str, str] = {}  # node label -> why it computes in float32
        self.fp32_weights: list[str] = []  # weights too large for float16
        self.flushed = 0  # nonzero weight values too small for float16, now zero


def node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} #{index}"


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor in the main graph, from ONNX shape inference."""
    inferred, _ = infer_shapes(model)
    graph = inferred.graph
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def activation_peaks(
    model: onnx.ModelProto, ctx: BuildContext, probes: np.ndarray
) -> dict[str, float]:
    """Largest magnitude of every float32 tensor over the probe inputs (weights included)."""
    peaks = {
        init.name: float(np.max(np.abs(numpy_helper.to_array(init)), initial=0.0))
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT
    }
    try:
        types = tensor_types(model)
    except Exception as exc:
        raise VariantError("fp16", f"ONNX shape inference fails on the reference: {exc}") from exc
    outputs = {o.name for o in model.graph.output}
    names = [
        name
        for node in model.graph.node
        for name in node.output
        if name and name not in outputs and types.get(name) == TensorProto.FLOAT
    ]
    # Every tensor is made an output of the model itself for one serialization, then the
    # outputs are taken off again: a copy of the model would hold every weight once more.
    kept = len(model.graph.output)
    model.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in names
    )
    try:
        exposed = model.SerializeToString()
    finally:
        del model.graph.output[kept:]
    sess = session(exposed, "fp16")
    del exposed
    fetch = [o.name for o in sess.get_outputs()]
    for i in range(len(probes)):
        values = sess.run(fetch, {ctx.info.input_name: probes[i : i + 1]})
        for name, value in zip(fetch, values, strict=True):
            arr = np.abs(np.asarray(value, dtype=np.float64))
            peak = float(np.max(np.where(np.isnan(arr), 0.0, arr), initial=0.0))
            peaks[name] = max(peaks.get(name, 0.0), peak)
    probe_in = np.abs(probes.astype(np.float64))
    peaks[ctx.info.input_name] = float(np.max(probe_in, initial=0.0))
    return peaks


def _fresh_name(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def to_float16(
    model: onnx.ModelProto, peaks: dict[str, float]
) -> tuple[onnx.ModelProto, ConversionReport]:
    """A float16 copy of ``model`` with float32 graph inputs and outputs.

    Every float32 tensor gets a home type: graph inputs stay float32, weights are stored as
    float16 (unless too large), node outputs take the node's compute type. A node computes in
    float32 when a tensor it touches peaks above FP16_SAFE, else in float16; Cast nodes bridge
    wherever a tensor's home type differs from what its consumer computes in.
    """
    report = ConversionReport()
    types = tensor_types(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for node in graph.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise VariantError(
                "fp16", f"control flow ({node.op_type}) is not supported by the float16 converter"
            )

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == TensorProto.FLOAT

    graph_outputs = {o.name for o in graph.output}
    float32_only = {
        node.input[i]
        for node in graph.node
        for i in FLOAT32_ONLY_INPUTS.get(node.op_type, ())
        if i < len(node.input)
    }
    home: dict[str, int] = {i.name: TensorProto.FLOAT for i in graph.input}
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = numpy_helper.to_array(init)
        if init.name in float32_only or init.name in graph_outputs:
            home[init.name] = TensorProto.FLOAT
        elif np.max(np.abs(values), initial=0.0) > FP16_MAX:
            home[init.name] = TensorProto.FLOAT
            report.fp32_weights.append(init.name)
        else:
            half = values.astype(np.float16)
            report.flushed += int(np.sum((half == 0) & (values != 0)))
            init.CopyFrom(numpy_helper.from_array(half, init.name))
            home[init.name] = TensorProto.FLOAT16

    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= set(home)
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            suffix = "fp16" if to == TensorProto.FLOAT16 else "fp32"
            casts[key] = _fresh_name(f"{name}_{suffix}", taken)
            nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to))
        return casts[key]

    # Graph outputs computed in float16 are renamed inside the graph and cast back at the end.
    alias: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        floats = [n for n in (*node.input, *node.output) if is_float(n)]
        if not floats:
            nodes.append(node)
            continue
        big = [n for n in floats if not peaks.get(n, 0.0) <= FP16_SAFE]  # NaN/inf count as big
        keep = node.op_type in DTYPE_ATTRIBUTE_OPS or bool(big)
        compute = TensorProto.FLOAT if keep else TensorProto.FLOAT16
        if big:
            report.kept_fp32[node_label(node, index)] = (
                f"{big[0]} reaches {peaks.get(big[0], 0.0):.3g} on the probe inputs, "
                f"above {FP16_SAFE:.0f}"
            )
        elif keep:
            report.kept_fp32[node_label(node, index)] = "its output type is an attribute"
        for i, name in enumerate(node.input):
            if not is_float(name):
                continue
            want = TensorProto.FLOAT if i in FLOAT32_ONLY_INPUTS.get(node.op_type, ()) else compute
            if home.get(name, want) != want:
                node.input[i] = cast(name, want)
        for i, name in enumerate(node.output):
            if not is_float(name):
                continue
            if compute == TensorProto.FLOAT16 and name in graph_outputs:
                alias[name] = node.output[i] = _fresh_name(f"{name}_fp16", taken)
                types[alias[name]] = TensorProto.FLOAT
                name = alias[name]
            home[name] = compute
        if not keep:
            _attributes_to_float16(node)
        nodes.append(node)
    for name, internal in alias.items():
        nodes.append(helper.make_node("Cast", [internal], [name], to=TensorProto.FLOAT))
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")
    onnx.checker.check_model(out)
    return out, report


def _attributes_to_float16(node: onnx.NodeProto) -> None:
    """Rewrite attributes that carry a float32 type or value for a node now computing in fp16."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(attr.t).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
