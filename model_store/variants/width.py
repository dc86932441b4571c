"""Narrower members of the reference's own architecture, trained on its outputs.

``student-w50`` and ``student-w35`` keep the reference's graph (the same layers, kernels,
strides and residual connections) with every hidden channel count multiplied by 0.5 or 0.35,
rounded to a multiple of 8 (the channel blocking of the int8 and fp32 convolution kernels; a
count between blocks costs the next block's time anyway). This is the width multiplier of
MobileNet and EfficientNet-Lite: the family's own way of trading accuracy for arithmetic, and
1x1 convolutions, where such networks spend most of their time, shrink with its square.

The student does not start from random weights: each layer keeps the reference's channels that
carry the most weight (L1 norm of the producing convolutions, summed over every convolution
that writes the same channels through a residual Add, so the kept channels agree on both sides
of it). That is structured pruning; the part a plain prune lacks is the recovery, so the student
is then trained with TensorFlow (the ``tflite-build`` extra, controller side only) to reproduce
the reference's outputs on the building calibration inputs and on flipped or shifted copies of
them (distillation: the teacher labels every input, so no ground truth is needed). Classifier
logits are learned centred per input, as :mod:`model_store.variants.distill` explains; every
narrowed activation is also taught the teacher's values of the channels it kept (hints).

Measured (benchmarks/README.md, "Green claim"): on bearing-diagnosis's 1-D CNN ``student-w35``
keeps 0.989 accuracy at 0.147x the MACs; on MobileNetV2 (visual-inspection) 12 epochs on 1,050
calibration images reach only 0.57-0.67, below the floor (so not offered). Batch norm during
training, folded at export, was tried and did no better (0.67 / 0.47); 40 epochs of w50 reach
0.72, the loss flat from epoch 30: more calibration inputs, not epochs, look like the lever.

Supported graphs: convolutions (plain and depthwise), Relu, Clip, Add, GlobalAveragePool,
Flatten, Gemm, and a Reshape of the graph input (1-D signals as images of height 1). Anything
else is refused by name: a narrower copy of an operator this module does not understand would
be wrong silently. Training is seeded and TensorFlow's op determinism is on, so the same
reference, calibration file, code and host give byte-identical students.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from agent.protocol import ModelFormat, Task
from model_store.variants.base import BuildContext, BuiltVariant, VariantError
from model_store.variants.reference import (
    calibration_inputs,
    file_size,
    load_reference,
)

VARIANT = "student-width"
WIDTHS = {"student-w50": 0.5, "student-w35": 0.35}
BLOCK = 8
SEED = 20261207
EPOCHS = 12
BATCH = 32
LEARNING_RATE = 3e-3
MIN_SAMPLES = 100
SUPPORTED = {"Conv", "Relu", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Reshape"}
PASS_THROUGH = {"Relu", "Clip", "Identity", "GlobalAveragePool", "Flatten"}


def scaled(channels: int, width: float) -> int:
    """A hidden channel count times ``width``, rounded to the kernel's block of 8, at least 8."""
    return min(channels, max(BLOCK, round(channels * width / BLOCK) * BLOCK))


@dataclass
class _Groups:
    """Tensors whose channel axis must keep the same channels (union-find over tensor names)."""

    parent: dict[str, str] = field(default_factory=dict)

    def find(self, name: str) -> str:
        root = self.parent.setdefault(name, name)
        while root != self.parent[root]:
            root = self.parent[root]
        self.parent[name] = root
        return root

    def join(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def check_graph(model: onnx.ModelProto, variant: str = VARIANT) -> None:
    """VariantError naming the first operator or pattern a width student cannot scale."""
    graph_inputs = {i.name for i in model.graph.input}
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in SUPPORTED and node.op_type != "Identity":
            raise VariantError(
                variant,
                f"operator {node.op_type} ({node.name}) is not one a width multiplier can scale "
                f"(supported: {', '.join(sorted(SUPPORTED))})",
            )
        if node.op_type == "Reshape" and node.input[0] not in graph_inputs:
            raise VariantError(variant, f"{node.name}: only the graph input may be reshaped")
        if node.op_type == "Conv":
            w = weights.get(node.input[1])
            group = int(_attrs(node).get("group", 1))
            if w is None or w.ndim != 4:
                raise VariantError(variant, f"{node.name}: needs a constant 2-D weight")
            if group != 1 and not (w.shape[1] == 1 and w.shape[0] == group):
                raise VariantError(variant, f"{node.name}: grouped convolution (group={group})")
        if node.op_type == "Gemm":
            a = _attrs(node)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise VariantError(variant, f"{node.name}: Gemm with transA/alpha/beta")
            if node.input[1] not in weights:
                raise VariantError(variant, f"{node.name}: needs a constant weight")


@dataclass
class Plan:
    """Which channels of each group a student of one width keeps."""

    keep: dict[str, np.ndarray]  # group root -> sorted channel indices
    fixed: set[str]  # groups that keep every channel (graph input and output side)
    groups: dict[str, str] = field(default_factory=dict)  # tensor -> its group's root

    def kept(self, tensor: str) -> np.ndarray | None:
        """The channels of ``tensor`` the student keeps; None when it keeps them all."""
        return self.keep.get(self.groups.get(tensor, tensor))


def plan_channels(model: onnx.ModelProto, width: float) -> Plan:
    """Group tensors that share channels, rank each group's channels, keep the heaviest."""
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    groups = _Groups()
    fixed_tensors = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    importance: dict[str, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for node in model.graph.node:
        out = node.output[0]
        if node.op_type in PASS_THROUGH:
            groups.join(out, node.input[0])
        elif node.op_type == "Add":
            groups.join(out, node.input[0])
            groups.join(out, node.input[1])
        elif node.op_type == "Reshape":
            fixed_tensors.add(out)
        elif node.op_type == "Conv" and int(_attrs(node).get("group", 1)) != 1:
            groups.join(out, node.input[0])  # depthwise: channel c in, channel c out
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            root = groups.find(node.output[0])
            norm = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
            importance[root] = importance.get(root, 0) + norm
            sizes[root] = w.shape[0]
        elif node.op_type == "Gemm":
            groups.find(node.output[0])
    fixed = {groups.find(t) for t in fixed_tensors}
    # The head: a Gemm's output is the model's answer, as wide as the reference's.
    fixed |= {groups.find(n.output[0]) for n in model.graph.node if n.op_type == "Gemm"}
    keep = {}
    for root, score in importance.items():
        if root in fixed:
            continue
        count = scaled(sizes[root], width)
        # Heaviest first; ties by index, so the plan is the same on every host.
        order = np.lexsort((np.arange(len(score)), -score))
        keep[root] = np.sort(order[:count])
    tensors = {t for n in model.graph.node for t in (*n.input, *n.output) if t}
    return Plan(keep, fixed, {t: groups.find(t) for t in tensors})


def narrow(model: onnx.ModelProto, plan: Plan) -> onnx.ModelProto:
    """The reference with each group's dropped channels cut out of every weight touching it."""
    kept = plan.kept
    result = onnx.ModelProto()
    result.CopyFrom(model)
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    new = dict(weights)
    for node in model.graph.node:
        if node.op_type == "Conv":
            w = weights[node.input[1]]
            out_keep, in_keep = kept(node.output[0]), kept(node.input[0])
            depthwise = int(_attrs(node).get("group", 1)) != 1
            if out_keep is not None:
                w = w[out_keep]
            if in_keep is not None and not depthwise:
                w = w[:, in_keep]
            new[node.input[1]] = w
            if len(node.input) > 2 and node.input[2] and out_keep is not None:
                new[node.input[2]] = weights[node.input[2]][out_keep]
        elif node.op_type == "Gemm":
            in_keep = kept(node.input[0])
            if in_keep is not None:
                trans_b = int(_attrs(node).get("transB", 0))
                b = weights[node.input[1]]
                new[node.input[1]] = b[:, in_keep] if trans_b else b[in_keep]
    # A depthwise convolution has one group per channel it keeps.
    for node in result.graph.node:
        if node.op_type == "Conv" and int(_attrs(node).get("group", 1)) != 1:
            for a in node.attribute:
                if a.name == "group":
                    a.i = int(new[node.input[1]].shape[0])
    del result.graph.initializer[:]
    result.graph.initializer.extend(
        numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in new.items()
    )
    del result.graph.value_info[:]
    return result


# ----------------------------------------------------------------------------------- training


def _tf() -> Any:
    try:
        import tensorflow as tf
    except ImportError:
        raise VariantError(
            VARIANT,
            "TensorFlow is not installed; pip install 'greenfleet[tflite-build]' on the "
            "controller to train width students",
        ) from None
    return tf


class _Trainable:
    """The narrowed ONNX graph as a TensorFlow computation over variables (NHWC inside)."""

    def __init__(self, tf: Any, model: onnx.ModelProto) -> None:
        self.tf = tf
        self.model = model
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.constants = weights
        self.variables: dict[str, Any] = {}
        for node in model.graph.node:
            if node.op_type == "Conv":
                w = weights[node.input[1]]
                if int(_attrs(node).get("group", 1)) != 1:
                    hwio = w.transpose(2, 3, 0, 1)  # (C, 1, kh, kw) -> (kh, kw, C, 1)
                else:
                    hwio = w.transpose(2, 3, 1, 0)
                self.variables[node.input[1]] = tf.Variable(hwio.astype(np.float32))
                if len(node.input) > 2 and node.input[2]:
                    self.variables[node.input[2]] = tf.Variable(weights[node.input[2]])
            elif node.op_type == "Gemm":
                for name in node.input[1:]:
                    if name:
                        self.variables[name] = tf.Variable(weights[name].astype(np.float32))

    def __call__(self, x: Any, taps: tuple[str, ...] = ()) -> tuple[Any, list[Any]]:
        """The graph's output for a batch ``x``, and the tensors named in ``taps`` (NHWC)."""
        tf = self.tf
        graph = self.model.graph
        env: dict[str, Any] = {}
        source = graph.input[0].name
        rank = len(graph.input[0].type.tensor_type.shape.dim)
        env[source] = tf.transpose(x, [0, 2, 3, 1]) if rank == 4 else x
        for node in graph.node:
            a = _attrs(node)
            ins: list[Any] = [env.get(i) for i in node.input]
            if node.op_type == "Reshape":
                shape = [int(d) for d in self.constants[node.input[1]]]
                y = tf.reshape(ins[0], [-1, *shape[1:]])
                y = tf.transpose(y, [0, 2, 3, 1]) if len(shape) == 4 else y
            elif node.op_type == "Conv":
                top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
                data = tf.pad(ins[0], [(0, 0), (top, bottom), (left, right), (0, 0)])
                strides = [1, *a.get("strides", [1, 1]), 1]
                kernel = self.variables[node.input[1]]
                if int(a.get("group", 1)) != 1:
                    y = tf.nn.depthwise_conv2d(data, kernel, strides, "VALID")
                else:
                    y = tf.nn.conv2d(data, kernel, strides, "VALID")
                if len(node.input) > 2 and node.input[2]:
                    y = tf.nn.bias_add(y, self.variables[node.input[2]])
            elif node.op_type == "Relu":
                y = tf.nn.relu(ins[0])
            elif node.op_type == "Clip":
                low, high = (
                    float(self.constants[node.input[k]].reshape(-1)[0])
                    if len(node.input) > k and node.input[k]
                    else bound
                    for k, bound in ((1, -np.inf), (2, np.inf))
                )
                y = tf.clip_by_value(ins[0], low, high)
            elif node.op_type == "Add":
                y = ins[0] + ins[1]
            elif node.op_type == "GlobalAveragePool":
                y = tf.reduce_mean(ins[0], axis=[1, 2], keepdims=True)
            elif node.op_type == "Flatten":
                y = tf.reshape(ins[0], [tf.shape(ins[0])[0], -1])
            elif node.op_type == "Gemm":
                b = self.variables[node.input[1]]
                y = tf.matmul(ins[0], b, transpose_b=bool(a.get("transB", 0)))
                if len(node.input) > 2 and node.input[2]:
                    y = y + self.variables[node.input[2]]
            else:  # Identity
                y = ins[0]
            env[node.output[0]] = y
        return env[graph.output[0].name], [env[t] for t in taps]

    def export(self) -> onnx.ModelProto:
        """The ONNX graph with the trained weights, in ONNX layouts."""
        result = onnx.ModelProto()
        result.CopyFrom(self.model)
        conv_weights = {n.input[1]: n for n in self.model.graph.node if n.op_type == "Conv"}
        for init in result.graph.initializer:
            if init.name not in self.variables:
                continue
            value = self.variables[init.name].numpy()
            node = conv_weights.get(init.name)
            if node is not None:
                if int(_attrs(node).get("group", 1)) != 1:
                    value = value.transpose(2, 3, 0, 1)
                else:
                    value = value.transpose(3, 2, 0, 1)
            init.CopyFrom(
                numpy_helper.from_array(np.ascontiguousarray(value, np.float32), init.name)
            )
        return result


def _augment(inputs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One fresh copy of every input: images flipped and turned, signals shifted and rescaled.

    The teacher labels each copy itself, so a transform may even change the true class; it
    only has to keep inputs like those the device will see.
    """
    out = inputs.copy()
    n = len(out)
    if out.ndim == 4:
        flip_h, flip_v = rng.random(n) < 0.5, rng.random(n) < 0.5
        out[flip_h] = out[flip_h, :, :, ::-1]
        out[flip_v] = out[flip_v, :, ::-1, :]
        if out.shape[2] == out.shape[3]:
            turn = rng.random(n) < 0.5
            out[turn] = out[turn].transpose(0, 1, 3, 2)
    else:
        shifts = rng.integers(out.shape[-1], size=n)
        for i, s in enumerate(shifts):
            out[i] = np.roll(out[i], int(s), axis=-1)
        out *= np.exp(rng.uniform(np.log(0.8), np.log(1.25), size=(n,) + (1,) * (out.ndim - 1)))
    return out.astype(np.float32)


def hint_tensors(student: onnx.ModelProto, plan: Plan) -> tuple[str, ...]:
    """The student's narrowed activations (after Relu, Clip or a residual Add): where it is
    taught the teacher's values of the channels it kept, not only the final outputs."""
    return tuple(
        n.output[0]
        for n in student.graph.node
        if n.op_type in ("Relu", "Clip", "Add") and plan.kept(n.output[0]) is not None
    )


def train(
    ctx: BuildContext,
    reference: onnx.ModelProto,
    plan: Plan,
    inputs: np.ndarray,
    epochs: int = EPOCHS,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Fit the narrowed reference to the reference; the trained graph and a summary.

    The loss is the outputs' mean squared error (classifier logits centred per input) plus
    the hint loss: at every narrowed activation, the squared error against the teacher's
    values of the same channels, divided by their variance. A deep network trained without
    batch norm from a pruned start learns slowly from its outputs alone (MobileNetV2 at width
    0.5: 54% of held-out decisions after 12 epochs); the hints tell every layer what to do.
    """
    tf = _tf()
    tf.config.experimental.enable_op_determinism()
    tf.random.set_seed(SEED)
    rng = np.random.default_rng(SEED)
    classifier = ctx.info.task is Task.CLASSIFICATION
    student = narrow(reference, plan)
    net, teacher = _Trainable(tf, student), _Trainable(tf, reference)
    hints = hint_tensors(student, plan)
    kept = [tf.constant(plan.kept(h), dtype=tf.int32) for h in hints]
    variables = list(net.variables.values())
    steps = epochs * max(1, len(inputs) // BATCH)
    schedule = tf.keras.optimizers.schedules.CosineDecay(LEARNING_RATE, steps)
    optimizer = tf.keras.optimizers.Adam(schedule)

    def flat(out: Any, x: Any) -> Any:
        out = tf.reshape(out, [tf.shape(x)[0], -1])
        return out - tf.reduce_mean(out, axis=1, keepdims=True) if classifier else out

    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
    def step(x: Any) -> Any:
        want, want_taps = teacher(x, hints)
        want = tf.stop_gradient(flat(want, x))
        with tf.GradientTape() as tape:
            got, got_taps = net(x, hints)
            loss = tf.reduce_mean(tf.square(flat(got, x) - want))
            for s_tap, t_tap, keep in zip(got_taps, want_taps, kept, strict=True):
                t_kept = tf.stop_gradient(tf.gather(t_tap, keep, axis=-1))
                scale = tf.math.reduce_variance(t_kept) + 1e-6
                loss += tf.reduce_mean(tf.square(s_tap - t_kept)) / scale / max(1, len(hints))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    losses = []
    for epoch in range(epochs):
        x = inputs if epoch == 0 else _augment(inputs, rng)
        order = rng.permutation(len(x))
        epoch_losses = [
            float(step(tf.constant(x[order[start : start + BATCH]])))
            for start in range(0, len(x) - BATCH + 1, BATCH)
        ]
        losses.append(float(np.mean(epoch_losses)))
    summary = {"epochs": epochs, "steps": steps, "hints": len(hints), "loss_by_epoch": losses}
    return net.export(), summary


def _quantized(ctx: BuildContext, student: Path, variant: str) -> BuiltVariant:
    """The student composed with static int8 (QDQ, per-channel weights): ``<variant>-int8``.

    Built by the same quantizer, node search and tolerance as ``int8-static-qdq``, judged
    against the student it starts from; the pipeline then judges it against the reference.
    """
    from onnxruntime.quantization import QuantFormat

    from model_store.variants.quantize import StaticInt8Builder

    name = f"{variant}-int8"

    class _StudentInt8(StaticInt8Builder):
        FORMATS = {name: QuantFormat.QDQ}

    workdir = ctx.workdir / name
    workdir.mkdir(exist_ok=True)
    (quantized,) = _StudentInt8().build(replace(ctx, reference=student, workdir=workdir))
    return replace(
        quantized,
        technique="distill-width+quantize-static",
        notes=(f"{variant} quantized to int8 (QDQ)", *quantized.notes),
        details={**quantized.details, "student": variant},
    )


class WidthStudentBuilder:
    """``student-w50`` and ``student-w35`` (see the module docstring)."""

    name = "width"
    needs_calibration = True

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        inputs = calibration_inputs(ctx, VARIANT, MIN_SAMPLES)
        reference = load_reference(ctx, VARIANT)
        check_graph(reference)
        _tf()
        built: list[BuiltVariant] = []
        for variant, width in WIDTHS.items():
            started = time.monotonic()
            plan = plan_channels(reference, width)
            if not plan.keep:
                raise VariantError(variant, "the graph has no hidden channels to narrow")
            student, summary = train(ctx, reference, plan, inputs)
            path = ctx.workdir / f"{variant}.onnx"
            onnx.save(student, str(path))
            seconds = time.monotonic() - started
            before, after = file_size(ctx.reference), file_size(path)
            kept = sum(len(k) for k in plan.keep.values())
            notes = (
                f"the reference's graph at width {width}: {len(plan.keep)} channel groups "
                f"narrowed to multiples of {BLOCK} ({kept} channels kept), the heaviest "
                "channels kept as the starting point",
                f"trained on {len(inputs)} calibration inputs and {summary['epochs'] - 1} "
                f"flipped/shifted copies of them, labelled by the reference ({seconds:.0f} s)",
                f"file {after} bytes vs {before} ({before / after:.1f}x smaller)",
            )
            student_variant = BuiltVariant(
                variant=variant,
                path=path,
                format=ModelFormat.ONNX,
                precision="fp32",
                technique="distill-width",
                notes=notes,
                details={
                    "width": width,
                    "block": BLOCK,
                    "channels_kept": kept,
                    "seed": SEED,
                    "seconds": round(seconds, 1),
                    "calibration_used": len(inputs),
                    **summary,
                },
            )
            try:
                composed = _quantized(ctx, path, variant)
            except VariantError as exc:
                note = f"not built: {variant}-int8: {exc.reason}"
                built.append(replace(student_variant, notes=(*student_variant.notes, note)))
                continue
            built += [student_variant, composed]
        return built
