"""The fp32 reference as builders see it: loading it, probe inputs, and output error.

Shared by the fp16, quantize, prune, distill, rules and TFLite builders, so every variant is
checked against the reference the same way before the profiler measures it properly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from model_store.errors import ModelStoreError
from model_store.variants.base import BuildContext, Calibration, VariantError

PROBE_COUNT = 32  # inputs the variants are compared on; enough to see a broken variant
PROBE_SEED = 20240611


def load_reference(ctx: BuildContext, variant: str) -> onnx.ModelProto:
    """The reference model, checked; VariantError if it is not a valid ONNX model."""
    try:
        model = onnx.load(str(ctx.reference))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError, ...
        raise VariantError(
            variant, f"the reference {ctx.reference} is not a valid ONNX model: {exc}"
        ) from exc
    return model


def probe_inputs(ctx: BuildContext, count: int = PROBE_COUNT) -> tuple[np.ndarray, str]:
    """Inputs to compare a variant with the reference on, and a phrase saying what they are.

    Calibration samples when there are any (they look like real data); otherwise seeded
    standard-normal noise, which at least exercises every weight.
    """
    if ctx.calibration is not None and len(ctx.calibration.inputs):
        inputs = np.asarray(ctx.calibration.inputs[:count], dtype=np.float32)
        return inputs, f"{len(inputs)} calibration samples"
    rng = np.random.default_rng(PROBE_SEED)
    inputs = rng.standard_normal((count, *ctx.info.sample_shape)).astype(np.float32)
    return inputs, f"{count} standard-normal random inputs (no calibration data given)"


def session(model: Path | bytes, variant: str) -> ort.InferenceSession:
    """A single-threaded CPU session; VariantError if onnxruntime cannot load the model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    try:
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/NotImplemented/... types
        detail = " ".join(str(exc).split())[:300]  # onnxruntime's messages run to 2,000 chars
        raise VariantError(variant, f"onnxruntime cannot load the result: {detail}") from exc


def run_outputs(
    model: Path | bytes,
    ctx: BuildContext,
    inputs: np.ndarray | Iterable[np.ndarray],
    variant: str,
) -> list[np.ndarray]:
    """Each output of ``model`` for each input, one sample at a time: ``[N, *output]`` per name.

    ``inputs`` is one ``[N, *sample]`` array or chunks of them in order, so a caller that makes
    inputs on the fly (the distilled student's augmented images) never holds them all.
    Also checks that the model keeps the reference's interface: float32 input and outputs under
    the same names, so the agent can feed it exactly like the reference.
    """
    chunks = [inputs] if isinstance(inputs, np.ndarray) else inputs
    if isinstance(inputs, np.ndarray):
        _check_shape(inputs, ctx, variant)
    sess = session(model, variant)
    feeds = {i.name: i.type for i in sess.get_inputs()}
    fetches = {o.name: o.type for o in sess.get_outputs()}
    if feeds != {ctx.info.input_name: "tensor(float)"}:
        raise VariantError(
            variant, f"inputs changed: expected {ctx.info.input_name} float32, got {feeds}"
        )
    names = list(ctx.info.output_names)
    if any(fetches.get(name) != "tensor(float)" for name in names):
        raise VariantError(variant, f"outputs changed: expected {names} as float32, got {fetches}")
    rows = []
    for chunk in chunks:
        _check_shape(chunk, ctx, variant)
        try:
            rows += [
                sess.run(names, {ctx.info.input_name: chunk[i : i + 1]}) for i in range(len(chunk))
            ]
        except Exception as exc:
            raise VariantError(variant, f"onnxruntime fails running the result: {exc}") from exc
    return [np.concatenate([np.asarray(row[k]) for row in rows]) for k in range(len(names))]


def _check_shape(inputs: np.ndarray, ctx: BuildContext, variant: str) -> None:
    try:
        Calibration(inputs).check_shape(ctx.info.sample_shape)
    except ModelStoreError as exc:
        raise VariantError(variant, str(exc)) from exc


def output_error(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Relative RMS error, worst over the outputs: ``rms(candidate - ref) / rms(ref)``.

    Non-finite candidate values count as an infinite error.
    """
    worst = 0.0
    for ref, got in zip(reference, candidate, strict=True):
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        if ref64.shape != got64.shape or not np.all(np.isfinite(got64)):
            return float("inf")
        finite = np.isfinite(ref64)
        scale = max(float(np.sqrt(np.mean(ref64[finite] ** 2))) if finite.any() else 0.0, 1e-12)
        diff = (
            float(np.sqrt(np.mean((got64[finite] - ref64[finite]) ** 2))) if finite.any() else 0.0
        )
        worst = max(worst, diff / scale)
    return worst


def file_size(path: Path) -> int:
    return path.stat().st_size


def percent(fraction: float) -> str:
    return "inf" if not np.isfinite(fraction) else f"{100 * fraction:.2f}%"


# ---------------------------------------------------------------------------------- fp16 builder


def calibration_inputs(ctx: BuildContext, variant: str, minimum: int = 1) -> np.ndarray:
    """The building calibration inputs as float32, or VariantError saying what is missing."""
    if ctx.calibration is None:
        raise VariantError(variant, "needs calibration data: pass --calibration FILE")
    try:
        ctx.calibration.check_shape(ctx.info.sample_shape)
    except ModelStoreError as exc:
        raise VariantError(variant, str(exc)) from exc
    if len(ctx.calibration.inputs) < minimum:
        raise VariantError(
            variant,
            f"needs at least {minimum} calibration inputs, got {len(ctx.calibration.inputs)}",
        )
    return np.asarray(ctx.calibration.inputs, dtype=np.float32)


MIN_OPSET = 13  # per-channel QDQ quantization and the builders' ops need opset 13 or later


def normalize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The graph in the layout the builders expect, and what was changed.

    Exporters before IR version 4 listed every weight among the graph inputs as well as the
    initializers; onnxruntime then treats the weights as overridable inputs, keeps them out of
    constant folding, and a builder that converts initializers (fp16) leaves a float32 input
    over a float16 initializer. Such inputs are dropped (IR 4 allows it), the IR version is
    raised to 4, and an opset below MIN_OPSET is converted up where onnx's converter can."""
    changes: list[str] = []
    weights = {t.name for t in model.graph.initializer}
    overlap = [i for i in model.graph.input if i.name in weights]
    if overlap:
        for item in overlap:
            model.graph.input.remove(item)
        changes.append(f"{len(overlap)} weight(s) taken out of the graph inputs")
    if model.ir_version < 4:
        changes.append(f"IR version {model.ir_version} -> 4")
        model.ir_version = 4
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < MIN_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, MIN_OPSET)
            changes.append(f"opset {opset} -> {MIN_OPSET}")
        except Exception as exc:  # the converter lacks adapters for some ops
            changes.append(f"opset {opset} kept (onnx cannot convert it: {str(exc)[:120]})")
    return model, changes


def optimize_reference(source: Path, target: Path) -> tuple[Path, list[str]]:
    """The fp32 reference: the source, normalized (:func:`normalize`), with onnxruntime's
    portable graph optimizations applied; and what normalizing changed."""
    import onnxruntime as ort

    try:
        model, changes = normalize(onnx.load(str(source)))
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError, ...
        raise VariantError("fp32", f"cannot read the source as ONNX: {str(exc)[:300]}") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    # unchanged, onnxruntime reads the file itself (a model over 2 GiB cannot be serialized)
    source_or_bytes: str | bytes = model.SerializeToString() if changes else str(source)
    try:
        ort.InferenceSession(source_or_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        detail = " ".join(str(exc).split())[:300]
        raise VariantError("fp32", f"onnxruntime cannot optimize the source: {detail}") from exc
    return target, changes
