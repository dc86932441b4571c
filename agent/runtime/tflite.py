"""TFLite models on LiteRT (``ai-edge-litert``), or on the older ``tflite-runtime`` package.

Inputs and outputs are named by the model's signature when it has exactly one (as converted
Keras models do: ``window`` rather than ``serving_default_window:0``), else by tensor name.

LiteRT verifies a file's flatbuffer before reading it; tflite-runtime does not, and a corrupt
file can kill the whole process with SIGSEGV or SIGBUS inside ``Interpreter()``. With
tflite-runtime a file is therefore opened once in a throwaway child process first.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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

try:
    from ai_edge_litert.interpreter import Interpreter

    PROVIDER = "ai-edge-litert"
except ImportError as litert_error:
    try:
        from tflite_runtime.interpreter import Interpreter

        PROVIDER = "tflite-runtime"
    except ImportError:
        raise ImportError(
            f"neither ai-edge-litert nor tflite-runtime can be imported ({litert_error})"
        ) from litert_error

if TYPE_CHECKING:
    from collections.abc import Iterable

logger = logging.getLogger(__name__)

CHECK_IN_CHILD = PROVIDER == "tflite-runtime"
CHILD_TIMEOUT_S = 60.0
_CHILD_CHECK = f"""
import sys
from {Interpreter.__module__} import Interpreter
Interpreter(model_path=sys.argv[1]).allocate_tensors()
"""


def _open_in_child(path: Path) -> None:
    """Raise :class:`ModelLoadError` if opening ``path`` crashes or hangs a child process.

    Errors the runtime raises as Python exceptions are left for the in-process load to report.
    """
    try:
        result = subprocess.run(
            [sys.executable, "-c", _CHILD_CHECK, str(path)],
            capture_output=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelLoadError(
            f"{path} did not open within {CHILD_TIMEOUT_S:.0f} s in {PROVIDER}; it is probably "
            "not a valid TFLite model: fetch it again and check its sha256"
        ) from exc
    except OSError as exc:  # no usable sys.executable (embedded or frozen interpreter)
        logger.warning("cannot check %s in a child process (%s); loading it unchecked", path, exc)
        return
    if result.returncode < 0:
        try:
            died_of = signal.Signals(-result.returncode).name
        except ValueError:
            died_of = f"signal {-result.returncode}"
        raise ModelLoadError(
            f"{path} is not a valid TFLite model: opening it crashed {PROVIDER} ({died_of}) "
            "in a check process; the file is corrupt or truncated: fetch it again and check "
            "its sha256"
        )


def _spec(name: str, detail: dict[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = detail["shape"] if signature is None or len(signature) == 0 else signature
    shape = tuple(None if int(d) < 0 else int(d) for d in dims)
    return TensorSpec(name=name, shape=shape, dtype=np.dtype(detail["dtype"]).name)


def _signature_names(
    interpreter: Any, inputs: Iterable[dict[str, Any]], outputs: Iterable[dict[str, Any]]
) -> tuple[dict[int, str], dict[int, str]] | None:
    """Tensor index -> signature name for inputs and outputs, if one signature covers them."""
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        return None
    # The runner holds a reference into the interpreter, and while it lives LiteRT refuses
    # allocate_tensors(); keep it local so it is gone when this returns.
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    by_index_in = {d["index"]: name for name, d in runner.get_input_details().items()}
    by_index_out = {d["index"]: name for name, d in runner.get_output_details().items()}
    del runner
    if set(by_index_in) != {d["index"] for d in inputs} or set(by_index_out) != {
        d["index"] for d in outputs
    }:
        return None  # the signature runs another subgraph than the one we drive
    return by_index_in, by_index_out


class TfliteModel:
    """A TFLite model in a LiteRT interpreter; build it with :meth:`load`."""

    format = ModelFormat.TFLITE
    provider = PROVIDER

    def __init__(self, path: Path, interpreter: Any) -> None:
        """Wrap an interpreter whose tensors are not yet allocated."""
        self.path = path
        input_details = interpreter.get_input_details()
        output_details = interpreter.get_output_details()
        names = _signature_names(interpreter, input_details, output_details)
        in_names, out_names = names or (
            {d["index"]: d["name"] for d in input_details},
            {d["index"]: d["name"] for d in output_details},
        )
        self.inputs = tuple(_spec(in_names[d["index"]], d) for d in input_details)
        self.outputs = tuple(_spec(out_names[d["index"]], d) for d in output_details)
        self._input_index = {in_names[d["index"]]: d["index"] for d in input_details}
        self._outputs = tuple((out_names[d["index"]], d["index"]) for d in output_details)
        # Shapes the tensors are allocated for now; a feed of another shape triggers a resize.
        self._shapes = {d["index"]: tuple(int(x) for x in d["shape"]) for d in input_details}
        interpreter.allocate_tensors()
        self._interpreter: Any = interpreter

    @classmethod
    def load(cls, path: Path, *, threads: int = 1) -> TfliteModel:
        """Open ``path`` with ``threads`` interpreter threads."""
        check_threads(threads)
        check_model_file(path, "TFLite")
        if CHECK_IN_CHILD:
            _open_in_child(path)
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
        except Exception as exc:  # LiteRT raises ValueError for bytes that do not verify
            raise ModelLoadError(
                f"{path} is not a valid TFLite model ({_gist(exc)}): the file is corrupt or "
                "truncated; fetch it again and check its sha256"
            ) from exc
        try:
            return cls(path, interpreter)
        except Exception as exc:  # RuntimeError from allocate_tensors
            raise ModelLoadError(
                f"{path} is not a valid TFLite model for {PROVIDER} ({_gist(exc)}): the file "
                "is corrupt or truncated (fetch it again and check its sha256), or it uses "
                "operators this runtime lacks (re-convert it or upgrade the runtime)"
            ) from exc

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; a feed whose shape differs from the last one resizes the model first."""
        interpreter = self._interpreter
        if interpreter is None:
            raise InferenceError(f"TFLite model {self.path} is closed; load it again to run it")
        indexed: list[tuple[int, Any]] | None
        try:
            indexed = [(self._input_index[name], value) for name, value in feeds.items()]
        except KeyError:
            indexed = None
        if indexed is None or len(indexed) != len(self._input_index):
            raise InferenceError(
                f"inference on {self.path} needs exactly the inputs "
                f"{sorted(self._input_index)}; got {describe_feeds(feeds)}"
            )
        try:
            if any(value.shape != self._shapes[index] for index, value in indexed):
                self._resize(indexed, feeds)
            for index, value in indexed:
                interpreter.set_tensor(index, value)
            interpreter.invoke()
            return {name: interpreter.get_tensor(index) for name, index in self._outputs}
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(
                f"inference on {self.path} failed: {_gist(exc)}; got {describe_feeds(feeds)}; "
                f"the model takes {describe_specs(self.inputs)}"
            ) from exc

    def close(self) -> None:
        """Drop the interpreter; its memory is freed with the last reference."""
        self._interpreter = None

    def _resize(self, indexed: list[tuple[int, Any]], feeds: dict[str, Any]) -> None:
        """Reallocate for the feeds' shapes; on failure go back to the previous shapes."""
        interpreter = self._interpreter
        previous = dict(self._shapes)
        wanted = {index: tuple(value.shape) for index, value in indexed}
        bad_rank = [i for i, shape in wanted.items() if len(shape) != len(previous[i])]
        if bad_rank:
            raise InferenceError(
                f"inference on {self.path} failed: wrong number of dimensions; got "
                f"{describe_feeds(feeds)}; the model takes {describe_specs(self.inputs)}"
            )
        try:
            for index, shape in wanted.items():
                interpreter.resize_tensor_input(index, list(shape))
            interpreter.allocate_tensors()
        except Exception as exc:
            for index, shape in previous.items():
                interpreter.resize_tensor_input(index, list(shape))
            interpreter.allocate_tensors()
            raise InferenceError(
                f"{self.path} cannot run on these input shapes ({_gist(exc)}); got "
                f"{describe_feeds(feeds)}; the model takes {describe_specs(self.inputs)}"
            ) from exc
        self._shapes = wanted


def _gist(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
