"""Write the tiny TFLite test models: one ADD op, ``sum = x + y`` on float32 ``[batch, 4]``.

``tiny_add.tflite`` names its tensors ``x``, ``y``, ``sum`` and has no signature.
``tiny_add_signature.tflite`` names them as the TF converter does (``serving_default_x:0``,
..., ``PartitionedCall:0``) and carries a ``serving_default`` signature mapping ``x``, ``y``
and ``sum`` to them, as converted Keras models do.

The runtime tests need real .tflite files and TensorFlow is not available here, so the models
are written directly with the TFLite flatbuffer schema bindings. Regenerate with::

    pip install tflite==2.18.0 flatbuffers
    python tests/data/make_tiny_add_tflite.py
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import flatbuffers
import tflite

HERE = Path(__file__).parent
WIDTH = 4
SIGNATURE_KEY = "serving_default"
# Signature name -> tensor name, as the TF converter names a Keras model's tensors.
CONVERTER_NAMES = {
    "x": "serving_default_x:0",
    "y": "serving_default_y:0",
    "sum": "PartitionedCall:0",
}


def _int_vector(
    builder: flatbuffers.Builder,
    start: Callable[[flatbuffers.Builder, int], object],
    values: list[int],
) -> int:
    start(builder, len(values))
    for value in reversed(values):
        builder.PrependInt32(value)
    return int(builder.EndVector())


def _tensor(builder: flatbuffers.Builder, name: str) -> int:
    name_off = builder.CreateString(name)
    shape = _int_vector(builder, tflite.TensorStartShapeVector, [1, WIDTH])
    # -1 marks the batch dimension as resizable, as converters do for a dynamic batch.
    signature = _int_vector(builder, tflite.TensorStartShapeSignatureVector, [-1, WIDTH])
    tflite.TensorStart(builder)
    tflite.TensorAddShape(builder, shape)
    tflite.TensorAddShapeSignature(builder, signature)
    tflite.TensorAddType(builder, tflite.TensorType.FLOAT32)
    tflite.TensorAddBuffer(builder, 0)  # buffer 0 is the empty sentinel: an activation
    tflite.TensorAddName(builder, name_off)
    return int(tflite.TensorEnd(builder))


def _offset_vector(
    builder: flatbuffers.Builder,
    start: Callable[[flatbuffers.Builder, int], object],
    offsets: list[int],
) -> int:
    start(builder, len(offsets))
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return int(builder.EndVector())


def _signature(builder: flatbuffers.Builder) -> int:
    maps = {}
    for name, index in (("x", 0), ("y", 1), ("sum", 2)):
        name_off = builder.CreateString(name)
        tflite.TensorMapStart(builder)
        tflite.TensorMapAddName(builder, name_off)
        tflite.TensorMapAddTensorIndex(builder, index)
        maps[name] = tflite.TensorMapEnd(builder)
    inputs = _offset_vector(builder, tflite.SignatureDefStartInputsVector, [maps["x"], maps["y"]])
    outputs = _offset_vector(builder, tflite.SignatureDefStartOutputsVector, [maps["sum"]])
    key = builder.CreateString(SIGNATURE_KEY)
    tflite.SignatureDefStart(builder)
    tflite.SignatureDefAddInputs(builder, inputs)
    tflite.SignatureDefAddOutputs(builder, outputs)
    tflite.SignatureDefAddSignatureKey(builder, key)
    tflite.SignatureDefAddSubgraphIndex(builder, 0)
    return int(tflite.SignatureDefEnd(builder))


def build(*, with_signature: bool) -> bytes:
    """The serialized model, with converter-style tensor names and a signature if asked."""
    builder = flatbuffers.Builder(1024)

    names = [CONVERTER_NAMES[n] if with_signature else n for n in ("x", "y", "sum")]
    tensors = [_tensor(builder, name) for name in names]
    tflite.SubGraphStartTensorsVector(builder, len(tensors))
    for off in reversed(tensors):
        builder.PrependUOffsetTRelative(off)
    tensors_vec = builder.EndVector()

    tflite.AddOptionsStart(builder)
    tflite.AddOptionsAddFusedActivationFunction(builder, tflite.ActivationFunctionType.NONE)
    add_options = tflite.AddOptionsEnd(builder)
    op_inputs = _int_vector(builder, tflite.OperatorStartInputsVector, [0, 1])
    op_outputs = _int_vector(builder, tflite.OperatorStartOutputsVector, [2])
    tflite.OperatorStart(builder)
    tflite.OperatorAddOpcodeIndex(builder, 0)
    tflite.OperatorAddInputs(builder, op_inputs)
    tflite.OperatorAddOutputs(builder, op_outputs)
    tflite.OperatorAddBuiltinOptionsType(builder, tflite.BuiltinOptions.AddOptions)
    tflite.OperatorAddBuiltinOptions(builder, add_options)
    operator = tflite.OperatorEnd(builder)
    tflite.SubGraphStartOperatorsVector(builder, 1)
    builder.PrependUOffsetTRelative(operator)
    operators_vec = builder.EndVector()

    sg_inputs = _int_vector(builder, tflite.SubGraphStartInputsVector, [0, 1])
    sg_outputs = _int_vector(builder, tflite.SubGraphStartOutputsVector, [2])
    sg_name = builder.CreateString("main")
    tflite.SubGraphStart(builder)
    tflite.SubGraphAddTensors(builder, tensors_vec)
    tflite.SubGraphAddInputs(builder, sg_inputs)
    tflite.SubGraphAddOutputs(builder, sg_outputs)
    tflite.SubGraphAddOperators(builder, operators_vec)
    tflite.SubGraphAddName(builder, sg_name)
    subgraph = tflite.SubGraphEnd(builder)
    tflite.ModelStartSubgraphsVector(builder, 1)
    builder.PrependUOffsetTRelative(subgraph)
    subgraphs_vec = builder.EndVector()

    tflite.OperatorCodeStart(builder)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(builder, tflite.BuiltinOperator.ADD)
    tflite.OperatorCodeAddBuiltinCode(builder, tflite.BuiltinOperator.ADD)
    tflite.OperatorCodeAddVersion(builder, 1)
    opcode = tflite.OperatorCodeEnd(builder)
    tflite.ModelStartOperatorCodesVector(builder, 1)
    builder.PrependUOffsetTRelative(opcode)
    opcodes_vec = builder.EndVector()

    tflite.BufferStart(builder)
    empty_buffer = tflite.BufferEnd(builder)
    tflite.ModelStartBuffersVector(builder, 1)
    builder.PrependUOffsetTRelative(empty_buffer)
    buffers_vec = builder.EndVector()

    signatures_vec = (
        _offset_vector(builder, tflite.ModelStartSignatureDefsVector, [_signature(builder)])
        if with_signature
        else None
    )
    description = builder.CreateString("greenfleet test fixture: sum = x + y")
    tflite.ModelStart(builder)
    tflite.ModelAddVersion(builder, 3)
    tflite.ModelAddOperatorCodes(builder, opcodes_vec)
    tflite.ModelAddSubgraphs(builder, subgraphs_vec)
    tflite.ModelAddDescription(builder, description)
    tflite.ModelAddBuffers(builder, buffers_vec)
    if signatures_vec is not None:
        tflite.ModelAddSignatureDefs(builder, signatures_vec)
    model = tflite.ModelEnd(builder)
    builder.Finish(model, file_identifier=b"TFL3")
    return bytes(builder.Output())


def main() -> int:
    for name, with_signature in (("tiny_add.tflite", False), ("tiny_add_signature.tflite", True)):
        out = HERE / name
        out.write_bytes(build(with_signature=with_signature))
        print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
