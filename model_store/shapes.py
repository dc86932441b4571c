"""ONNX shape inference on a model's skeleton: its graph with the large weights passed as typed,
shaped inputs instead of their bytes.

``onnx.shape_inference.infer_shapes`` serializes the whole model, parses it in C++ and hands a
full copy back: the weights three or four times over in memory at once (about 300 MB more for a
ResNet-50, the largest step of a profile). Activation types and shapes depend on the weights'
types and shapes only, and on the values of the small constants that shape operators read
(Reshape's shape, Slice's starts, Resize's scales), which stay in the skeleton.
"""

from __future__ import annotations

import onnx

SMALL_BYTES = 4096  # initializers up to this size keep their values in the skeleton


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * 8  # typed fields hold at most 8 bytes an element; an upper bound is enough


def infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """The inferred skeleton of ``model`` and the names of the initializers it passes as inputs.

    Raises what ``onnx.shape_inference.infer_shapes`` raises. ``model`` is not changed.
    """
    graph = model.graph
    inputs = {value.name for value in graph.input}
    kept = [t for t in graph.initializer if _nbytes(t) <= SMALL_BYTES]
    lifted = [t for t in graph.initializer if _nbytes(t) > SMALL_BYTES]
    skeleton_graph = onnx.helper.make_graph(
        list(graph.node),
        graph.name,
        [
            *graph.input,
            *(
                onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in lifted
                if t.name not in inputs
            ),
        ],
        list(graph.output),
        initializer=kept,
        value_info=list(graph.value_info),
        sparse_initializer=list(graph.sparse_initializer),
    )
    skeleton = onnx.helper.make_model(
        skeleton_graph, opset_imports=list(model.opset_import), functions=list(model.functions)
    )
    skeleton.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    return inferred, {t.name for t in lifted if t.name not in inputs}
