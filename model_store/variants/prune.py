"""Pruned variants: magnitude pruning of the weights that feed MatMul, Gemm and Conv.

* ``pruned-50`` / ``pruned-75``: the smallest weights of each tensor set to zero. ONNX stores
  tensors densely and onnxruntime's CPU kernels are dense, so these files are as large and as
  fast as the reference; only a compressed transfer or a sparse-aware runtime gains.
* ``pruned-structured``: whole hidden units removed where a layer feeds the next through
  operators that act channel by channel (bias, ReLU, pooling, ...); both weight tensors shrink,
  so the file gets smaller and the model faster.

Only weights that look learned are pruned. Fixed matrices of a feature extractor (a DFT, a
band-pooling or selection matrix) are recognised and left alone: a tensor with a handful of
distinct values, or whose rows or columns are tones (nearly all their energy in a few
frequencies), is not a trained weight, and zeroing its small entries would destroy the features.
Fidelity is reported, not enforced: the profiler decides whether a pruned variant is usable.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from agent.protocol import ModelFormat
from model_store.variants.base import BuildContext, BuiltVariant, VariantError
from model_store.variants.reference import (
    file_size,
    load_reference,
    output_error,
    percent,
    probe_inputs,
    run_outputs,
)

VARIANT = "prune"
TARGETS = {"pruned-50": 0.5, "pruned-75": 0.75}
STRUCTURED_SHARE = 0.25  # of the hidden units of each prunable layer pair
# onnxruntime's CPU convolutions work on channel blocks of 8 (AVX2, NEON) or 16 (AVX-512): a
# Conv left with 12 of 16 channels runs slower than with 16, so kept channels stay multiples of 8.
CONV_CHANNEL_ALIGN = 8
# Operand positions that may hold weights (Gemm's C is a bias, never pruned).
WEIGHT_INPUTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,), "ConvTranspose": (1,)}
ENGINEERED_DISTINCT = 16  # at most this many distinct values: a selection/pooling matrix
TONAL_SHARE = 0.05  # a row is tonal when this share of its frequencies ...
TONAL_ENERGY = 0.8  # ... holds this share of its energy
TONAL_MIN_LENGTH = 32  # shorter axes say nothing about tones
# Operators that act on each channel separately, so dropping a channel is invisible to the rest.
UNARY_CHANNEL_WISE = {
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Elu",
    "Selu",
    "HardSigmoid",
    "HardSwish",
    "Softplus",
    "Softsign",
    "Identity",
    "Log",
    "Exp",
    "Abs",
    "Neg",
    "Sqrt",
}
SPATIAL_CHANNEL_WISE = {
    "MaxPool",
    "AveragePool",
    "GlobalMaxPool",
    "GlobalAveragePool",
    "LpPool",
}  # per channel for NCHW activations
BINARY_CHANNEL_WISE = {"Add", "Sub", "Mul", "Div"}  # with a constant per-channel operand


@dataclass
class Weight:
    """One weight tensor that may be pruned: an initializer or a Constant node's value."""

    name: str
    consumers: list[str]
    values: np.ndarray
    constant_node: onnx.NodeProto | None = None  # set when the weight is a Constant's output


@dataclass
class Survey:
    """What the graph offers for pruning and what is left alone, with reasons."""

    weights: list[Weight] = field(default_factory=list)
    engineered: dict[str, str] = field(default_factory=dict)  # name -> why it is kept
    from_operators: list[str] = field(default_factory=list)  # "MatMul 'x': Transpose"


def node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} #{index}"


def looks_engineered(values: np.ndarray) -> str | None:
    """Why ``values`` looks like a fixed constant rather than a learned weight, or None."""
    distinct = np.unique(values).size
    if distinct <= ENGINEERED_DISTINCT:
        return f"only {distinct} distinct values (a selection or pooling matrix)"
    for axis in range(values.ndim):
        length = values.shape[axis]
        if length < TONAL_MIN_LENGTH:
            continue
        rows = np.moveaxis(values, axis, -1).reshape(-1, length).astype(np.float64)
        power = np.abs(np.fft.rfft(rows, axis=1)) ** 2
        top = max(1, int(np.ceil(TONAL_SHARE * power.shape[1])))
        share = np.sort(power, axis=1)[:, -top:].sum() / max(power.sum(), 1e-30)
        if share >= TONAL_ENERGY:
            return (
                f"its vectors along axis {axis} are tones ({100 * share:.0f}% of their energy "
                f"in {100 * TONAL_SHARE:.0f}% of the frequencies: a DFT or filter-bank matrix)"
            )
    return None


def survey(model: onnx.ModelProto) -> Survey:
    """Weights feeding MatMul/Gemm/Conv, split into prunable, engineered and computed ones."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    dynamic = {i.name for i in graph.input if i.name not in initializers}
    for node in graph.node:
        if any(name in dynamic for name in node.input):
            dynamic.update(node.output)
    found: dict[str, Weight] = {}
    result = Survey()
    for index, node in enumerate(graph.node):
        for position in WEIGHT_INPUTS.get(node.op_type, ()):
            if position >= len(node.input) or not node.input[position]:
                continue
            name = node.input[position]
            if name in dynamic:
                continue  # an activation, not a weight
            label = node_label(node, index)
            if name in found:
                found[name].consumers.append(label)
                continue
            values: np.ndarray | None = None
            constant: onnx.NodeProto | None = None
            if name in initializers:
                values = numpy_helper.to_array(initializers[name])
            elif name in producers and producers[name].op_type == "Constant":
                constant = producers[name]
                value = next((a for a in constant.attribute if a.name == "value"), None)
                if value is not None:
                    values = numpy_helper.to_array(value.t)
            if values is None:
                producer = producers.get(name)
                made_by = producer.op_type if producer is not None else "unknown"
                result.from_operators.append(f"{label} input {name!r} is computed by {made_by}")
                continue
            if values.dtype != np.float32 or values.ndim < 2:
                continue
            found[name] = Weight(name, [label], values, constant)
    for weight in found.values():
        reason = looks_engineered(weight.values)
        if reason:
            result.engineered[weight.name] = reason
        else:
            result.weights.append(weight)
    return result


def prune_smallest(values: np.ndarray, target: float) -> np.ndarray:
    """``values`` with its smallest-magnitude entries zeroed until ``target`` of it is zero."""
    flat = values.ravel()
    count = round(target * flat.size)
    if np.count_nonzero(flat == 0) >= count:
        return values
    pruned = flat.copy()
    pruned[np.argsort(np.abs(flat), kind="stable")[:count]] = 0
    return pruned.reshape(values.shape)


def set_weight(model: onnx.ModelProto, weight: Weight, values: np.ndarray) -> None:
    tensor = numpy_helper.from_array(values.astype(np.float32), weight.name)
    if weight.constant_node is not None:
        for node in model.graph.node:
            if list(node.output) == list(weight.constant_node.output):
                for attr in node.attribute:
                    if attr.name == "value":
                        attr.t.CopyFrom(tensor)
        return
    for init in model.graph.initializer:
        if init.name == weight.name:
            init.CopyFrom(tensor)


def compressed_size(path: Path) -> int:
    """Bytes of the file deflated at level 6, read 1 MiB at a time (not the file in memory
    twice, whole and compressed)."""
    deflate, size = zlib.compressobj(6), 0
    with path.open("rb") as fh:
        while chunk := fh.read(2**20):
            size += len(deflate.compress(chunk))
    return size + len(deflate.flush())


# -------------------------------------------------------------------------- structured pruning


@dataclass
class Slice:
    """An initializer and the axis along which a hidden unit owns ``block`` consecutive entries."""

    name: str
    axis: int
    block: int = 1


@dataclass
class Pair:
    """A layer whose output units can be removed, and the layer that reads them."""

    label: str
    units: int
    producer: list[Slice]  # the producing weight, then per-unit biases/scales on the way
    consumer: Slice


class Graph:
    """Indexes over one graph for pattern matching."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.uses: dict[str, int] = {}
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                self.consumers.setdefault(name, []).append(node)
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        self.nodes = list(graph.node)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def private_weight(self, name: str) -> bool:
        """An initializer used by exactly one node input, so it can be resliced safely."""
        return name in self.initializers and self.uses.get(name, 0) == 1

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        if tensor in self.outputs or len(users) != 1:
            return None
        return users[0]


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _producer_slice(g: Graph, node: onnx.NodeProto) -> tuple[Slice, int, int] | None:
    """The weight slice holding a layer's output units, their count, the output's channel axis."""
    if node.op_type == "MatMul" and len(node.input) == 2 and g.private_weight(node.input[1]):
        w = g.array(node.input[1])
        return (Slice(node.input[1], 1), w.shape[1], -1) if w.ndim == 2 else None
    if node.op_type == "Gemm" and g.private_weight(node.input[1]) and not _attr(node, "transA", 0):
        w = g.array(node.input[1])
        axis = 0 if _attr(node, "transB", 0) else 1
        return Slice(node.input[1], axis), w.shape[axis], -1
    if node.op_type == "Conv" and g.private_weight(node.input[1]) and _attr(node, "group", 1) == 1:
        w = g.array(node.input[1])
        return Slice(node.input[1], 0), w.shape[0], 1
    return None


def _per_channel(g: Graph, name: str, units: int, channel_axis: int) -> Slice | None:
    """A constant operand broadcast against the activation: its per-unit slice, or None if unsafe.

    ``channel_axis`` is -1 for [..., units] activations (MatMul/Gemm) and 1 for NCHW (Conv).
    An operand that does not vary by channel comes back with axis -1: nothing to slice.
    """
    if name not in g.initializers:
        return None
    values = g.array(name)
    if channel_axis == 1 and values.ndim > 4:
        return None
    axis = values.ndim - 3 if channel_axis == 1 else values.ndim - 1
    if axis < 0 or values.shape[axis] == 1:
        return Slice(name, -1)
    if values.shape[axis] == units and g.private_weight(name):
        return Slice(name, axis)
    return None


def _unit_vector(g: Graph, name: str, units: int) -> Slice | None:
    """A private 1-D parameter with one entry per unit (a Conv bias, BatchNormalization's)."""
    if g.private_weight(name) and g.array(name).shape == (units,):
        return Slice(name, 0)
    return None


def find_pairs(model: onnx.ModelProto) -> tuple[list[Pair], list[str]]:
    """Layer pairs whose hidden units can be removed, and why other layers could not."""
    g = Graph(model)
    pairs: list[Pair] = []
    blocked: list[str] = []
    for index, node in enumerate(g.nodes):
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        label = node_label(node, index)
        found = _producer_slice(g, node)
        if found is None:
            continue
        weight, units, channel_axis = found
        slices = [weight]
        if len(node.input) > 2 and node.input[2]:
            bias = (
                _unit_vector(g, node.input[2], units)
                if node.op_type == "Conv"
                else _per_channel(g, node.input[2], units, -1)
            )
            if bias is None:
                blocked.append(f"{label}: its bias is shared or not per unit")
                continue
            slices.append(bias)
        tensor = node.output[0]
        consumer: Slice | None = None
        why = "its output is used by more than one node or is a graph output"
        while (nxt := g.only_consumer(tensor)) is not None:
            op = nxt.op_type
            if len([out for out in nxt.output if out]) != 1:
                why = f"it flows into {op}, which has more than one output"
                break
            if op in UNARY_CHANNEL_WISE or (op in SPATIAL_CHANNEL_WISE and channel_axis == 1):
                tensor = nxt.output[0]
                continue
            if op == "Clip" and all(n in g.initializers or not n for n in nxt.input[1:]):
                tensor = nxt.output[0]
                continue
            if op in BINARY_CHANNEL_WISE and len(nxt.input) == 2:
                other = nxt.input[1] if nxt.input[0] == tensor else nxt.input[0]
                operand = _per_channel(g, other, units, channel_axis)
                if operand is None:
                    why = f"{op} mixes it with a tensor that is not a per-unit constant"
                    break
                slices.append(operand)
                tensor = nxt.output[0]
                continue
            if op == "BatchNormalization" and channel_axis == 1:
                params = [_unit_vector(g, n, units) for n in nxt.input[1:5]]
                if any(p is None for p in params):
                    why = "BatchNormalization with shared or non-constant parameters"
                    break
                slices.extend(p for p in params if p is not None)
                tensor = nxt.output[0]
                continue
            consumer = _consumer_slice(g, nxt, tensor, units, channel_axis)
            if consumer is None:
                why = f"it flows into {op}, which mixes channels in a way this pruner cannot follow"
            break
        if consumer is None:
            blocked.append(f"{label}: {why}")
            continue
        pairs.append(Pair(label, units, slices, consumer))
    return pairs, blocked


def _consumer_slice(
    g: Graph, node: onnx.NodeProto, tensor: str, units: int, channel_axis: int
) -> Slice | None:
    """The next layer's weight rows that read each unit of ``tensor``, if the pattern is simple."""
    block = 1
    if channel_axis == 1 and node.op_type in ("Flatten", "Reshape"):
        flat = _flattens_channels(g, node)
        after = g.only_consumer(node.output[0]) if flat else None
        if after is None:
            return None
        node, tensor, channel_axis = after, node.output[0], -1
        block = 0  # filled in from the weight's size
    if node.op_type == "Conv" and channel_axis == 1:
        if node.input[0] != tensor or _attr(node, "group", 1) != 1:
            return None
        if not g.private_weight(node.input[1]) or g.array(node.input[1]).shape[1] != units:
            return None
        return Slice(node.input[1], 1)
    if node.op_type not in ("MatMul", "Gemm") or node.input[0] != tensor or channel_axis == 1:
        return None
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return None
    if not g.private_weight(node.input[1]):
        return None
    w = g.array(node.input[1])
    if w.ndim != 2:
        return None
    axis = 1 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 0
    if block == 0:
        if w.shape[axis] % units:
            return None
        block = w.shape[axis] // units
    elif w.shape[axis] != units:
        return None
    return Slice(node.input[1], axis, block)


def _flattens_channels(g: Graph, node: onnx.NodeProto) -> bool:
    """Flatten(axis=1), or Reshape to [batch, -1]: channel c becomes one block of features."""
    if node.op_type == "Flatten":
        return bool(_attr(node, "axis", 1) == 1)
    if len(node.input) < 2 or node.input[1] not in g.initializers:
        return False
    shape = g.array(node.input[1]).tolist()
    return len(shape) == 2 and shape[1] == -1 and shape[0] in (0, 1, -1)


def _unit_rows(values: np.ndarray, piece: Slice, units: int) -> np.ndarray:
    """``values`` as [units, rest]: everything one hidden unit owns in one row."""
    return np.moveaxis(values, piece.axis, 0).reshape(units, -1)


def _keep(values: np.ndarray, piece: Slice, keep: np.ndarray) -> np.ndarray:
    if piece.axis < 0:
        return values
    if piece.block == 1:
        return np.take(values, keep, axis=piece.axis)
    index = (keep[:, None] * piece.block + np.arange(piece.block)[None, :]).ravel()
    return np.take(values, index, axis=piece.axis)


def units_to_drop(units: int, conv: bool) -> int:
    """STRUCTURED_SHARE of ``units``; for a Conv, so that a multiple of 8 channels is kept."""
    keep = units - int(STRUCTURED_SHARE * units)
    if conv and units >= CONV_CHANNEL_ALIGN:
        blocks = int(keep / CONV_CHANNEL_ALIGN + 0.5)  # to the nearest block, ties keep more
        keep = min(units, max(1, blocks) * CONV_CHANNEL_ALIGN)
    return max(0, units - max(keep, 1))


def prune_structured(
    model: onnx.ModelProto, pairs: list[Pair]
) -> tuple[onnx.ModelProto, list[str], int]:
    """Remove STRUCTURED_SHARE of each pair's units, the weakest by weight norm; return notes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    arrays = {init.name: numpy_helper.to_array(init) for init in out.graph.initializer}
    removed_params = 0
    done: list[str] = []
    for pair in pairs:
        weight, consumer = pair.producer[0], pair.consumer
        units = arrays[weight.name].shape[weight.axis]
        drop = units_to_drop(units, pair.label.startswith("Conv"))
        if drop == 0:
            continue
        # A unit matters as much as what goes in times what comes out of it.
        score = np.linalg.norm(_unit_rows(arrays[weight.name], weight, units), axis=1)
        score *= np.linalg.norm(_unit_rows(arrays[consumer.name], consumer, units), axis=1)
        keep = np.sort(np.argsort(score, kind="stable")[drop:])
        for piece in [*pair.producer, consumer]:
            before = arrays[piece.name].size
            arrays[piece.name] = _keep(arrays[piece.name], piece, keep)
            removed_params += before - arrays[piece.name].size
        done.append(f"{pair.label}: {units} -> {units - drop} units")
    for init in out.graph.initializer:
        if init.name in arrays:
            init.CopyFrom(numpy_helper.from_array(arrays[init.name], init.name))
    out.graph.ClearField("value_info")
    return out, done, removed_params


# ----------------------------------------------------------------------------------- builder


class PruneBuilder:
    """Unstructured (50%, 75%) and, where the graph allows, structured magnitude pruning."""

    name = VARIANT
    needs_calibration = False

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        model = load_reference(ctx, self.name)
        found = survey(model)
        skipped = [f"{n} ({why})" for n, why in found.engineered.items()]
        computed = "; ".join(found.from_operators)
        if not found.weights:
            if found.engineered:
                raise VariantError(
                    self.name,
                    "every weight feeding MatMul/Gemm/Conv looks like a fixed constant, not a "
                    "learned weight, and pruning it would break the model: "
                    + "; ".join(skipped)
                    + (f"; weights computed by operators: {computed}" if computed else ""),
                )
            raise VariantError(
                self.name,
                "no weight initializers feed MatMul/Gemm/Conv"
                + (
                    f" (weights come from operators: {computed}); fold them into initializers "
                    "to prune them"
                    if computed
                    else ""
                ),
            )
        probes, probe_text = probe_inputs(ctx)
        reference_out = run_outputs(ctx.reference, ctx, probes, self.name)
        common = {
            "reference_bytes": file_size(ctx.reference),
            "reference_compressed_bytes": compressed_size(ctx.reference),
            "probe": probe_text,
            "left_dense": dict(found.engineered),
            "weights_from_operators": list(found.from_operators),
        }
        shared_notes = []
        if skipped:
            shared_notes.append("left dense (fixed constants, not learned): " + "; ".join(skipped))
        if found.from_operators:
            shared_notes.append(
                "not pruned (weights computed by operators): " + "; ".join(found.from_operators)
            )

        pairs, blocked = find_pairs(model)
        fixed = set(found.engineered)
        for pair in pairs:
            if ({piece.name for piece in pair.producer} | {pair.consumer.name}) & fixed:
                blocked.append(f"{pair.label}: its weights are fixed constants")
        pairs = [
            pair
            for pair in pairs
            if not ({piece.name for piece in pair.producer} | {pair.consumer.name}) & fixed
        ]
        structured, why_not = self._structured(
            ctx, model, pairs, probes, reference_out, common, shared_notes
        )
        if structured is None:
            shared_notes.append(f"structured pruning was not possible for this graph: {why_not}")
        built = [
            self._unstructured(
                ctx, model, found, variant, target, probes, reference_out, common, shared_notes
            )
            for variant, target in TARGETS.items()
        ]
        if structured is not None:
            built.append(structured)
        return built

    def _measure(
        self, ctx: BuildContext, path: Path, probes: np.ndarray, reference_out: list[np.ndarray]
    ) -> float:
        return output_error(reference_out, run_outputs(path, ctx, probes, self.name))

    def _unstructured(
        self,
        ctx: BuildContext,
        model: onnx.ModelProto,
        found: Survey,
        variant: str,
        target: float,
        probes: np.ndarray,
        reference_out: list[np.ndarray],
        common: dict[str, Any],
        shared_notes: list[str],
    ) -> BuiltVariant:
        pruned = onnx.ModelProto()
        pruned.CopyFrom(model)
        zeros = total = 0
        per_tensor: dict[str, float] = {}
        for weight in found.weights:
            values = prune_smallest(weight.values, target)
            set_weight(pruned, weight, values)
            zeros += int(np.count_nonzero(values == 0))
            total += values.size
            per_tensor[weight.name] = round(float(np.mean(values == 0)), 4)
        path = ctx.workdir / f"{variant}.onnx"
        onnx.save(pruned, str(path))
        error = self._measure(ctx, path, probes, reference_out)
        sparsity = zeros / total
        size, packed = file_size(path), compressed_size(path)
        before = common["reference_bytes"]
        notes = [
            f"sparsity {percent(sparsity)} over {total} prunable weights in "
            f"{len(found.weights)} tensor(s): {', '.join(per_tensor)}",
            f"file {size} bytes vs {before} ({size - before:+d}): ONNX stores zeros densely and "
            "onnxruntime's CPU kernels do not skip them, so expect "
            f"no size or speed gain; compressed it is {packed} vs "
            f"{common['reference_compressed_bytes']} bytes",
            f"outputs differ from the reference by {percent(error)} (relative RMS on "
            f"{common['probe']})",
            *shared_notes,
        ]
        return BuiltVariant(
            variant=variant,
            path=path,
            format=ModelFormat.ONNX,
            precision="fp32",
            technique="prune",
            notes=tuple(notes),
            details={
                **common,
                "kind": "unstructured",
                "target_sparsity": target,
                "sparsity": sparsity,
                "prunable_weights": total,
                "sparsity_by_tensor": per_tensor,
                "size_bytes": size,
                "size_change_bytes": size - common["reference_bytes"],
                "compressed_bytes": packed,
                "output_error": error,
            },
        )

    def _structured(
        self,
        ctx: BuildContext,
        model: onnx.ModelProto,
        pairs: list[Pair],
        probes: np.ndarray,
        reference_out: list[np.ndarray],
        common: dict[str, Any],
        shared_notes: list[str],
    ) -> tuple[BuiltVariant | None, str]:
        """The structured variant, or None and why it could not be made."""
        if not pairs:
            return None, "no layer feeds another one through per-channel operators only"
        pruned, done, removed = prune_structured(model, pairs)
        if not done:
            return None, "every prunable layer is too narrow to lose a unit"
        path = ctx.workdir / "pruned-structured.onnx"
        try:
            onnx.checker.check_model(pruned, full_check=True)
            onnx.save(pruned, str(path))
            error = self._measure(ctx, path, probes, reference_out)
        except Exception as exc:  # a pattern this pruner misjudged: report, keep the others
            path.unlink(missing_ok=True)
            return None, f"removing units broke the graph ({exc})"
        size = file_size(path)
        notes = [
            f"removed about {100 * STRUCTURED_SHARE:.0f}% of the hidden units (weakest by weight "
            f"norm; Conv layers keep a multiple of {CONV_CHANNEL_ALIGN} channels) of "
            f"{len(done)} layer(s): {'; '.join(done)}; {removed} parameters fewer",
            f"file {size} bytes vs {common['reference_bytes']} "
            f"({size - common['reference_bytes']:+d})",
            f"outputs differ from the reference by {percent(error)} (relative RMS on "
            f"{common['probe']}); no fine-tuning after pruning",
            *shared_notes,
        ]
        variant = BuiltVariant(
            variant="pruned-structured",
            path=path,
            format=ModelFormat.ONNX,
            precision="fp32",
            technique="prune",
            notes=tuple(notes),
            details={
                **common,
                "kind": "structured",
                "unit_share_removed": STRUCTURED_SHARE,
                "layers": done,
                "parameters_removed": removed,
                "size_bytes": size,
                "size_change_bytes": size - common["reference_bytes"],
                "compressed_bytes": compressed_size(path),
                "output_error": error,
            },
        )
        return variant, ""
