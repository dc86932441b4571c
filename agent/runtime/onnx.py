"""ONNX models on onnxruntime's CPU execution provider."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, InvalidProtobuf

from agent.protocol import ModelFormat
from agent.runtime.base import (
    InferenceError,
    ModelLoadError,
    TensorSpec,
    check_model_file,
    check_threads,
    describe_feeds,
    describe_specs,
)

if TYPE_CHECKING:
    import numpy as np

# onnxruntime element types as numpy dtype names; types numpy lacks keep their ONNX name.
_DTYPES = {
    "float": "float32",
    "double": "float64",
    "float16": "float16",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "string": "object",
}

# What onnxruntime raises when the bytes do not parse as an ONNX model at all.
_CORRUPT = (InvalidProtobuf, InvalidArgument)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def _dtype_name(ort_type: str) -> str:
    if ort_type.startswith("tensor(") and ort_type.endswith(")"):
        element = ort_type[len("tensor(") : -1]
        return _DTYPES.get(element, element)
    return ort_type


def _spec(arg: Any) -> TensorSpec:
    # Symbolic dims come back as strings ("batch") and unknown ones as None.
    shape = tuple(d if isinstance(d, int) else None for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, shape=shape, dtype=_dtype_name(arg.type))


class OnnxModel:
    """An ONNX model in an onnxruntime session; build it with :meth:`load`."""

    format = ModelFormat.ONNX
    provider = "onnxruntime"

    def __init__(self, path: Path, session: ort.InferenceSession) -> None:
        self.path = path
        self._session: ort.InferenceSession | None = session
        self.inputs = tuple(_spec(arg) for arg in session.get_inputs())
        self.outputs = tuple(_spec(arg) for arg in session.get_outputs())
        self._output_names = [spec.name for spec in self.outputs]
        # a one-output model's result dict is built as a literal: ``dict(zip(...))`` costs
        # ~3 us per run right after the model (benchmarks/README.md, "Inference overhead")
        self._only_output = self._output_names[0] if len(self._output_names) == 1 else None
        # The session's C++ run, called directly: the Python ``InferenceSession.run`` checks
        # the feed's names and owners on every call (~6 us of a 40 us model on a 2-core EPYC),
        # and the agent builds its feeds from this model's own input names. A wrong name or
        # shape still fails, in C++, as an InferenceError.
        self._run = getattr(session, "_sess", session).run

    @classmethod
    def load(cls, path: Path, *, threads: int = 1) -> OnnxModel:
        """Open ``path`` on the CPU with ``threads`` intra-op threads."""
        check_threads(threads)
        check_model_file(path, "ONNX")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except _CORRUPT as exc:
            raise ModelLoadError(
                f"{path} is not a valid ONNX model ({_gist(exc)}): the file is corrupt "
                "or truncated; fetch it again and check its sha256"
            ) from exc
        except Exception as exc:
            raise ModelLoadError(
                f"onnxruntime {ort.__version__} cannot load {path} ({_gist(exc)}); "
                "it may not be a valid ONNX model, or it uses operators or an opset this "
                "onnxruntime does not support: re-export it or upgrade onnxruntime"
            ) from exc
        return cls(path, session)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; feeds are passed to onnxruntime as they are, unchecked."""
        try:
            values = self._run(self._output_names, feeds, None)
        except Exception as exc:
            raise self._inference_error(feeds, exc) from exc
        if self._only_output is not None:
            return {self._only_output: values[0]}
        return dict(zip(self._output_names, values, strict=False))  # as many as were named

    def close(self) -> None:
        """Drop the session; onnxruntime frees it once no run is in flight."""
        self._session = None
        self._run = _closed

    def _inference_error(self, feeds: dict[str, Any], exc: Exception) -> InferenceError:
        if self._session is None:
            return InferenceError(f"ONNX model {self.path} is closed; load it again to run it")
        return InferenceError(
            f"inference on {self.path} failed: {_gist(exc)}; got {describe_feeds(feeds)}; "
            f"the model takes {describe_specs(self.inputs)}"
        )


def _closed(*args: Any) -> list[Any]:
    raise RuntimeError("the session is closed")


def _gist(exc: BaseException) -> str:
    """An onnxruntime message on one line, without its '[ONNXRuntimeError] : 2 : ...' prefix."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return _ORT_PREFIX.sub("", text)
