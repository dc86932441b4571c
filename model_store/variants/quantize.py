"""int8 variants from onnxruntime's quantizer: dynamic (no data needed) and static (calibrated).

Quantizing every node first; when that moves the outputs more than QUANT_TOLERANCE from the
reference, a small search leaves the most sensitive nodes in float32: each candidate node is
quantized alone to measure its damage, then nodes are left out, worst first, until the outputs
are close enough. A node the quantizer or onnxruntime refuses is left out the same way, so one
odd operator costs a node, not the variant. Feature-extraction graphs (a log of band powers, as
in vibration-ae) are where this matters: int8 noise in a small band power becomes a large error
after the log.

Weights are int8 with ``reduce_range`` (-64..64), in both builders. onnxruntime's U8S8 kernels
on x86 without VNNI (AVX2, AVX-512F) add uint8 x int8 products in pairs into int16 (VPMADDUBSW),
which saturates once a pair passes 32767 (2 x 255 x 127 can); 2 x 255 x 64 = 32640 always fits.
VNNI and Arm sum into int32 and never saturate, so there 7 bits cost a little precision and no
time (onnxruntime's quantization guide prescribes exactly this). Without it the same file is
accurate on one host and wrong on another, and the search below keeps a different node set
depending on the build host. Measured on vibration-ae (int8-dynamic, relative RMS of the score
on 32 calibration windows, each DFT MatMul quantized alone; "exact" is MatMulInteger evaluated
in float64, what a VNNI or Arm host computes):

    weights            DFT cos / sin alone     search on AVX2              search, exact
    int8               17.76% / 25.82% (AVX2)  DFT float32: 1.93%, 1.00x   per-channel 1.69%, 0.28x
                       0.97% / 1.05% (exact)
    int8 reduce_range  1.78% / 1.58% (both)    per-channel 2.62%, 0.28x    the same
    uint8 (U8U8)       1.10% / 1.08% (both)    per-tensor 2.63%, 0.28x     the same

U8U8 is as accurate but runs onnxruntime's slower uint8 x uint8 kernels on x86 (the AVX-512
VNNI dot product takes uint8 x int8). The band-power MatMul stays float32 whatever the setting
(over 11000% alone). The static builder saw the same on a small CNN: its first Conv quantized alone
moved the logits by 8.74% per-channel on AVX2 against 0.60% exact; with reduce_range 0.98% on
both, and the calibrated CNN's error with every node quantized fell from 4.63% to 1.49%.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.registry import (
    IntegerOpsRegistry,
    QDQRegistry,
    QLinearOpsRegistry,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from agent.protocol import ModelFormat
from model_store.variants.base import BuildContext, BuiltVariant, VariantError
from model_store.variants.reference import (
    calibration_inputs,
    file_size,
    load_reference,
    output_error,
    percent,
    probe_inputs,
    run_outputs,
)

log = logging.getLogger(__name__)

QUANT_TOLERANCE = 0.05  # relative RMS output error a quantized variant may reach on probe inputs
MAX_SEARCH_NODES = 48  # beyond this many candidate nodes, skip the per-node search (time)
MAX_CALIBRATION = 256  # calibration samples used for activation ranges
# Unsigned activations and signed weights (U8S8) are onnxruntime's recommendation for x86 CPUs.
ACTIVATION_TYPE = QuantType.QUInt8
WEIGHT_TYPE = QuantType.QInt8
# 7-bit weights, so U8S8 cannot saturate int16 on x86 without VNNI (see the module docstring).
REDUCE_RANGE = True
# Operators that run on integers once quantized (QOperator format and dynamic quantization).
INTEGER_OPS = {
    "MatMulInteger",
    "ConvInteger",
    "QGemm",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM",
    "QAttention",
    "MatMulIntegerToFloat",
}
STATIC_OPS = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
# quantize_dynamic turns Gemm into MatMul (+ Add) first, so Gemm nodes are candidates too.
DYNAMIC_OPS = sorted(set(IntegerOpsRegistry) | {"Gemm"})
# Newer onnxruntime can reuse activation ranges between quantize_static calls; the node search
# quantizes the same model many times, so calibrate once when it can.
RANGES_CACHE = "calibration_cache_path" in inspect.signature(quantize_static).parameters


class Refused(Exception):
    """The quantizer or onnxruntime could not handle a node set; the message says why."""


@dataclass
class Attempt:
    """One quantized model and how far its outputs are from the reference."""

    path: Path
    excluded: tuple[str, ...]
    error: float


@dataclass
class Outcome:
    """The chosen attempt and what the search learned on the way."""

    attempt: Attempt
    setting: str
    full_error: float | None  # error with every node quantized; None if that was refused
    left_out: dict[str, str] = field(default_factory=dict)  # node -> why it stayed float32
    remark: str = ""  # anything else a person should know about the choice


class Samples(CalibrationDataReader):  # type: ignore[misc]
    """Calibration inputs fed one sample at a time, as the agent feeds the model."""

    def __init__(self, input_name: str, inputs: np.ndarray) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = (
            {input_name: inputs[i : i + 1]} for i in range(len(inputs))
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def prepare(ctx: BuildContext, variant: str, optimize: bool) -> tuple[Path, list[onnx.NodeProto]]:
    """The reference after onnxruntime's quantization pre-processing, every node named.

    Symbolic shape inference (it needs sympy) is skipped: edge models have static shapes,
    which ONNX shape inference covers.
    """
    load_reference(ctx, variant)
    prepared = ctx.workdir / f"{variant}-prepared.onnx"
    try:
        quant_pre_process(
            str(ctx.reference),
            str(prepared),
            skip_optimization=not optimize,
            skip_symbolic_shape=True,
        )
        model = onnx.load(str(prepared))
    except Exception as exc:
        raise VariantError(variant, f"quantization pre-processing failed: {exc}") from exc
    constants_to_initializers(model)
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    onnx.save(model, str(prepared))
    return prepared, list(model.graph.node)


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn Constant nodes holding a tensor into initializers: the quantizers only see those."""
    kept = []
    for node in model.graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def candidates(nodes: list[onnx.NodeProto], op_types: list[str]) -> list[onnx.NodeProto]:
    return [node for node in nodes if node.op_type in op_types]


def aliases(node: onnx.NodeProto) -> list[str]:
    """Names a node may carry when the quantizer sees it (a Gemm becomes NAME_MatMul)."""
    return [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]


def quantized_ops(path: Path) -> Counter[str]:
    """Operators that compute on quantized data.

    Integer operators (QOperator format, dynamic quantization), or in QDQ form a float operator
    whose weight is stored as int8 and dequantized (onnxruntime fuses those into integer kernels
    when it loads the model). Operators that merely sit between Q/DQ pairs are not counted.
    """
    graph = onnx.load(str(path)).graph
    weights = {init.name for init in graph.initializer}
    dequantized_weights = {
        node.output[0]
        for node in graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in weights
    }
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if (
            node.op_type in INTEGER_OPS
            or node.op_type.startswith("QLinear")
            or any(name in dequantized_weights for name in node.input)
        ):
            counts[node.op_type] += 1
    return counts


class Search:
    """Quantize, compare with the reference, and leave sensitive or refused nodes in float32."""

    def __init__(
        self,
        ctx: BuildContext,
        variant: str,
        quantize: Callable[[Path, list[str] | None, list[str], bool], None],
        nodes: list[onnx.NodeProto],
        probes: np.ndarray,
        reference_out: list[np.ndarray],
    ) -> None:
        self.ctx = ctx
        self.variant = variant
        self.quantize = quantize
        self.nodes = nodes
        self.probes = probes
        self.reference_out = reference_out
        self.trial = ctx.workdir / f"{variant}-trial.onnx"

    def attempt(
        self, out: Path, only: list[str] | None, excluded: tuple[str, ...], per_channel: bool
    ) -> Attempt:
        """Quantize (only ``only``, or all but ``excluded``) and measure; Refused on failure."""
        by_name = {node.name: node for node in self.nodes}
        names = [a for n in excluded for a in aliases(by_name[n])]
        quantize_only = None if only is None else [a for n in only for a in aliases(by_name[n])]
        try:
            self.quantize(out, quantize_only, names, per_channel)
        except Exception as exc:  # the quantizer raises ValueError, KeyError, AssertionError...
            raise Refused(f"the quantizer failed: {type(exc).__name__}: {exc}") from exc
        try:
            got = run_outputs(out, self.ctx, self.probes, self.variant)
        except VariantError as exc:
            raise Refused(exc.reason) from exc
        return Attempt(out, excluded, output_error(self.reference_out, got))

    def run(self) -> Outcome:
        """The best attempt: everything quantized if close enough, else a searched subset."""
        full: dict[bool, Attempt] = {}
        refusal = ""
        for per_channel in (True, False):
            out = self.ctx.workdir / f"{self.variant}-pc{int(per_channel)}.onnx"
            try:
                full[per_channel] = self.attempt(out, None, (), per_channel)
            except Refused as exc:
                refusal = str(exc)
        per_channel = min(full, key=lambda pc: full[pc].error) if full else True
        setting = "per-channel" if per_channel else "per-tensor"
        best = full.get(per_channel)
        full_error = best.error if best else None
        if best is not None and quantized_ops(best.path).total() == 0:
            kinds = ", ".join(sorted({n.op_type for n in self.nodes})) or "none"
            raise VariantError(
                self.variant,
                f"the quantizer changed no node (candidate operators: {kinds}); it needs "
                "MatMul/Gemm/Conv nodes whose weights are constants",
            )
        if best is not None and best.error <= QUANT_TOLERANCE:
            return Outcome(best, setting, full_error)
        if len(self.nodes) > MAX_SEARCH_NODES:
            if best is None:
                raise VariantError(self.variant, refusal)
            remark = (
                f"outputs are {percent(best.error)} off, above the {percent(QUANT_TOLERANCE)} "
                f"tolerance; no per-node search with {len(self.nodes)} candidate nodes "
                f"(limit {MAX_SEARCH_NODES})"
            )
            return Outcome(best, setting, full_error, remark=remark)
        # Damage of each node quantized alone; refused nodes and hopeless ones stay float32.
        left_out: dict[str, str] = {}
        damage: dict[str, float] = {}
        for node in self.nodes:
            try:
                alone = self.attempt(self.trial, [node.name], (), per_channel)
            except Refused as exc:
                left_out[node.name] = f"{node.op_type}: refused ({exc})"
                continue
            damage[node.name] = alone.error
            if alone.error > QUANT_TOLERANCE:
                left_out[node.name] = (
                    f"{node.op_type}: quantized alone it moves the outputs by "
                    f"{percent(alone.error)}"
                )
        order = sorted(
            (n for n in damage if n not in left_out), key=lambda n: damage[n], reverse=True
        )
        final = self.ctx.workdir / f"{self.variant}-search.onnx"
        chosen: Attempt | None = None
        while order:
            excluded = tuple(left_out)
            try:
                trial = self.attempt(final, None, excluded, per_channel)
            except Refused:
                trial = None
            if trial is not None and trial.error <= QUANT_TOLERANCE:
                chosen = trial
                break
            worst = order.pop(0)
            left_out[worst] = (
                f"{_op(self.nodes, worst)}: left out, worst remaining "
                f"({percent(damage[worst])} alone)"
            )
        if chosen is None:
            full_text = f"{percent(full_error)}" if full_error is not None else "refused"
            raise VariantError(
                self.variant,
                f"no set of nodes quantizes within {percent(QUANT_TOLERANCE)} of the reference "
                f"outputs (all nodes: {full_text}); {_why(left_out)}",
            )
        if quantized_ops(chosen.path).total() == 0:
            raise VariantError(self.variant, "no node could be quantized: " + _why(left_out))
        return Outcome(chosen, setting, full_error, left_out)


def _op(nodes: list[onnx.NodeProto], name: str) -> str:
    return next(node.op_type for node in nodes if node.name == name)


def _why(left_out: dict[str, str]) -> str:
    return "; ".join(f"{n} {why}" for n, why in list(left_out.items())[:6])


def finish(
    ctx: BuildContext,
    outcome: Outcome,
    variant: str,
    technique: str,
    probe_text: str,
    extra_notes: list[str],
    extra_details: dict[str, Any],
) -> BuiltVariant:
    """Move the chosen attempt to ``<variant>.onnx`` and describe it honestly."""
    path = ctx.workdir / f"{variant}.onnx"
    outcome.attempt.path.replace(path)
    for leftover in ctx.workdir.glob(f"{variant}-*.onnx"):
        leftover.unlink()
    ops = quantized_ops(path)
    before, after = file_size(ctx.reference), file_size(path)
    left_out = outcome.left_out
    notes = [
        f"{ops.total()} node(s) quantized ({', '.join(f'{n} {op}' for op, n in ops.items())}); "
        f"file {after} bytes vs {before} ({after / before:.2f}x)",
        f"outputs differ from the reference by {percent(outcome.attempt.error)} (relative RMS on "
        f"{probe_text}); {outcome.setting} weights{', 7-bit' if REDUCE_RANGE else ''}",
    ]
    if left_out:
        full = "refused" if outcome.full_error is None else percent(outcome.full_error)
        notes.append(
            f"quantizing every node moved the outputs by {full}, so {len(left_out)} node(s) stay "
            f"float32: {_why(left_out)}"
        )
    if outcome.remark:
        notes.append(outcome.remark)
    notes.extend(extra_notes)
    return BuiltVariant(
        variant=variant,
        path=path,
        format=ModelFormat.ONNX,
        precision="mixed" if left_out else "int8",
        technique=technique,
        notes=tuple(notes),
        details={
            "quantized_nodes": ops.total(),
            "quantized_ops": dict(ops),
            "float32_nodes": dict(left_out),
            "output_error": outcome.attempt.error,
            "output_error_all_nodes": outcome.full_error,
            "tolerance": QUANT_TOLERANCE,
            "probe": probe_text,
            "per_channel": outcome.setting == "per-channel",
            "weight_type": "int8",
            "reduce_range": REDUCE_RANGE,
            "size_bytes": after,
            "reference_bytes": before,
            "size_change_bytes": after - before,
            **extra_details,
        },
    )


class DynamicInt8Builder:
    """int8 weights, activations quantized at run time (MatMul, Gemm, Conv and friends)."""

    name = "int8-dynamic"
    needs_calibration = False

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        # No graph optimization here: fused nodes would hide MatMuls from the dynamic quantizer.
        prepared, nodes = prepare(ctx, self.name, optimize=False)
        probes, probe_text = probe_inputs(ctx)
        reference_out = run_outputs(ctx.reference, ctx, probes, self.name)

        def quantize(out: Path, only: list[str] | None, exclude: list[str], pc: bool) -> None:
            quantize_dynamic(
                str(prepared),
                str(out),
                per_channel=pc,
                reduce_range=REDUCE_RANGE,
                weight_type=WEIGHT_TYPE,
                nodes_to_quantize=only,
                nodes_to_exclude=exclude,
            )

        search = Search(
            ctx, self.name, quantize, candidates(nodes, DYNAMIC_OPS), probes, reference_out
        )
        outcome = search.run()
        prepared.unlink(missing_ok=True)
        note = (
            "activations are quantized per inference from their observed range; only "
            "MatMul/Gemm/Conv-like operators are covered, the rest stays float32"
        )
        return [finish(ctx, outcome, self.name, "quantize-dynamic", probe_text, [note], {})]


class StaticInt8Builder:
    """int8 weights and activations with ranges from calibration data, in QDQ and QOperator form."""

    name = "int8-static"
    needs_calibration = True

    FORMATS = {"int8-static-qdq": QuantFormat.QDQ, "int8-static-qop": QuantFormat.QOperator}

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        inputs = calibration_inputs(ctx, self.name)[:MAX_CALIBRATION]
        prepared, nodes = prepare(ctx, self.name, optimize=True)
        # Judged on the same samples the ranges come from; the profiler judges on held-out data.
        probes, probe_text = probe_inputs(ctx)
        reference_out = run_outputs(ctx.reference, ctx, probes, self.name)
        ranges = ctx.workdir / f"{self.name}-ranges.json"
        cache = {"calibration_cache_path": str(ranges)} if RANGES_CACHE else {}
        built: list[BuiltVariant] = []
        failures: list[str] = []
        for variant, fmt in self.FORMATS.items():

            def quantize(
                out: Path,
                only: list[str] | None,
                exclude: list[str],
                pc: bool,
                fmt: QuantFormat = fmt,
            ) -> None:
                quantize_static(
                    str(prepared),
                    str(out),
                    Samples(ctx.info.input_name, inputs),
                    quant_format=fmt,
                    per_channel=pc,
                    reduce_range=REDUCE_RANGE,
                    activation_type=ACTIVATION_TYPE,
                    weight_type=WEIGHT_TYPE,
                    nodes_to_quantize=only,
                    nodes_to_exclude=exclude,
                    **cache,
                )

            search = Search(
                ctx, variant, quantize, candidates(nodes, STATIC_OPS), probes, reference_out
            )
            try:
                outcome = search.run()
            except VariantError as exc:
                log.warning("%s", exc)
                failures.append(f"{variant}: {exc.reason}")
                continue
            notes = [
                f"activation ranges from {len(inputs)} calibration samples (MinMax); "
                "uint8 activations, int8 weights"
            ]
            built.append(
                finish(
                    ctx,
                    outcome,
                    variant,
                    "quantize-static",
                    probe_text,
                    notes,
                    {
                        "format": fmt.name,
                        "activation_type": "uint8",
                        "calibration_samples": len(inputs),
                    },
                )
            )
        prepared.unlink(missing_ok=True)
        ranges.unlink(missing_ok=True)
        if not built:
            raise VariantError(self.name, " | ".join(failures))
        missing = tuple(f"not built: {failure}" for failure in failures)
        return [replace(v, notes=(*v.notes, *missing)) for v in built]
