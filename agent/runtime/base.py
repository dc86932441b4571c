"""What every inference backend provides, and the errors the runtime package raises.

Error tree (third-party errors are translated into these at the backend boundary)::

    ModelRuntimeError            anything raised by agent.runtime
     ├── ModelLoadError          the file cannot become a runnable model: backend not
     │                           installed, file missing, corrupt or truncated, unsupported
     │                           ops. Fatal for that artifact: fetch it again or fall back to
     │                           another variant; loading it again as-is will fail again.
     └── InferenceError          one run() failed: feeds with wrong names, shapes or dtypes,
                                 or the runtime failed. The model stays loaded; a model that
                                 keeps failing should be demoted to the next tier.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from agent.errors import AgentError

if TYPE_CHECKING:
    import numpy as np

    from agent.protocol import ModelFormat


class ModelRuntimeError(AgentError):
    """Base of the errors raised by :mod:`agent.runtime` (the model store on the controller
    catches it too, by this name)."""


class ModelLoadError(ModelRuntimeError):
    """A model file could not be loaded; the message names the file and what to do."""


class InferenceError(ModelRuntimeError):
    """One inference call failed; the message names the model file and the offending feed."""


class TensorSpec(msgspec.Struct, frozen=True):
    """One model input or output: name, shape (``None`` for a dynamic dim), numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


class LoadedModel(Protocol):
    """A model ready to run. Not thread-safe: one caller runs a given model at a time."""

    format: ModelFormat
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; raises :class:`InferenceError` on bad feeds or a runtime failure."""
        ...

    def close(self) -> None:
        """Release the runtime's resources; ``run`` raises :class:`InferenceError` after it."""
        ...


def check_model_file(path: Path, kind: str) -> None:
    """Raise :class:`ModelLoadError` unless ``path`` is a non-empty regular file."""
    if not path.exists():
        raise ModelLoadError(f"{kind} model file {path} does not exist; deploy the model again")
    if not path.is_file():
        raise ModelLoadError(f"{kind} model path {path} is not a regular file")
    if path.stat().st_size == 0:
        raise ModelLoadError(
            f"{path} is not a valid {kind} model: the file is empty (truncated transfer?); "
            "fetch it again and check its sha256"
        )


def check_threads(threads: int) -> None:
    """Reject a thread count a runtime would misread (0 means 'all cores' to some)."""
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")


def describe_feeds(feeds: dict[str, Any]) -> str:
    """``name: shape dtype`` for each feed, for error messages; tolerates non-arrays."""
    parts = []
    for name, value in feeds.items():
        shape = getattr(value, "shape", None)
        dtype = getattr(value, "dtype", None)
        if shape is None or dtype is None:
            parts.append(f"{name}: {type(value).__name__}")
        else:
            parts.append(f"{name}: {tuple(shape)} {dtype}")
    return ", ".join(parts) or "no feeds"


def describe_specs(specs: tuple[TensorSpec, ...]) -> str:
    """``name: shape dtype`` for each spec, ``None`` dims shown as ``?``."""
    return ", ".join(f"{s.name}: {_shape_text(s.shape)} {s.dtype}" for s in specs)


def _shape_text(shape: tuple[int | None, ...]) -> str:
    dims = ["?" if d is None else str(d) for d in shape]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
