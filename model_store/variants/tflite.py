"""TFLite variants converted from the reference: fp32, fp16 weights, and int8.

TensorFlow is needed only here, imported when the builder runs (``pip install
'greenfleet[tflite-build]'``); without it the builder refuses with that hint and the pipeline
goes on. The ONNX graph is rebuilt as a TensorFlow function by :mod:`onnx_to_tf` and handed to
the TFLite converter three times:

* ``tflite-fp32``: the same arithmetic; must match the reference closely, else the conversion
  is wrong and nothing is built.
* ``tflite-fp16``: weights stored as float16 (``optimizations=[DEFAULT]``, ``supported_types=
  [float16]``); CPU kernels dequantize them at load, GPU delegates compute in float16.
* ``tflite-int8``: weights and activations int8 with ranges from the calibration inputs
  (``representative_dataset``); float32 input and output are kept, so the agent feeds it like
  the others, and operators without an int8 kernel stay float. Skipped without calibration.
  When full int8 strays too far, a second try keeps the nodes feeding a Log, Sqrt or Pow in
  float32 (TFLite's quantization debugger ``denylisted_nodes``; TFLite tensor names carry the
  ONNX node index, see :mod:`onnx_to_tf`) and reports precision "mixed". That is the
  vibration-ae case: int8 noise in small band powers becomes a large error after the log, and
  as the DFT is in the float part the file is no smaller, only the autoencoder is int8.

Every file is run in a TFLite interpreter (LiteRT if installed, else TensorFlow's) on probe
inputs and compared with the reference; a variant whose outputs stray further than its
tolerance is not returned, and the notes of the others say why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.protocol import ModelFormat, Task
from model_store.errors import ModelStoreError
from model_store.variants.base import BuildContext, BuiltVariant, VariantError
from model_store.variants.reference import (
    file_size,
    load_reference,
    output_error,
    percent,
    probe_inputs,
    run_outputs,
)

VARIANT = "tflite"
FP32_TOLERANCE = 1e-3  # relative RMS: beyond this the conversion itself is wrong
FP16_TOLERANCE = 0.01
INT8_TOLERANCE = 0.05  # as the ONNX int8 builders
MAX_REPRESENTATIVE = 200  # calibration inputs used for int8 ranges
SENSITIVE_OPS = {"Log", "Sqrt", "Pow"}
NO_TENSORFLOW = (
    "TensorFlow is not installed; pip install 'greenfleet[tflite-build]' or import a .tflite "
    "built elsewhere with `greenfleet models add`"
)


def _interpreter(model: bytes) -> Any:
    """A LiteRT interpreter when available (what devices run), else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            # tf.lite.Interpreter warns that it is moving to LiteRT; fine for a build check.
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_content=model)
    return Interpreter(model_content=model)


def run_tflite(model: bytes, inputs: np.ndarray) -> list[np.ndarray]:
    """Each output for each input, one at a time, in the model's signature output order."""
    interpreter = _interpreter(model)
    runner = interpreter.get_signature_runner()
    (input_name,) = runner.get_input_details()
    names = list(runner.get_output_details())
    rows = [runner(**{input_name: x[None]}) for x in inputs.astype(np.float32)]
    return [np.concatenate([row[name] for row in rows]) for name in names]


def signature(model: bytes) -> tuple[list[str], list[str]]:
    """Input and output names of the model's single signature."""
    runner = _interpreter(model).get_signature_runner()
    return list(runner.get_input_details()), list(runner.get_output_details())


def _fidelity(task: Task, reference: list[np.ndarray], got: list[np.ndarray]) -> dict[str, Any]:
    error = output_error(reference, got)
    ref, out = reference[0].reshape(len(reference[0]), -1), got[0].reshape(len(got[0]), -1)
    result: dict[str, Any] = {"output_error": error}
    if ref.shape == out.shape and np.all(np.isfinite(out)):
        result["max_abs_error"] = float(np.max(np.abs(ref - out)))
        if ref.std() > 0 and out.std() > 0:
            result["correlation"] = float(np.corrcoef(ref.ravel(), out.ravel())[0, 1])
        if task is Task.CLASSIFICATION and ref.shape[1] > 1:
            result["agreement"] = float(np.mean(ref.argmax(axis=1) == out.argmax(axis=1)))
    return result


def sensitive_prefix(model: Any) -> set[int]:
    """Indices of the nodes that feed a Log, Sqrt or Pow, with those nodes themselves.

    These compress a wide range (band powers) and magnify int8 noise in small values, so the
    int8 fallback keeps them and everything before them in float32.
    """
    nodes = list(model.graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    prefix: set[int] = set()
    stack = [i for i, node in enumerate(nodes) if node.op_type in SENSITIVE_OPS]
    while stack:
        index = stack.pop()
        if index not in prefix:
            prefix.add(index)
            stack += [producer[name] for name in nodes[index].input if name in producer]
    return prefix


@dataclass
class _Candidate:
    variant: str
    precision: str
    technique: str
    data: bytes
    fidelity: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class TfliteBuilder:
    """fp32, fp16 and int8 TFLite files from the ONNX reference (see the module docstring)."""

    name = "tflite"
    needs_calibration = False

    def build(self, ctx: BuildContext) -> list[BuiltVariant]:
        try:
            import tensorflow as tf
        except ImportError as exc:
            raise VariantError(VARIANT, NO_TENSORFLOW) from exc
        from model_store.variants import onnx_to_tf

        if ctx.calibration is not None:
            try:
                ctx.calibration.check_shape(ctx.info.sample_shape)
            except ModelStoreError as exc:
                raise VariantError(VARIANT, str(exc)) from exc
        model = load_reference(ctx, VARIANT)
        converted = onnx_to_tf.convert(model)
        if converted.output_names != tuple(ctx.info.output_names):
            raise VariantError(
                VARIANT,
                f"graph outputs {list(converted.output_names)} differ from the model's "
                f"{list(ctx.info.output_names)}",
            )
        probes, probe_text = probe_inputs(ctx)
        reference = run_outputs(ctx.reference, ctx, probes, VARIANT)

        def converter(optimize: bool = False) -> Any:
            module = tf.Module()
            module.serve = converted.function
            concrete = converted.function.get_concrete_function()
            c = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
            if optimize:
                c.optimizations = [tf.lite.Optimize.DEFAULT]
            return c

        def check(variant: str, data: bytes) -> dict[str, Any]:
            """Fidelity of a converted file; VariantError if it does not run or lost names."""
            try:
                outputs = run_tflite(data, probes)
                inputs, output_names = signature(data)
            except Exception as exc:  # interpreter errors come as RuntimeError/ValueError
                raise VariantError(variant, f"the TFLite model does not run: {exc}") from exc
            if inputs != [ctx.info.input_name] or output_names != list(ctx.info.output_names):
                raise VariantError(
                    variant,
                    f"the TFLite signature has inputs {inputs} and outputs {output_names}, "
                    f"not {[ctx.info.input_name]} and {list(ctx.info.output_names)}",
                )
            return _fidelity(ctx.info.task, reference, outputs)

        def too_far(fidelity: dict[str, Any], tolerance: float) -> str | None:
            error = fidelity["output_error"]
            if error <= tolerance:
                return None
            return (
                f"outputs differ from the reference by {percent(error)} (relative RMS on "
                f"{probe_text}; at most {percent(tolerance)} accepted)"
            )

        fp32 = _convert(converter())
        fidelity = check("tflite-fp32", fp32)
        if reason := too_far(fidelity, FP32_TOLERANCE):
            raise VariantError(VARIANT, f"the conversion is wrong: {reason}")
        candidates = [_Candidate("tflite-fp32", "fp32", "tflite", fp32, fidelity)]
        skipped: dict[str, str] = {}

        try:
            c = converter(optimize=True)
            c.target_spec.supported_types = [tf.float16]
            data = _convert(c)
            fidelity = check("tflite-fp16", data)
            if reason := too_far(fidelity, FP16_TOLERANCE):
                raise VariantError("tflite-fp16", reason)
            notes = ["float16 weights; CPU kernels dequantize them and compute in float32"]
            candidates.append(
                _Candidate("tflite-fp16", "fp16", "tflite-fp16", data, fidelity, notes)
            )
        except VariantError as exc:
            skipped["tflite-fp16"] = exc.reason

        if ctx.calibration is None:
            skipped["tflite-int8"] = "no calibration data for activation ranges (--calibration)"
        else:
            samples = np.asarray(ctx.calibration.inputs[:MAX_REPRESENTATIVE], dtype=np.float32)

            def representative() -> Iterator[list[np.ndarray]]:
                for x in samples:
                    yield [x[None]]

            try:
                candidates.append(
                    self._int8(tf, converter, representative, check, too_far, model, fp32)
                )
            except VariantError as exc:
                skipped["tflite-int8"] = exc.reason

        before = file_size(ctx.reference)
        results = []
        for candidate in candidates:
            path = ctx.workdir / f"{candidate.variant}.tflite"
            path.write_bytes(candidate.data)
            size = file_size(path)
            notes = [
                f"file {size} bytes vs {before} for the ONNX reference ({size / before:.2f}x)",
                f"outputs within {percent(candidate.fidelity['output_error'])} of the reference "
                f"(relative RMS on {probe_text})",
                *candidate.notes,
                *(f"{name} not built: {why}" for name, why in skipped.items()),
            ]
            results.append(
                BuiltVariant(
                    variant=candidate.variant,
                    path=path,
                    format=ModelFormat.TFLITE,
                    precision=candidate.precision,
                    technique=candidate.technique,
                    notes=tuple(notes),
                    details={
                        **candidate.fidelity,
                        "probe": probe_text,
                        "size_bytes": size,
                        "reference_bytes": before,
                        "tensorflow": tf.__version__,
                        "skipped": dict(skipped),
                    },
                )
            )
        return results

    def _int8(
        self,
        tf: Any,
        converter: Callable[[bool], Any],
        representative: Callable[[], Iterator[list[np.ndarray]]],
        check: Callable[[str, bytes], dict[str, Any]],
        too_far: Callable[[dict[str, Any], float], str | None],
        model: Any,
        fp32: bytes,
    ) -> _Candidate:
        """Full int8 if close enough; else int8 after a float32 feature-extraction prefix."""
        from model_store.variants import onnx_to_tf

        c = converter(True)
        c.representative_dataset = representative
        data = _convert(c, "tflite-int8")
        fidelity = check("tflite-int8", data)
        full_reason = too_far(fidelity, INT8_TOLERANCE)
        if full_reason is None:
            notes = ["int8 weights and activations, float32 input and output"]
            return _Candidate("tflite-int8", "int8", "tflite-int8", data, fidelity, notes)
        prefix = sensitive_prefix(model)
        if not prefix:
            raise VariantError("tflite-int8", full_reason)
        # Tensors of the float model whose ops come from the prefix nodes stay float32.
        names = [d["name"] for d in _interpreter(fp32).get_tensor_details()]
        denied = [n for n in names if onnx_to_tf.node_indices(n) & prefix]
        c = converter(True)
        c.representative_dataset = representative
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denied)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                debugger = tf.lite.experimental.QuantizationDebugger(
                    converter=c, debug_dataset=representative, debug_options=options
                )
                data = bytes(debugger.get_nondebug_quantized_model())
        except Exception as exc:  # converter and debugger errors of many kinds
            raise VariantError(
                "tflite-int8", f"full int8 {full_reason}; selective int8 failed: {exc}"
            ) from exc
        fidelity = check("tflite-int8", data)
        if reason := too_far(fidelity, INT8_TOLERANCE):
            raise VariantError(
                "tflite-int8", f"full int8 {full_reason}; with the prefix in float32 {reason}"
            )
        total = len(model.graph.node)
        notes = [
            f"full int8 was refused: {full_reason}",
            f"{len(prefix)} of {total} ONNX nodes (everything up to the Log/Sqrt/Pow feature "
            "extraction) stay float32, the rest is int8; float32 input and output",
        ]
        return _Candidate("tflite-int8", "mixed", "tflite-int8", data, fidelity, notes)


def _convert(c: Any, variant: str = "tflite") -> bytes:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bytes(c.convert())
    except Exception as exc:  # the converter raises ConverterError and friends
        raise VariantError(variant, f"the TFLite converter failed: {str(exc)[:500]}") from exc
